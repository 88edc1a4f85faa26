//! A duration a user writes in a setting (`SET volley.result_cache_ttl = '10m'`): a whole
//! number with a unit `ms`, `s`, `m`, `h` or `d`, or `0`. It is checked when it is set, so a
//! typo is refused by the `SET` statement, not by a later query.

use std::fmt;
use std::time::Duration;

use datafusion::common::config_err;
use datafusion::config::{ConfigField, Visit};

/// A duration setting; displays in the largest unit that divides it (`300s` shows as `5m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SettingDuration(pub Duration);

impl SettingDuration {
    /// Minutes.
    pub const fn minutes(n: u64) -> Self {
        Self(Duration::from_secs(n * 60))
    }
}

const UNITS: [(&str, u128); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parse `text` as a duration (`0`, `1500ms`, `30s`, `5m`, `1h`, `7d`; a bare number is
/// seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim().to_ascii_lowercase();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!(
            "{text:?} is not a duration: write a whole number with a unit, like 0, 500ms, 30s, 5m, 1h or 1d"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis = match unit.trim() {
        "" | "s" => 1_000,
        "ms" => 1,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(millis)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

impl fmt::Display for SettingDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0");
        }
        for (unit, size) in UNITS {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl ConfigField for SettingDuration {
    fn visit<V: Visit>(&self, v: &mut V, key: &str, description: &'static str) {
        v.some(key, self, description)
    }

    fn set(&mut self, key: &str, value: &str) -> datafusion::common::Result<()> {
        match parse_duration(value) {
            Ok(d) => {
                self.0 = d;
                Ok(())
            }
            Err(e) => config_err!("{key}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_display_back() {
        for (text, ms, shown) in [
            ("0", 0, "0"),
            ("30s", 30_000, "30s"),
            ("300s", 300_000, "5m"),
            ("5m", 300_000, "5m"),
            ("1500ms", 1_500, "1500ms"),
            ("2h", 7_200_000, "2h"),
            ("1d", 86_400_000, "1d"),
            ("45", 45_000, "45s"),
            (" 10M ", 600_000, "10m"),
        ] {
            let d = parse_duration(text).expect("parses");
            assert_eq!(d, Duration::from_millis(ms), "{text}");
            assert_eq!(SettingDuration(d).to_string(), shown);
            assert_eq!(parse_duration(shown), Ok(d));
        }
        for bad in ["", "m", "5 minutes", "-1s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} is refused");
        }
    }
}
