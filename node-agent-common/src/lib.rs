//! Plain `#[repr(C)]` types shared by the eBPF programs (`flowlens-agent-ebpf`)
//! and the agent. Every struct has explicit padding so no uninitialised byte
//! crosses the kernel boundary, and a size assertion so a layout change is a
//! compile error on both sides.
//!
//! Addresses are 16 bytes; IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one code path serves both families and an IPv4
//! CIDR `a.b.c.d/n` is the IPv6 prefix `::ffff:a.b.c.d/(96+n)`.
#![no_std]

/// Traffic direction relative to the local endpoint (the pod on this node).
pub const DIRECTION_EGRESS: u8 = 0;
/// Traffic to the local endpoint.
pub const DIRECTION_INGRESS: u8 = 1;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// `FlowStats::flags`: a TCP SYN without ACK, or an ICMP echo request, was
/// seen (the sender is the client).
pub const FLOW_FLAG_SYN: u32 = 1;
/// A TCP SYN with ACK, or an ICMP echo reply, was seen (the sender is the server).
pub const FLOW_FLAG_SYN_ACK: u32 = 2;
/// A TCP FIN was seen.
pub const FLOW_FLAG_FIN: u32 = 4;
/// A TCP RST was seen.
pub const FLOW_FLAG_RST: u32 = 8;

/// One direction of one 5-tuple, seen at a local endpoint's interface.
/// Ports are in host byte order (0 for protocols without ports).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Counters of one [`FlowKey`], updated per packet by the TC programs.
///
/// `packets` counts wire packets: a GSO/GRO super-packet of N segments counts
/// N. `bytes` are IP-layer bytes (IP header + payload of every segment);
/// `payload_bytes` the transport payload within them.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    /// `FLOW_FLAG_*` seen on this key.
    pub flags: u32,
    /// TCP retransmissions (egress keys only), from the retransmit tracepoint.
    pub retransmits: u32,
    /// Packets of this flow the kernel dropped (freed with a drop reason),
    /// from the `skb:kfree_skb` tracepoint. A GSO packet counts once.
    pub drops: u32,
    /// The host-side interface whose program counted the key's packets
    /// (0: none yet). A packet leaving a pod takes the fast path only
    /// through that interface: the key's local address was checked to be
    /// that pod's when the entry was made, so the source check is implied.
    pub ifindex: u32,
    /// Whether, and how, every packet of this key passes without rule
    /// evaluation in the current config epoch ([`pass_word`]): untouched
    /// (an endpoint without rules, or a connection its rules allow), or
    /// audited (counted against the rule that audits it); 0: evaluate. One
    /// word, written and read whole. Set only by the TC programs.
    pub pass: u64,
}

/// Bits of [`FlowStats::pass`]: slot (6), rule direction (1), endpoint id
/// (30), the epoch's low 25 bits, passes (1), audited (1). An entry lives
/// one drain period, far fewer config flips than 2^25, so the epoch's low
/// bits tell a current word from a stale one.
const PASS_EPOCH_SHIFT: u32 = 37;
const PASS_EPOCH_MASK: u64 = (1 << 25) - 1;
const PASS_PASSES: u64 = 1 << 62;
const PASS_AUDITED: u64 = 1 << 63;

/// [`FlowStats::pass`] for a key decided to pass in `epoch`: untouched
/// (`audited` false; the other fields are then ignored), or counted
/// against rule `slot` of `endpoint_id`'s `rule_direction` rules.
#[inline(always)]
pub const fn pass_word(
    epoch: u32,
    audited: bool,
    endpoint_id: u32,
    rule_direction: u8,
    slot: u8,
) -> u64 {
    let word = PASS_PASSES | (((epoch as u64) & PASS_EPOCH_MASK) << PASS_EPOCH_SHIFT);
    if !audited {
        return word;
    }
    word | PASS_AUDITED
        | (((endpoint_id & (MAX_ENDPOINT_ID - 1)) as u64) << 7)
        | (((rule_direction & 1) as u64) << 6)
        | ((slot & 63) as u64)
}

