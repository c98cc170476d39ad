//! The kernel side of the agent: the only module that touches eBPF objects.
//!
//! [`Datapath::open`] loads the programs, reusing pinned maps and links of a
//! previous agent (so enforcement and counters never stop); [`Datapath::apply`]
//! writes compiled tables into the inactive generation and flips to it in one
//! array update; [`Datapath::drain`] swaps and empties the result tables.

pub(crate) mod attach;
pub(crate) mod drop_reasons;
pub(crate) mod error;
pub mod pins;
mod results;
mod service_tables;
pub(crate) mod skb_layout;
pub(crate) mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
};
use flowlens_agent_common::{AttemptKey, AttemptStats};
use flowlens_agent_common::{
    ClassRuleKey, DatapathConfig, DnsBudget, EndpointInfo, EndpointKey, FlowKey, FlowStats,
    NUM_COUNTERS, NUM_DROP_REASONS, OverflowKey, PEER_GENERATION_BITS, PORT_SCOPE_BITS, PeerKey,
    PodAddrs, PodInterface, PortKey, RttKey, RuleCounterKey, RuleCounters, SkbLayout,
    peer_generation, rule_scope,
};
use flowlens_api::node_agent_config::DatapathHooks;
use tracing::{info, warn};

pub(crate) use error::{DatapathError, Result};
use pins::PinLayout;
use results::Swappable;

use crate::{
    aggregate::Drained,
    tables::{Capacity, Tables},
};

/// The compiled eBPF object, embedded at build time.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowlens-agent-ebpf"));

/// Maps of the object, pinned by name.
const PINNED_MAPS: &[&str] = &[
    "FL_CONFIG",
    "FL_ENDPOINTS",
    "FL_PEER_CLASSES",
    "FL_CLASS_RULES",
    "FL_PORTS",
    "FL_CONNS",
    "FL_CGROUPS",
    "FL_COUNTERS",
    "FL_DROP_REASONS",
    "FL_SKB_LAYOUT",
    "FL_RTT_LAST",
    "FL_RTT_SOCK",
    "FL_FLOWS",
    "FL_OVERFLOW",
    "FL_RTT",
    "FL_RULE_CNT",
    "FL_ATTEMPTS",
    "FL_SERVICES",
    "FL_SVC_BACKENDS",
    "FL_SVC_CONNS",
    "FL_SVC_SOCKS",
    "FL_DNS_EVENTS",
    "FL_DNS_BUDGET",
];

/// The policy tables, sized by `--policy-table-size`: peer classes, class
/// rules, ports (the order of [`Capacity::per_generation`]).
const POLICY_TABLES: [&str; 3] = ["FL_PEER_CLASSES", "FL_CLASS_RULES", "FL_PORTS"];

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Capacity of each named-attempts table (blocked and audited attempts by
/// peer and port, per drain). A full table loses names, never counts.
const ATTEMPT_TABLE_SIZE: u32 = 4096;

/// Which hook to use for RTT samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RttHook {
    /// The best the kernel offers: sock_ops, else tcp_probe.
    Auto,
    /// `sock_ops` RTT callbacks (cgroup v2).
    SockOps,
    /// The `tcp:tcp_probe` tracepoint.
    TcpProbe,
    /// No RTT sampling.
    None,
}

/// The first kernel with tcx links (TC programs attached without qdiscs).
const TCX_SINCE: aya::util::KernelVersion = aya::util::KernelVersion::new(6, 6, 0);

/// How to open the datapath.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Pin root (the layout version is appended).
    pub bpffs_root: PathBuf,
    /// The cgroup v2 directory whose sockets are observed (RTT via sock_ops)
    /// and checked at connect(); `None` disables both.
    pub cgroup_root: Option<PathBuf>,
    pub rtt_hook: RttHook,
    pub flow_table_size: u32,
    pub rtt_table_size: u32,
    /// Entries of each policy table (peer classes, class rules, ports).
    pub policy_table_size: u32,
    pub rtt_sample_interval: Duration,
}

/// Global kernel counters (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KernelCounters {
    pub flow_table_full: u64,
    pub rtt_table_full: u64,
    pub conn_table_full: u64,
    pub rtt_samples: u64,
    pub connect_denied: u64,
    /// Kernel drops of traced endpoints that found no flow entry.
    pub drops_without_flow: u64,
    /// Connections to Services translated to a backend at `connect()`.
    pub service_translated: u64,
    /// Suspect packets by `SUSPECT_*` reason.
    pub suspect: [u64; flowlens_agent_common::NUM_SUSPECT as usize],
    /// DNS packets copied to the ring buffer, and not copied (budget or
    /// ring full).
    pub dns_copied: u64,
    pub dns_dropped: u64,
}

/// Which result tables a drain swaps out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrainScope {
    /// Every table: an observation's window ended (or the flow table is
    /// filling, or the agent stops).
    All,
    /// Rule counters and named attempts only: a policy window ended.
    Rules,
}

