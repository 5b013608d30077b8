//! Real packets through veth namespaces: client → node (lb-agent + XDP) → backends.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT, udp_ask};

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

#[test]
fn clusterip_tcp_and_udp_are_balanced_and_reverse_natted() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .unwrap();
    topo.start_agent(&[]).unwrap();

    let (tcp, udp) = topo.client(|| {
        let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
        let mut udp: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..300 {
            let mut c = Conversation::open(vip(TCP_PORT)).unwrap();
            // The client only ever sees the ClusterIP: anything else would not match its socket.
            assert_eq!(c.peer().unwrap(), vip(TCP_PORT));
            *tcp.entry(c.ask().unwrap()).or_default() += 1;
        }
        for _ in 0..300 {
            let (from, name) = udp_ask(vip(UDP_PORT)).unwrap();
            assert_eq!(
                from,
                vip(UDP_PORT),
                "UDP reply must come from the ClusterIP"
            );
            *udp.entry(name).or_default() += 1;
        }
        (tcp, udp)
    });
    println!("TCP answers per backend: {tcp:?}\nUDP answers per backend: {udp:?}");
    assert_eq!(tcp.values().sum::<usize>(), 300);
    assert_eq!(udp.values().sum::<usize>(), 300);
    for i in 1..=3 {
        let name = format!("backend-{i}");
        assert!(
            tcp.get(&name).copied().unwrap_or(0) > 30,
            "TCP to {name}: {tcp:?}"
        );
        assert!(
            udp.get(&name).copied().unwrap_or(0) > 30,
            "UDP to {name}: {udp:?}"
        );
    }

    // The datapath counted what it forwarded, and lbctl shows it.
    let stats: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["stats", "-o", "json"]).unwrap()).unwrap();
    let tcp_frontend = stats["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "10.96.0.10:80/TCP")
        .unwrap();
    assert!(
        tcp_frontend["packets"].as_u64().unwrap() >= 300 * 4,
        "{stats}"
    );
    let services: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["services", "-o", "json"]).unwrap()).unwrap();
    let tcp_service = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "10.96.0.10:80/TCP")
        .unwrap();
    assert_eq!(tcp_service["type"], "ClusterIP");
    assert_eq!(tcp_service["service"], "default/echo");
    assert_eq!(
        tcp_service["backends"],
        serde_json::json!(["10.0.1.2:8080", "10.0.2.2:8080", "10.0.3.2:8080"])
    );
    // -o yaml: the same document.
    let yaml: serde_json::Value =
        serde_yaml_ng::from_str(&topo.lbctl(&["services", "-o", "yaml"]).unwrap()).unwrap();
    assert_eq!(yaml, services);
}

#[test]
fn removed_backend_gets_no_new_flows_but_keeps_its_open_connection() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .unwrap();
    topo.start_agent(&[]).unwrap();

    // Open connections until one lands on backend-1, and keep it open.
    let mut open = topo
        .client(|| {
            for _ in 0..200 {
                let mut c = Conversation::open(vip(TCP_PORT)).unwrap();
                if c.ask().unwrap() == "backend-1" {
                    return Some(c);
                }
            }
            None
        })
        .expect("no connection reached backend-1");

    topo.write_config(&Topology::service_yaml(&[2, 3])).unwrap();
    // New flows must avoid backend-1 within a second of the change.
    std::thread::sleep(Duration::from_millis(1000));
    let log = topo.agent_log();
    assert!(
        log.contains("slots moved"),
        "agent did not report the table change:\n{log}"
    );
    // lbctl maglev shows the rewrite: a third of the slots moved, the ideal for 1 of 3 removed.
    let last = last_rewrite(&topo);
    let moved = last["slots_moved"].as_f64().unwrap() / last["slots"].as_f64().unwrap();
    let ideal = last["ideal_fraction"].as_f64().unwrap();
    assert!((ideal - 1.0 / 3.0).abs() < 1e-9, "{last}");
    assert!(moved <= ideal * 1.05, "{last}");
    let table = topo.lbctl(&["maglev", "10.96.0.10:80/TCP"]).unwrap();
    assert!(
        table.contains("last table rewrites of default/echo:tcp"),
        "{table}"
    );

    let (counts, still_open) = topo.client(move || {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..150 {
            let mut c = Conversation::open(vip(TCP_PORT)).unwrap();
            *counts.entry(c.ask().unwrap()).or_default() += 1;
        }
        // The connection opened before the change still talks to backend-1.
        let answers: Vec<String> = (0..5).map(|_| open.ask().unwrap()).collect();
        (counts, answers)
    });
    println!("after removing backend-1: {counts:?}");
    assert!(
        !counts.contains_key("backend-1"),
        "backend-1 got new flows: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 150);
    assert!(
        still_open.iter().all(|a| a == "backend-1"),
        "{still_open:?}"
    );
}

