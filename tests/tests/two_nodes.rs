//! Backends on other nodes, on a two-node cluster of namespaces (see `lb_tests::cluster`): both
//! agents read the same YAML (endpoints carry their `nodeName`), each serves its own
//! `--node-ip`. External traffic to a backend on the other node is SNATed to the node's address
//! (the reply comes back through it and is translated back); a local backend sees the client;
//! externalTrafficPolicy Local never leaves the node; a pod calling its own Service is always
//! answered (hairpin SNAT to 169.254.42.1); open flows survive kill -9 of the agent. Every
//! interface at kernel defaults.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use lb_tests::{
    BACKEND_TCP_PORT, BACKEND_UDP_PORT, Capture, Conversation, Topology, cluster::Cluster,
    in_netns, sh, udp_ask_peer,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 200);
const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 201);
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;
const LOCAL_NODE_PORT: u16 = 30081;
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// `web` (externalTrafficPolicy Cluster: TCP 80, UDP 53) over both pods; `local`
/// (externalTrafficPolicy Local, TCP 80) over pod-1 on node-a only, announced by ARP.
fn objects() -> String {
    format!(
        "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: lan}}\n\
         spec: {{blocks: [{{start: {LB_IP}, stop: {LOCAL_LB_IP}}}]}}\n---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {{name: local}}\n\
         spec: {{loadBalancerIPs: true, serviceSelector: {{matchLabels: {{l2: \"yes\"}}}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  clusterIP: {CLUSTER_IP}\n  loadBalancerIP: {LB_IP}\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: {NODE_PORT_TCP}, protocol: TCP}}\n  \
         - {{name: udp, port: 53, targetPort: {BACKEND_UDP_PORT}, nodePort: {NODE_PORT_UDP}, protocol: UDP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n\
         - {{name: tcp, port: {BACKEND_TCP_PORT}, protocol: TCP}}\n- {{name: udp, port: {BACKEND_UDP_PORT}, protocol: UDP}}\n\
         endpoints:\n\
         - {{addresses: [\"10.2.1.2\"], conditions: {{ready: true}}, nodeName: node-a}}\n\
         - {{addresses: [\"10.2.2.2\"], conditions: {{ready: true}}, nodeName: node-b}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: default, labels: {{l2: \"yes\"}}}}\nspec:\n  \
         type: LoadBalancer\n  clusterIP: 10.96.0.11\n  loadBalancerIP: {LOCAL_LB_IP}\n  externalTrafficPolicy: Local\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: {LOCAL_NODE_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: local-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: local}}\naddressType: IPv4\nports:\n\
         - {{name: tcp, port: {BACKEND_TCP_PORT}, protocol: TCP}}\n\
         endpoints:\n\
         - {{addresses: [\"10.2.1.2\"], conditions: {{ready: true}}, nodeName: node-a}}\n"
    )
}

fn cluster_with(extra: &[&str]) -> (Cluster, PathBuf) {
    let mut cluster = Cluster::new().unwrap();
    let config = cluster.dir.join("services.yaml");
    std::fs::write(&config, objects()).unwrap();
    cluster.start_agent_on_file(0, &config, extra).unwrap();
    cluster.start_agent_on_file(1, &config, extra).unwrap();
    (cluster, config)
}

fn cluster() -> (Cluster, PathBuf) {
    cluster_with(&[])
}

/// The client reaches the LoadBalancer IP and the ClusterIP through node `i`.
fn route_via(cluster: &Cluster, i: usize) {
    let via = cluster.nodes[i].lan_ip;
    for dst in [format!("{LB_IP}/32"), "10.96.0.0/16".to_string()] {
        sh(&format!(
            "ip -n {} route replace {dst} via {via}",
            cluster.client
        ))
        .unwrap();
    }
}

