//! The flags that bound what one connection may hold: how long it may take to
//! send a request head and a body, how long it may sit idle, HTTP/2 keepalive,
//! and how many connections one address may open.

use std::time::Duration;

/// Protections from slow, idle and greedy clients.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionLimits {
    /// A new connection must complete its TLS handshake and send a whole
    /// request head within this, or it is closed; the same bound applies to
    /// every later HTTP/1.1 request head, from its first byte.
    #[arg(long, env = "TRELLIS_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// A request body must arrive whole within this from the moment the
    /// registry first waits for it; past it the request gets `408 request_timeout`.
    #[arg(long, env = "TRELLIS_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// A connection with no request in progress for this long is closed
    /// (HTTP/2 with a GOAWAY). Must exceed `--max-wait` (default 5m) and be at
    /// least `--header-timeout`.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "6m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// HTTP/2: send a PING after this long without a frame from the client.
    #[arg(long, env = "TRELLIS_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// HTTP/2: close the connection when a PING is not answered within this.
    #[arg(long, env = "TRELLIS_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Most connections open at once from one IP address; past it that
    /// address's new connections get `503 overloaded`. 0 turns the limit off.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    pub max_connections_per_ip: usize,
}

impl ConnectionLimits {
    /// Relations with the other flags; `max_wait` is the longest blocking query.
    pub fn validate(&self, max_wait: Duration) -> Result<(), String> {
        let zero = [
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
            ("--http2-keepalive-interval", self.http2_keepalive_interval),
            ("--http2-keepalive-timeout", self.http2_keepalive_timeout),
        ];
        if let Some((flag, _)) = zero.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("{flag} must be above zero"));
        }
        // The watchdog looks at a busy or new connection once per header
        // timeout; a shorter idle timeout would be enforced late.
        if self.idle_timeout < self.header_timeout {
            return Err("--idle-timeout must be at least --header-timeout".into());
        }
        // A blocking query is a request in progress, so it never counts as
        // idle; the margin keeps the two limits from being confused.
        if self.idle_timeout <= max_wait {
            return Err(format!(
                "--idle-timeout ({}) must exceed --max-wait ({})",
                humantime::format_duration(self.idle_timeout),
                humantime::format_duration(max_wait)
            ));
        }
        Ok(())
    }
}
