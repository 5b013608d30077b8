//! LoadBalancer IPs end to end in namespaces: pool allocation, the XDP ARP responder answering
//! arping on matching interfaces only, TCP to the LoadBalancer IP and to a NodePort.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_tests::{BACKEND_TCP_PORT, Conversation, Topology, sh};

const POOL_AND_POLICY: &str = "\
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: homelab}
spec:
  blocks: [{start: 192.168.30.60, stop: 192.168.30.80}]
---
apiVersion: lb.xdp.rs/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: client-side}
spec:
  interfaces: [\"^c[0-9]+\"]
  loadBalancerIPs: true
---
";

fn lb_service(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|i| format!("- addresses: [\"10.0.{i}.2\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "{POOL_AND_POLICY}apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  ports:\n  \
         - {{name: http, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: 30080, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {BACKEND_TCP_PORT}, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

fn spread(topo: &Topology, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    topo.client(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let mut c = Conversation::open(to).unwrap();
            assert_eq!(
                c.peer().unwrap(),
                to,
                "reply must come from the frontend address"
            );
            *seen.entry(c.ask().unwrap()).or_insert(0) += 1;
        }
        seen
    })
}

#[test]
fn load_balancer_ip_is_announced_and_balanced() {
    let mut topo = Topology::new(2).unwrap();
    // The pool is on the client's link, so the client ARPs for it directly.
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.client
    ))
    .unwrap();
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.backends[0]
    ))
    .unwrap();
    topo.write_config(&lb_service(&[1, 2])).unwrap();
    topo.start_agent(&[]).unwrap();

    // The lowest address of the pool went to the only LoadBalancer Service.
    let pools: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["pools", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(pools["services"][0]["service"], "default/web", "{pools}");
    assert_eq!(
        pools["services"][0]["addresses"][0], "192.168.30.60",
        "{pools}"
    );
    assert_eq!(pools["pools"][0]["used"], 1);
    assert_eq!(pools["pools"][0]["size"], 21);

    // arping from the client: exactly one reply, with the node interface's MAC.
    let node_mac = Topology::mac_of(&topo.node, "c0").unwrap();
    let (sent, replies) = Topology::arping(&topo.client, "192.168.30.60").unwrap();
    assert!(sent >= 1);
    assert_eq!(
        replies,
        vec![node_mac.clone(); sent],
        "exactly one reply per request, from c0"
    );
    // No reply for an address that is not announced …
    let (sent, replies) = Topology::arping(&topo.client, "192.168.30.61").unwrap();
    assert!(sent >= 1 && replies.is_empty(), "{replies:?}");
    // … nor on an interface the policy does not match (the node's b1 side).
    let (sent, replies) = Topology::arping(&topo.backends[0], "192.168.30.60").unwrap();
    assert!(sent >= 1 && replies.is_empty(), "{replies:?}");

    let arp: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["arp", "-o", "json"]).unwrap()).unwrap();
    let entries = arp.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{arp}");
    assert_eq!(entries[0]["address"], "192.168.30.60");
    assert_eq!(entries[0]["interface"], "c0");
    assert_eq!(entries[0]["mac"], node_mac.as_str());
    assert_eq!(entries[0]["service"], "default/web");
    assert!(entries[0]["replies"].as_u64().unwrap() >= 1, "{arp}");
    assert!(
        entries[0]["last_garp"].is_u64(),
        "a gratuitous ARP was sent: {arp}"
    );

    // TCP to the LoadBalancer IP and to the NodePort on the node address reaches both backends.
    let lb = spread(&topo, "192.168.30.60:80".parse().unwrap(), 60);
    let node_port = spread(&topo, "10.0.0.254:30080".parse().unwrap(), 60);
    println!("LoadBalancer IP: {lb:?}\nNodePort: {node_port:?}");
    for seen in [&lb, &node_port] {
        assert_eq!(seen.values().sum::<usize>(), 60);
        assert_eq!(seen.len(), 2, "both backends used: {seen:?}");
    }
    let services = topo.lbctl(&["services"]).unwrap();
    for want in [
        "192.168.30.60:80/TCP  LoadBalancer",
        "10.0.0.254:30080/TCP  NodePort",
        "10.96.0.30:80/TCP",
    ] {
        assert!(
            services.contains(want),
            "lbctl services lacks {want:?}:\n{services}"
        );
    }
}