/// What `n` TCP connections from the client to `to` see: connections answered per pod, and the
/// source each pod saw (pod → set of addresses).
fn tcp_from_client(cluster: &Cluster, to: SocketAddr, n: usize) -> Seen {
    in_netns(&cluster.client, move || {
        let mut seen = Seen::default();
        for _ in 0..n {
            match Conversation::open(to).and_then(|mut c| {
                let peer = c.peer()?;
                let answer = c.ask_peer()?;
                Ok((peer, c.local()?.port(), answer))
            }) {
                Ok((peer, port, (pod, source))) => {
                    assert_eq!(peer, to, "the reply came from {peer}, not the frontend");
                    seen.ports.entry(pod.clone()).or_default().push(port);
                    seen.record(pod, source.ip());
                }
                Err(e) => seen.failed.push(format!("{e:#}")),
            }
        }
        seen
    })
}

fn udp_from_client(cluster: &Cluster, to: SocketAddr, n: usize) -> Seen {
    in_netns(&cluster.client, move || {
        let mut seen = Seen::default();
        for _ in 0..n {
            match udp_ask_peer(to) {
                Ok((from, pod, source)) => {
                    assert_eq!(from, to, "the UDP reply came from {from}, not the frontend");
                    seen.record(pod, source.ip());
                }
                Err(e) => seen.failed.push(format!("{e:#}")),
            }
        }
        seen
    })
}

/// 64 KiB on one line over a connection through `frontend` that reached pod-2 (the pod's
/// answer, or what failed).
fn long_request_to_pod_2(cluster: &Cluster, frontend: SocketAddr) -> Result<String, String> {
    in_netns(&cluster.client, move || {
        for _ in 0..20 {
            let mut c = Conversation::open(frontend).map_err(|e| format!("{e:#}"))?;
            if c.ask().map_err(|e| format!("{e:#}"))? == "pod-2" {
                return c
                    .request(&"x".repeat(64 * 1024))
                    .map_err(|e| format!("{e:#}"));
            }
        }
        Err("no connection to pod-2 in 20".to_string())
    })
}

#[derive(Default, Debug)]
struct Seen {
    /// Answers per pod.
    answers: BTreeMap<String, usize>,
    /// Source addresses each pod saw.
    sources: BTreeMap<String, std::collections::BTreeSet<Ipv4Addr>>,
    /// The client's ports of the TCP connections each pod answered.
    ports: BTreeMap<String, Vec<u16>>,
    failed: Vec<String>,
}

impl Seen {
    fn record(&mut self, pod: String, source: std::net::IpAddr) {
        let std::net::IpAddr::V4(source) = source else {
            panic!("IPv6 source {source}");
        };
        *self.answers.entry(pod.clone()).or_default() += 1;
        self.sources.entry(pod).or_default().insert(source);
    }

    fn total(&self) -> usize {
        self.answers.values().sum()
    }

