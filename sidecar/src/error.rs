//! Errors the sidecar produces, mapped to status and JSON body in one place.
