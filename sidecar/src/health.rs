//! Checks of the local app's health with thresholds.
