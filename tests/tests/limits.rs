//! Limits, on a real node: every map the config fills refuses a state that does not fit whole
//! (a clear error naming the flag to raise, the maps as they were, traffic on the last good
//! state); a full conntrack table evicts its least recently used flows, counts them and keeps
//! serving; 100,000 frontends load and answer.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT, dump_maps};

fn service(name: &str, spec: &str, backend: usize, endpoints: usize) -> String {
    let addresses: String = (0..endpoints)
        .map(|i| {
            if i == 0 {
                format!("- addresses: [\"10.0.{backend}.2\"]\n")
            } else {
                format!("- addresses: [\"10.77.{}.{}\"]\n", i / 250, i % 250 + 1)
            }
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\nendpoints:\n{addresses}"
    )
}

fn answers(topo: &Topology, to: SocketAddr) -> bool {
    topo.client(move || Conversation::open(to).and_then(|mut c| c.ask()).is_ok())
}

#[test]
fn every_map_the_config_fills_refuses_a_state_that_does_not_fit() {
    let mut topo = Topology::new(2).unwrap();
    // The base: 2 service ports, 2 frontends, 2 backends, 2 of 3 Maglev blocks.
    let base = Topology::service_yaml(&[1]);
    topo.write_config(&base).unwrap();
    topo.start_agent(&[
        "--max-services",
        "4",
        "--max-frontends",
        "8",
        "--max-backends",
        "9",
        "--maglev-table-size",
        "251",
        "--maglev-capacity",
        "768",
        "--max-announcements",
        "1",
    ])
    .unwrap();
    let before = dump_maps(&topo.bpffs());
    let many_ranges: String = (0..lb_common::DEFAULT_MAX_SOURCE_RANGES + 1)
        .map(|i| format!("10.{}.{}.{}/32,", 100 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "service ports (LB_SERVICE_NAMES, tables)",
            base.clone()
                + &service("a", "  clusterIP: 10.96.1.1\n", 1, 1)
                + &service("b", "  clusterIP: 10.96.1.2\n", 1, 1)
                + &service("c", "  clusterIP: 10.96.1.3\n", 1, 1),
            "--max-services",
        ),
        (
            "frontends (LB_FRONTENDS)",
            base.clone()
                + &service(
                    "a",
                    "  clusterIP: 10.96.1.1\n  externalIPs: [10.100.0.1, 10.100.0.2, 10.100.0.3, 10.100.0.4, 10.100.0.5, 10.100.0.6]\n",
                    1,
                    1,
                ),
            "--max-frontends",
        ),
        (
            "backends (LB_BACKENDS)",
            base.clone() + &service("a", "  clusterIP: 10.96.1.1\n", 1, 8),
            "--max-backends",
        ),
        (
            "Maglev array (LB_MAGLEV)",
            base.clone()
                + &service("a", "  clusterIP: 10.96.1.1\n", 1, 1)
                + &service("b", "  clusterIP: 10.96.1.2\n", 1, 1),
            "--maglev-capacity",
        ),
        (
            "source ranges (LB_SOURCE_RANGES)",
            base.clone()
                + &service(
                    "a",
                    &format!(
                        "  clusterIP: 10.96.1.1\n  externalIPs: [10.100.0.1]\n  loadBalancerSourceRanges: [{}]\n",
                        many_ranges.trim_end_matches(',')
                    ),
                    1,
                    1,
                ),
            "loadBalancerSourceRanges",
        ),
        (
            "ARP announcements (LB_ARP)",
            base.clone()
                + "---\napiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: lan}\nspec: {blocks: [{cidr: 192.168.30.60/31}]}\n\
                   ---\napiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {name: all}\nspec: {loadBalancerIPs: true}\n"
                + &service("a", "  type: LoadBalancer\n  clusterIP: 10.96.1.1\n", 1, 1),
            "--max-announcements",
        ),
    ];
    for (name, text, expected) in &cases {
        let start = topo.agent_log().len();
        topo.write_config(text).unwrap();
        topo.wait_until(Duration::from_secs(10), name, |t| {
            t.agent_log()[start..].contains(" not applied: ")
        })
        .unwrap_or_else(|e| {
            panic!(
                "{name}: not refused ({e:#}):\n{}",
                &topo.agent_log()[start..]
            )
        });
        let log = topo.agent_log();
        let line = log[start..]
            .lines()
            .find(|l| l.contains(" not applied: "))
            .unwrap();
        println!("{name}: {}", line.split("] ").nth(1).unwrap_or(line));
        assert!(line.contains(expected), "{name}: {line}");
        assert!(line.contains("capacity"), "{name}: {line}");
        assert_eq!(dump_maps(&topo.bpffs()), before, "{name}: the maps changed");
        assert!(
            answers(&topo, SocketAddr::from((CLUSTER_IP, TCP_PORT))),
            "{name}"
        );
        assert!(
            !log[start..].contains("retrying"),
            "{name}: a state that does not fit is not retried"
        );
    }
    // And the base still applies (nothing was left half-done).
    let start = topo.agent_log().len();
    topo.write_config(&(base + &service("a", "  clusterIP: 10.96.1.1\n", 2, 1)))
        .unwrap();
    topo.wait_until(Duration::from_secs(10), "a fitting state", |t| {
        t.agent_log()[start..].contains(" applied in ")
    })
    .unwrap();
    assert!(answers(&topo, SocketAddr::from(([10, 96, 1, 1], 80))));
}

#[test]
fn a_full_conntrack_table_evicts_the_oldest_flows_counts_them_and_keeps_serving() {
    let mut topo = Topology::new(2).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2])).unwrap();
    topo.start_agent(&["--conntrack-size", "512"]).unwrap();
    let vip = |port| SocketAddr::from((CLUSTER_IP, port));
    let mut held = topo.client(move || Conversation::open(vip(TCP_PORT)).unwrap());
    let first = held.ask().unwrap();
    // 2,000 new UDP flows (two entries each) through a table of 512.
    let failed = topo.client(move || {
        (0..2000)
            .filter(|_| lb_tests::udp_ask(vip(UDP_PORT)).is_err())
            .count()
    });
    let stats: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["stats", "-o", "json"]).unwrap()).unwrap();
    let ct = &stats["conntrack"];
    println!("after 2,000 UDP flows through 512 entries: {ct}");
    assert_eq!(failed, 0, "new flows failed while the table was full");
    assert!(ct["entries"].as_u64().unwrap() <= 512, "{ct}");
    assert!(ct["evicted"].as_u64().unwrap() >= 3000, "{ct}");
    let text = topo.lbctl(&["stats"]).unwrap();
    assert!(text.contains("evicted"), "{text}");
    // The held connection's entries were evicted too (it was idle): its next packet finds the
    // same backend again (Maglev on its 5-tuple), so it goes on.
    assert_eq!(held.ask().unwrap(), first);
}

