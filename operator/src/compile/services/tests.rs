use std::collections::BTreeSet;

use flowlens_api::{
    flow_policy::Protocol,
    node_agent_config::{MAX_SERVICE_BACKENDS, ServiceBackend, ServiceFrontend},
};
use kube::api::DynamicObject;
use serde_json::{Value, json};

use crate::{
    compile::{
        Compiler,
        tests::{cfg, obs, shop},
    },
    model::{endpoint_slice_info, service_info},
};

fn svc(v: Value) -> crate::model::ServiceInfo {
    service_info(&serde_json::from_value(v).unwrap())
}

fn slice(v: Value) -> crate::model::EndpointSliceInfo {
    let o: DynamicObject = serde_json::from_value(v).unwrap();
    endpoint_slice_info(&o)
}

/// A Service `data/<name>` with `spec` (namespace and name filled in).
fn service(name: &str, mut spec: Value) -> crate::model::ServiceInfo {
    if spec.get("clusterIP").is_none() {
        spec["clusterIP"] = json!("10.96.0.10");
    }
    svc(json!({"metadata": {"name": name, "namespace": "data"}, "spec": spec}))
}

/// An EndpointSlice of `data/<service>`.
fn endpoints(
    service: &str,
    name: &str,
    address_type: &str,
    endpoints: Value,
    ports: Value,
) -> crate::model::EndpointSliceInfo {
    slice(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "data", "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type, "endpoints": endpoints, "ports": ports
    }))
}

fn backend(address: &str, port: u16) -> ServiceBackend {
    ServiceBackend {
        address: address.into(),
        port,
    }
}

/// The shop, with web and api (on n1) traced; n2 (db) has no local endpoint.
fn traced_shop() -> Compiler {
    let mut c = shop();
    c.upsert_observation("o", "ou", 1, obs("namespaces: [shop]"));
    c.take_dirty_nodes();
    c
}

fn frontend<'a>(c: &'a [ServiceFrontend], address: &str, port: u16) -> &'a ServiceFrontend {
    c.iter()
        .find(|f| f.address == address && f.port == port)
        .unwrap_or_else(|| panic!("no frontend {address}:{port} in {c:#?}"))
}

#[test]
fn ports_map_to_named_target_ports_by_name() {
    let mut c = traced_shop();
    c.upsert_service(service(
        "db",
        json!({"ports": [
            {"name": "pg", "port": 5432, "targetPort": "postgres"},
            {"name": "http", "port": 80, "targetPort": 8080}
        ]}),
    ));
    c.upsert_endpoint_slice(endpoints(
        "db",
        "db-1",
        "IPv4",
        json!([
            {"addresses": ["10.0.2.2"], "conditions": {"ready": true}, "nodeName": "n2"},
            {"addresses": ["10.0.2.1"], "nodeName": "n2"},
            {"addresses": ["10.0.2.3"], "conditions": {"ready": false}, "nodeName": "n2"}
        ]),
        // The slice lists the ports in another order, with the resolved numbers.
        json!([{"name": "http", "port": 8080}, {"name": "pg", "port": 6432}]),
    ));
    let n1 = cfg(&mut c, "n1").services;
    assert_eq!(n1.len(), 2, "{n1:#?}");
    let pg = frontend(&n1, "10.96.0.10", 5432);
    assert_eq!(pg.service, "data/db");
    assert_eq!(pg.protocol, Protocol::Tcp);
    assert!(!pg.client_affinity);
    assert_eq!(
        pg.backends,
        vec![backend("10.0.2.1", 6432), backend("10.0.2.2", 6432)],
        "sorted, the not-ready endpoint excluded"
    );
    assert_eq!(
        frontend(&n1, "10.96.0.10", 80).backends,
        vec![backend("10.0.2.1", 8080), backend("10.0.2.2", 8080)],
        "port 80 -> targetPort 8080"
    );
}