/// Whether `word` says the key's packets pass in `epoch` (one compare).
#[inline(always)]
pub const fn passes_in(word: u64, epoch: u32) -> bool {
    word & (PASS_PASSES | (PASS_EPOCH_MASK << PASS_EPOCH_SHIFT))
        == PASS_PASSES | (((epoch as u64) & PASS_EPOCH_MASK) << PASS_EPOCH_SHIFT)
}

/// The rule a passing `word` counts its packets against: `(endpoint id,
/// rule direction, slot)`; `None` when they pass untouched.
#[inline(always)]
pub const fn audited_rule(word: u64) -> Option<(u32, u8, u8)> {
    if word & PASS_AUDITED == 0 {
        return None;
    }
    Some((
        ((word >> 7) as u32) & (MAX_ENDPOINT_ID - 1),
        ((word >> 6) & 1) as u8,
        (word & 63) as u8,
    ))
}

/// Traffic of a local endpoint that could not get its own [`FlowKey`] entry
/// because the flow table was full. Keeps totals exact under overflow.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OverflowKey {
    pub local_addr: [u8; 16],
    pub direction: u8,
    pub _pad: [u8; 7],
}

/// One bucket of a connection's smoothed-RTT histogram.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RttKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// See [`rtt_bucket`].
    pub bucket: u16,
    pub _pad: u16,
}

/// Key of the endpoint table: a local pod address in one configuration generation.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub generation: u32,
    pub addr: [u8; 16],
}

/// `EndpointInfo::flags`: count this endpoint's flows and RTT.
pub const ENDPOINT_TRACE: u32 = 1;
/// Rules apply to traffic this endpoint initiates.
pub const ENDPOINT_POLICY_EGRESS: u32 = 2;
/// Rules apply to connections initiated towards this endpoint.
pub const ENDPOINT_POLICY_INGRESS: u32 = 4;

/// Rule slots of one direction of one endpoint. Bit `i` stands for the
/// endpoint's `i`-th rule in that direction (at most 64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionRules {
    /// Slots in `Enforce` mode; the others are `Audit`.
    pub enforce_mask: u64,
    /// Slots that match every port and protocol (rules without `ports`).
    pub any_port_mask: u64,
}

/// Value of the endpoint table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Agent-assigned index, `< MAX_ENDPOINT_ID`, used in rule keys.
    pub id: u32,
    /// `ENDPOINT_*` bits.
    pub flags: u32,
    pub egress: DirectionRules,
    pub ingress: DirectionRules,
}

/// Endpoint ids fit in 30 bits (see [`rule_scope`]).
pub const MAX_ENDPOINT_ID: u32 = 1 << 30;

/// The 4-byte big-endian scope prefix of rule keys: generation (1 bit),
/// direction (1 bit), endpoint id (30 bits). Big-endian so that an LPM prefix
/// of 32 bits covers exactly the scope.
#[inline(always)]
pub const fn rule_scope(generation: u32, direction: u8, endpoint_id: u32) -> [u8; 4] {
    let v = ((generation & 1) << 31)
        | (((direction as u32) & 1) << 30)
        | (endpoint_id & (MAX_ENDPOINT_ID - 1));
    v.to_be_bytes()
}

/// The inverse of [`rule_scope`]: `(generation, direction, endpoint id)`.
#[inline(always)]
pub const fn split_rule_scope(scope: [u8; 4]) -> (u32, u8, u32) {
    let v = u32::from_be_bytes(scope);
    (v >> 31, ((v >> 30) & 1) as u8, v & (MAX_ENDPOINT_ID - 1))
}

/// LPM key data of the peer class table: the generation (0 or 1,
/// big-endian), then the peer address. The prefix length is
/// `32 + address prefix` (IPv4 prefixes are `96 + n`). The last 4 bytes pad
/// the key to a multiple of 8 and are never covered by a prefix.
///
/// Peer classes are shared by every endpoint and rule of the node: a class
/// is one combination of the address sets that contain an address, so the
/// table grows with the distinct peer prefixes, not with endpoints x peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub generation: [u8; 4],
    pub addr: [u8; 16],
    pub _pad: [u8; 4],
}

/// Bits of the peer LPM prefix that cover the generation.
pub const PEER_GENERATION_BITS: u32 = 32;

