//! The admin listener: /ready, /metrics, /endpoints.
