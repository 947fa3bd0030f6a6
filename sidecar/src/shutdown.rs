//! Ordered, bounded shutdown.
