//! Passive outlier detection (placeholder until the data-plane work lands).

/// Per-endpoint outlier state.
#[derive(Debug, Default)]
pub struct OutlierState {}