#[test]
fn a_hundred_thousand_frontends_load_and_answer() {
    const SERVICES: u32 = 20_000;
    const EXTERNAL: u32 = 4;
    let mut topo = Topology::new(2).unwrap();
    // Each Service: a ClusterIP in 10.96/14 and four external IPs in 10.100/14 (both routed
    // to the node by the client), one port, one endpoint on backend 1 or 2.
    let addr = |base: u32, i: u32| Ipv4Addr::from(base + i);
    let cluster_ip = |i: u32| addr(u32::from(Ipv4Addr::new(10, 96, 0, 0)), i + 1);
    let external = |i: u32, j: u32| {
        addr(
            u32::from(Ipv4Addr::new(10, 100, 0, 0)),
            i * EXTERNAL + j + 1,
        )
    };
    let mut text = String::with_capacity(SERVICES as usize * 700);
    for i in 0..SERVICES {
        let ips: Vec<String> = (0..EXTERNAL).map(|j| external(i, j).to_string()).collect();
        let _ = write!(
            text,
            "{}",
            service(
                &format!("s{i}"),
                &format!(
                    "  clusterIP: {}\n  externalIPs: [{}]\n",
                    cluster_ip(i),
                    ips.join(", ")
                ),
                1 + (i % 2) as usize,
                1
            )
        );
    }
    topo.write_config(&text).unwrap();
    let started = Instant::now();
    topo.spawn_agent(&[
        "--max-services",
        "20480",
        "--max-frontends",
        "131072",
        "--maglev-table-size",
        "251",
    ])
    .unwrap();
    topo.wait_agent_log("lb-agent ready", Duration::from_secs(240))
        .unwrap();
    let loaded = started.elapsed();
    let fill: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["status", "-o", "json"]).unwrap()).unwrap();
    let frontends = fill["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "LB_FRONTENDS")
        .unwrap()["entries"]
        .as_u64()
        .unwrap();
    assert_eq!(frontends, u64::from(SERVICES * (1 + EXTERNAL)));
    // Served: the first and last Service, and 300 spread over all of them, on every frontend
    // address kind, each answered by its own backend.
    let mut picks: BTreeSet<u32> = [0, SERVICES - 1].into();
    let mut x = 12345u32;
    while picks.len() < 302 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        picks.insert(x % SERVICES);
    }
    let targets: Vec<(SocketAddr, String)> = picks
        .iter()
        .map(|&i| {
            let to = if i % 2 == 0 {
                cluster_ip(i)
            } else {
                external(i, i % EXTERNAL)
            };
            (SocketAddr::from((to, 80)), format!("backend-{}", 1 + i % 2))
        })
        .collect();
    let wrong = topo.client(move || {
        targets
            .into_iter()
            .filter(|(to, want)| {
                Conversation::open(*to)
                    .and_then(|mut c| c.ask())
                    .map_or(true, |name| &name != want)
            })
            .map(|(to, _)| to)
            .collect::<Vec<_>>()
    });
    println!(
        "{} frontends ({SERVICES} Services) loaded in {:.1} s; 302 of them asked, {} wrong",
        frontends,
        loaded.as_secs_f64(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
}