#[test]
fn bad_config_is_rejected_and_last_good_state_keeps_forwarding() {
    let mut topo = Topology::new(2).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2])).unwrap();
    topo.start_agent(&[]).unwrap();
    let bad = Topology::service_yaml(&[1]).replace("port: 80,", "port: 99999,");
    topo.write_config(&bad).unwrap();
    topo.wait_until(Duration::from_secs(3), "rejection in the log", |t| {
        t.agent_log().contains("rejected")
    })
    .unwrap();
    let log = topo.agent_log();
    assert!(
        log.contains("Service default/echo: spec.ports[0].port: 99999 is not a port"),
        "{log}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["status", "-o", "json"]).unwrap()).unwrap();
    let reload = &status["agent"]["state"]["last_reload"];
    assert_eq!(reload["result"], "rejected", "{status}");
    assert!(
        reload["detail"].as_str().unwrap().contains("99999"),
        "{status}"
    );
    let names = topo.client(|| {
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..60 {
            names.insert(Conversation::open(vip(TCP_PORT)).unwrap().ask().unwrap());
        }
        names
    });
    assert_eq!(
        names.len(),
        2,
        "both backends of the last good state still serve: {names:?}"
    );

    // An empty file (a ConfigMap cut off, an editor's truncate) does not delete every Service.
    topo.write_config("").unwrap();
    topo.wait_until(Duration::from_secs(3), "the empty file refused", |t| {
        t.agent_log().contains("no objects (empty or truncated?)")
    })
    .unwrap();
    let name = topo.client(|| Conversation::open(vip(TCP_PORT)).unwrap().ask().unwrap());
    assert!(name.starts_with("backend-"), "{name}");
}

#[test]
fn agent_restart_keeps_forwarding_and_lbctl_works_while_it_is_down() {
    let mut topo = Topology::new(2).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2])).unwrap();
    topo.start_agent(&[]).unwrap();
    let mut held = topo.client(|| Conversation::open(vip(TCP_PORT)).unwrap());
    let first = held.ask().unwrap();
    let status = |topo: &Topology| -> serde_json::Value {
        serde_json::from_str(&topo.lbctl(&["status", "-o", "json"]).unwrap()).unwrap()
    };
    let up = status(&topo);
    assert_eq!(up["agent"]["running"], true, "{up}");
    assert_eq!(
        up["agent"]["state"]["last_reload"]["result"], "applied",
        "{up}"
    );
    assert_eq!(up["agent"]["state"]["last_reload"]["frontends"], 2, "{up}");
    let programs: Vec<&str> = up["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(programs.contains(&"lb_tc"), "{up}");
    let frontends = up["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "LB_FRONTENDS")
        .unwrap();
    assert_eq!(frontends["entries"], 2, "{up}");
    let table = topo.lbctl(&["status"]).unwrap();
    assert!(
        table.contains("agent: running") && table.contains("LB_CONNTRACK"),
        "{table}"
    );
    topo.stop_agent().unwrap();
    assert_eq!(status(&topo)["agent"]["running"], false);
    // Agent down: pinned program and maps keep forwarding; lbctl reads the pins.
    let services = topo.lbctl(&["services"]).unwrap();
    assert!(services.contains("10.96.0.10:80/TCP"), "{services}");
    let (again, fresh) = topo.client(move || {
        let again = held.ask().unwrap();
        let fresh = Conversation::open(vip(TCP_PORT)).unwrap().ask().unwrap();
        (again, fresh)
    });
    assert_eq!(again, first);
    assert!(fresh.starts_with("backend-"));
    topo.start_agent(&[]).unwrap();
    let fresh = topo.client(|| Conversation::open(vip(TCP_PORT)).unwrap().ask().unwrap());
    assert!(fresh.starts_with("backend-"));
}

/// A manifest as `kubectl apply` takes it: type NodePort, no clusterIP, no nodePort. The agent
/// allocates the NodePort from --node-port-range, lbctl shows it, and it answers.
#[test]
fn own_manifest_without_cluster_ip_or_node_port_gets_a_node_port() {
    let mut topo = Topology::new(2).unwrap();
    let manifest = Topology::service_yaml(&[1, 2]).replace(
        &format!("  clusterIP: {CLUSTER_IP}\n"),
        "  type: NodePort\n",
    );
    assert!(!manifest.contains("clusterIP") && !manifest.contains("nodePort"));
    topo.write_config(&manifest).unwrap();
    topo.start_agent(&["--node-port-range", "31000-31999"])
        .unwrap();
    let services: serde_json::Value =
        serde_json::from_str(&topo.lbctl(&["services", "-o", "json"]).unwrap()).unwrap();
    let tcp = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["type"] == "NodePort" && s["frontend"].as_str().unwrap().ends_with("/TCP"))
        .unwrap_or_else(|| panic!("no TCP NodePort frontend: {services}"));
    let frontend = tcp["frontend"].as_str().unwrap().trim_end_matches("/TCP");
    let to: SocketAddr = frontend.parse().unwrap();
    assert_eq!(to.ip().to_string(), "10.0.0.254");
    assert!((31_000..=31_999).contains(&to.port()), "{to}");
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["type"] != "ClusterIP"),
        "no ClusterIP frontend without a clusterIP: {services}"
    );
    let name = topo.client(move || Conversation::open(to).and_then(|mut c| c.ask()));
    assert!(name.unwrap().starts_with("backend-"));
}

