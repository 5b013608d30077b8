//! Service policies with real connections: loadBalancerSourceRanges, sessionAffinity ClientIP,
//! terminating endpoints, and a Service without endpoints.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_tests::{BACKEND_TCP_PORT, Conversation, Topology, sh};

/// One Service "web" (TCP 80) with `spec_extra` lines added to its spec and one endpoint per
/// (backend number, condition YAML), plus a pool and an L2 policy for its LoadBalancer IP.
fn web(spec_extra: &str, endpoints: &[(usize, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(i, c)| format!("- addresses: [\"10.0.{i}.2\"]\n  conditions: {c}\n"))
        .collect();
    format!(
        "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: lan}}\nspec: {{blocks: [{{cidr: 192.168.30.60/32}}]}}\n---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {{name: all}}\nspec: {{loadBalancerIPs: true}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n{spec_extra}  ports:\n  \
         - {{name: http, port: 80, targetPort: {BACKEND_TCP_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {BACKEND_TCP_PORT}, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

const READY: &str = "{ready: true}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const LB_IP: &str = "192.168.30.60:80";
const CLUSTER_IP: &str = "10.96.0.40:80";

fn topology(n: usize, yaml: &str) -> Topology {
    let mut topo = Topology::new(n).unwrap();
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.client
    ))
    .unwrap();
    topo.write_config(yaml).unwrap();
    topo.start_agent(&[]).unwrap();
    topo
}

fn answers(topo: &Topology, to: &str, n: usize) -> BTreeMap<String, usize> {
    let to: SocketAddr = to.parse().unwrap();
    topo.client(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let mut c = Conversation::open(to).unwrap();
            *seen.entry(c.ask().unwrap()).or_insert(0) += 1;
        }
        seen
    })
}

#[test]
fn source_ranges_block_an_unlisted_client() {
    // The client is 10.0.0.1: outside 10.0.0.8/29.
    let mut topo = topology(
        1,
        &web("  loadBalancerSourceRanges: [10.0.0.8/29]\n", &[(1, READY)]),
    );
    let blocked = topo.client(|| {
        Conversation::open(LB_IP.parse().unwrap())
            .err()
            .map(|e| format!("{e:#}"))
    });
    assert!(
        blocked.is_some(),
        "an unlisted client got through to the LoadBalancer IP"
    );
    println!("unlisted client: {}", blocked.unwrap());
    // The ClusterIP is not guarded by source ranges.
    assert_eq!(answers(&topo, CLUSTER_IP, 3).values().sum::<usize>(), 3);
    // Listing the client lets it in.
    topo.write_config(&web(
        "  loadBalancerSourceRanges: [10.0.0.0/29]\n",
        &[(1, READY)],
    ))
    .unwrap();
    topo.wait_until(Duration::from_secs(5), "the listed client to get in", |t| {
        t.client(|| {
            Conversation::open(LB_IP.parse().unwrap())
                .and_then(|mut c| c.ask())
                .is_ok()
        })
    })
    .unwrap();
    drop(topo.stop_agent());
}

#[test]
fn client_ip_affinity_sends_every_connection_to_one_backend() {
    let topo = topology(
        3,
        &web(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n",
            &[(1, READY), (2, READY), (3, READY)],
        ),
    );
    let seen = answers(&topo, LB_IP, 40);
    println!("with affinity: {seen:?}");
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 40);
}

