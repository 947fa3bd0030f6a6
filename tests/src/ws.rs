//! A WebSocket echo server for the tests that run WebSockets through the
//! proxy: it counts its open connections, so a test can see the proxy close
//! the endpoint's side too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// A running echo server; stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Upgraded connections open right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Undoes one count in `open` however the connection's task ends.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A WebSocket server on a loopback port of its own choosing, echoing every
/// text message prefixed with `name:` and every binary message as is.
pub async fn echo_server(name: &'static str) -> EchoServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the echo server");
    let addr = listener.local_addr().expect("the echo server's address");
    let open = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&open);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let _counted = Counted(counter);
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("{name}:{t}")),
                        Message::Binary(b) => Message::binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    EchoServer { addr, open, task }
}
