//! Finds the host-side interface of a pod.
//!
//! - Routed CNIs (Calico, Cilium, the `ptp` plugin) install one host route per
//!   pod on its veth: the interface of the route to the pod's IP.
//! - Bridge CNIs (Flannel, the `bridge` plugin) put the pod's veth on a bridge
//!   and route the whole pod CIDR to the bridge, so the route names the bridge,
//!   not the pod. The CNI's own result cache (`/var/lib/cni/results`, written
//!   by libcni for containerd and CRI-O) names each pod's host-side veth and
//!   its addresses; that answer wins, and a route to a bridge is never taken
//!   for a pod's interface.
//!
//! Parsing is pure (`parse_*`, `lookup`, `host_side_interfaces`); reading
//! `/proc` and the cache directory is the thin shell.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::Deserialize;

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

/// One cached CNI ADD result (`/var/lib/cni/results/<network>-<container>-<if>`),
/// only the fields used here.
#[derive(Deserialize)]
struct CniCacheEntry {
    result: CniResult,
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<CniInterface>,
    #[serde(default)]
    ips: Vec<CniIp>,
}

#[derive(Deserialize)]
struct CniInterface {
    name: String,
    /// Set for interfaces inside the pod's network namespace.
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct CniIp {
    /// `10.244.0.5/24`
    address: String,
}

/// The pod addresses and host-side interface of one cached CNI result: the
/// interface outside the pod's sandbox that is not a bridge. `None` when the
/// result has no such interface (macvlan, ipvlan) or several.
pub fn host_side_interfaces(
    cache_json: &str,
    is_bridge: impl Fn(&str) -> bool,
) -> Option<(Vec<IpAddr>, String)> {
    let entry: CniCacheEntry = serde_json::from_str(cache_json).ok()?;
    let mut host = entry
        .result
        .interfaces
        .iter()
        .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty) && !is_bridge(&i.name));
    let ifname = host.next()?.name.clone();
    if host.next().is_some() {
        return None;
    }
    let ips = entry
        .result
        .ips
        .iter()
        .filter_map(|ip| ip.address.split('/').next()?.parse().ok())
        .collect::<Vec<IpAddr>>();
    (!ips.is_empty()).then_some((ips, ifname))
}

/// Pod address -> host-side interface, from every cached CNI result in `dir`.
/// An unreadable or foreign file is skipped.
pub fn read_cni_cache(dir: &Path) -> HashMap<IpAddr, String> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some((ips, ifname)) = host_side_interfaces(&text, is_bridge) {
            for ip in ips {
                out.insert(ip, ifname.clone());
            }
        }
    }
    out
}

/// Whether `ifname` is a bridge of the agent's network namespace. (sysfs shows
/// the namespace that mounted `/sys`: right for a host-network agent; the
/// simulated nodes have no bridges.)
pub fn is_bridge(ifname: &str) -> bool {
    !ifname.contains('/')
        && Path::new("/sys/class/net")
            .join(ifname)
            .join("bridge")
            .is_dir()
}

/// The host-side interface of a pod address: the CNI's cached answer, else
/// the route to it, unless that route leads to a bridge.
pub fn pod_interface<'a>(
    cni: &'a HashMap<IpAddr, String>,
    routes: &'a [Route],
    ip: &IpAddr,
) -> Option<&'a str> {
    if let Some(ifname) = cni.get(ip) {
        return Some(ifname);
    }
    lookup(routes, ip).filter(|ifname| !is_bridge(ifname))
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

/// The node's own addresses (every interface's; loopback, IPv6 link-local
/// and kube-proxy's `kube-ipvs0` excluded): where kube-proxy translates
/// NodePorts.
pub(crate) fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; every
    // pointer is checked before use and sockaddrs are read by family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            // kube-proxy's IPVS mode holds every ClusterIP on kube-ipvs0,
            // and leaves that interface out of the NodePort addresses.
            let ipvs = !(*cur).ifa_name.is_null()
                && std::ffi::CStr::from_ptr((*cur).ifa_name).to_bytes() == b"kube-ipvs0";
            if !sa.is_null() && !ipvs {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    });
    out.sort();
    out.dedup();
    out
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
    fn cni_cache_names_the_bridge_port() {
        // What libcni caches for the `bridge` plugin: the bridge, the pod's
        // host-side veth, and eth0 in the sandbox.
        let bridge = r#"{"kind":"cniCacheV1","containerId":"abc","ifName":"eth0","networkName":"flowlens",
            "result":{"cniVersion":"0.4.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:01"},
            {"name":"veth1234abcd","mac":"aa:bb:cc:dd:ee:02"},
            {"name":"eth0","mac":"aa:bb:cc:dd:ee:03","sandbox":"/var/run/netns/cni-1"}],
            "ips":[{"version":"4","interface":2,"address":"10.244.0.5/24","gateway":"10.244.0.1"}]}}"#;
        assert_eq!(
            host_side_interfaces(bridge, |n| n == "cni0"),
            Some((
                vec!["10.244.0.5".parse().unwrap()],
                "veth1234abcd".to_owned()
            ))
        );
        // Without knowing cni0 is a bridge the answer is ambiguous: none.
        assert_eq!(host_side_interfaces(bridge, |_| false), None);
        // `ptp`: host veth first, eth0 in the sandbox; dual-stack.
        let ptp = r#"{"result":{"interfaces":[{"name":"veth99"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
            "ips":[{"address":"10.244.0.7/32"},{"address":"fd00:244::7/128"}]}}"#;
        assert_eq!(
            host_side_interfaces(ptp, |_| false),
            Some((
                vec![
                    "10.244.0.7".parse().unwrap(),
                    "fd00:244::7".parse().unwrap()
                ],
                "veth99".to_owned()
            ))
        );
        assert_eq!(host_side_interfaces("not json", |_| false), None);
        assert_eq!(host_side_interfaces(r#"{"result":{}}"#, |_| false), None);
    }

    #[test]
    fn the_cache_wins_over_a_route_to_a_bridge() {
        let routes = parse_ipv4_routes(V4);
        let mut cni = HashMap::new();
        cni.insert("10.250.0.9".parse().unwrap(), "vethB".to_owned());
        assert_eq!(
            pod_interface(&cni, &routes, &"10.250.0.9".parse().unwrap()),
            Some("vethB")
        );
        assert_eq!(
            pod_interface(&cni, &routes, &"10.168.1.5".parse().unwrap()),
            Some("vethA")
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