#[test]
fn terminating_endpoint_keeps_its_connection_and_gets_no_new_ones() {
    let mut topo = topology(3, &web("", &[(1, READY), (2, READY), (3, READY)]));
    let mut open = topo
        .client(|| {
            for _ in 0..200 {
                let mut c = Conversation::open(CLUSTER_IP.parse().unwrap()).unwrap();
                if c.ask().unwrap() == "backend-1" {
                    return Some(c);
                }
            }
            None
        })
        .expect("no connection reached backend-1");
    topo.write_config(&web("", &[(1, TERMINATING), (2, READY), (3, READY)]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let seen = answers(&topo, CLUSTER_IP, 100);
    println!("while backend-1 terminates: {seen:?}");
    assert!(
        !seen.contains_key("backend-1"),
        "terminating backend got new flows: {seen:?}"
    );
    let still = topo.client(move || (0..5).map(|_| open.ask().unwrap()).collect::<Vec<_>>());
    assert!(still.iter().all(|a| a == "backend-1"), "{still:?}");
    let backends = topo.lbctl(&["backends"]).unwrap();
    assert!(
        backends.contains("terminating"),
        "lbctl shows the state:\n{backends}"
    );
    drop(topo.stop_agent());
}

#[test]
fn service_without_endpoints_refuses_tcp_at_once() {
    let topo = topology(1, &web("", &[]));
    let started = std::time::Instant::now();
    let err = topo.client(|| {
        Conversation::open(CLUSTER_IP.parse().unwrap())
            .err()
            .map(|e| format!("{e:#}"))
    });
    let took = started.elapsed();
    let err = err.expect("connected to a Service without endpoints");
    println!("no endpoints: {err} after {took:?}");
    assert!(
        err.contains("refused"),
        "expected a RST (connection refused), got: {err}"
    );
    assert!(took < Duration::from_millis(500), "refusal took {took:?}");
}

/// After an endpoint is removed, the same UDP 5-tuple is balanced afresh: its conntrack entries
/// were flushed instead of steering datagrams to the removed endpoint.
#[test]
fn removed_endpoint_udp_flows_move_on() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .unwrap();
    topo.start_agent(&[]).unwrap();
    let to: SocketAddr = (lb_tests::CLUSTER_IP, lb_tests::UDP_PORT).into();
    let ask = |s: &std::net::UdpSocket| -> String {
        s.send(b"who").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("UDP answer");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    };
    // One connected socket = one fixed 5-tuple; find one that lands on backend-1.
    let socket = topo
        .client(move || {
            for _ in 0..200 {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.connect(to).unwrap();
                if ask(&s) == "backend-1" {
                    return Some(s);
                }
            }
            None
        })
        .expect("no UDP flow reached backend-1");
    topo.write_config(&Topology::service_yaml(&[2, 3])).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // backend-1's server is still running: only the flush keeps the flow from reaching it.
    let answers = topo.client(move || (0..3).map(|_| ask(&socket)).collect::<Vec<_>>());
    println!("same UDP 5-tuple after removing backend-1: {answers:?}");
    assert!(answers.iter().all(|a| a != "backend-1"), "{answers:?}");
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the new flow sticks: {answers:?}"
    );
    assert!(
        topo.agent_log()
            .contains("UDP conntrack entries of removed endpoints"),
        "{}",
        topo.agent_log()
    );
}

/// externalTrafficPolicy: Local: traffic to the LoadBalancer IP only reaches endpoints on this
/// node, the ClusterIP still reaches all; with no ready local endpoint the address is not
/// announced at all.
#[test]
fn external_traffic_policy_local_uses_and_announces_local_endpoints_only() {
    const LOCAL: &str = "{ready: true}\n  nodeName: node-a";
    const REMOTE: &str = "{ready: true}\n  nodeName: node-b";
    let mut topo = Topology::new(2).unwrap();
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.client
    ))
    .unwrap();
    topo.write_config(&web(
        "  externalTrafficPolicy: Local\n",
        &[(1, LOCAL), (2, REMOTE)],
    ))
    .unwrap();
    topo.start_agent(&["--node-name", "node-a"]).unwrap();

    let external = answers(&topo, LB_IP, 30);
    let internal = answers(&topo, CLUSTER_IP, 60);
    println!("LoadBalancer IP: {external:?}\nClusterIP: {internal:?}");
    assert_eq!(
        external.keys().collect::<Vec<_>>(),
        ["backend-1"],
        "{external:?}"
    );
    assert_eq!(internal.len(), 2, "{internal:?}");

    // Only a remote endpoint left: the LoadBalancer IP is withdrawn from ARP.
    topo.write_config(&web("  externalTrafficPolicy: Local\n", &[(2, REMOTE)]))
        .unwrap();
    topo.wait_until(Duration::from_secs(3), "the announcement to go", |t| {
        t.lbctl(&["arp", "-o", "json"])
            .is_ok_and(|o| o.trim() == "[]")
    })
    .unwrap();
    sh(&format!("ip -n {} neigh flush dev eth0", topo.client)).unwrap();
    let (sent, replies) = Topology::arping(&topo.client, "192.168.30.60").unwrap();
    assert!(sent >= 1 && replies.is_empty(), "{replies:?}");
    drop(topo.stop_agent());
}