#[test]
fn pool_problems_are_reported_and_bad_pools_rejected() {
    let mut topo = Topology::new(1).unwrap();
    topo.write_config(&lb_service(&[1])).unwrap();
    topo.start_agent(&[]).unwrap();

    // A second Service asking for the taken address gets a reported conflict, not silence.
    let clash = format!(
        "{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
         loadBalancerIP: 192.168.30.60\n  clusterIP: 10.96.0.31\n  ports: [{{port: 80}}]\n",
        lb_service(&[1])
    );
    topo.write_config(&clash).unwrap();
    topo.wait_until(Duration::from_secs(3), "conflict in lbctl pools", |t| {
        t.lbctl(&["pools"])
            .is_ok_and(|o| o.contains("conflicts: already allocated to default/web"))
    })
    .unwrap();
    assert!(topo.agent_log().contains(
        "Service default/other: no LoadBalancer address: requested 192.168.30.60 conflicts"
    ));

    // Overlapping pools reject the whole file; the last good state stays.
    let overlap = format!(
        "{}\n---\napiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: overlap}}\nspec: {{blocks: [{{cidr: 192.168.30.64/30}}]}}\n",
        lb_service(&[1])
    );
    topo.write_config(&overlap).unwrap();
    topo.wait_until(Duration::from_secs(3), "rejection", |t| {
        t.agent_log().contains("rejected")
    })
    .unwrap();
    let log = topo.agent_log();
    assert!(log.contains("LoadBalancerIPPool overlap: spec.blocks: 192.168.30.65-192.168.30.66 overlaps 192.168.30.60-192.168.30.80 of pool homelab"), "{log}");
    let services = topo.lbctl(&["services"]).unwrap();
    assert!(
        services.contains("192.168.30.60:80/TCP"),
        "last good state kept:\n{services}"
    );
}

/// Allocations survive an agent restart even when a new Service that sorts first shows up, and
/// `--garp-interval` keeps re-announcing.
#[test]
fn allocation_is_stable_across_restarts_and_garp_repeats() {
    let mut topo = Topology::new(1).unwrap();
    topo.write_config(&lb_service(&[1])).unwrap();
    topo.start_agent(&["--garp-interval", "1"]).unwrap();
    let first_garp = |t: &Topology| -> u64 {
        let arp: serde_json::Value =
            serde_json::from_str(&t.lbctl(&["arp", "-o", "json"]).unwrap()).unwrap();
        arp[0]["last_garp"].as_u64().unwrap_or(0)
    };
    let before = first_garp(&topo);
    topo.wait_until(Duration::from_secs(4), "a repeated gratuitous ARP", |t| {
        first_garp(t) > before
    })
    .unwrap();
    topo.stop_agent().unwrap();

    // "aaa" sorts before "web" and would take the lowest address if allocation started over.
    let with_new = format!(
        "{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: aaa, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.31\n  ports: [{{port: 80}}]\n",
        lb_service(&[1])
    );
    topo.write_config(&with_new).unwrap();
    topo.start_agent(&[]).unwrap();
    let pools: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["pools", "-o", "json"]).unwrap()).unwrap();
    let by: std::collections::BTreeMap<String, String> = pools["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_string(),
                s["addresses"][0].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(by["default/web"], "192.168.30.60", "{pools}");
    assert_eq!(by["default/aaa"], "192.168.30.61", "{pools}");
}

/// More (interface, address) pairs than LB_ARP holds: refused before any write, said in the log;
/// nothing is half-announced.
#[test]
fn announcements_that_do_not_fit_change_nothing() {
    let mut topo = Topology::new(1).unwrap();
    let second = lb_service(&[1])
        .replace("name: web,", "name: web2,")
        .replace("clusterIP: 10.96.0.30", "clusterIP: 10.96.0.31")
        .replace("nodePort: 30080", "nodePort: 30081")
        .replace("name: web-1", "name: web2-1")
        .replace(
            "kubernetes.io/service-name: web}",
            "kubernetes.io/service-name: web2}",
        );
    let second = second.split_once(POOL_AND_POLICY).unwrap().1.to_string();
    topo.write_config(&format!("{}---\n{second}", lb_service(&[1])))
        .unwrap();
    topo.start_agent(&["--max-announcements", "1"]).unwrap();
    topo.wait_until(Duration::from_secs(5), "the capacity error", |t| {
        t.agent_log()
            .contains("2 (interface, address) pairs to announce exceed the capacity of 1")
    })
    .unwrap();
    assert_eq!(topo.lbctl(&["arp", "-o", "json"]).unwrap().trim(), "[]");
}
