//! Watches upstream services and publishes endpoint snapshots; the capped Directory.