/// The generation field of a [`PeerKey`].
#[inline(always)]
pub const fn peer_generation(generation: u32) -> [u8; 4] {
    (generation & 1).to_be_bytes()
}

/// The class of an address in no address set a rule names: never a key of
/// the class rule table.
pub const NO_CLASS: u32 = 0;

/// Key of the class rule table: the rule slots of one endpoint and
/// direction ([`rule_scope`]) that match the peers of one class.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassRuleKey {
    pub scope: [u8; 4],
    pub class: u32,
}

/// LPM key data of the port table: scope, protocol, then the port
/// (big-endian). The prefix length is `40 + port prefix` (0..=16 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub scope: [u8; 4],
    pub protocol: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}

/// Bits of the port LPM prefix that cover scope and protocol.
pub const PORT_SCOPE_BITS: u32 = 40;

/// Key of per-rule match counters.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleCounterKey {
    /// [`rule_scope`] of the endpoint and direction.
    pub scope: [u8; 4],
    /// Rule slot (0..64).
    pub slot: u8,
    /// [`VERDICT_DROP`] or [`VERDICT_AUDIT`].
    pub verdict: u8,
    pub _pad: [u8; 2],
}

/// Per-rule match counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: u64,
    /// TCP SYNs (without ACK) and `connect()` calls rejected at the socket.
    pub connections: u64,
}

/// Key of the table of named attempts: which local endpoint (scope), rule
/// and verdict, and whom it tried to reach (or who tried to reach it) on
/// which server port.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    /// [`rule_scope`] of the endpoint and the rules' direction.
    pub scope: [u8; 4],
    pub slot: u8,
    /// [`VERDICT_DROP`] or [`VERDICT_AUDIT`].
    pub verdict: u8,
    pub protocol: u8,
    pub _pad: u8,
    /// The peer's port and the local one (host order): the server's port
    /// is the first for egress rules, the second for ingress rules (the
    /// agent picks; choosing here would cost the verifier a branch on the
    /// rules' direction).
    pub remote_port: u16,
    pub local_port: u16,
    /// The peer: the server (egress rules) or the client (ingress rules).
    pub peer: [u8; 16],
}

/// What one [`AttemptKey`] matched in a window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptStats {
    /// Connection attempts (TCP SYNs, `connect()` calls).
    pub attempts: u64,
    pub packets: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last match.
    pub last_ns: u64,
}

/// Verdicts of the policy evaluation.
pub const VERDICT_PASS: u8 = 0;
pub const VERDICT_DROP: u8 = 1;
pub const VERDICT_AUDIT: u8 = 2;

/// Connection-table key: a [`FlowKey`] with `direction` 0, identifying a
/// connection of a local endpoint with rules whatever the packet direction.
pub type ConnKey = FlowKey;

/// The local endpoint opened the connection.
pub const ROLE_CLIENT: u8 = 1;
/// The remote peer opened the connection.
pub const ROLE_SERVER: u8 = 2;

/// Connection-table value: who opened the connection, and the verdict
/// computed for it under configuration `epoch` (recomputed when the
/// epoch changes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    pub role: u8,
    pub verdict: u8,
    /// Slot that decided a DROP/AUDIT verdict.
    pub slot: u8,
    /// 1 when the local endpoint was not traced (so has no flow entry to
    /// carry the verdict): the verdict cache is its fast path.
    pub untraced: u8,
    /// The config epoch the verdict was decided in.
    pub epoch: u32,
    /// The interface of the packet that was decided (a pod's own: both of
    /// its TC programs are on its host-side interface). A packet leaving a
    /// pod takes the fast path only through it.
    pub ifindex: u32,
}

/// A pod's addresses (IPv4-mapped and IPv6; all-zero when it has no such
/// address): the value of the cgroup table (connect-time checks) and of the
/// interface table (anti-spoofing).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    pub addr4: [u8; 16],
    pub addr6: [u8; 16],
}

