//! Human-readable figures, for `kubectl get` columns and `flowlens-agent dump`.

/// `1.2 MB`, `930 B` (decimal units, like network tools).
pub fn bytes(n: u64) -> String {
    scaled(n as f64, "B")
}

/// `1.2 MB/s`.
pub fn rate(bytes_per_second: f64) -> String {
    format!("{}/s", scaled(bytes_per_second, "B"))
}

/// `3.4k`, `12`.
pub fn count(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let s = scaled(n as f64, "");
    s.replace(' ', "")
}

fn scaled(v: f64, unit: &str) -> String {
    const PREFIXES: [&str; 6] = ["", "k", "M", "G", "T", "P"];
    let mut v = v;
    let mut i = 0;
    while v >= 1000.0 && i < PREFIXES.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{} {unit}", v.round() as u64)
    } else if v < 10.0 {
        format!("{v:.2} {}{unit}", PREFIXES[i])
    } else if v < 100.0 {
        format!("{v:.1} {}{unit}", PREFIXES[i])
    } else {
        format!("{v:.0} {}{unit}", PREFIXES[i])
    }
}

/// `850µs`, `12.3ms`, `1.25s`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures() {
        assert_eq!(bytes(930), "930 B");
        assert_eq!(bytes(1_234_567), "1.23 MB");
        assert_eq!(rate(45_600.0), "45.6 kB/s");
        assert_eq!(count(3_400), "3.40k");
        assert_eq!(micros(850), "850µs");
        assert_eq!(micros(12_345), "12.3ms");
        assert_eq!(micros(1_250), "1.25ms");
        assert_eq!(micros(2_500_000), "2.50s");
    }
}
