//! Retry policy and retry budget.
