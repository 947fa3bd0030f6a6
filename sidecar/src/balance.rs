//! Least-connections endpoint selection, a pure data structure.
