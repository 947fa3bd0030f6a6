//! Validated identifiers. Constructors are the only way in, so a value of these
//! types is always valid and can be put in a URL path segment without escaping.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name was refused; the message is meant for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is invalid: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn err(what: &'static str, value: &str, reason: &'static str) -> NameError {
    // Never echo an unbounded value back.
    let value: String = value.chars().take(80).collect();
    NameError { what, value, reason }
}

/// Checks an RFC 1123 label: 1..=63 of `[a-z0-9-]`, not starting or ending with `-`.
fn check_label(what: &'static str, s: &str, allow_upper: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(err(what, s, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(err(what, s, "must be at most 63 characters"));
    }
    let ok = |c: char| {
        c.is_ascii_digit() || c == '-' || c.is_ascii_lowercase() || (allow_upper && c.is_ascii_uppercase())
    };
    if !s.chars().all(ok) {
        return Err(err(
            what,
            s,
            if allow_upper {
                "may contain only letters, digits and '-'"
            } else {
                "may contain only lowercase letters, digits and '-'"
            },
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(err(what, s, "must not start or end with '-'"));
    }
    Ok(())
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::new(s)
            }
        }
    };
}

/// A service name: a lowercase DNS label (`[a-z0-9-]`, 1..=63 characters, no
/// leading or trailing `-`), so it can also be used as a Host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        check_label("service name", &s, false)?;
        Ok(ServiceName(s))
    }
}
string_newtype!(ServiceName);

/// Longest instance id, in bytes.
pub const MAX_INSTANCE_ID_LEN: usize = 128;

/// An instance id: 1..=128 characters from `[A-Za-z0-9._~:@-]`, the characters
/// a URL path segment carries without escaping (no `/`, `%`, `?`, `#`, spaces).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(err("instance id", &s, "must not be empty"));
        }
        if s.len() > MAX_INSTANCE_ID_LEN {
            return Err(err("instance id", &s, "must be at most 128 characters"));
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | ':' | '@' | '-');
        if !s.chars().all(ok) {
            return Err(err("instance id", &s, "may contain only letters, digits and . _ ~ : @ -"));
        }
        Ok(InstanceId(s))
    }
}
string_newtype!(InstanceId);

/// A zone (failure domain) label: same rules as a service name, upper case allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone(String);

impl Zone {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        check_label("zone", &s, true)?;
        Ok(Zone(s))
    }
}
string_newtype!(Zone);

/// Where an instance listens: an IP address or a DNS hostname (resolved by the
/// caller when it connects, so a container that comes back with a new IP stays
/// reachable under its name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(String);

impl Address {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.parse::<IpAddr>().is_ok() {
            return Ok(Address(s));
        }
        if s.is_empty() {
            return Err(err("address", &s, "must not be empty"));
        }
        if s.len() > 253 {
            return Err(err("address", &s, "hostname must be at most 253 characters"));
        }
        for label in s.trim_end_matches('.').split('.') {
            check_label("address", label, true).map_err(|_| {
                err("address", &s, "must be an IP address or a hostname of letters, digits, '-' and '.'")
            })?;
        }
        Ok(Address(s))
    }

    /// The address as an IP, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.0.parse().ok()
    }
}
string_newtype!(Address);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["a", "users", "user-api", "a1", &"x".repeat(63)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Users", "-a", "a-", "a_b", "a.b", "a b", &"x".repeat(64), "é"] {
            assert!(ServiceName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_ids() {
        for ok in ["i-1", "host:8080", "a@b", "A.b_c~d", &"x".repeat(128)] {
            assert!(InstanceId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "a%20", "a?b", "a#", &"x".repeat(129), "ü"] {
            assert!(InstanceId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        for ok in ["10.0.0.5", "::1", "app1", "app-1.svc.local", "App1."] {
            assert!(Address::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "-a", "a_b", "1.2.3.4:80", "http://x", &"a".repeat(254)] {
            assert!(Address::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_do_not_echo_unbounded_input() {
        let e = ServiceName::new("X".repeat(10_000)).unwrap_err();
        assert!(e.to_string().len() < 300);
    }
}
