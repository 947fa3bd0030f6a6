//! Registers the local app and heartbeats its health.
