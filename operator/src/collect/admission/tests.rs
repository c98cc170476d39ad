use std::collections::{BTreeMap, BTreeSet};

use flowlens_api::report::{Matches, PolicyMatches};

use super::*;

const NOW_MS: i64 = 1_000_000_000;
const NOW_S: i64 = NOW_MS / 1000;

/// Node `a`: observation `u` (10 s windows, maxSeries 2) traces pods on it,
/// `v` only on other nodes; pod `ns/here` is on `a`, `ns/there` on `b`;
/// policy `ns/p` targets `a`, `ns/q` only other nodes.
#[derive(Default)]
struct Fake {
    observations: BTreeMap<String, ObservationScope>,
    pods: BTreeMap<(String, String), Option<String>>,
    policies: BTreeSet<(String, String)>,
}

impl Fake {
    fn new() -> Self {
        let mut f = Fake::default();
        let obs = |on_node| ObservationScope {
            window_seconds: 10,
            max_series: 2,
            on_node,
        };
        f.observations.insert("u".into(), obs(true));
        f.observations.insert("v".into(), obs(false));
        f.pods
            .insert(("ns".into(), "here".into()), Some("a".into()));
        f.pods
            .insert(("ns".into(), "there".into()), Some("b".into()));
        f.policies.insert(("ns".into(), "p".into()));
        f
    }
}

impl Scope for Fake {
    fn observation(&self, uid: &str) -> Option<ObservationScope> {
        self.observations.get(uid).copied()
    }
    fn pod_node(&self, namespace: &str, name: &str) -> Option<Option<&str>> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|n| n.as_deref())
    }
    fn policy_on_node(&self, namespace: &str, name: &str) -> bool {
        self.policies
            .contains(&(namespace.to_owned(), name.to_owned()))
    }
}

/// The window that just ended.
const START: i64 = NOW_S - NOW_S % 10 - 10;

fn window(uid: &str, start: i64) -> ObservationWindow {
    ObservationWindow {
        observation: "o".into(),
        uid: uid.into(),
        start,
        window_seconds: 10,
        complete: true,
        ..Default::default()
    }
}

fn series(ns: &str, pod: &str) -> Series {
    Series {
        local: FlowEndpoint {
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            ..Default::default()
        },
        remote: Some("10.0.0.9".into()),
        port: 80,
        protocol: 6,
        ..Default::default()
    }
}

fn policy_window(start: i64, policies: &[&str]) -> PolicyWindow {
    PolicyWindow {
        part: 0,
        start,
        window_seconds: 10,
        policies: policies
            .iter()
            .map(|n| PolicyMatches {
                attempts: Vec::new(),
                namespace: "ns".into(),
                name: (*n).into(),
                blocked: Matches {
                    packets: 1,
                    connections: 1,
                },
                audited: Matches::default(),
            })
            .collect(),
    }
}

fn batch(windows: Vec<ObservationWindow>, policy_windows: Vec<PolicyWindow>) -> ReportBatch {
    ReportBatch {
        node: "a".into(),
        agent: "x".into(),
        windows,
        policy_windows,
    }
}

fn admit(b: ReportBatch) -> Result<Admitted, Refused> {
    Admission::new().admit(&Fake::new(), "a", b, NOW_MS)
}

/// The reason the whole batch is refused.
fn batch_refusal(b: ReportBatch) -> Refusal {
    admit(b).expect_err("the batch is refused").reason
}

/// The reasons of what was dropped; the batch itself is accepted.
fn dropped(b: ReportBatch) -> (Admitted, Vec<Refusal>) {
    let a = admit(b).expect("the batch is accepted");
    let reasons = a.dropped.iter().map(|r| r.reason).collect();
    (a, reasons)
}

#[test]
fn an_honest_batch_passes_whole() {
    let mut w = window("u", START);
    w.series = vec![series("ns", "here"), series("ns", "gone")];
    let b = batch(vec![w], vec![policy_window(START, &["p"])]);
    let a = admit(b.clone()).unwrap();
    assert!(a.dropped.is_empty(), "{:?}", a.dropped);
    assert_eq!(a.windows, b.windows);
    assert_eq!(a.policy_windows, b.policy_windows);
}