/// Sizes of the tables drained last time, against their capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableFill {
    pub flows: (usize, u32),
    pub rtt: (usize, u32),
    pub overflow: (usize, u32),
    pub rules: (usize, u32),
    pub attempts: (usize, u32),
}

pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    hooks: DatapathHooks,
    flows: Swappable<FlowKey, FlowStats>,
    overflow: Swappable<OverflowKey, FlowStats>,
    rtt: Swappable<RttKey, u64>,
    rules: Swappable<RuleCounterKey, RuleCounters>,
    attempts: Swappable<AttemptKey, AttemptStats>,
    generation: u32,
    /// Tables written to each generation by this agent (None: unknown).
    written: [Option<Arc<Tables>>; 2],
    cgroups: Option<BTreeMap<u64, PodAddrs>>,
    /// The interface table as last written (None: not read yet).
    pod_interfaces: Option<BTreeMap<u32, PodInterface>>,
    /// The Service tables of the generation replaced last: connections
    /// translated under them still drain once after the flip.
    retired_services: Option<Arc<Tables>>,
    rtt_sample_interval_ns: u64,
    /// Drained from spare tables at start: counts a dead agent did not report.
    leftovers: Option<Drained>,
    /// Drop reason names of the running kernel, by value.
    drop_reason_names: BTreeMap<u32, String>,
    pub(crate) fill: TableFill,
    /// What one generation of the policy tables holds (read from the maps
    /// as the kernel made them: a pinned map keeps its size).
    policy_capacity: Capacity,
    /// The DNS copies (None: the ring buffer could not be opened).
    dns_ring: Option<aya::maps::RingBuf<MapData>>,
}

/// A stable hash of a revision string (kept in the kernel per generation).
pub(crate) fn revision_hash(revision: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    revision.hash(&mut h);
    h.finish() | 1
}

