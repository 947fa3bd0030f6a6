//! The query string of Consul's read routes, parsed the way Consul does:
//! `index`, `wait` in Go's duration syntax (`120000ms`, `10s`, `5m`, `1m30s`),
//! `passing` and `stale` as flags with an optional boolean, `tag` repeated.
//!
//! Consul ignores parameters it does not know; Trellis refuses the ones that
//! would change the answer if ignored (`filter`, `node-meta`, a namespace or
//! partition other than `default`, a `token` in the URL), so a client never
//! mistakes an unfiltered answer for a filtered one, and accepts the rest that
//! Consul's clients send (`near`, `cached`, `consistent`, `stale`).

use std::time::Duration;

use crate::error::ApiError;

/// Consul's own cap on `wait`: ten minutes.
pub const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's `wait` when a blocking query names none: five minutes.
pub const CONSUL_DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// How current an answer must be (Consul's consistency modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Served by a replica that knows its copy is current, refused otherwise.
    #[default]
    Default,
    /// `?stale`: any replica's copy, said so in `X-Consul-KnownLeader`.
    Stale,
    /// `?consistent`: as the default here (see docs/consul.md).
    Consistent,
}

impl Consistency {
    /// `X-Consul-Effective-Consistency`.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Default => "leader",
            Consistency::Stale => "stale",
            Consistency::Consistent => "consistent",
        }
    }
}

/// Which parameters a route takes beyond the common ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takes {
    pub passing: bool,
    pub tag: bool,
}

/// A parsed query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsulQuery {
    /// A blocking query's index; `None` (or 0) answers at once.
    pub index: Option<u64>,
    /// Capped at Consul's ten minutes and the registry's `--max-wait`;
    /// ignored without `index`, as Consul does.
    pub wait: Option<Duration>,
    pub passing: bool,
    /// Instances must carry every one of these.
    pub tags: Vec<String>,
    pub dc: Option<String>,
    pub consistency: Consistency,
}

fn bad(msg: String) -> ApiError {
    ApiError::InvalidQuery(msg)
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Consul's flags: present without a value means true; else Go's booleans.
fn flag(key: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(bad(format!("{key} must be a boolean or empty, got {:?}", clip(v)))),
    }
}

/// Parses the query of a Consul read route.
pub fn parse(raw: Option<&str>, takes: Takes, max_wait: Duration) -> Result<ConsulQuery, ApiError> {
    let mut q = ConsulQuery::default();
    let (mut stale, mut consistent) = (false, false);
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "index" => {
                let i = v
                    .parse::<u64>()
                    .map_err(|_| bad(format!("index must be a non-negative integer, got {:?}", clip(&v))))?;
                q.index = Some(i);
            }
            "wait" => q.wait = Some(parse_wait(&v)?.min(CONSUL_MAX_WAIT).min(max_wait)),
            "passing" if takes.passing => q.passing = flag("passing", &v)?,
            "tag" if takes.tag => {
                if v.is_empty() {
                    return Err(bad("tag must not be empty".into()));
                }
                q.tags.push(v.into_owned());
            }
            "dc" => q.dc = Some(v.into_owned()).filter(|d| !d.is_empty()),
            "stale" => stale = flag("stale", &v)?,
            "consistent" => consistent = flag("consistent", &v)?,
            // Caching and sorting by distance change nothing Trellis answers.
            "cached" | "near" => {}
            "ns" | "partition" if v.is_empty() || v == "default" => {}
            "ns" | "partition" => {
                return Err(bad(format!(
                    "{k} {:?}: Trellis has one namespace and partition, \"default\"",
                    clip(&v)
                )))
            }
            "token" => {
                return Err(bad(
                    "send the token in the X-Consul-Token header, not in the URL (where logs keep it)".into(),
                ))
            }
            "filter" | "node-meta" | "peer" | "sampling" => {
                return Err(bad(format!(
                    "{k} is not supported by Trellis's Consul-compatible API (docs/consul.md)"
                )))
            }
            other => {
                let known = match (takes.passing, takes.tag) {
                    (true, _) => "index, wait, passing, tag, dc, stale, consistent, cached, near",
                    (false, true) => "index, wait, tag, dc, stale, consistent, cached, near",
                    (false, false) => "index, wait, dc, stale, consistent, cached",
                };
                return Err(bad(format!("unknown parameter {:?} (known: {known})", clip(other))));
            }
        }
    }
    if stale && consistent {
        return Err(bad("stale and consistent exclude each other".into()));
    }
    q.consistency = match (stale, consistent) {
        (true, _) => Consistency::Stale,
        (_, true) => Consistency::Consistent,
        _ => Consistency::Default,
    };
    Ok(q)
}