/// Datapath-wide settings (a one-element array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Counts configuration flips (0 before the first). Bit 0 is the active
    /// table generation; the whole value tells cached decisions of an
    /// earlier configuration from current ones. One 32-bit load reads both.
    pub epoch: u32,
    pub _pad: u32,
    /// Minimum time between two RTT samples of one socket, in nanoseconds.
    pub rtt_sample_interval_ns: u64,
    /// A hash of the config revision written to each generation (userspace
    /// bookkeeping: lets a restarted agent know what the kernel enforces).
    pub revision_hash: [u64; 2],
}

/// Where the fields the drop hook reads sit in the running kernel's
/// `struct sk_buff`, resolved by the agent from BTF. The drop hook does
/// nothing until `valid` is 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbLayout {
    /// `unsigned char *head`.
    pub head: u32,
    /// `__u16 network_header` (offset of the IP header from `head`).
    pub network_header: u32,
    /// `__u16 transport_header` (offset of the L4 header from `head`).
    pub transport_header: u32,
    pub valid: u32,
}

/// Drop reasons counted one by one; larger values (subsystem reasons) share
/// the last slot.
pub const NUM_DROP_REASONS: u32 = 256;

/// Indices of the global per-CPU counters.
pub const COUNTER_FLOW_TABLE_FULL: u32 = 0;
pub const COUNTER_RTT_TABLE_FULL: u32 = 1;
pub const COUNTER_CONN_TABLE_FULL: u32 = 2;
pub const COUNTER_RTT_SAMPLES: u32 = 3;
pub const COUNTER_PARSE_ERRORS: u32 = 4;
pub const COUNTER_CONNECT_DENIED: u32 = 5;
/// Kernel drops of traced endpoints whose flow had no entry to count them in
/// (for example a connection blocked before its first packet was counted).
pub const COUNTER_DROPS_WITHOUT_FLOW: u32 = 6;
/// Connections to a Service translated to a backend at `connect()`.
pub const COUNTER_SERVICE_TRANSLATED: u32 = 7;
pub const NUM_COUNTERS: u32 = 8;

/// Suspect packets of attached pods, by reason (indices of `FL_SUSPECT`, a
/// per-CPU array). At a pod with rules they are dropped: rules that cannot
/// be evaluated must not be skipped.
///
/// A non-first IP fragment whose first fragment was not seen (its ports are
/// unknown).
pub const SUSPECT_ORPHAN_FRAGMENT: u32 = 0;
/// The transport header is missing or cut short (a first fragment too small
/// to carry it, RFC 1858; a truncated packet).
pub const SUSPECT_TRUNCATED: u32 = 1;
/// More IPv6 extension headers than the datapath walks.
pub const SUSPECT_EXT_HEADERS: u32 = 2;
/// A source address the pod does not own (spoofed). Never counted as the
/// traffic of the pod that owns the address.
pub const SUSPECT_SPOOFED: u32 = 3;
pub const NUM_SUSPECT: u32 = 4;

/// Value of the interface table: the addresses of the pod behind a host-side
/// interface, and whether packets it sends from other addresses are dropped.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInterface {
    pub addrs: PodAddrs,
    /// 1: the pod has rules, its spoofed packets are dropped; 0: they pass
    /// uncounted.
    pub drop_spoofed: u32,
    pub _pad: u32,
}

/// Key of the fragment table: one fragmented datagram.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// The ports of a fragmented datagram, from its first fragment (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Histogram layout: values below 32 µs have their own bucket; above, each
/// power of two is split into 32 linear sub-buckets (relative width at most
/// 1/32, so a bucket midpoint is within 1.6% of any value in it).
pub const RTT_SUB_BUCKETS_LOG2: u32 = 5;
const SUB: u32 = 1 << RTT_SUB_BUCKETS_LOG2;
/// Number of buckets (values up to `u32::MAX` µs).
pub const RTT_BUCKETS: u16 = (SUB + (32 - RTT_SUB_BUCKETS_LOG2) * SUB) as u16;

/// The histogram bucket of an RTT in microseconds. Branch-only arithmetic so
/// the verifier accepts it (no loops, no `clz`).
#[inline(always)]
pub const fn rtt_bucket(us: u32) -> u16 {
    if us < SUB {
        return us as u16;
    }
    // e = floor(log2(us)), 5..=31, by binary search.
    let mut e: u32 = 0;
    let mut v = us;
    if v >= 1 << 16 {
        v >>= 16;
        e += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        e += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        e += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        e += 2;
    }
    if v >= 1 << 1 {
        e += 1;
    }
    let shift = e - RTT_SUB_BUCKETS_LOG2;
    let sub = (us >> shift) & (SUB - 1);
    (SUB + shift * SUB + sub) as u16
}