#[test]
fn misaligned_windows_refuse_the_batch() {
    let r = admit(batch(vec![window("u", START + 3)], vec![])).unwrap_err();
    assert_eq!(r.reason, Refusal::MisalignedWindow);
    assert_eq!(r.field, "windows[0].start");
    assert_eq!(
        batch_refusal(batch(vec![], vec![policy_window(START + 5, &["p"])])),
        Refusal::MisalignedWindow
    );
    // Negative starts are aligned or not like any other.
    assert_eq!(
        batch_refusal(batch(vec![window("u", -13)], vec![])),
        Refusal::MisalignedWindow
    );
}

#[test]
fn window_lengths_that_no_agent_sends_refuse_the_batch() {
    let mut w = window("u", START);
    w.window_seconds = 0;
    assert_eq!(
        batch_refusal(batch(vec![w], vec![])),
        Refusal::WrongWindowSeconds
    );
    // A policy part flushed by a stopping agent is shorter (or, with a
    // late flush, longer): its length is not used.
    for secs in [3, 11] {
        let mut p = policy_window(START, &["p"]);
        p.window_seconds = secs;
        assert!(dropped(batch(vec![], vec![p])).1.is_empty());
    }
}

#[test]
fn a_window_length_not_the_observations_drops_the_part() {
    let mut w = window("u", START);
    w.window_seconds = 5;
    let (a, reasons) = dropped(batch(vec![w, window("u", START - 10)], vec![]));
    assert_eq!(reasons, vec![Refusal::WrongWindowSeconds]);
    assert_eq!(a.windows.len(), 1, "the other part stays");
}

#[test]
fn future_windows_refuse_the_batch() {
    let within_skew = NOW_S - NOW_S % 10 + 50;
    assert!(admit(batch(vec![window("u", within_skew)], vec![])).is_ok());
    let r = admit(batch(vec![window("u", within_skew + 20)], vec![])).unwrap_err();
    assert_eq!(r.reason, Refusal::FutureWindow);
    assert!(r.detail.contains("clock"), "{r}");
    // The start that overflowed the operator once.
    assert_eq!(
        batch_refusal(batch(
            vec![],
            vec![policy_window(9_300_000_000_000_000, &["p"])]
        )),
        Refusal::FutureWindow
    );
    assert_eq!(
        batch_refusal(batch(vec![window("u", i64::MAX - i64::MAX % 10)], vec![])),
        Refusal::FutureWindow
    );
}

#[test]
fn windows_older_than_the_agents_buffer_are_dropped() {
    let horizon = BUFFER_WINDOWS * 10;
    let old = START - horizon - 10;
    let (a, reasons) = dropped(batch(
        vec![window("u", old), window("u", START - horizon + 10)],
        vec![policy_window(old, &["p"])],
    ));
    assert_eq!(reasons, vec![Refusal::StaleWindow, Refusal::StaleWindow]);
    assert_eq!(a.windows.len(), 1);
    assert!(a.policy_windows.is_empty());
    assert_eq!(
        dropped(batch(vec![window("u", i64::MIN - i64::MIN % 10)], vec![])).1,
        vec![Refusal::StaleWindow]
    );
}

#[test]
fn observations_that_trace_no_pod_on_the_node_are_dropped() {
    let (a, reasons) = dropped(batch(vec![window("v", START), window("u", START)], vec![]));
    assert_eq!(reasons, vec![Refusal::ObservationNotOnNode]);
    assert_eq!(a.dropped[0].field, "windows[0].uid");
    assert_eq!(a.windows.len(), 1);
    // Deleted observations are not refused: the collector answers them as
    // gone so the agent forgets them.
    assert!(
        dropped(batch(vec![window("deleted", START)], vec![]))
            .1
            .is_empty()
    );
}

#[test]
fn an_observation_that_just_left_the_node_is_still_accepted_for_a_while() {
    let mut adm = Admission::new();
    let mut f = Fake::new();
    assert!(
        adm.admit(&f, "a", batch(vec![window("u", START)], vec![]), NOW_MS)
            .unwrap()
            .dropped
            .is_empty()
    );
    f.observations.get_mut("u").unwrap().on_node = false;
    // The agent closes the open window when its config changes.
    let late = adm
        .admit(
            &f,
            "a",
            batch(vec![window("u", START + 10)], vec![]),
            NOW_MS + 15_000,
        )
        .unwrap();
    assert!(late.dropped.is_empty(), "{:?}", late.dropped);
    let later = adm
        .admit(
            &f,
            "a",
            batch(vec![window("u", START + 100)], vec![]),
            NOW_MS + 100_000,
        )
        .unwrap();
    assert_eq!(later.dropped[0].reason, Refusal::ObservationNotOnNode);
    // Not from another node that never had it.
    let other = adm
        .admit(
            &f,
            "b",
            batch(vec![window("u", START + 10)], vec![]),
            NOW_MS + 15_000,
        )
        .unwrap();
    assert_eq!(other.dropped[0].reason, Refusal::ObservationNotOnNode);
}

