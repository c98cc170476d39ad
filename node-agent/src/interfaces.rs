//! Finds the host-side interface of a pod: the interface of the route to the
//! pod's IP in the agent's network namespace (routed CNIs such as Calico or
//! Cilium install one host route per pod on its veth).
//!
//! Parsing is pure (`parse_*`, `lookup`); reading `/proc` is the thin shell.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub dest: IpAddr,
    pub prefix_len: u8,
    pub ifname: String,
    /// Routes through a gateway do not lead to a local pod.
    pub via_gateway: bool,
}

/// Parses `/proc/net/route` (IPv4).
pub(crate) fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(gw), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[2], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        // The kernel prints the in-memory (network order) value as a native integer.
        let mask = Ipv4Addr::from(mask.to_ne_bytes());
        out.push(Route {
            dest: IpAddr::V4(Ipv4Addr::from(dest.to_ne_bytes())),
            prefix_len: u32::from(mask).count_ones() as u8,
            ifname: f[0].to_owned(),
            via_gateway: gw != 0,
        });
    }
    out
}

/// Parses `/proc/net/ipv6_route`.
pub(crate) fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    const RTF_GATEWAY: u32 = 0x2;
    const RTF_REJECT: u32 = 0x200;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dest), Ok(plen), Ok(flags)) = (
            u128::from_str_radix(f[0], 16),
            u8::from_str_radix(f[1], 16),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        if flags & RTF_REJECT != 0 {
            continue;
        }
        out.push(Route {
            dest: IpAddr::V6(Ipv6Addr::from(dest)),
            prefix_len: plen,
            ifname: f[9].to_owned(),
            via_gateway: flags & RTF_GATEWAY != 0,
        });
    }
    out
}

fn contains(r: &Route, ip: &IpAddr) -> bool {
    match (r.dest, ip) {
        (IpAddr::V4(d), IpAddr::V4(a)) => {
            let m = if r.prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(r.prefix_len))
            };
            u32::from(d) & m == u32::from(*a) & m
        }
        (IpAddr::V6(d), IpAddr::V6(a)) => {
            let m = if r.prefix_len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(r.prefix_len))
            };
            u128::from(d) & m == u128::from(*a) & m
        }
        _ => false,
    }
}

/// The interface leading directly (no gateway, not loopback) to `ip` by
/// longest prefix match, if any.
pub(crate) fn lookup<'a>(routes: &'a [Route], ip: &IpAddr) -> Option<&'a str> {
    routes
        .iter()
        .filter(|r| contains(r, ip))
        .max_by_key(|r| r.prefix_len)
        .filter(|r| !r.via_gateway && r.ifname != "lo")
        .map(|r| r.ifname.as_str())
}

/// Reads the routes of the agent's network namespace.
pub(crate) fn read_routes() -> std::io::Result<Vec<Route>> {
    let mut routes = parse_ipv4_routes(&std::fs::read_to_string("/proc/net/route")?);
    if let Ok(v6) = std::fs::read_to_string("/proc/net/ipv6_route") {
        routes.extend(parse_ipv6_routes(&v6));
    }
    Ok(routes)
}

/// The index of an interface of the agent's network namespace, if it exists.
/// (Not from sysfs: `/sys/class/net` shows the namespace that mounted `/sys`.)
pub(crate) fn ifindex(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: a valid C string; if_nametoindex has no other preconditions.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100FA0A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000FA0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
vethA\t0501A80A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    const V6: &str = "fd000000000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 vethA
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001 lo
";

    #[test]
    fn finds_the_pod_veth() {
        let r = parse_ipv4_routes(V4);
        assert_eq!(r.len(), 3);
        assert_eq!(lookup(&r, &"10.168.1.5".parse().unwrap()), Some("vethA"));
        assert_eq!(lookup(&r, &"10.250.0.9".parse().unwrap()), Some("eth0"));
        assert_eq!(
            lookup(&r, &"8.8.8.8".parse().unwrap()),
            None,
            "default route via gateway"
        );
    }

    #[test]
    fn ipv6_routes() {
        let r = parse_ipv6_routes(V6);
        assert_eq!(lookup(&r, &"fd00::5".parse().unwrap()), Some("vethA"));
        assert_eq!(lookup(&r, &"2001:db8::1".parse().unwrap()), None);
        assert_eq!(lookup(&r, &"::1".parse().unwrap()), None);
    }
}
