//! Ports for binaries that cannot report what they bound (etcd, HAProxy,
//! nginx): they must be told their ports, and etcd's members must know each
//! other's before any of them runs.
//!
//! Our own binaries never need this: they take port 0 and write a ready file
//! (see `ready.rs`). Here the port is one the kernel just handed out and took
//! back, so another process may bind it before the child does. That race is
//! not ignored: the child then exits with "address already in use"
//! ([`crate::Proc::lost_port_race`]) and the caller starts it again on fresh
//! ports, up to [`ATTEMPTS`] times.

use std::net::{SocketAddr, TcpListener};

/// How many times a caller starts a foreign binary on fresh ports.
pub const ATTEMPTS: usize = 3;

/// A loopback address for a binary that cannot take port 0.
pub fn foreign_binary_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}