/// Go's `time.ParseDuration`, which Consul uses for `wait`: a sequence of
/// decimal numbers with units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h` (`1m30s`,
/// `1.5s`); a bare `0` is zero. Values past ten minutes saturate (the caller
/// caps them anyway).
pub fn parse_wait(v: &str) -> Result<Duration, ApiError> {
    let err =
        || bad(format!("wait must be a duration like \"10s\", \"120000ms\" or \"5m\", got {:?}", clip(v)));
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = v;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(err());
        }
        let n: f64 = num.parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    Ok(Duration::try_from_secs_f64(total).unwrap_or(Duration::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Takes = Takes { passing: true, tag: true };
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn waits_in_consuls_forms() {
        for (s, ms) in [
            ("120000ms", 120_000),
            ("10s", 10_000),
            ("5m", 300_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("0", 0),
            ("250000us", 250),
        ] {
            assert_eq!(parse_wait(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for bad in ["", "10", "s", "1d", "10 s", "-5s", "1..5s", "soon", "5sm"] {
            assert!(matches!(parse_wait(bad), Err(ApiError::InvalidQuery(_))), "{bad}");
        }
    }

    #[test]
    fn parses_what_consul_clients_send() {
        // Prometheus: wait without index on its first call, stale as a bare flag.
        let q = parse(Some("wait=120000ms&stale="), ALL, MAX).unwrap();
        assert_eq!(
            (q.index, q.wait, q.consistency),
            (None, Some(Duration::from_secs(120)), Consistency::Stale)
        );
        // py-consul: index, wait, passing=1, repeated tags, dc.
        let q = parse(Some("index=7&wait=10s&passing=1&tag=a&tag=b&dc=dc1"), ALL, MAX).unwrap();
        assert_eq!(q.index, Some(7));
        assert_eq!(q.wait, Some(Duration::from_secs(10)));
        assert!(q.passing);
        assert_eq!(q.tags, ["a", "b"]);
        assert_eq!(q.dc.as_deref(), Some("dc1"));
        assert!(parse(Some("passing"), ALL, MAX).unwrap().passing);
        assert!(!parse(Some("passing=false"), ALL, MAX).unwrap().passing);
        assert_eq!(parse(Some("consistent"), ALL, MAX).unwrap().consistency, Consistency::Consistent);
        assert_eq!(
            parse(Some("index=1&wait=1h"), ALL, Duration::from_secs(900)).unwrap().wait,
            Some(CONSUL_MAX_WAIT)
        );
        assert!(parse(Some("ns=default&partition=&cached&near=_agent"), ALL, MAX).is_ok());
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for bad in [
            "index=-1",
            "index=x",
            "wait=forever",
            "passing=maybe",
            "tag=",
            "stale&consistent",
            "filter=Service.Tags%20contains%20%22a%22",
            "node-meta=rack:1",
            "ns=team",
            "token=s3cret",
            "indx=3",
        ] {
            assert!(matches!(parse(Some(bad), ALL, MAX), Err(ApiError::InvalidQuery(_))), "{bad}");
        }
        let no_filters = Takes { passing: false, tag: false };
        assert!(parse(Some("passing=1"), no_filters, MAX).is_err());
        assert!(parse(Some("tag=a"), no_filters, MAX).is_err());
    }
}
