//! Taking the next connection off a listening socket, the same way in every
//! accept loop (the registry's, the sidecar's outbound, inbound and admin
//! listeners): stop as soon as shutdown begins, and survive accept errors.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// After a failed accept, the loop waits this long before trying again. The
/// usual cause is running out of file descriptors, which persists until some
/// connection closes: retrying at once would spin a core on the error.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The next connection, or `None` once `stop` completes (checked first, so a
/// listener with a backlog cannot delay shutdown). Errors are logged with
/// `what` naming the listener, and followed by [`ACCEPT_ERROR_PAUSE`].
pub async fn next<F>(listener: &TcpListener, stop: F, what: &'static str) -> Option<(TcpStream, SocketAddr)>
where
    F: Future<Output = ()>,
{
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed; pausing");
                tokio::select! {
                    biased;
                    _ = &mut stop => return None,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_over_a_connection_and_stops_when_told() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (_stream, peer) = next(&listener, std::future::pending(), "test").await.expect("a connection");
        let ours = client.await.expect("join").expect("connect");
        assert_eq!(peer, ours.local_addr().expect("local addr"));

        // A connection waits in the backlog, but stopping comes first.
        let _waiting = TcpStream::connect(addr).await.expect("connect");
        assert!(next(&listener, std::future::ready(()), "test").await.is_none());
    }
}