#[test]
fn a_node_without_local_endpoints_gets_no_services() {
    let mut c = traced_shop();
    c.upsert_service(service("db", json!({"ports": [{"port": 5432}]})));
    c.upsert_endpoint_slice(endpoints(
        "db",
        "db-1",
        "IPv4",
        json!([{"addresses": ["10.0.2.1"]}]),
        json!([{"port": 5432}]),
    ));
    assert_eq!(
        c.take_dirty_nodes(),
        BTreeSet::from(["n1".to_string()]),
        "only nodes with local endpoints are recompiled"
    );
    assert_eq!(cfg(&mut c, "n1").services.len(), 1);
    assert!(
        cfg(&mut c, "n2").services.is_empty(),
        "n2 has no traced or targeted pod"
    );
}

#[test]
fn headless_and_external_name_services_are_skipped() {
    let mut c = traced_shop();
    c.upsert_service(service(
        "h",
        json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
    ));
    c.upsert_service(service(
        "e",
        json!({"type": "ExternalName", "externalName": "db.example", "clusterIP": ""}),
    ));
    c.upsert_endpoint_slice(endpoints(
        "h",
        "h-1",
        "IPv4",
        json!([{"addresses": ["10.0.2.1"]}]),
        json!([{"port": 5432}]),
    ));
    assert!(cfg(&mut c, "n1").services.is_empty());
}

#[test]
fn a_service_without_ready_backends_has_a_frontend_without_backends() {
    let mut c = traced_shop();
    c.upsert_service(service("db", json!({"ports": [{"port": 5432}]})));
    let n1 = cfg(&mut c, "n1").services;
    assert_eq!(n1.len(), 1);
    assert!(n1[0].backends.is_empty(), "refused, as kube-proxy does");
}

#[test]
fn node_ports_use_only_this_nodes_addresses() {
    let mut c = traced_shop();
    for (n, zone, addrs) in [
        ("n1", "a", vec!["192.0.2.1", "198.51.100.1"]),
        ("n2", "b", vec!["192.0.2.2"]),
    ] {
        let mut info = crate::compile::tests::node(n, zone);
        info.addresses = addrs.iter().map(|a| a.parse().unwrap()).collect();
        c.upsert_node(info);
    }
    // n2 gets a traced pod too.
    c.upsert_observation("o2", "ou2", 1, obs("namespaces: [data]"));
    c.upsert_service(service(
        "db",
        json!({"type": "LoadBalancer", "externalIPs": ["203.0.113.9"], "sessionAffinity": "ClientIP",
               "ports": [{"name": "pg", "port": 5432, "nodePort": 30432}]}),
    ));
    let mut lb = c.services["data/db"].clone();
    lb.load_balancer_ips = vec!["203.0.113.10".parse().unwrap()];
    c.upsert_service(lb);
    c.upsert_endpoint_slice(endpoints(
        "db",
        "db-1",
        "IPv4",
        json!([{"addresses": ["10.0.2.1"]}]),
        json!([{"name": "pg", "port": 5432}]),
    ));
    let n1 = cfg(&mut c, "n1").services;
    let got: Vec<(String, u16)> = n1.iter().map(|f| (f.address.clone(), f.port)).collect();
    assert_eq!(
        got,
        vec![
            ("10.96.0.10".to_string(), 5432),
            ("192.0.2.1".to_string(), 30432),
            ("198.51.100.1".to_string(), 30432),
            ("203.0.113.10".to_string(), 5432),
            ("203.0.113.9".to_string(), 5432),
        ],
        "sorted; n2's address is not translated here"
    );
    assert!(
        n1.iter()
            .all(|f| f.client_affinity && f.backends == vec![backend("10.0.2.1", 5432)])
    );
    let node_ports: Vec<&str> = n1
        .iter()
        .filter(|f| f.node_port)
        .map(|f| f.address.as_str())
        .collect();
    assert_eq!(node_ports, vec!["192.0.2.1", "198.51.100.1"]);
    let n2 = cfg(&mut c, "n2").services;
    assert!(
        n2.iter()
            .any(|f| f.address == "192.0.2.2" && f.port == 30432)
    );
    assert!(!n2.iter().any(|f| f.address == "192.0.2.1"));
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_backends_for_cluster_ips() {
    let mut c = traced_shop();
    c.upsert_service(service(
        "db",
        json!({"internalTrafficPolicy": "Local", "externalIPs": ["203.0.113.9"], "ports": [{"port": 5432}]}),
    ));
    // v1beta1: the node is in the topology.
    c.upsert_endpoint_slice(slice(json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "db-1", "namespace": "data", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.1.50"], "topology": {"kubernetes.io/hostname": "n1"}},
            {"addresses": ["10.0.2.1"], "topology": {"kubernetes.io/hostname": "n2"}}
        ],
        "ports": [{"port": 5432}]
    })));
    let n1 = cfg(&mut c, "n1").services;
    assert_eq!(
        frontend(&n1, "10.96.0.10", 5432).backends,
        vec![backend("10.0.1.50", 5432)]
    );
    assert_eq!(
        frontend(&n1, "203.0.113.9", 5432).backends.len(),
        2,
        "externalIPs are not internal traffic"
    );
}