impl Datapath {
    /// Loads the programs and maps, adopting whatever a previous agent
    /// pinned. `spooled`: the spare tables (map ids) whose records the
    /// predecessor's spool holds.
    pub fn open(opts: &DatapathOptions, spooled: &[u32]) -> Result<Datapath> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoEbpfObject);
        }
        let layout = PinLayout::new(&opts.bpffs_root);
        layout.prepare().map_err(|e| {
            DatapathError::io(
                format!("preparing pins under {}", layout.dir().display()),
                e,
            )
        })?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|n| (*n, layout.map(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for name in POLICY_TABLES {
            loader.map_max_entries(name, opts.policy_table_size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        attach::load_programs(&mut ebpf)?;

        let flows = Swappable::open(
            &mut ebpf,
            &layout,
            "FL_FLOWS",
            "flows",
            opts.flow_table_size,
        )?;
        let overflow = Swappable::open(&mut ebpf, &layout, "FL_OVERFLOW", "overflow", 8192)?;
        let rtt = Swappable::open(&mut ebpf, &layout, "FL_RTT", "rtt", opts.rtt_table_size)?;
        let rules = Swappable::open(&mut ebpf, &layout, "FL_RULE_CNT", "rules", 16384)?;
        let attempts = Swappable::open(
            &mut ebpf,
            &layout,
            "FL_ATTEMPTS",
            "attempts",
            ATTEMPT_TABLE_SIZE,
        )?;

        let config = read_config(&mut ebpf)?;
        let dns_ring = open_dns_ring(&mut ebpf);
        let [peer_classes, class_rules, ports] = POLICY_TABLES.map(|name| max_entries(&ebpf, name));
        let policy_capacity = Capacity::per_generation(peer_classes?, class_rules?, ports?);
        let mut dp = Datapath {
            ebpf,
            layout,
            hooks: DatapathHooks::default(),
            flows,
            overflow,
            rtt,
            rules,
            attempts,
            generation: config.epoch & 1,
            written: [None, None],
            cgroups: None,
            pod_interfaces: None,
            retired_services: None,
            rtt_sample_interval_ns: opts.rtt_sample_interval.as_nanos() as u64,
            leftovers: None,
            drop_reason_names: BTreeMap::new(),
            fill: TableFill::default(),
            policy_capacity,
            dns_ring,
        };
        // Spare tables a predecessor's spool vouches for are emptied by the
        // first drain; any other spare table holds what a predecessor
        // drained but never committed: counted once, by the first drain.
        let counted = |id: Result<u32>| id.map(|id| spooled.contains(&id));
        let mut leftovers = Drained {
            flows: if counted(dp.flows.spare_id())? {
                Vec::new()
            } else {
                dp.flows.read_spare()?
            },
            overflow: if counted(dp.overflow.spare_id())? {
                Vec::new()
            } else {
                dp.overflow.read_spare()?
            },
            rtt: if counted(dp.rtt.spare_id())? {
                Vec::new()
            } else {
                dp.rtt.read_spare()?
            },
            rules: if counted(dp.rules.spare_id())? {
                Vec::new()
            } else {
                dp.rules.read_spare()?
            },
            attempts: if counted(dp.attempts.spare_id())? {
                Vec::new()
            } else {
                dp.attempts.read_spare()?
            },
            read_at_ns: monotonic_ns(),
            // Before any config: Service names are not known yet.
            services: Vec::new(),
        };
        leftovers.sort_flows();
        dp.leftovers = Some(leftovers);
        dp.attach_global_hooks(opts);
        Ok(dp)
    }

    /// Attaches the hooks that are not per interface (RTT, connect,
    /// retransmits, drops), each as far as the kernel allows, and records
    /// which are in use in `self.hooks`.
    fn attach_global_hooks(&mut self, opts: &DatapathOptions) {
        self.hooks.flows = if attach::tcx_supported() {
            "tcx".into()
        } else {
            "none".into()
        };
        let tracefs = pins::ensure_tracefs();
        if let Err(e) = &tracefs {
            warn!(error = %e, "tracefs is not available: no tracepoint hooks");
        }
        let fentry =
            aya::sys::is_program_supported(aya::programs::ProgramType::Tracing).unwrap_or(false);
        info!(
            fentry_supported = fentry,
            "probed kernel: fentry/fexit (BPF tracing programs) {}",
            if fentry { "available" } else { "unavailable" }
        );
        self.hooks.rtt = self.attach_rtt_hook(opts, tracefs.is_ok());
        self.hooks.connect = self.attach_connect_hooks(opts);
        self.hooks.retransmits = if tracefs.is_ok() {
            self.attach_retransmit_hook()
        } else {
            "none".into()
        };
        self.hooks.drops = match &tracefs {
            Ok(root) => self.attach_drop_hook(root),
            Err(_) => "none".into(),
        };
        info!(flows = %self.hooks.flows, rtt = %self.hooks.rtt, connect = %self.hooks.connect, retransmits = %self.hooks.retransmits, drops = %self.hooks.drops, "kernel hooks in use");
    }

    /// RTT: sock_ops when a cgroup v2 root is known, else tcp_probe. Returns
    /// the hook in use.
    fn attach_rtt_hook(&mut self, opts: &DatapathOptions, tracefs: bool) -> String {
        let mut rtt = "none".to_owned();
        let want_sockops = matches!(opts.rtt_hook, RttHook::Auto | RttHook::SockOps);
        if want_sockops && let Some(cg) = &opts.cgroup_root {
            match attach::cgroup_hook(
                &mut self.ebpf,
                &self.layout,
                attach::PROG_SOCKOPS,
                cg,
                "sockops",
            ) {
                Ok(()) => rtt = "sock_ops".into(),
                Err(e) => warn!(error = %e, "sock_ops RTT hook unavailable"),
            }
        }
        if rtt == "sock_ops" {
            attach::unpin(&self.layout, "tp_tcp_probe");
        } else {
            attach::unpin(&self.layout, "sockops");
            if matches!(opts.rtt_hook, RttHook::Auto | RttHook::TcpProbe) && tracefs {
                match attach::tracepoint_hook(
                    &mut self.ebpf,
                    &self.layout,
                    attach::PROG_TCP_PROBE,
                    "tcp",
                    "tcp_probe",
                    "tp_tcp_probe",
                ) {
                    Ok(()) => rtt = "tracepoint/tcp/tcp_probe".into(),
                    Err(e) => warn!(error = %e, "tcp_probe RTT hook unavailable"),
                }
            }
        }
        rtt
    }

    /// Connect-time rejection (cgroup connect4 and connect6). Returns the
    /// hooks in use.
    fn attach_connect_hooks(&mut self, opts: &DatapathOptions) -> String {
        let Some(cg) = &opts.cgroup_root else {
            return "none".into();
        };
        let c4 = attach::cgroup_hook(
            &mut self.ebpf,
            &self.layout,
            attach::PROG_CONNECT4,
            cg,
            "connect4",
        );
        let c6 = attach::cgroup_hook(
            &mut self.ebpf,
            &self.layout,
            attach::PROG_CONNECT6,
            cg,
            "connect6",
        );
        match (c4, c6) {
            (Ok(()), Ok(())) => {}
            (a, b) => {
                warn!(connect4 = ?a.err(), connect6 = ?b.err(), "connect-time rejection unavailable");
                return "none".into();
            }
        }
        // Unconnected UDP to a Service is translated per datagram; a socket
        // translated to a Service backend reports the Service address as its
        // peer, and as the source of its UDP replies, as through kube-proxy.
        let mut failed = Vec::new();
        for (prog, pin) in [
            (attach::PROG_GETPEERNAME4, "getpeername4"),
            (attach::PROG_GETPEERNAME6, "getpeername6"),
            (attach::PROG_RECVMSG4, "recvmsg4"),
            (attach::PROG_RECVMSG6, "recvmsg6"),
            (attach::PROG_SENDMSG4, "sendmsg4"),
            (attach::PROG_SENDMSG6, "sendmsg6"),
        ] {
            if let Err(e) = attach::cgroup_hook(&mut self.ebpf, &self.layout, prog, cg, pin) {
                failed.push(format!("{pin}: {e}"));
            }
        }
        if failed.is_empty() {
            "cgroup/connect4+connect6+sendmsg4+sendmsg6+getpeername4+getpeername6+recvmsg4+recvmsg6"
                .into()
        } else {
            warn!(failed = ?failed, "Service clients will see the backend as their peer");
            "cgroup/connect4+connect6".into()
        }
    }

    /// Retransmits: the `tcp:tcp_retransmit_skb` tracepoint. Returns the
    /// hook in use.
    fn attach_retransmit_hook(&mut self) -> String {
        match attach::tracepoint_hook(
            &mut self.ebpf,
            &self.layout,
            attach::PROG_TCP_RETRANS,
            "tcp",
            "tcp_retransmit_skb",
            "tp_tcp_retransmit_skb",
        ) {
            Ok(()) => "tracepoint/tcp/tcp_retransmit_skb".into(),
            Err(e) => {
                warn!(error = %e, "retransmit hook unavailable");
                "none".into()
            }
        }
    }

    /// Kernel drops: `skb:kfree_skb`, reading packets at the `sk_buff`
    /// offsets of this kernel's BTF. Without BTF, drops are not counted.
    fn attach_drop_hook(&mut self, tracefs: &Path) -> String {
        let layout = match skb_layout::resolve(Path::new(skb_layout::KERNEL_BTF)) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "kernel drops are not counted: the sk_buff layout of this kernel is unknown");
                attach::unpin(&self.layout, "tp_kfree_skb");
                return "none".into();
            }
        };
        let written = typed::<Array<&mut MapData, SkbLayout>>(&mut self.ebpf, "FL_SKB_LAYOUT")
            .and_then(|mut a| {
                a.set(0, layout, 0)
                    .map_err(|e| DatapathError::map("FL_SKB_LAYOUT", e))
            });
        if let Err(e) = written {
            warn!(error = %e, "kernel drops are not counted");
            return "none".into();
        }
        match std::fs::read_to_string(tracefs.join(drop_reasons::FORMAT)) {
            Ok(f) => self.drop_reason_names = drop_reasons::parse(&f),
            Err(e) => {
                warn!(error = %e, "drop reason names unavailable: metrics label reasons by number")
            }
        }
        match attach::tracepoint_hook(
            &mut self.ebpf,
            &self.layout,
            attach::PROG_KFREE_SKB,
            "skb",
            "kfree_skb",
            "tp_kfree_skb",
        ) {
            Ok(()) => "tracepoint/skb/kfree_skb".into(),
            Err(e) => {
                warn!(error = %e, "kernel drop hook unavailable");
                "none".into()
            }
        }
    }

    /// Removes the pins of other layout versions (an agent of another
    /// version ran before): their programs detach, their maps go. Called once
    /// this agent enforces its first config, so enforcement has no gap.
    pub(crate) fn remove_other_layouts(&self) -> usize {
        let mut removed = 0;
        for old in self.layout.other_versions() {
            match attach::remove_all(&old) {
                Ok(n) => {
                    info!(layout = %old.dir().display(), pins = n, "removed the pins of another agent version");
                    removed += 1;
                }
                Err(e) => {
                    warn!(layout = %old.dir().display(), error = %e, "cannot remove the pins of another agent version")
                }
            }
        }
        removed
    }

    /// Kernel drops of traced endpoints by reason label, summed over CPUs
    /// (cumulative since the maps were created); reasons never seen are left out.
    pub(crate) fn drops_by_reason(&mut self) -> Result<BTreeMap<String, u64>> {
        let map: PerCpuArray<&mut MapData, u64> = typed(&mut self.ebpf, "FL_DROP_REASONS")?;
        let mut out = BTreeMap::new();
        for slot in 0..NUM_DROP_REASONS {
            let n: u64 = map
                .get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            if n > 0 {
                let label = drop_reasons::label(&self.drop_reason_names, slot, NUM_DROP_REASONS);
                *out.entry(label).or_default() += n;
            }
        }
        Ok(out)
    }

    /// The hooks in use, by purpose.
    pub(crate) fn hooks(&self) -> &DatapathHooks {
        &self.hooks
    }

    /// What one generation of the policy tables can hold.
    pub(crate) fn policy_capacity(&self) -> Capacity {
        self.policy_capacity
    }

    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// The revision hash the kernel enforces now (0 when never configured).
    pub(crate) fn active_revision_hash(&mut self) -> Result<u64> {
        let c = read_config(&mut self.ebpf)?;
        Ok(c.revision_hash[(c.epoch & 1) as usize])
    }

    /// Writes `tables` into the inactive generation, then makes it active
    /// with one array update. Lookups see either the old or the new tables in
    /// full, never a mix. Old entries are deleted after an RCU barrier.
    pub(crate) fn apply(&mut self, tables: Arc<Tables>, revision: &str) -> Result<()> {
        let next = self.generation ^ 1;
        self.clear_generation(next)?;
        {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointInfo> =
                typed(&mut self.ebpf, "FL_ENDPOINTS")?;
            for (addr, info) in &tables.endpoints {
                endpoints
                    .insert(
                        EndpointKey {
                            generation: next,
                            addr: *addr,
                        },
                        *info,
                        0,
                    )
                    .map_err(|e| DatapathError::map("FL_ENDPOINTS (is the table full?)", e))?;
            }
        }
        {
            let mut classes: LpmTrie<&mut MapData, PeerKey, u32> =
                typed(&mut self.ebpf, "FL_PEER_CLASSES")?;
            for (prefix, class) in &tables.peer_classes {
                classes
                    .insert(&peer_class_key(next, prefix), *class, 0)
                    .map_err(|e| DatapathError::map("FL_PEER_CLASSES (is the table full?)", e))?;
            }
        }
        {
            let mut rules: HashMap<&mut MapData, ClassRuleKey, u64> =
                typed(&mut self.ebpf, "FL_CLASS_RULES")?;
            for (dir, id, class, mask) in &tables.class_rules {
                let key = ClassRuleKey {
                    scope: rule_scope(next, *dir, *id),
                    class: *class,
                };
                rules
                    .insert(key, *mask, 0)
                    .map_err(|e| DatapathError::map("FL_CLASS_RULES (is the table full?)", e))?;
            }
        }
        {
            let mut ports: LpmTrie<&mut MapData, PortKey, u64> = typed(&mut self.ebpf, "FL_PORTS")?;
            for (dir, id, prefix, mask) in &tables.ports {
                let key = Key::new(
                    PORT_SCOPE_BITS + u32::from(prefix.len),
                    PortKey {
                        scope: rule_scope(next, *dir, *id),
                        protocol: prefix.protocol,
                        port: prefix.port.to_be_bytes(),
                        _pad: 0,
                    },
                );
                ports
                    .insert(&key, *mask, 0)
                    .map_err(|e| DatapathError::map("FL_PORTS (is the table full?)", e))?;
            }
        }
        service_tables::write(&mut self.ebpf, next, &tables.services)?;
        // The flip.
        let mut config = read_config(&mut self.ebpf)?;
        config.epoch = next_epoch(config.epoch, next);
        config.revision_hash[next as usize] = revision_hash(revision);
        config.rtt_sample_interval_ns = self.rtt_sample_interval_ns;
        write_config(&mut self.ebpf, &config)?;
        // Wait until no program can still be reading the old generation.
        self.flows.barrier(&mut self.ebpf)?;
        let old = self.generation;
        self.generation = next;
        self.retired_services = self.written[old as usize].clone();
        self.written[next as usize] = Some(tables);
        self.clear_generation(old)?;
        Ok(())
    }

    /// Deletes every table entry of generation `g`.
    fn clear_generation(&mut self, g: u32) -> Result<()> {
        let known = self.written[g as usize].as_ref().map(|t| &t.services);
        service_tables::clear(&mut self.ebpf, g, known)?;
        if let Some(t) = self.written[g as usize].take() {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointInfo> =
                typed(&mut self.ebpf, "FL_ENDPOINTS")?;
            for (addr, _) in &t.endpoints {
                let _ = endpoints.remove(&EndpointKey {
                    generation: g,
                    addr: *addr,
                });
            }
            let mut classes: LpmTrie<&mut MapData, PeerKey, u32> =
                typed(&mut self.ebpf, "FL_PEER_CLASSES")?;
            for (prefix, _) in &t.peer_classes {
                let _ = classes.remove(&peer_class_key(g, prefix));
            }
            let mut rules: HashMap<&mut MapData, ClassRuleKey, u64> =
                typed(&mut self.ebpf, "FL_CLASS_RULES")?;
            for (dir, id, class, _) in &t.class_rules {
                let _ = rules.remove(&ClassRuleKey {
                    scope: rule_scope(g, *dir, *id),
                    class: *class,
                });
            }
            let mut ports: LpmTrie<&mut MapData, PortKey, u64> = typed(&mut self.ebpf, "FL_PORTS")?;
            for (dir, id, prefix, _) in &t.ports {
                let _ = ports.remove(&Key::new(
                    PORT_SCOPE_BITS + u32::from(prefix.len),
                    PortKey {
                        scope: rule_scope(g, *dir, *id),
                        protocol: prefix.protocol,
                        port: prefix.port.to_be_bytes(),
                        _pad: 0,
                    },
                ));
            }
            return Ok(());
        }
        // Unknown content (written by a previous agent): scan.
        let gen_bit = |scope: [u8; 4]| u32::from_be_bytes(scope) >> 31;
        {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointInfo> =
                typed(&mut self.ebpf, "FL_ENDPOINTS")?;
            let keys: Vec<EndpointKey> = endpoints
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.generation == g)
                .collect();
            for k in keys {
                let _ = endpoints.remove(&k);
            }
        }
        {
            let mut classes: LpmTrie<&mut MapData, PeerKey, u32> =
                typed(&mut self.ebpf, "FL_PEER_CLASSES")?;
            let keys: Vec<Key<PeerKey>> = classes
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data().generation == peer_generation(g))
                .collect();
            for k in keys {
                let _ = classes.remove(&k);
            }
        }
        {
            let mut rules: HashMap<&mut MapData, ClassRuleKey, u64> =
                typed(&mut self.ebpf, "FL_CLASS_RULES")?;
            let keys: Vec<ClassRuleKey> = rules
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| gen_bit(k.scope) == g)
                .collect();
            for k in keys {
                let _ = rules.remove(&k);
            }
        }
        {
            let mut ports: LpmTrie<&mut MapData, PortKey, u64> = typed(&mut self.ebpf, "FL_PORTS")?;
            let keys: Vec<Key<PortKey>> = ports
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| gen_bit(k.data().scope) == g)
                .collect();
            for k in keys {
                let _ = ports.remove(&k);
            }
        }
        Ok(())
    }

    /// Makes the cgroup table equal to `wanted` (cgroup id -> pod addresses).
    pub(crate) fn sync_cgroups(&mut self, wanted: &BTreeMap<u64, PodAddrs>) -> Result<()> {
        sync_map(&mut self.ebpf, "FL_CGROUPS", &mut self.cgroups, wanted)
    }

    /// Makes the interface table (pod interface -> the addresses its pod
    /// owns, for anti-spoofing) equal to `wanted`.
    pub(crate) fn sync_pod_interfaces(
        &mut self,
        wanted: &BTreeMap<u32, PodInterface>,
    ) -> Result<()> {
        sync_map(
            &mut self.ebpf,
            "FL_IFACES",
            &mut self.pod_interfaces,
            wanted,
        )
    }

    /// Makes the set of interfaces carrying the TC programs equal to `wanted`.
    pub(crate) fn sync_interfaces(
        &mut self,
        wanted: &BTreeSet<attach::Interface>,
    ) -> Result<BTreeMap<attach::Interface, attach::TcLinks>> {
        attach::sync_tc(&mut self.ebpf, &self.layout, wanted)
    }

    /// What the spare tables held at start and no spool vouched for (once;
    /// the next [`Self::drain`] empties those tables).
    pub(crate) fn take_leftovers(&mut self) -> Option<Drained> {
        self.leftovers.take()
    }

    /// The spare tables' map ids: after a drain, they hold exactly what it
    /// returned (the spool names them when it holds those records).
    pub(crate) fn spare_ids(&self) -> Result<Vec<u32>> {
        Ok(vec![
            self.flows.spare_id()?,
            self.overflow.spare_id()?,
            self.rtt.spare_id()?,
            self.rules.spare_id()?,
            self.attempts.spare_id()?,
        ])
    }

    /// Empties the spare tables (what the last drain read), when nothing
    /// else vouches for their records.
    pub(crate) fn clear_spares(&mut self) -> Result<()> {
        self.flows.clear_spare()?;
        self.overflow.clear_spare()?;
        self.rtt.clear_spare()?;
        self.rules.clear_spare()?;
        self.attempts.clear_spare()
    }

    /// Swaps out and reads the result tables (emptying the tables the
    /// previous drain read first): every table with [`DrainScope::All`], only
    /// the rule counters and named attempts with [`DrainScope::Rules`] (a policy
    /// window ended, no observation's did: the flow tables, by far the
    /// largest, wait for their window).
    pub(crate) fn drain(&mut self, which: DrainScope) -> Result<Drained> {
        if let Some(left) = self.leftovers.take() {
            // Not counted yet: emptying the spare tables would lose them.
            self.leftovers = Some(left);
            return Err(DatapathError::LeftoversNotTaken);
        }
        let flow_tables = which == DrainScope::All;
        let (flows, overflow, rtt) = if flow_tables {
            (
                self.flows.swap_and_read(&mut self.ebpf)?,
                self.overflow.swap_and_read(&mut self.ebpf)?,
                self.rtt.swap_and_read(&mut self.ebpf)?,
            )
        } else {
            Default::default()
        };
        let rules = self.rules.swap_and_read(&mut self.ebpf)?;
        let attempts = self.attempts.swap_and_read(&mut self.ebpf)?;
        if flow_tables {
            self.fill.flows = (flows.len(), self.flows.capacity());
            self.fill.rtt = (rtt.len(), self.rtt.capacity());
            self.fill.overflow = (overflow.len(), self.overflow.capacity());
        }
        self.fill.rules = (rules.len(), self.rules.capacity());
        self.fill.attempts = (attempts.len(), self.attempts.capacity());
        let known: Vec<&crate::tables::services::ServiceTables> = self
            .written
            .iter()
            .flatten()
            .chain(self.retired_services.iter())
            .map(|t| &t.services)
            .collect();
        let services = service_tables::services_of(&self.ebpf, &flows, &known)?;
        if flow_tables {
            // The flows counted under the retired Service tables are read.
            self.retired_services = None;
        }
        // Moved, not copied: a full flow table is megabytes.
        let mut d = Drained {
            flows,
            overflow,
            rtt,
            rules,
            attempts,
            services,
            read_at_ns: monotonic_ns(),
        };
        d.sort_flows();
        Ok(d)
    }

    /// Gives back a drain's flow records once they are counted: after a
    /// large drain the next one reads into their memory (at 64,000 flows a
    /// drain, faulting in fresh pages was ~5% of the agent's time; the
    /// resident set keeps ~7 MB more while drains are that large:
    /// docs/benchmarks.md).
    pub(crate) fn recycle(&mut self, d: Drained) {
        self.flows.recycle(d.flows);
    }

    /// The live tables, read without draining (for `dump`).
    pub(crate) fn peek(&self) -> Result<Drained> {
        let flows = self.flows.peek()?;
        let known: Vec<&crate::tables::services::ServiceTables> =
            self.written.iter().flatten().map(|t| &t.services).collect();
        Ok(Drained {
            services: service_tables::services_of(&self.ebpf, &flows, &known)?,
            flows,
            overflow: self.overflow.peek()?,
            rtt: self.rtt.peek()?,
            rules: self.rules.peek()?,
            attempts: self.attempts.peek()?,
            read_at_ns: monotonic_ns(),
        })
    }

    /// The global counters, summed over CPUs (cumulative since the maps were created).
    pub(crate) fn counters(&mut self) -> Result<KernelCounters> {
        let dns_budget = self.dns_budget()?;
        let map: PerCpuArray<&mut MapData, u64> = typed(&mut self.ebpf, "FL_COUNTERS")?;
        let mut v = [0u64; NUM_COUNTERS as usize];
        for (i, slot) in v.iter_mut().enumerate() {
            if let Ok(per_cpu) = map.get(&(i as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        Ok(KernelCounters {
            flow_table_full: v[flowlens_agent_common::COUNTER_FLOW_TABLE_FULL as usize],
            rtt_table_full: v[flowlens_agent_common::COUNTER_RTT_TABLE_FULL as usize],
            conn_table_full: v[flowlens_agent_common::COUNTER_CONN_TABLE_FULL as usize],
            rtt_samples: v[flowlens_agent_common::COUNTER_RTT_SAMPLES as usize],
            connect_denied: v[flowlens_agent_common::COUNTER_CONNECT_DENIED as usize],
            drops_without_flow: v[flowlens_agent_common::COUNTER_DROPS_WITHOUT_FLOW as usize],
            service_translated: v[flowlens_agent_common::COUNTER_SERVICE_TRANSLATED as usize],
            suspect: self.suspect_counters()?,
            dns_copied: dns_budget.captured,
            dns_dropped: dns_budget.dropped,
        })
    }

    /// The DNS packets the ring buffer holds, parsed.
    pub(crate) fn take_dns(&mut self) -> Vec<crate::dns::tracker::DnsPacket> {
        let mut out = Vec::new();
        if let Some(ring) = &mut self.dns_ring {
            crate::dns::capture::read(ring, &mut out);
        }
        out
    }

    /// The DNS copy's counters, summed over CPUs.
    fn dns_budget(&mut self) -> Result<DnsBudget> {
        let map: PerCpuArray<&mut MapData, DnsBudget> = typed(&mut self.ebpf, "FL_DNS_BUDGET")?;
        let per_cpu = map
            .get(&0, 0)
            .map_err(|e| DatapathError::map("FL_DNS_BUDGET", e))?;
        Ok(per_cpu.iter().fold(DnsBudget::default(), |a, b| DnsBudget {
            captured: a.captured.saturating_add(b.captured),
            dropped: a.dropped.saturating_add(b.dropped),
            ..a
        }))
    }

    /// The suspect-packet counters, summed over CPUs (cumulative).
    fn suspect_counters(&mut self) -> Result<[u64; flowlens_agent_common::NUM_SUSPECT as usize]> {
        let map: PerCpuArray<&mut MapData, u64> = typed(&mut self.ebpf, "FL_SUSPECT")?;
        let mut v = [0u64; flowlens_agent_common::NUM_SUSPECT as usize];
        for (i, slot) in v.iter_mut().enumerate() {
            if let Ok(per_cpu) = map.get(&(i as u32), 0) {
                *slot = per_cpu.iter().fold(0u64, |a, b| a.saturating_add(*b));
            }
        }
        Ok(v)
    }
}

/// Makes the hash map `name` equal to `wanted`, writing only what differs
/// from `last` (what this agent wrote; read from the map when unknown).
fn sync_map<K, V>(
    ebpf: &mut Ebpf,
    name: &'static str,
    last: &mut Option<BTreeMap<K, V>>,
    wanted: &BTreeMap<K, V>,
) -> Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut map: HashMap<&mut MapData, K, V> = typed(ebpf, name)?;
    let current = match last.take() {
        Some(c) => c,
        None => map.iter().filter_map(|r| r.ok()).collect(),
    };
    for (k, v) in wanted {
        if current.get(k) != Some(v) {
            map.insert(k, v, 0)
                .map_err(|e| DatapathError::map(name, e))?;
        }
    }
    for k in current.keys() {
        if !wanted.contains_key(k) {
            let _ = map.remove(k);
        }
    }
    *last = Some(wanted.clone());
    Ok(())
}

/// The epoch after `epoch` whose bit 0 is the generation `next` (epochs only
/// grow: cached decisions of any earlier epoch never match again).
fn next_epoch(epoch: u32, next: u32) -> u32 {
    let e = epoch.wrapping_add(1);
    let e = if e & 1 == next { e } else { e.wrapping_add(1) };
    // 0 means "before the first config" to the kernel; never reuse it.
    if e == 0 { 2 | next } else { e }
}

/// The LPM key of a peer class entry of generation `g`.
fn peer_class_key(g: u32, prefix: &crate::tables::prefix::AddrPrefix) -> Key<PeerKey> {
    Key::new(
        PEER_GENERATION_BITS + u32::from(prefix.len),
        PeerKey {
            generation: peer_generation(g),
            addr: prefix.bytes(),
            _pad: [0; 4],
        },
    )
}

/// The entries map `name` can hold, as the kernel created it (a pinned map
/// keeps the size it was created with).
fn max_entries(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    use aya::maps::Map;
    let data = match ebpf.map(name) {
        Some(Map::LpmTrie(m) | Map::HashMap(m)) => m,
        _ => {
            return Err(DatapathError::map(
                name,
                aya::maps::MapError::InvalidName { name: name.into() },
            ));
        }
    };
    data.info()
        .map(|i| i.max_entries())
        .map_err(|e| DatapathError::map(name, e))
}

fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).ok_or_else(|| {
        DatapathError::map(name, aya::maps::MapError::InvalidName { name: name.into() })
    })?;
    T::try_from(map).map_err(|e| DatapathError::map(name, e))
}

