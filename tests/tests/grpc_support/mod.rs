//! gRPC test servers and calls shared by the gRPC tests (through the
//! outbound proxy, and through the inbound side): tonic's server machinery
//! with a raw-bytes codec, so no protobuf code generation and no `protoc`.
//! `/test.Echo/Unary` answers the instance name after sleeping the number of
//! milliseconds in the request, `/test.Echo/Stream` streams `name:i` for i
//! below the number in the request.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::Status;

// ---- A raw-bytes gRPC codec.

#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// ---- The tonic test server.

fn number(b: &Bytes) -> u64 {
    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

pub async fn dispatch(name: Arc<str>, req: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
    let mut grpc = tonic::server::Grpc::new(Raw);
    match req.uri().path() {
        "/test.Echo/Unary" => {
            let svc = tower::service_fn(move |r: tonic::Request<Bytes>| {
                let name = Arc::clone(&name);
                async move {
                    tokio::time::sleep(Duration::from_millis(number(r.get_ref()))).await;
                    Ok::<_, Status>(tonic::Response::new(Bytes::from(name.to_string())))
                }
            });
            grpc.unary(svc, req).await
        }
        "/test.Echo/Stream" => {
            let svc = tower::service_fn(move |r: tonic::Request<Bytes>| {
                let name = Arc::clone(&name);
                let n = number(r.get_ref());
                async move {
                    let s = futures_util::stream::unfold(0u64, move |i| {
                        let name = Arc::clone(&name);
                        async move {
                            if i >= n {
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Some((Ok::<_, Status>(Bytes::from(format!("{name}:{i}"))), i + 1))
                        }
                    });
                    Ok::<_, Status>(tonic::Response::new(Box::pin(s)))
                }
            });
            grpc.server_streaming(svc, req).await
        }
        _ => {
            let svc = tower::service_fn(|_r: tonic::Request<Bytes>| async {
                Err::<tonic::Response<Bytes>, _>(Status::unimplemented("no such method"))
            });
            grpc.unary(svc, req).await
        }
    }
}

/// Serves gRPC (h2c) on `listener` until the task is dropped; counts calls.
pub async fn serve_grpc(name: String, listener: TcpListener, calls: Arc<AtomicUsize>) {
    let name: Arc<str> = Arc::from(name);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let name = Arc::clone(&name);
        let calls = Arc::clone(&calls);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let name = Arc::clone(&name);
                async move { Ok::<_, Infallible>(dispatch(name, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub struct GrpcServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn grpc_server(name: &str) -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(serve_grpc(name.to_string(), listener, Arc::clone(&calls)));
    GrpcServer { addr, calls, task }
}

// ---- Calls.

pub async fn unary(ch: &Channel, payload: &str, timeout: Option<Duration>) -> Result<String, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(Bytes::from(payload.to_string()));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let r = g.unary(req, PathAndQuery::from_static("/test.Echo/Unary"), Raw).await?;
    Ok(String::from_utf8_lossy(r.get_ref()).into_owned())
}

pub async fn call_path(ch: &Channel, path: &'static str) -> Result<String, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let r =
        g.unary(tonic::Request::new(Bytes::from_static(b"0")), PathAndQuery::from_static(path), Raw).await?;
    Ok(String::from_utf8_lossy(r.get_ref()).into_owned())
}

pub async fn stream(ch: &Channel, n: usize) -> Result<Vec<String>, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let req = tonic::Request::new(Bytes::from(n.to_string()));
    let mut s =
        g.server_streaming(req, PathAndQuery::from_static("/test.Echo/Stream"), Raw).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(String::from_utf8_lossy(&m).into_owned());
    }
    Ok(out)
}
