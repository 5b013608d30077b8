//! Socket-level balancing: a client process in the agent's `--cgroup` reaches ClusterIP,
//! NodePort and externalIPs through the cgroup hooks. On the wire there is only the backend
//! address (a packet socket on the node sees no frontend address), while getpeername() and the
//! source of UDP replies show the frontend. A Service without endpoints refuses at once.

use std::collections::BTreeSet;

use lb_tests::{BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLUSTER_IP, Capture, Topology};

const EMPTY_IP: &str = "10.96.0.20";
const STICKY_IP: &str = "10.96.0.30";
const EXTERNAL_IP: &str = "192.168.40.10";
const NODE_PORT: u16 = 30080;

fn config() -> String {
    let endpoints: String = (1..=3)
        .map(|i| format!("- addresses: [\"10.0.{i}.2\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  externalIPs: [{EXTERNAL_IP}]\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}\n  \
         - {{name: udp, port: 53, targetPort: {BACKEND_UDP_PORT}, nodePort: {NODE_PORT}, protocol: UDP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\n\
         addressType: IPv4\nports:\n- {{name: tcp, port: {BACKEND_TCP_PORT}, protocol: TCP}}\n- {{name: udp, port: {BACKEND_UDP_PORT}, protocol: UDP}}\n\
         endpoints:\n{endpoints}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: default}}\nspec:\n  clusterIP: {EMPTY_IP}\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 53, targetPort: 8053, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default}}\nspec:\n  clusterIP: {STICKY_IP}\n  sessionAffinity: ClientIP\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: {BACKEND_TCP_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: sticky-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: sticky}}\n\
         addressType: IPv4\nports:\n- {{name: tcp, port: {BACKEND_TCP_PORT}, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

/// Splits `peer=A name=B` lines; panics on anything else.
fn answers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let mut peer = None;
            let mut name = None;
            for part in l.split_whitespace() {
                if let Some(v) = part.strip_prefix("peer=") {
                    peer = Some(v.to_string());
                }
                if let Some(v) = part.strip_prefix("name=") {
                    name = Some(v.to_string());
                }
            }
            match (peer, name) {
                (Some(p), Some(n)) => (p, n),
                _ => panic!("client failed: {l}"),
            }
        })
        .collect()
}