    fn sources_of(&self, pod: &str) -> Vec<Ipv4Addr> {
        self.sources
            .get(pod)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Through node `i` (0: node-a hosts pod-1, 1: node-b hosts pod-2): every connection and
/// exchange answered from the frontend, both pods used, the local pod sees the client, the
/// other node's pod sees node `i`'s address.
fn external_through(cluster: &Cluster, i: usize) {
    route_via(cluster, i);
    let node_ip = cluster.nodes[i].lan_ip;
    let (local_pod, remote_pod) = (format!("pod-{}", i + 1), format!("pod-{}", 2 - i));
    let frontends = [
        ("NodePort", SocketAddr::from((node_ip, NODE_PORT_TCP))),
        ("LoadBalancer", SocketAddr::from((LB_IP, 80))),
        ("ClusterIP from outside", SocketAddr::from((CLUSTER_IP, 80))),
    ];
    for (kind, to) in frontends {
        let n = if kind == "ClusterIP from outside" {
            100
        } else {
            300
        };
        let seen = tcp_from_client(cluster, to, n);
        println!("node {i}, {kind} {to} TCP: {seen:?}");
        assert_eq!(seen.total(), n, "{kind} {to} via node {i}: {seen:?}");
        assert_eq!(seen.answers.len(), 2, "both pods used: {seen:?}");
        assert_eq!(seen.sources_of(&local_pod), [CLIENT], "{kind}: {seen:?}");
        assert_eq!(seen.sources_of(&remote_pod), [node_ip], "{kind}: {seen:?}");
    }
    for to in [
        SocketAddr::from((node_ip, NODE_PORT_UDP)),
        SocketAddr::from((LB_IP, 53)),
    ] {
        let seen = udp_from_client(cluster, to, 300);
        let n = 300;
        println!("node {i}, {to} UDP: {seen:?}");
        assert_eq!(seen.total(), n, "{to} via node {i}: {seen:?}");
        assert_eq!(seen.answers.len(), 2, "both pods used: {seen:?}");
        assert_eq!(seen.sources_of(&local_pod), [CLIENT], "{seen:?}");
        assert_eq!(seen.sources_of(&remote_pod), [node_ip], "{seen:?}");
    }
}

#[test]
fn external_traffic_reaches_both_nodes_pods_through_either_node() {
    let (cluster, config) = cluster();
    external_through(&cluster, 0);
    external_through(&cluster, 1);
    // A remote backend's health is its EndpointSlice condition: pod-2 not ready, so node B
    // (pod-2's own node) sends everything to pod-1 on node A, SNATed.
    let yaml = objects().replacen(
        "{addresses: [\"10.2.2.2\"], conditions: {ready: true}",
        "{addresses: [\"10.2.2.2\"], conditions: {ready: false}",
        1,
    );
    std::fs::write(&config, yaml).unwrap();
    let to = SocketAddr::from((cluster.nodes[1].lan_ip, NODE_PORT_TCP));
    let mut seen = Seen::default();
    for _ in 0..50 {
        seen = tcp_from_client(&cluster, to, 50);
        if seen.answers.keys().eq(["pod-1"]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("pod-2 not ready, through node-b: {seen:?}");
    assert_eq!(seen.total(), 50, "{seen:?}");
    assert_eq!(
        seen.answers.keys().collect::<Vec<_>>(),
        ["pod-1"],
        "{seen:?}"
    );
    assert_eq!(
        seen.sources_of("pod-1"),
        [cluster.nodes[1].lan_ip],
        "{seen:?}"
    );
    // The SNATed flows hold NAT entries, counted in lbctl stats.
    let stats = cluster.lbctl(0, &["stats", "-o", "json"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let allocated = stats["nat"]["allocated"].as_u64().unwrap();
    println!("node-a: {allocated} SNAT ports allocated; {}", stats["nat"]);
    assert!(allocated >= 200, "{stats}");
    assert_eq!(stats["nat"]["refused_no_port"], 0, "{stats}");
    assert_eq!(stats["nat"]["refused_table_full"], 0, "{stats}");
    // lbctl conntrack lists the NAT entries: pod-2 → node-a's address, restoring the client.
    let entries = cluster.lbctl(0, &["conntrack", "-o", "json"]).unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_str(&entries).unwrap();
    let nat: Vec<&serde_json::Value> = entries.iter().filter(|e| e["table"] == "nat").collect();
    println!("node-a: {} NAT entries, e.g. {:?}", nat.len(), nat.first());
    assert!(!nat.is_empty());
    for e in &nat {
        assert!(
            e["source"].as_str().unwrap().starts_with("10.2.2.2:"),
            "{e}"
        );
        assert!(
            e["destination"].as_str().unwrap().starts_with("10.1.0.11:"),
            "{e}"
        );
        assert!(
            e["client_rewrite"]
                .as_str()
                .unwrap()
                .starts_with("10.1.0.1:"),
            "{e}"
        );
    }
}

#[test]
fn local_policy_never_leaves_the_node_and_keeps_the_client_address() {
    let (cluster, _) = cluster();
    // Node A: only its own pod, the client's address preserved.
    let to = SocketAddr::from((cluster.nodes[0].lan_ip, LOCAL_NODE_PORT));
    let seen = tcp_from_client(&cluster, to, 100);
    println!("Local NodePort on node-a: {seen:?}");
    assert_eq!(seen.total(), 100, "{seen:?}");
    assert_eq!(seen.answers.keys().collect::<Vec<_>>(), ["pod-1"]);
    assert_eq!(seen.sources_of("pod-1"), [CLIENT]);
    // The LoadBalancer IP is answered (ARP) by node A alone: B has no ready local endpoint.
    let (sent, macs) = Topology::arping(&cluster.client, &LOCAL_LB_IP.to_string()).unwrap();
    let mac_a = Topology::mac_of(&cluster.nodes[0].ns, "eth1").unwrap();
    println!("ARP {LOCAL_LB_IP}: {sent} sent, replies {macs:?} (node-a {mac_a})");
    assert!(
        !macs.is_empty() && macs.iter().all(|m| *m == mac_a),
        "{macs:?}"
    );
    let seen = tcp_from_client(&cluster, SocketAddr::from((LOCAL_LB_IP, 80)), 50);
    assert_eq!(seen.total(), 50, "{seen:?}");
    assert_eq!(seen.sources_of("pod-1"), [CLIENT]);
    // Node B has no local endpoint: its NodePort of the Service reaches no pod (it does not
    // send the client to node A's pod).
    let to = SocketAddr::from((cluster.nodes[1].lan_ip, LOCAL_NODE_PORT));
    let seen = tcp_from_client(&cluster, to, 5);
    println!("Local NodePort on node-b: {seen:?}");
    assert_eq!(seen.total(), 0, "{seen:?}");
    let stats = cluster.lbctl(0, &["stats", "-o", "json"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["nat"]["allocated"], 0, "Local never SNATs: {stats}");
}

#[test]
fn a_pod_calling_its_own_service_is_always_answered() {
    let (cluster, _) = cluster();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let me = format!("pod-{}", i + 1);
        let pod_ip = node.pod_ip;
        let seen = in_netns(&node.pod_ns, move || {
            let mut seen = Seen::default();
            let to = SocketAddr::from((CLUSTER_IP, 80));
            for _ in 0..200 {
                match Conversation::open(to).and_then(|mut c| c.ask_peer()) {
                    Ok((pod, source)) => seen.record(pod, source.ip()),
                    Err(e) => seen.failed.push(format!("{e:#}")),
                }
            }
            for _ in 0..50 {
                match udp_ask_peer(SocketAddr::from((CLUSTER_IP, 53))) {
                    Ok((_, pod, source)) => seen.record(pod, source.ip()),
                    Err(e) => seen.failed.push(format!("{e:#}")),
                }
            }
            seen
        });
        println!("{me} → its Service: {seen:?}");
        assert_eq!(seen.total(), 250, "{seen:?}");
        assert_eq!(seen.answers.len(), 2, "both pods picked: {seen:?}");
        // Picked itself: the request came from the service loopback address. The other pod
        // sees the caller's own address (pod to pod: no SNAT).
        assert_eq!(seen.sources_of(&me), [LOOPBACK], "{seen:?}");
        let other = format!("pod-{}", 2 - i);
        assert_eq!(seen.sources_of(&other), [pod_ip], "{seen:?}");
    }
}

#[test]
fn open_flows_survive_kill_9_of_the_agent_and_its_restart() {
    let (mut cluster, config) = cluster();
    route_via(&cluster, 0);
    let to = SocketAddr::from((cluster.nodes[0].lan_ip, NODE_PORT_TCP));
    let ns = cluster.client.clone();
    let ask_all = move |conversations: Vec<Conversation>| -> (Vec<Conversation>, Vec<String>) {
        in_netns(&ns, move || {
            let mut conversations = conversations;
            let answers = conversations
                .iter_mut()
                .map(|c| c.ask().unwrap_or_else(|e| format!("failed: {e:#}")))
                .collect();
            (conversations, answers)
        })
    };
    let conversations: Vec<Conversation> = in_netns(&cluster.client, move || {
        (0..50).map(|_| Conversation::open(to).unwrap()).collect()
    });
    let (conversations, before) = ask_all(conversations);
    let pods: std::collections::BTreeSet<&String> = before.iter().collect();
    println!("50 connections through node-a: {pods:?}");
    assert_eq!(pods.len(), 2, "{before:?}");

    cluster.signal_agent(0, libc::SIGKILL).unwrap();
    let (conversations, during) = ask_all(conversations);
    assert_eq!(during, before, "with node-a's agent killed");
    cluster.start_agent_on_file(0, &config, &[]).unwrap();
    let (conversations, after) = ask_all(conversations);
    assert_eq!(after, before, "after node-a's agent restarted");
    // New connections go on too.
    let seen = tcp_from_client(&cluster, to, 50);
    assert_eq!(seen.total(), 50, "{seen:?}");
    drop(conversations);
    std::thread::sleep(Duration::from_millis(100));
}

/// Out of SNAT ports or NAT table room: new flows are refused and counted, open ones keep
/// working.
#[test]
fn new_flows_are_refused_when_snat_ports_or_the_nat_table_run_out() {
    for (flags, limit, refused) in [
        (
            ["--snat-port-range", "61000-61003", "--nat-size", "1024"],
            4,
            "refused_no_port",
        ),
        (
            ["--snat-port-range", "61000-65535", "--nat-size", "3"],
            3,
            "refused_table_full",
        ),
    ] {
        let (cluster, _) = cluster_with(&flags);
        route_via(&cluster, 0);
        let to = SocketAddr::from((cluster.nodes[0].lan_ip, NODE_PORT_TCP));
        // Connections until node-a's pod-2 holds `limit` SNATed ones (pod-1's are local).
        let (open, remote, refused_seen) = in_netns(&cluster.client, move || {
            let mut open = Vec::new();
            let (mut remote, mut refused) = (0, 0);
            for _ in 0..60 {
                match Conversation::open(to).and_then(|mut c| c.ask().map(|name| (c, name))) {
                    Ok((c, name)) => {
                        remote += usize::from(name == "pod-2");
                        open.push(c);
                    }
                    Err(_) => refused += 1,
                }
                if refused >= 3 {
                    break;
                }
            }
            (open, remote, refused)
        });
        println!(
            "{flags:?}: {} open ({remote} SNATed), {refused_seen} refused",
            open.len()
        );
        assert_eq!(remote, limit, "{flags:?}");
        assert!(refused_seen >= 1, "{flags:?}");
        let stats = cluster.lbctl(0, &["stats", "-o", "json"]).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        println!("{}", stats["nat"]);
        assert!(stats["nat"][refused].as_u64().unwrap() >= 1, "{stats}");
        assert_eq!(stats["nat"]["entries"], limit as u64, "{stats}");
        // The open flows, SNATed ones included, still work.
        let ns = cluster.client.clone();
        let failed = in_netns(&ns, move || {
            let mut open = open;
            open.iter_mut()
                .map(|c| c.ask())
                .filter(Result::is_err)
                .count()
        });
        assert_eq!(failed, 0, "{flags:?}: open flows broken");
    }
}

/// Direct server return: the pod on the other node sees the client's own address and answers it
/// directly: none of its replies passes node A. hybrid: DSR for TCP, SNAT for UDP.
#[test]
fn dsr_replies_go_straight_to_the_client() {
    for mode in ["dsr", "hybrid"] {
        let (cluster, _) = cluster_with(&["--lb-mode", mode]);
        let node_a = cluster.nodes[0].lan_ip;
        let capture = Capture::start(&cluster.nodes[0].ns, "eth1").unwrap();
        let frontend = SocketAddr::from((node_a, NODE_PORT_TCP));
        let tcp = tcp_from_client(&cluster, frontend, 200);
        let udp = udp_from_client(&cluster, SocketAddr::from((node_a, NODE_PORT_UDP)), 100);
        let packets = capture.finish().unwrap();
        println!("{mode}: TCP {tcp:?}\n{mode}: UDP {udp:?}");
        assert_eq!(tcp.total(), 200, "{mode}: {tcp:?}");
        assert_eq!(tcp.answers.len(), 2, "{mode}: {tcp:?}");
        // No SNAT for TCP: both pods see the client.
        assert_eq!(tcp.sources_of("pod-1"), [CLIENT], "{mode}: {tcp:?}");
        assert_eq!(tcp.sources_of("pod-2"), [CLIENT], "{mode}: {tcp:?}");
        // Replies as seen on node A's uplink: those of pod-1's connections (local), none of
        // pod-2's (they go from node B straight to the client).
        let replies_to = |pod: &str| {
            let ports = &tcp.ports[pod];
            packets
                .iter()
                .filter(|(src, dst)| {
                    *src == frontend && dst.ip() == CLIENT && ports.contains(&dst.port())
                })
                .count()
        };
        let requests_of_pod_2 = packets
            .iter()
            .filter(|(src, _)| src.ip() == CLIENT && tcp.ports["pod-2"].contains(&src.port()))
            .count();
        println!(
            "{mode}: on node-a's uplink: {} replies of pod-1's connections, {} of pod-2's, {requests_of_pod_2} packets from the client on pod-2's",
            replies_to("pod-1"),
            replies_to("pod-2")
        );
        assert!(
            replies_to("pod-1") > 0,
            "the capture saw node-a's own replies"
        );
        assert!(
            requests_of_pod_2 > 0,
            "the capture saw the requests to pod-2"
        );
        assert_eq!(
            replies_to("pod-2"),
            0,
            "{mode}: pod-2's replies passed node-a"
        );
        // Full-size segments no longer fit with the option: node A answers "fragmentation
        // needed" for 8 bytes less and the client's path MTU follows.
        let long = long_request_to_pod_2(&cluster, frontend);
        assert_eq!(
            long.as_deref(),
            Ok("pod-2"),
            "{mode}: 64 KiB to pod-2 by DSR"
        );
        assert_eq!(udp.total(), 100, "{mode}: {udp:?}");
        let udp_source = if mode == "dsr" { CLIENT } else { node_a };
        assert_eq!(udp.sources_of("pod-2"), [udp_source], "{mode}: {udp:?}");
        let stats = cluster.lbctl(0, &["stats", "-o", "json"]).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let snated = stats["nat"]["allocated"].as_u64().unwrap();
        let expected = udp.answers.get("pod-2").copied().unwrap_or(0) as u64;
        println!("{mode}: {snated} flows SNATed on node-a");
        // hybrid: one NAT entry per UDP flow to pod-2 (a client port the kernel happened to
        // pick twice is one flow); dsr: none.
        if mode == "dsr" {
            assert_eq!(snated, 0, "{stats}");
        } else {
            assert!(
                snated >= 1 && snated <= expected,
                "{snated} of {expected}: {stats}"
            );
        }
    }
}

/// Path MTU through SNAT: node B's side of its pod link is narrower (1200; the pod's own MTU
/// stays 1500, so its MSS does not hide the problem); B's "fragmentation needed",
/// sent to node A's SNAT address about the translated packet, is translated back to the client,
/// whose path MTU follows, so 64 KiB reach the pod on B.
#[test]
fn path_mtu_discovery_works_through_snat() {
    let (cluster, _) = cluster();
    let b = &cluster.nodes[1];
    sh(&format!("ip -n {} link set p0 mtu 1200", b.ns)).unwrap();
    let frontend = SocketAddr::from((cluster.nodes[0].lan_ip, NODE_PORT_TCP));
    let long = long_request_to_pod_2(&cluster, frontend);
    assert_eq!(long.as_deref(), Ok("pod-2"), "64 KiB to pod-2 through SNAT");
    let mtu = in_netns(&cluster.client, move || {
        std::process::Command::new("ip")
            .args(["route", "get", &frontend.ip().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    });
    println!("client's route to node-a: {mtu}");
    assert!(mtu.contains("mtu 1200"), "{mtu}");
}
