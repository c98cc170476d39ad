//! Reading Prometheus text exposition in tests.

/// The sum of the samples of `name` whose line contains `filter` (a label
/// pair such as `reason="NO_SOCKET"`, or `""` for all).
pub(crate) fn sum(body: &str, name: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_matching_samples() {
        let body =
            "# HELP x_total x\nx_total{reason=\"A\"} 2\nx_total{reason=\"B\"} 3\nxy_total 7\n";
        assert_eq!(super::sum(body, "x_total", ""), 5.0);
        assert_eq!(super::sum(body, "x_total", "reason=\"B\""), 3.0);
        assert_eq!(super::sum(body, "z_total", ""), 0.0);
    }
}