#[test]
fn node_clients_are_balanced_at_the_socket() {
    let mut topo = Topology::new(3).expect("topology");
    topo.write_config(&config()).expect("config");
    let cgroup = topo.test_cgroup().expect("cgroup");
    topo.start_agent(&["--cgroup", cgroup.to_str().unwrap()])
        .expect("agent");
    let capture = Capture::start(&topo.node, "c0").expect("capture");
    let client = topo.client.clone();
    let run = |args: &[&str]| Topology::client_in_cgroup(&client, &cgroup, args).expect("client");

    let frontend_tcp = format!("{CLUSTER_IP}:80");
    let tcp = answers(&run(&["tcp", &frontend_tcp, "30"]));
    let udp = answers(&run(&["udp", &format!("{CLUSTER_IP}:53"), "15"]));
    let udp_connected = answers(&run(&["udp-connected", &format!("{CLUSTER_IP}:53"), "15"]));
    let node_port = answers(&run(&["tcp", &format!("10.0.0.254:{NODE_PORT}"), "10"]));
    let external = answers(&run(&["tcp", &format!("{EXTERNAL_IP}:80"), "10"]));
    let seen = capture.finish().expect("capture");

    for (what, got, frontend) in [
        ("TCP to the ClusterIP", &tcp, frontend_tcp.clone()),
        ("UDP to the ClusterIP", &udp, format!("{CLUSTER_IP}:53")),
        (
            "connected UDP to the ClusterIP",
            &udp_connected,
            format!("{CLUSTER_IP}:53"),
        ),
        (
            "TCP to the NodePort",
            &node_port,
            format!("10.0.0.254:{NODE_PORT}"),
        ),
        (
            "TCP to the externalIP",
            &external,
            format!("{EXTERNAL_IP}:80"),
        ),
    ] {
        let peers: BTreeSet<&String> = got.iter().map(|(p, _)| p).collect();
        assert_eq!(
            peers,
            BTreeSet::from([&frontend]),
            "{what}: the client must only ever see the frontend"
        );
        let names: BTreeSet<&String> = got.iter().map(|(_, n)| n).collect();
        println!("{what}: {} answers from {names:?}", got.len());
        assert!(names.len() >= 2, "{what}: balanced over {names:?} only");
    }

    // ClientIP affinity at the socket: every connection of the client (one network namespace)
    // goes to one backend.
    let sticky = answers(&run(&["tcp", &format!("{STICKY_IP}:80"), "20"]));
    let names: BTreeSet<&String> = sticky.iter().map(|(_, n)| n).collect();
    assert_eq!(names.len(), 1, "ClientIP affinity at the socket: {names:?}");

    // On the wire: the backends, never a frontend address.
    let frontends = [
        CLUSTER_IP.to_string(),
        EXTERNAL_IP.to_string(),
        STICKY_IP.to_string(),
    ];
    let to_backends = seen
        .iter()
        .filter(|(_, dst)| {
            dst.ip().to_string().starts_with("10.0.")
                && [BACKEND_TCP_PORT, BACKEND_UDP_PORT].contains(&dst.port())
        })
        .count();
    let with_frontend: Vec<_> = seen
        .iter()
        .filter(|(s, d)| {
            frontends.contains(&s.ip().to_string())
                || frontends.contains(&d.ip().to_string())
                || s.port() == NODE_PORT
                || d.port() == NODE_PORT
        })
        .collect();
    println!(
        "captured on c0: {} packets, {to_backends} to backend ports",
        seen.len()
    );
    assert!(to_backends >= 80, "too few packets to backends on the wire");
    assert!(
        with_frontend.is_empty(),
        "frontend addresses on the wire: {with_frontend:?}"
    );

    // A Service without endpoints: connect() and sendto() fail at once.
    for mode in ["tcp", "udp"] {
        let port = if mode == "tcp" { 80 } else { 53 };
        let lines = run(&[mode, &format!("{EMPTY_IP}:{port}"), "1"]);
        let line = lines.first().expect("one line");
        assert!(
            line.starts_with("error=ConnectionRefused"),
            "{mode} to a Service without endpoints: {line}"
        );
        let ms: u64 = line.rsplit("ms=").next().unwrap().parse().unwrap();
        assert!(ms < 100, "{mode}: refused only after {ms} ms");
    }

    // The reverse translations are bounded and visible.
    let stats: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["stats", "-o", "json"]).expect("lbctl")).unwrap();
    let entries = stats["socket_revnat"]["entries"].as_u64().unwrap();
    let capacity = stats["socket_revnat"]["capacity"].as_u64().unwrap();
    println!("socket reverse translations: {entries}/{capacity}");
    assert!(entries >= 100 && entries <= capacity, "{stats}");

    // A client outside the cgroup still goes through the packet path.
    let (from, name) = topo
        .client(|| lb_tests::udp_ask(format!("{CLUSTER_IP}:53").parse().unwrap()))
        .expect("packet path");
    assert_eq!(from.to_string(), format!("{CLUSTER_IP}:53"));
    assert!(name.starts_with("backend-"));
    let interfaces = topo.lbctl(&["interfaces"]).expect("lbctl interfaces");
    println!("{interfaces}");
    assert!(interfaces.contains("4/4 hooks pinned"), "{interfaces}");
}

/// A connected UDP socket never runs a hook again, so when its backend leaves, the agent
/// destroys it (sock_diag SOCK_DESTROY): the client sees an error, reconnects, and lands on a
/// live backend instead of staying pinned to the one that left.
#[test]
fn connected_udp_socket_moves_when_its_backend_leaves() {
    use std::io::BufRead;
    let mut topo = Topology::new(3).expect("topology");
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .expect("config");
    let cgroup = topo.test_cgroup().expect("cgroup");
    topo.start_agent(&["--cgroup", cgroup.to_str().unwrap()])
        .expect("agent");
    let mut child = Topology::spawn_client_in_cgroup(
        &topo.client,
        &cgroup,
        &[
            "udp-connected",
            &format!("{CLUSTER_IP}:53"),
            "1",
            "--hold",
            "8",
        ],
    )
    .expect("client");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = answers(&[lines.next().expect("a line").expect("read")]);
    let (peer, pinned) = first[0].clone();
    assert_eq!(peer, format!("{CLUSTER_IP}:53"));
    let gone: usize = pinned.trim_start_matches("backend-").parse().unwrap();
    let rest: Vec<usize> = (1..=3).filter(|&i| i != gone).collect();
    topo.write_config(&Topology::service_yaml(&rest))
        .expect("config");
    let mut after = Vec::new();
    for line in lines {
        after.push(line.expect("read"));
    }
    let _ = child.wait();
    println!("pinned to {pinned}, then: {after:?}");
    let log = topo.agent_log();
    assert!(
        log.contains("destroyed 1 connected UDP sockets"),
        "agent did not destroy the socket:\n{log}"
    );
    let last: Vec<_> = after.iter().rev().take(5).cloned().collect();
    for (peer, name) in answers(&last) {
        assert_eq!(peer, format!("{CLUSTER_IP}:53"));
        assert_ne!(
            name, pinned,
            "still pinned to the removed backend: {after:?}"
        );
    }
}
