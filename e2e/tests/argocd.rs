//! Argo CD's health checks of the Flowlens kinds against the cases in Argo
//! CD's own test layout (`health_test.yaml` beside each `health.lua`), run
//! with Debian's Lua 5.1. The live-status checks are in `api_server.rs`
//! and `pipeline.rs`.

use flowlens_e2e::argocd::{Health, check_dir, health};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize)]
struct Expected {
    status: String,
    message: String,
}

fn check_kind(kind: &str) {
    let dir = check_dir(kind);
    let cases: Cases =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
            .unwrap();
    assert!(cases.tests.len() >= 5, "{kind}: too few cases");
    let mut failures = Vec::new();
    for case in &cases.tests {
        let obj: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join(&case.input_path)).unwrap())
                .unwrap();
        let want = Health {
            status: case.health_status.status.clone(),
            message: case.health_status.message.clone(),
        };
        match health(&obj) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("{}: {got:?}, want {want:?}", case.input_path)),
            Err(e) => failures.push(format!("{}: {e:#}", case.input_path)),
        }
    }
    assert!(failures.is_empty(), "{kind}:\n{}", failures.join("\n"));
}

#[test]
fn network_observation_health() {
    check_kind("NetworkObservation");
}

#[test]
fn flow_policy_health() {
    check_kind("FlowPolicy");
}

/// Messages go through byte for byte, whatever a user put in a field the
/// operator quotes.
#[test]
fn any_message_survives_the_trip_through_lua() {
    let message = "quote \" backslash \\ newline \n ]]=] tab \t 9\u{e9} \u{1f600} end";
    let obj = serde_json::json!({
        "apiVersion": "flowlens.dev/v1alpha1",
        "kind": "NetworkObservation",
        "metadata": {"name": "x", "generation": 1, "annotations": {"a": null}},
        "status": {"observedGeneration": 1, "conditions": [
            {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": message}
        ]}
    });
    let got = health(&obj).unwrap();
    assert_eq!(got.status, "Degraded");
    assert_eq!(got.message, message);
}
