//! `--metrics-addr`: Prometheus counters after real traffic, /healthz and /readyz, and the
//! healthCheckNodePort of an externalTrafficPolicy: Local Service.

use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    BACKEND_TCP_PORT, CLUSTER_IP, Conversation, TCP_PORT, Topology, http_get, in_netns, sh,
};

const LB_IP: &str = "192.168.30.60";

/// echo (ClusterIP, both backends) and web (LoadBalancer, Local, healthCheckNodePort 32000)
/// whose endpoints are `web` (backend number, node).
fn config(web: &[(usize, &str)]) -> String {
    let endpoints: String = web
        .iter()
        .map(|(i, node)| {
            format!(
                "- addresses: [\"10.0.{i}.2\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
            )
        })
        .collect();
    format!(
        "{}---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: lan}}\nspec:\n  blocks: [{{start: {LB_IP}, stop: {LB_IP}}}]\n---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {{name: lan}}\nspec:\n  interfaces: [\"^c[0-9]+\"]\n  loadBalancerIPs: true\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  \
         externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  \
         - {{name: http, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: 30080, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {BACKEND_TCP_PORT}, protocol: TCP}}\nendpoints:\n{endpoints}",
        Topology::service_yaml(&[1, 2])
    )
}

/// The value of the sample `name{labels…}` (labels given as `key="value"` parts it contains).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or("");
            metric == name && labels.iter().all(|p| l.contains(p))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_health_and_health_check_node_port() {
    let mut topo = Topology::new(2).unwrap();
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.client
    ))
    .unwrap();
    topo.write_config(&config(&[(1, "node-a"), (2, "node-b")]))
        .unwrap();
    topo.start_agent(&["--node-name", "node-a", "--metrics-addr", "127.0.0.1:0"])
        .unwrap();
    let addr = topo.metrics_addr().unwrap();
    let get = |path: &'static str| in_netns(&topo.node, move || http_get(addr, path).unwrap());

    assert_eq!(get("/readyz").0, 200);
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/nothing").0, 404);

    // Real traffic: 30 conversations to the ClusterIP, 10 to the LoadBalancer IP.
    topo.client(|| {
        for _ in 0..30 {
            Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))
                .and_then(|mut c| c.ask())
                .unwrap();
        }
        for _ in 0..10 {
            Conversation::open(format!("{LB_IP}:80").parse().unwrap())
                .and_then(|mut c| c.ask())
                .unwrap();
        }
    });
    let (code, text) = get("/metrics");
    assert_eq!(code, 200);
    let packets = sample(
        &text,
        "lb_frontend_packets_total",
        &[
            "frontend=\"10.96.0.10:80/TCP\"",
            "service=\"default/echo:tcp\"",
        ],
    )
    .unwrap_or_else(|| panic!("no frontend counter:\n{text}"));
    // SYN, ACK, request, FIN/ACK at least per conversation.
    assert!(packets >= 120.0, "{packets}\n{text}");
    let lb = sample(
        &text,
        "lb_frontend_packets_total",
        &[&format!("frontend=\"{LB_IP}:80/TCP\"")],
    )
    .unwrap();
    assert!(lb >= 40.0, "{lb}");
    let to_backends: f64 = ["10.0.1.2:8080", "10.0.2.2:8080"]
        .iter()
        .map(|b| {
            sample(
                &text,
                "lb_backend_packets_total",
                &[&format!("backend=\"{b}\"")],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(
        to_backends >= packets + lb,
        "{to_backends} < {packets} + {lb}"
    );
    assert!(sample(&text, "lb_conntrack_inserted_total", &[]).unwrap() >= 80.0);
    assert!(sample(&text, "lb_conntrack_capacity", &[]).unwrap() >= 65536.0);
    assert!(sample(&text, "lb_reconcile_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "lb_announcements_owned", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "lb_map_write_errors_total", &[]), Some(0.0));

    // ARP replies per announced address.
    sh(&format!("ip -n {} neigh flush dev eth0", topo.client)).unwrap();
    let (_, replies) = Topology::arping(&topo.client, LB_IP).unwrap();
    assert!(!replies.is_empty());
    let text = get("/metrics").1;
    assert!(
        sample(
            &text,
            "lb_arp_replies_total",
            &[&format!("address=\"{LB_IP}\"")]
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );

    // healthCheckNodePort, from the client as a cloud load balancer would probe it.
    let probe = |topo: &Topology| {
        topo.client(|| http_get("10.0.0.254:32000".parse().unwrap(), "/healthz").unwrap())
    };
    let (code, body) = probe(&topo);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["service"]["name"], "web");

    // No local endpoint left: 503, and a file change was programmed (latency observed).
    topo.write_config(&config(&[(2, "node-b")])).unwrap();
    topo.wait_until(Duration::from_secs(5), "health check 503", |t| {
        probe(t).0 == 503
    })
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&probe(&topo).1).unwrap();
    assert_eq!(v["localEndpoints"], 0);
    let text = get("/metrics").1;
    assert!(
        sample(&text, "lb_network_programming_duration_seconds_count", &[]).unwrap() >= 1.0,
        "{text}"
    );

    // A rejected file is counted; the service keeps its port.
    topo.write_config(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 0}]}\n",
    )
    .unwrap();
    topo.wait_until(Duration::from_secs(5), "rejection counted", |t| {
        let text = in_netns(&t.node, move || http_get(addr, "/metrics").unwrap().1);
        sample(&text, "lb_objects_rejected_total", &[]).is_some_and(|v| v >= 1.0)
    })
    .unwrap();
    assert_eq!(probe(&topo).0, 503);
}

/// kube-proxy's healthz rule: a change that cannot be programmed (here: more Service ports
/// than `--max-services`) makes /healthz fail once it has waited `--health-timeout`; the last
/// good state keeps forwarding, and the next change that fits makes it healthy again.
#[test]
fn healthz_fails_while_a_change_cannot_be_programmed() {
    let mut topo = Topology::new(1).unwrap();
    let fits = Topology::service_yaml(&[1]);
    topo.write_config(&fits).unwrap();
    topo.start_agent(&[
        "--max-services",
        "2",
        "--health-timeout",
        "1",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    let addr = topo.metrics_addr().unwrap();
    let get = |topo: &Topology, path: &'static str| {
        in_netns(&topo.node, move || http_get(addr, path).unwrap())
    };
    assert_eq!(get(&topo, "/healthz").0, 200);

    // Two more Service ports than the maps hold: rejected before any write, counted.
    let too_big = format!(
        "{fits}---\napiVersion: v1\nkind: Service\nmetadata: {{name: more, namespace: default}}\nspec:\n  \
         clusterIP: 10.96.0.77\n  ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]\n"
    );
    topo.write_config(&too_big).unwrap();
    topo.wait_until(Duration::from_secs(5), "the write error counted", |t| {
        sample(&get(t, "/metrics").1, "lb_map_write_errors_total", &[]).is_some_and(|v| v >= 1.0)
    })
    .unwrap();
    topo.wait_until(Duration::from_secs(5), "/healthz 503", |t| {
        get(t, "/healthz").0 == 503
    })
    .unwrap();
    // The last good state still forwards.
    let name = topo.client(|| {
        Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    assert_eq!(name, "backend-1");

    topo.write_config(&fits).unwrap();
    topo.wait_until(Duration::from_secs(5), "/healthz 200 again", |t| {
        get(t, "/healthz").0 == 200
    })
    .unwrap();
}