#[test]
fn series_of_pods_on_other_nodes_drop_the_part() {
    let mut w = window("u", START);
    w.series = vec![series("ns", "here"), series("ns", "there")];
    let (a, reasons) = dropped(batch(vec![w], vec![]));
    assert_eq!(reasons, vec![Refusal::ForeignPod]);
    assert_eq!(a.dropped[0].field, "windows[0].series[1].local.pod");
    assert!(a.windows.is_empty(), "the whole part is dropped");

    let mut w = window("u", START);
    let mut s = series("ns", "here");
    s.local.node = Some("b".into());
    w.series = vec![s];
    assert_eq!(dropped(batch(vec![w], vec![])).1, vec![Refusal::ForeignPod]);
}

/// A node names only attempts of its own pods (or of pods deleted since),
/// with an IP address as the peer; the rest go one by one, the counts stay.
#[test]
fn named_attempts_of_other_nodes_pods_or_without_an_address_are_dropped() {
    use flowlens_api::report::{AttemptDirection, AttemptVerdict, NamedAttempt};
    let named = |pod: &str, peer: &str| NamedAttempt {
        pod: pod.into(),
        direction: AttemptDirection::Egress,
        peer: peer.into(),
        port: 5432,
        protocol: 6,
        verdict: AttemptVerdict::Blocked,
        attempts: 1,
        packets: 1,
        last_seen: NOW_S,
    };
    let mut w = policy_window(START, &["p"]);
    w.policies[0].attempts = vec![
        named("ns/here", "10.0.0.9"),
        named("ns/there", "10.0.0.9"),
        named("ns/gone", "fd00::9"),
        named("ns/here", "not-an-ip"),
        named("no-slash", "10.0.0.9"),
    ];
    let (a, reasons) = dropped(batch(vec![], vec![w.clone()]));
    assert_eq!(
        reasons,
        vec![
            Refusal::ForeignPod,
            Refusal::BadAddress,
            Refusal::ForeignPod
        ]
    );
    assert_eq!(
        a.dropped[0].field,
        "policyWindows[0].policies[0].attempts[1].pod"
    );
    let kept: Vec<&str> = a.policy_windows[0].policies[0]
        .attempts
        .iter()
        .map(|n| n.pod.as_str())
        .collect();
    assert_eq!(kept, vec!["ns/here", "ns/gone"]);
    assert_eq!(a.policy_windows[0].policies[0].blocked.connections, 1);
    // More than an agent sends refuses the batch.
    w.policies[0].attempts = vec![named("ns/here", "10.0.0.9"); MAX_NAMED_ATTEMPTS + 1];
    assert_eq!(batch_refusal(batch(vec![], vec![w])), Refusal::FieldTooLong);
}

#[test]
fn counters_of_policies_not_on_the_node_are_dropped_alone() {
    let (a, reasons) = dropped(batch(vec![], vec![policy_window(START, &["q", "p", "r"])]));
    assert_eq!(
        reasons,
        vec![Refusal::PolicyNotOnNode, Refusal::PolicyNotOnNode]
    );
    assert_eq!(a.dropped[1].field, "policyWindows[0].policies[2]");
    let kept: Vec<&str> = a.policy_windows[0]
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(kept, vec!["p"]);
}

#[test]
fn a_policy_that_just_left_the_node_still_counts_for_a_while() {
    let mut adm = Admission::new();
    let mut f = Fake::new();
    adm.admit(
        &f,
        "a",
        batch(vec![], vec![policy_window(START, &["p"])]),
        NOW_MS,
    )
    .unwrap();
    f.policies.clear();
    let soon = adm
        .admit(
            &f,
            "a",
            batch(vec![], vec![policy_window(START + 10, &["p"])]),
            NOW_MS + 10_000,
        )
        .unwrap();
    assert!(soon.dropped.is_empty());
    let later = adm
        .admit(
            &f,
            "a",
            batch(vec![], vec![policy_window(START + 90, &["p"])]),
            NOW_MS + 90_000,
        )
        .unwrap();
    assert_eq!(later.dropped[0].reason, Refusal::PolicyNotOnNode);
}

