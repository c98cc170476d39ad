//! Parsing of the window durations used in `NetworkObservation.spec.window`
//! (`5s`, `1m`, `1m30s`, `2h`).

use std::time::Duration;

/// Why a duration string is not a valid window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration: use hours, minutes and seconds such as 30s, 1m or 1m30s")]
    Syntax(String),
    #[error("{0:?} is shorter than the minimum of {1}s")]
    TooShort(String, u64),
    #[error("{0:?} is longer than the maximum of {1}s")]
    TooLong(String, u64),
}

/// The shortest window an observation may use.
pub const MIN_WINDOW_SECONDS: u64 = 5;
/// The longest window an observation may use.
pub const MAX_WINDOW_SECONDS: u64 = 3600;

/// Parses `[Nh][Nm][Ns]` (units in that order, each at most once, at least one).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(s.to_owned());
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_rank = 0u8;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let (rank, unit) = match c {
            'h' => (1, 3600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return Err(syntax()),
        };
        if digits.is_empty() || rank <= last_rank {
            return Err(syntax());
        }
        let n: u64 = digits.parse().map_err(|_| syntax())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(syntax)?;
        digits.clear();
        last_rank = rank;
    }
    if !digits.is_empty() || last_rank == 0 {
        return Err(syntax());
    }
    Ok(Duration::from_secs(total))
}

/// Parses a window and checks it lies within [`MIN_WINDOW_SECONDS`], [`MAX_WINDOW_SECONDS`].
pub fn parse_window(s: &str) -> Result<Duration, DurationError> {
    let d = parse_duration(s)?;
    if d.as_secs() < MIN_WINDOW_SECONDS {
        return Err(DurationError::TooShort(s.to_owned(), MIN_WINDOW_SECONDS));
    }
    if d.as_secs() > MAX_WINDOW_SECONDS {
        return Err(DurationError::TooLong(s.to_owned(), MAX_WINDOW_SECONDS));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("1m").unwrap().as_secs(), 60);
        assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert_eq!(parse_duration("1h0m5s").unwrap().as_secs(), 3605);
    }

    #[test]
    fn rejects_bad_syntax() {
        for s in [
            "",
            "5",
            "s",
            "1s1m",
            "1m1m",
            "1.5m",
            "-1s",
            "1ms",
            "1 s",
            "99999999999999999999h",
        ] {
            assert!(
                matches!(parse_duration(s), Err(DurationError::Syntax(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn window_bounds() {
        assert!(matches!(
            parse_window("4s"),
            Err(DurationError::TooShort(..))
        ));
        assert!(parse_window("5s").is_ok());
        assert!(parse_window("1h").is_ok());
        assert!(matches!(
            parse_window("1h1s"),
            Err(DurationError::TooLong(..))
        ));
    }
}
