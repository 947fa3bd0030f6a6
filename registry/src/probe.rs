//! `registry probe`: a healthcheck for images without a shell or curl.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// True when `GET /health` on `addr` answers 200 within `timeout`.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        // The connection is driven beside the request; it ends with it.
        tokio::spawn(conn);
        let req = Request::get("/health")
            .header(header::HOST, addr.to_string())
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        match resp.status() {
            StatusCode::OK => Ok(()),
            other => Err(format!("unexpected answer {other}")),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// The address to probe for a listen address: loopback for a wildcard.
pub fn local_addr_for(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::Response;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn passes_only_on_a_200() {
        for (status, passes) in [(200, true), (503, false)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(
                        Response::builder().status(status).body(Empty::<Bytes>::new()).unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            let result = probe(addr, Duration::from_secs(10)).await;
            println!("{status}: {result:?}");
            assert_eq!(result.is_ok(), passes, "{status}: {result:?}");
        }
    }
}