/// The lowest value (µs) of a bucket.
pub const fn rtt_bucket_lower(bucket: u16) -> u64 {
    let b = bucket as u64;
    let n = SUB as u64;
    if b < n {
        return b;
    }
    let shift = (b - n) / n;
    let sub = (b - n) % n;
    (n + sub) << shift
}

/// The width (µs) of a bucket.
pub const fn rtt_bucket_width(bucket: u16) -> u64 {
    let b = bucket as u64;
    let n = SUB as u64;
    if b < n {
        return 1;
    }
    1 << ((b - n) / n)
}

/// Converts an IPv4 address (network order bytes) to its IPv4-mapped form.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Key of the Service frontend table: an address and port kube-proxy
/// translates, in one configuration generation.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub generation: u32,
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// `ServiceInfo::flags`: a client keeps its backend (`sessionAffinity: ClientIP`).
pub const SERVICE_CLIENT_AFFINITY: u32 = 1;

/// The most backends the connect hook examines for one connection: beyond,
/// a client whose examined backends are all blocked is refused (fail closed).
pub const SERVICE_BACKENDS_EXAMINED: u32 = 16;

/// Value of the Service frontend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Names the Service (a hash of `namespace/name`) in connection records.
    pub service_id: u64,
    /// Backends are `FL_SVC_BACKENDS[(generation, first .. first + count)]`.
    pub first: u32,
    pub count: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the Service backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub generation: u32,
    pub index: u32,
}

/// A Service backend: a pod address and its target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceBackendAddr {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of the record of connections translated at `connect()`: client,
/// backend, backend port and protocol (the client port is not known yet
/// when `connect()` runs).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceConnKey {
    pub client: [u8; 16],
    pub backend: [u8; 16],
    /// Host order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// What a translated socket connected to (the frontend) and was given (the
/// backend), for `getpeername()` and `recvmsg()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSocket {
    pub frontend: [u8; 16],
    pub backend: [u8; 16],
    /// Host order.
    pub port: u16,
    /// Host order.
    pub backend_port: u16,
    pub _pad: [u8; 4],
}

/// DNS: the server port whose messages the TC programs copy to the agent
/// (queries a traced pod sends to it, the answers it receives from it),
/// over UDP and TCP.
pub const DNS_PORT: u16 = 53;
/// Payload bytes copied per DNS packet (a longer message arrives cut; the
/// agent still reads its header and question).
pub const DNS_CAPTURE_BYTES: usize = 512;
/// DNS packets copied per CPU per second at most; more are counted as
/// dropped (`DnsBudget::dropped`).
pub const DNS_EVENTS_PER_CPU_SECOND: u64 = 16384;

/// One DNS packet of a traced pod, copied to the agent's ring buffer.
/// Addresses and ports as seen from the pod (as in [`FlowKey`]).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    /// CLOCK_MONOTONIC nanoseconds when the packet passed the hook.
    pub ts_ns: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// `DIRECTION_EGRESS`: a query leaving the pod; `DIRECTION_INGRESS`:
    /// an answer to it.
    pub direction: u8,
    /// Bytes of `payload` filled (at most [`DNS_CAPTURE_BYTES`]).
    pub captured: u16,
    /// The packet's transport payload length (more than `captured` when
    /// the message was cut).
    pub payload_len: u32,
    pub _pad: u32,
    pub payload: [u8; DNS_CAPTURE_BYTES],
}