/// The DNS ring buffer; without it, DNS goes unobserved (logged), and
/// everything else works.
fn open_dns_ring(ebpf: &mut Ebpf) -> Option<aya::maps::RingBuf<MapData>> {
    let opened = ebpf
        .take_map("FL_DNS_EVENTS")
        .ok_or_else(|| "the object has no FL_DNS_EVENTS map".to_owned())
        .and_then(|m| aya::maps::RingBuf::try_from(m).map_err(|e| e.to_string()));
    match opened {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "DNS of traced pods will not be observed");
            None
        }
    }
}

fn read_config(ebpf: &mut Ebpf) -> Result<DatapathConfig> {
    let a: Array<&mut MapData, DatapathConfig> = typed(ebpf, "FL_CONFIG")?;
    a.get(&0, 0).map_err(|e| DatapathError::map("FL_CONFIG", e))
}

fn write_config(ebpf: &mut Ebpf, c: &DatapathConfig) -> Result<()> {
    let mut a: Array<&mut MapData, DatapathConfig> = typed(ebpf, "FL_CONFIG")?;
    a.set(0, c, 0)
        .map_err(|e| DatapathError::map("FL_CONFIG", e))
}

/// Removes every pin of a layout (detaching programs, freeing maps).
pub fn remove_pins(bpffs_root: &Path) -> std::io::Result<usize> {
    attach::remove_all(&PinLayout::new(bpffs_root))
}

#[cfg(test)]
mod tests {
    use super::next_epoch;

    #[test]
    fn epochs_grow_and_carry_the_generation_in_bit_0() {
        assert_eq!(next_epoch(0, 1), 1);
        assert_eq!(next_epoch(1, 0), 2);
        assert_eq!(next_epoch(2, 1), 3);
        // A generation out of step with the epoch (a previous agent's
        // state): skip one rather than go back.
        assert_eq!(next_epoch(2, 0), 4);
        // Wrapping around skips 0.
        assert_eq!(next_epoch(u32::MAX, 0), 2);
        assert_eq!(next_epoch(u32::MAX - 1, 1), u32::MAX);
    }
}