#[test]
fn more_series_than_the_budget_drop_the_part() {
    let mut w = window("u", START);
    w.series = vec![series("ns", "here"); 3]; // maxSeries 2 + other
    assert!(dropped(batch(vec![w.clone()], vec![])).1.is_empty());
    w.series.push(series("ns", "here"));
    assert_eq!(
        dropped(batch(vec![w], vec![])).1,
        vec![Refusal::TooManySeries]
    );
}

#[test]
fn over_long_strings_refuse_the_batch() {
    let long = "x".repeat(MAX_FIELD_BYTES + 1);
    let mut b = batch(vec![], vec![]);
    b.agent = long.clone();
    assert_eq!(batch_refusal(b), Refusal::FieldTooLong);

    let mut w = window("u", START);
    let mut s = series("ns", "here");
    s.local.labels.insert("app".into(), long.clone());
    w.series = vec![s];
    let r = admit(batch(vec![w], vec![])).unwrap_err();
    assert_eq!(
        (r.reason, r.field.as_str()),
        (
            Refusal::FieldTooLong,
            "windows[0].series[0].local.labels[app]"
        )
    );

    let mut w = window("u", START);
    let mut s = series("ns", "here");
    s.local.labels = (0..=MAX_LABELS)
        .map(|i| (i.to_string(), String::new()))
        .collect();
    w.series = vec![s];
    assert_eq!(batch_refusal(batch(vec![w], vec![])), Refusal::FieldTooLong);

    let mut p = policy_window(START, &["p"]);
    p.policies[0].name = long;
    assert_eq!(batch_refusal(batch(vec![], vec![p])), Refusal::FieldTooLong);
}

#[test]
fn dns_names_and_lists_a_node_makes_up_refuse_the_batch() {
    use flowlens_api::dns::{DnsWindow, NameCount};

    let named = |name: &str| {
        let mut w = window("u", START);
        let mut s = series("ns", "here");
        s.remote_name = Some(name.into());
        w.series = vec![s];
        batch(vec![w], vec![])
    };
    assert!(admit(named("api.payments.example")).is_ok());
    for bad in ["", "Api.example", "a b.example", "a..b", &"x".repeat(300)] {
        let r = admit(named(bad)).unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_str()),
            (Refusal::BadDns, "windows[0].series[0].remoteName"),
            "{bad:?}"
        );
    }

    let with_dns = |d: DnsWindow| {
        let mut w = window("u", START);
        w.dns = Some(d);
        batch(vec![w], vec![])
    };
    let honest = DnsWindow {
        queries: 3,
        responses: [("NOERROR".to_owned(), 2), ("RCODE23".to_owned(), 1)].into(),
        top_names: vec![NameCount {
            name: "api.example".into(),
            queries: 3,
        }],
        ..Default::default()
    };
    assert!(admit(with_dns(honest.clone())).is_ok());
    let mut d = honest.clone();
    d.top_names = (0..=MAX_TOP_NAMES)
        .map(|i| NameCount {
            name: format!("n{i}.example"),
            queries: 1,
        })
        .collect();
    assert_eq!(batch_refusal(with_dns(d)), Refusal::FieldTooLong);
    let mut d = honest.clone();
    d.responses = (0..=MAX_RCODES as u16)
        .map(|i| (format!("RCODE{i}"), 1))
        .collect();
    assert_eq!(batch_refusal(with_dns(d)), Refusal::FieldTooLong);
    let mut d = honest.clone();
    d.responses = [("<script>".to_owned(), 1)].into();
    assert_eq!(batch_refusal(with_dns(d)), Refusal::BadDns);
    let mut d = honest;
    d.top_names[0].name = "x\u{0}.example".into();
    assert_eq!(batch_refusal(with_dns(d)), Refusal::BadDns);
}

#[test]
fn refusals_are_logged_once_per_node_and_reason_per_interval() {
    let mut adm = Admission::new();
    let (foreign, stale) = (Refusal::ForeignPod.label(), Refusal::StaleWindow.label());
    assert!(adm.should_log("a", foreign, 0));
    assert!(!adm.should_log("a", foreign, 1_000));
    assert!(adm.should_log("a", stale, 1_000));
    assert!(adm.should_log("b", foreign, 1_000));
    assert!(adm.should_log("a", foreign, LOG_INTERVAL_MS));
}

#[test]
fn reason_labels_are_distinct() {
    let labels: BTreeSet<&str> = Refusal::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), Refusal::ALL.len());
}