/// `lbctl diff --config FILE`: what applying a file would change, touching nothing; exit 0 when
/// nothing would, 1 when something would, 2 when the file would be rejected.
#[test]
fn diff_shows_what_a_file_would_change_and_touches_nothing() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2])).unwrap();
    topo.start_agent(&[]).unwrap();
    let diff = |topo: &Topology, text: &str| -> (i32, serde_json::Value) {
        let path = topo.dir.join("candidate.yaml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(lb_tests::sibling_binary("lbctl"))
            .arg("--bpffs")
            .arg(topo.bpffs())
            .arg("--state-dir")
            .arg(topo.state_dir())
            .args(["-o", "json", "diff", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap(), json)
    };
    let before = topo.lbctl(&["services", "-o", "json"]).unwrap();

    let (code, same) = diff(&topo, &Topology::service_yaml(&[1, 2]));
    assert_eq!(
        (code, &same["changes"]),
        (0, &serde_json::json!(false)),
        "{same}"
    );

    let (code, more) = diff(&topo, &Topology::service_yaml(&[1, 2, 3]));
    assert_eq!(code, 1, "{more}");
    let changed = more["frontends"]["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2, "TCP and UDP frontends: {more}");
    let tcp = changed
        .iter()
        .find(|c| c["backends_added"] == serde_json::json!(["10.0.3.2:8080"]))
        .unwrap_or_else(|| panic!("{more}"));
    // Adding a third backend moves about a third of the slots, and exactly what the agent
    // then moves.
    let (moved, slots) = (
        tcp["maglev"]["slots_moved"].as_u64().unwrap(),
        tcp["maglev"]["slots"].as_u64().unwrap(),
    );
    let share = moved as f64 / slots as f64;
    assert!((0.3..0.37).contains(&share), "{share}: {tcp}");

    let extra = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: default}}\nspec:\n  clusterIP: 10.96.0.99\n  ports: [{{port: 8443}}]\n",
        Topology::service_yaml(&[1, 2])
    );
    let (code, added) = diff(&topo, &extra);
    assert_eq!(code, 1);
    assert_eq!(
        added["frontends"]["added"][0]["frontend"], "10.96.0.99:8443/TCP",
        "{added}"
    );

    let (code, _) = diff(
        &topo,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 0}]}\n",
    );
    assert_eq!(code, 2);

    assert_eq!(
        topo.lbctl(&["services", "-o", "json"]).unwrap(),
        before,
        "diff touched the maps"
    );
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .unwrap();
    topo.wait_until(Duration::from_secs(5), "the third backend", |t| {
        t.lbctl(&["services"]).unwrap().contains("10.0.3.2")
    })
    .unwrap();
    let last = last_rewrite(&topo);
    assert_eq!(
        last["slots_moved"].as_u64(),
        Some(moved),
        "diff predicted {moved} slots, the agent moved: {last}"
    );
    // -o wide, and colour only on a terminal (NO_COLOR honoured).
    let wide = topo.lbctl(&["services", "-o", "wide"]).unwrap();
    assert!(
        wide.contains("SERVICE_ID") && wide.contains("TABLE"),
        "{wide}"
    );
    let piped = topo.lbctl(&["backends"]).unwrap();
    assert!(
        piped.contains("active") && !piped.contains('\x1b'),
        "{piped}"
    );
    let on_tty = |no_color: &str| {
        let cmd = format!(
            "{} --bpffs {} --state-dir {} backends",
            lb_tests::sibling_binary("lbctl").display(),
            topo.bpffs().display(),
            topo.state_dir().display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("NO_COLOR", no_color)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(on_tty("").contains("\x1b[32mactive"), "{:?}", on_tty(""));
    assert!(!on_tty("1").contains('\x1b'), "NO_COLOR");
    assert!(
        topo.agent_log().contains(&format!(
            "service default/echo:tcp: Maglev table rebuilt, {moved}/{slots} slots moved"
        )),
        "the agent logs each rewrite:\n{}",
        topo.agent_log()
    );
}

/// The last Maglev rewrite of 10.96.0.10:80/TCP, as `lbctl maglev -o json` reports it.
fn last_rewrite(topo: &Topology) -> serde_json::Value {
    let report: serde_json::Value = serde_json::from_str(
        &topo
            .lbctl(&["maglev", "10.96.0.10:80/TCP", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    report["rewrites"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap()
}