#[test]
fn dual_stack_frontends_get_backends_of_their_family() {
    let mut c = traced_shop();
    c.upsert_service(service(
        "db",
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"], "ports": [{"port": 5432}]}),
    ));
    c.upsert_endpoint_slice(endpoints(
        "db",
        "db-v4",
        "IPv4",
        json!([{"addresses": ["10.0.2.1"]}]),
        json!([{"port": 5432}]),
    ));
    c.upsert_endpoint_slice(endpoints(
        "db",
        "db-v6",
        "IPv6",
        json!([{"addresses": ["fd00::2:1"]}]),
        json!([{"port": 5432}]),
    ));
    let n1 = cfg(&mut c, "n1").services;
    assert_eq!(
        frontend(&n1, "10.96.0.10", 5432).backends,
        vec![backend("10.0.2.1", 5432)]
    );
    assert_eq!(
        frontend(&n1, "fd00:96::10", 5432).backends,
        vec![backend("fd00::2:1", 5432)]
    );
    // Deleting a slice removes its backends.
    c.take_dirty_nodes();
    c.delete_endpoint_slice("data/db-v6");
    assert_eq!(c.take_dirty_nodes(), BTreeSet::from(["n1".to_string()]));
    assert!(
        frontend(&cfg(&mut c, "n1").services, "fd00:96::10", 5432)
            .backends
            .is_empty()
    );
    c.delete_service("data/db");
    assert!(cfg(&mut c, "n1").services.is_empty());
}

#[test]
fn backends_are_capped() {
    let mut c = traced_shop();
    c.upsert_service(service("big", json!({"ports": [{"port": 80}]})));
    let eps: Vec<Value> = (0..300)
        .map(|i| json!({"addresses": [format!("10.1.{}.{}", i / 200, i % 200 + 1)]}))
        .collect();
    c.upsert_endpoint_slice(endpoints(
        "big",
        "big-1",
        "IPv4",
        json!(eps),
        json!([{"port": 80}]),
    ));
    let n1 = cfg(&mut c, "n1").services;
    assert_eq!(n1[0].backends.len(), MAX_SERVICE_BACKENDS);
    assert_eq!(n1[0].backends[0], backend("10.1.0.1", 80));
}

#[test]
fn without_endpoint_slices_no_services_reach_agents() {
    let mut c = traced_shop();
    c.upsert_service(service("db", json!({"ports": [{"port": 5432}]})));
    c.set_endpoint_slices_served(false);
    assert!(cfg(&mut c, "n1").services.is_empty());
}