/// Per-CPU state and counters of the DNS copy (cumulative counters).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsBudget {
    /// Start (CLOCK_MONOTONIC ns) of the current one-second budget.
    pub window_ns: u64,
    /// Packets copied in the current budget.
    pub used: u64,
    /// Packets copied.
    pub captured: u64,
    /// Packets not copied: over budget or the ring buffer full.
    pub dropped: u64,
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(FlowKey, 40);
assert_size!(FlowStats, 48);
assert_size!(OverflowKey, 24);
assert_size!(RttKey, 40);
assert_size!(EndpointKey, 20);
assert_size!(EndpointInfo, 40);
assert_size!(PeerKey, 24);
assert_size!(ClassRuleKey, 8);
assert_size!(PortKey, 8);
assert_size!(RuleCounterKey, 8);
assert_size!(RuleCounters, 16);
assert_size!(AttemptKey, 28);
assert_size!(AttemptStats, 24);
assert_size!(ConnState, 12);
assert_size!(PodAddrs, 32);
assert_size!(DatapathConfig, 32);
assert_size!(SkbLayout, 16);
assert_size!(ServiceKey, 24);
assert_size!(ServiceInfo, 24);
assert_size!(BackendKey, 8);
assert_size!(ServiceBackendAddr, 24);
assert_size!(ServiceConnKey, 36);
assert_size!(ServiceSocket, 40);
assert_size!(FragKey, 40);
assert_size!(FragPorts, 4);
assert_size!(PodInterface, 40);

assert_size!(DnsEvent, 568);
assert_size!(DnsBudget, 32);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `repr(C)`, `Copy`, and have no implicit padding
    // (checked by the size assertions above and explicit `_pad` fields).
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for DnsEvent {}
    unsafe impl aya::Pod for DnsBudget {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for OverflowKey {}
    unsafe impl aya::Pod for RttKey {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for ClassRuleKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for RuleCounterKey {}
    unsafe impl aya::Pod for RuleCounters {}
    unsafe impl aya::Pod for AttemptKey {}
    unsafe impl aya::Pod for AttemptStats {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for PodAddrs {}
    unsafe impl aya::Pod for PodInterface {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SkbLayout {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for ServiceBackendAddr {}
    unsafe impl aya::Pod for ServiceConnKey {}
    unsafe impl aya::Pod for ServiceSocket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_word_carries_its_rule_and_passes_only_in_its_epoch() {
        for epoch in [1u32, 2, 77, (1 << 25) - 1, 1 << 25, u32::MAX] {
            for (ep, dir, slot) in [(0, 0, 0), (MAX_ENDPOINT_ID - 1, 1, 63), (12345, 1, 7)] {
                let w = pass_word(epoch, true, ep, dir, slot);
                assert_eq!(audited_rule(w), Some((ep, dir, slot)));
                assert!(passes_in(w, epoch));
                assert!(!passes_in(w, epoch.wrapping_add(1)));
                assert!(!passes_in(w, epoch.wrapping_sub(1)));
            }
            let plain = pass_word(epoch, false, 9, 1, 3);
            assert_eq!(audited_rule(plain), None);
            assert!(passes_in(plain, epoch));
            assert!(!passes_in(plain, epoch.wrapping_add(2)));
            // 0: evaluate, in any epoch.
            assert!(!passes_in(0, epoch));
        }
    }

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0u16;
        for us in (0u32..200_000).chain([1 << 20, (1 << 24) + 12345, u32::MAX]) {
            let b = rtt_bucket(us);
            assert!(b >= last, "bucket of {us} went down");
            last = b;
            let lo = rtt_bucket_lower(b);
            let w = rtt_bucket_width(b);
            assert!(
                lo <= us as u64 && (us as u64) < lo + w,
                "{us} not in bucket {b} [{lo}, {})",
                lo + w
            );
            assert!(b < RTT_BUCKETS);
            if us >= 32 {
                assert!(
                    w * 32 <= lo,
                    "bucket {b} is wider than 1/32 of its lower bound"
                );
            } else {
                assert_eq!((lo, w), (us as u64, 1), "values below 32 µs are exact");
            }
        }
    }

    #[test]
    fn scope_layout() {
        assert_eq!(rule_scope(1, DIRECTION_INGRESS, 5), [0xc0, 0, 0, 5]);
        assert_eq!(
            rule_scope(0, DIRECTION_EGRESS, MAX_ENDPOINT_ID - 1),
            [0x3f, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn v4_mapping() {
        assert_eq!(v4_mapped([10, 0, 0, 1])[10..], [0xff, 0xff, 10, 0, 0, 1]);
    }
}
