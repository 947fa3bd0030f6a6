//! A minimal HTTP/1.1 response reader for the load generators: no allocation
//! per response, keep-alive, `content-length` and chunked bodies.
//!
//! The generators must cost as little CPU as possible, because on two cores
//! they share a core with the backends; a full client (hyper) would make the
//! load side the limit sooner.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

/// What a buffer holds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes.
    Incomplete,
    /// One whole response of `len` bytes is at the front of the buffer.
    Complete { status: u16, len: usize, close: bool },
}

/// The buffer does not hold an HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed HTTP response: {0}")]
pub struct Malformed(pub &'static str);

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_usize(s: &[u8], radix: u32) -> Option<usize> {
    let s = std::str::from_utf8(s).ok()?.trim();
    usize::from_str_radix(s, radix).ok()
}

/// Parses the response at the front of `buf`.
pub fn parse_response(buf: &[u8]) -> Result<Parse, Malformed> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(Malformed("header section too long"));
        }
        return Ok(Parse::Incomplete);
    };
    let head = &buf[..head_end];
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().ok_or(Malformed("empty"))?;
    if !status_line.starts_with(b"HTTP/1.") || status_line.len() < 12 {
        return Err(Malformed("bad status line"));
    }
    let status = parse_usize(&status_line[9..12], 10).ok_or(Malformed("bad status code"))? as u16;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = status_line.starts_with(b"HTTP/1.0");
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = Some(parse_usize(value, 10).ok_or(Malformed("bad content-length"))?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"));
        }
    }
    let body_start = head_end + 4;
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Parse::Complete { status, len: body_start, close });
    }
    if chunked {
        let mut pos = body_start;
        loop {
            let Some(eol) = find(&buf[pos..], b"\r\n") else { return Ok(Parse::Incomplete) };
            let size_field = &buf[pos..pos + eol];
            let size_field = size_field.split(|&b| b == b';').next().unwrap_or(size_field);
            let size = parse_usize(size_field, 16).ok_or(Malformed("bad chunk size"))?;
            pos += eol + 2;
            if size == 0 {
                // Trailers end with an empty line.
                let Some(end) = find(&buf[pos..], b"\r\n") else { return Ok(Parse::Incomplete) };
                if end == 0 {
                    return Ok(Parse::Complete { status, len: pos + 2, close });
                }
                let Some(end) = find(&buf[pos..], b"\r\n\r\n") else { return Ok(Parse::Incomplete) };
                return Ok(Parse::Complete { status, len: pos + end + 4, close });
            }
            if buf.len() < pos + size + 2 {
                return Ok(Parse::Incomplete);
            }
            pos += size + 2;
        }
    }
    match content_length {
        Some(n) if buf.len() >= body_start + n => Ok(Parse::Complete { status, len: body_start + n, close }),
        Some(_) => Ok(Parse::Incomplete),
        // Without a length the body runs to the end of the connection; the
        // harness's peers never answer that way, so treat it as an error.
        None => Err(Malformed("response without a length")),
    }
}

/// A GET request for `path` with the given Host header.
pub fn get_request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: trellis-bench\r\n\r\n").into_bytes()
}

/// How a generator reaches its target: plain TCP, or TLS over it trusting
/// the given roots (the registry's private CA in case 6). A `Dial` is cheap to
/// clone: one per generator task.
#[derive(Clone, Debug)]
pub enum Dial {
    Plain,
    Tls(Arc<rustls::ClientConfig>, ServerName<'static>),
}

/// What a [`Conn`] reads and writes: a TCP stream or a TLS stream over one.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Dial {
    /// A new connection; over TLS the handshake is complete when it returns.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let s: Box<dyn Stream> = match self {
            Dial::Plain => Box::new(tcp),
            Dial::Tls(config, name) => {
                Box::new(tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), tcp).await?)
            }
        };
        Ok(Conn { s, buf: Vec::with_capacity(8192), head_len: 0, len: 0 })
    }
}

/// A keep-alive client connection for the registry and etcd workloads.
pub struct Conn {
    s: Box<dyn Stream>,
    buf: Vec<u8>,
    head_len: usize,
    len: usize,
}

impl Conn {
    /// A plain TCP connection.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        Dial::Plain.connect(addr).await
    }

    pub async fn send(&mut self, req: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(req).await?;
        // TLS may hold the last record back until flushed; for TCP this is a no-op.
        self.s.flush().await
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16384];
        let n = self.s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads one whole response; its body is then [`Conn::body`].
    pub async fn recv(&mut self) -> std::io::Result<u16> {
        self.buf.drain(..self.len.min(self.buf.len()));
        self.len = 0;
        loop {
            match parse_response(&self.buf) {
                Ok(Parse::Complete { status, len, .. }) => {
                    self.head_len = self.buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                    self.len = len;
                    return Ok(status);
                }
                Ok(Parse::Incomplete) => self.fill().await?,
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
        }
    }

    pub async fn roundtrip(&mut self, req: &[u8]) -> std::io::Result<u16> {
        self.send(req).await?;
        self.recv().await
    }

    /// Body of the last response read by [`Conn::recv`] (raw chunks when chunked).
    pub fn body(&self) -> &[u8] {
        &self.buf[self.head_len.min(self.len)..self.len]
    }

    /// For streams that never end (etcd's watch): reads until `needle`
    /// arrives and consumes everything up to it.
    pub async fn read_until(&mut self, needle: &[u8]) -> std::io::Result<()> {
        self.buf.drain(..self.len.min(self.buf.len()));
        self.len = 0;
        loop {
            if let Some(p) = find(&self.buf, needle) {
                self.buf.drain(..p + needle.len());
                return Ok(());
            }
            self.fill().await?;
        }
    }
}

/// A request with a JSON (or empty) body.
pub fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    request_with_token(method, path, None, body)
}

/// A request with a JSON (or empty) body, carrying `token` as a bearer token
/// when given.
pub fn request_with_token(method: &str, path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: bench\r\n");
    if let Some(token) = token {
        head.push_str("authorization: Bearer ");
        head.push_str(token);
        head.push_str("\r\n");
    }
    format!("{head}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_keep_alive() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1";
        assert_eq!(parse_response(r).unwrap(), Parse::Complete { status: 200, len: 43, close: false });
        assert_eq!(parse_response(&r[..40]).unwrap(), Parse::Incomplete);
    }

    #[test]
    fn chunked_and_close() {
        let r = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), Parse::Complete { status: 503, len: r.len(), close: true });
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), Parse::Incomplete);
    }

    #[test]
    fn a_token_is_one_more_header() {
        let plain = request("PUT", "/x", "{}");
        assert_eq!(
            plain,
            b"PUT /x HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        let with = request_with_token("PUT", "/x", Some("s3cr3t"), "{}");
        assert_eq!(
            with,
            b"PUT /x HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer s3cr3t\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
