//! Interfaces come and go: a pod's veth deleted and recreated (same name, new ifindex) is
//! attached again while the agent runs, and an agent started after such a change starts cleanly
//! over the stale pinned links (no --cleanup, so conntrack survives).

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{CLUSTER_IP, Topology, UDP_PORT, udp_ask};

/// Backend names that answered 30 UDP requests to the ClusterIP (new source port each).
fn answering(topo: &Topology) -> BTreeSet<String> {
    let to = format!("{CLUSTER_IP}:{UDP_PORT}").parse().unwrap();
    topo.client(move || {
        (0..30)
            .filter_map(|_| udp_ask(to).ok())
            .filter(|(from, _)| *from == to)
            .map(|(_, name)| name)
            .collect()
    })
}

fn all_answer(topo: &Topology, what: &str) {
    let want: BTreeSet<String> = ["backend-1".into(), "backend-2".into()].into();
    topo.wait_until(Duration::from_secs(10), what, |t| answering(t) == want)
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: answering {:?}\nagent log:\n{}",
                answering(topo),
                topo.agent_log()
            )
        });
}

#[test]
fn recreated_interfaces_are_attached_with_the_agent_up_or_down() {
    let mut topo = Topology::new(2).expect("topology");
    topo.write_config(&Topology::service_yaml(&[1, 2]))
        .expect("config");
    topo.start_agent(&["--interface-regex", "^b[0-9]+$"])
        .expect("agent");
    all_answer(&topo, "both backends at start");

    // Agent up: b2 goes and comes back with a new ifindex.
    let before = Topology::ifindex_of(&topo.node, "b2").unwrap();
    topo.recreate_backend_link(2).expect("recreate b2");
    let after = Topology::ifindex_of(&topo.node, "b2").unwrap();
    assert_ne!(before, after);
    all_answer(&topo, "backend-2 again after b2 was recreated (agent up)");
    let interfaces: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["interfaces", "-o", "json"]).unwrap()).unwrap();
    let b2 = interfaces["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["interface"] == "b2")
        .expect("b2 listed")
        .clone();
    assert_eq!(b2["ifindex"], after, "{interfaces}");
    assert_eq!(b2["pinned"], "tc", "{interfaces}");
    let log = topo.agent_log();
    assert!(log.contains("b2: gone"), "{log}");

    // Agent down: recreated again; the new agent starts over the stale pins.
    topo.stop_agent().unwrap();
    topo.recreate_backend_link(2).expect("recreate b2");
    topo.start_agent(&["--interface-regex", "^b[0-9]+$"])
        .expect("agent starts over a stale pinned link");
    all_answer(&topo, "backend-2 after b2 was recreated (agent down)");

    // A link that appears later is attached too, and one deleted for good is forgotten.
    let before_del = topo.lbctl(&["interfaces"]).unwrap();
    assert!(before_del.contains("b1"), "{before_del}");
    lb_tests::sh(&format!("ip -n {} link del b1", topo.node)).unwrap();
    topo.wait_until(Duration::from_secs(5), "b1 forgotten", |t| {
        !t.lbctl(&["interfaces"]).unwrap().contains("b1 ")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", topo.agent_log()));
    assert!(
        !topo.bpffs().join("links/tc-b1").exists(),
        "pinned link of a deleted interface left behind"
    );
}
