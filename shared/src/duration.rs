//! Durations on the wire are strings like `500ms`, `5s`, `1m` (humantime's syntax).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `Duration` that is written and read as a human string (`"5s"`, `"500ms"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireDuration(pub Duration);

impl WireDuration {
    pub fn parse(s: &str) -> Result<Self, humantime::DurationError> {
        humantime::parse_duration(s.trim()).map(WireDuration)
    }
}

impl std::str::FromStr for WireDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WireDuration::parse(s).map_err(|e| format!("{e} (examples: 500ms, 5s, 1m)"))
    }
}

impl From<Duration> for WireDuration {
    fn from(d: Duration) -> Self {
        WireDuration(d)
    }
}

impl fmt::Display for WireDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime writes "1s 500ms"; joining the parts keeps it one token.
        let s = humantime::format_duration(self.0).to_string();
        f.write_str(&s.replace(' ', ""))
    }
}

impl Serialize for WireDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WireDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WireDuration::parse(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (examples: \"500ms\", \"5s\", \"1m\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (s, d) in [("5s", 5_000), ("500ms", 500), ("1m", 60_000), ("1s500ms", 1_500)] {
            let w = WireDuration::parse(s).unwrap();
            assert_eq!(w.0, Duration::from_millis(d));
            assert_eq!(WireDuration::parse(&w.to_string()).unwrap(), w);
        }
        assert_eq!(WireDuration(Duration::from_millis(1500)).to_string(), "1s500ms");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "5", "five seconds", "-1s", "5x"] {
            assert!(WireDuration::parse(bad).is_err(), "{bad}");
        }
        let e = serde_json::from_str::<WireDuration>("\"soon\"").unwrap_err();
        assert!(e.to_string().contains("invalid duration"));
    }
}
