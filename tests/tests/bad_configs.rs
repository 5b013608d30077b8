//! A table of invalid config files (issue 11): each is refused whole with an error naming the
//! object and field (or the file), and the live maps stay exactly as they were — every pinned
//! map the agent writes is dumped before and after and compared — while traffic keeps flowing.

use std::time::Duration;

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, sh};
use lb_userspace::maps::PinnedMaps;

/// A Service over backend 1, a pool, an L2 policy and a LoadBalancer Service with source ranges
/// and affinity: every map the agent writes has entries.
fn good() -> String {
    Topology::service_yaml(&[1])
        + "\n---\n"
        + "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: lan}\nspec: {blocks: [{cidr: 192.168.30.60/32}]}\n---\n\
           apiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {name: all}\nspec: {loadBalancerIPs: true}\n---\n\
           apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  \
           loadBalancerSourceRanges: [10.0.0.0/24]\n  sessionAffinity: ClientIP\n  ports:\n  \
           - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}\n---\n\
           apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\n\
           addressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n- addresses: [\"10.0.1.2\"]\n"
}

/// A Service document to append, with `spec` lines of its own.
fn service(name: &str, spec: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}"
    )
}

/// An EndpointSlice of Service `svc` with `body` after its metadata.
fn slice(svc: &str, body: &str) -> String {
    format!(
        "\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-x\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {svc}}}\n{body}"
    )
}

#[test]
fn bad_configs_are_refused_whole_and_the_maps_stay_as_they_were() {
    let mut topo = Topology::new(1).unwrap();
    sh(&format!(
        "ip -n {} route add 192.168.30.0/24 dev eth0",
        topo.client
    ))
    .unwrap();
    topo.write_config(&good()).unwrap();
    topo.start_agent(&["--max-backends", "64"]).unwrap();
    let before = lb_tests::dump_maps(&topo.bpffs());
    assert!(
        before.contains("frontends [(") && before.contains("arp [("),
        "{before}"
    );

    let g = good();
    let many_endpoints: String = (0..100)
        .map(|i| {
            format!(
                "- addresses: [\"10.0.{}.{}\"]\n",
                100 + i / 200,
                1 + i % 200
            )
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not YAML", b"apiVersion: v1\nkind: Service\n  metadata: : [\n".to_vec(), "services.yaml"),
        ("tab-indented YAML", format!("{g}\n---\napiVersion: v1\nkind: Service\n\tmetadata: {{}}\n").into_bytes(), "services.yaml"),
        ("empty file", Vec::new(), "services.yaml"),
        ("only a comment", b"# nothing here\n".to_vec(), "services.yaml"),
        ("truncated mid-document", g.as_bytes()[..g.len() / 3].to_vec(), ""),
        ("not UTF-8", [g.as_bytes(), &[0xff, 0xfe, 0xfd]].concat(), "UTF-8"),
        ("oversized file", vec![b'#'; 129 << 20], "too large"),
        // A foreign kind (a Deployment in the same bundle) is skipped; our group's are checked.
        ("unknown kind of lb.xdp.rs", format!("{g}\n---\napiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPol\nmetadata: {{name: typo}}\n").into_bytes(), "LoadBalancerIPPol"),
        ("Service of an unknown apiVersion", format!("{g}\n---\napiVersion: v2\nkind: Service\nmetadata: {{name: v2, namespace: default}}\n").into_bytes(), "apiVersion"),
        ("port out of range", g.replace("port: 80, targetPort: 8080", "port: 99999, targetPort: 8080").into_bytes(), "port"),
        ("port zero", g.replace("{name: tcp, port: 80,", "{name: tcp, port: 0,").into_bytes(), "port"),
        ("negative port", g.replace("{name: tcp, port: 80,", "{name: tcp, port: -80,").into_bytes(), "echo"),
        ("targetPort out of range", g.replace("targetPort: 8080, protocol: TCP}\n  - {name: udp", "targetPort: 70000, protocol: TCP}\n  - {name: udp").into_bytes(), "targetPort"),
        ("named targetPort without a number", format!("{g}{}{}", service("named", "  clusterIP: 10.96.0.50\n  ports:\n  - {name: web, port: 80, targetPort: http, protocol: TCP}\n"), slice("named", "addressType: IPv4\nports:\n- {name: web, protocol: TCP}\nendpoints:\n- addresses: [\"10.0.1.2\"]\n")).into_bytes(), "targetPort"),
        ("unknown protocol", g.replace("port: 53, targetPort: 8053, protocol: UDP", "port: 53, targetPort: 8053, protocol: QUIC").into_bytes(), "protocol"),
        ("clusterIP not an address", g.replace("clusterIP: 10.96.0.40", "clusterIP: 10.96.0.400").into_bytes(), "clusterIP"),
        ("duplicate frontend", format!("{g}{}", service("twin", &format!("  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: tcp, port: {TCP_PORT}, targetPort: 8080, protocol: TCP}}\n"))).into_bytes(), "twin"),
        ("duplicate Service", format!("{g}{}", service("echo", "  clusterIP: 10.96.0.51\n  ports:\n  - {name: tcp, port: 80, protocol: TCP}\n")).into_bytes(), "echo"),
        ("Service without a name", format!("{g}\n---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: default}}\nspec: {{clusterIP: 10.96.0.52, ports: [{{port: 80}}]}}\n").into_bytes(), "name"),
        ("port without a number", format!("{g}{}", service("noport", "  clusterIP: 10.96.0.53\n  ports:\n  - {name: tcp, protocol: TCP}\n")).into_bytes(), "noport"),
        ("bad Service type", format!("{g}{}", service("odd", "  type: Teleport\n  clusterIP: 10.96.0.54\n  ports:\n  - {port: 80}\n")).into_bytes(), "type"),
        ("bad externalTrafficPolicy", format!("{g}{}", service("etp", "  type: NodePort\n  clusterIP: 10.96.0.55\n  externalTrafficPolicy: Nowhere\n  ports:\n  - {port: 80}\n")).into_bytes(), "externalTrafficPolicy"),
        ("bad externalIPs", format!("{g}{}", service("ext", "  clusterIP: 10.96.0.56\n  externalIPs: [300.1.1.1]\n  ports:\n  - {port: 80}\n")).into_bytes(), "externalIPs"),
        ("bad loadBalancerSourceRanges", g.replace("loadBalancerSourceRanges: [10.0.0.0/24]", "loadBalancerSourceRanges: [10.0.0.0/33]").into_bytes(), "loadBalancerSourceRanges"),
        ("affinity timeout out of range", g.replace("sessionAffinity: ClientIP\n", "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n").into_bytes(), "timeoutSeconds"),
        ("bad sessionAffinity", g.replace("sessionAffinity: ClientIP", "sessionAffinity: Sticky").into_bytes(), "sessionAffinity"),
        ("nodePort out of range", g.replace("nodePort: 30080", "nodePort: 70000").into_bytes(), "nodePort"),
        ("endpoint address not an address", g.replace("- addresses: [\"10.0.1.2\"]\n", "- addresses: [\"10.0.1.256\"]\n").into_bytes(), "addresses"),
        ("EndpointSlice port out of range", g.replace("- {name: http, port: 8080, protocol: TCP}", "- {name: http, port: 80800, protocol: TCP}").into_bytes(), "port"),
        ("more backends than the maps hold", format!("{g}{}", slice("echo", &format!("addressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\nendpoints:\n{many_endpoints}"))).into_bytes(), "backend"),
        ("pool with a bad CIDR", g.replace("cidr: 192.168.30.60/32", "cidr: 192.168.30.60/40").into_bytes(), "lan"),
        ("pool start after stop", g.replace("{cidr: 192.168.30.60/32}", "{start: 192.168.30.70, stop: 192.168.30.60}").into_bytes(), "lan"),
        ("overlapping pools", format!("{g}\n---\napiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: lan2}}\nspec: {{blocks: [{{cidr: 192.168.30.0/24}}]}}\n").into_bytes(), "overlaps"),
        ("L2 policy with a bad regex", g.replace("spec: {loadBalancerIPs: true}", "spec: {loadBalancerIPs: true, interfaces: [\"eth[\"]}").into_bytes(), "interfaces"),
        ("L2 policy announcing nothing", g.replace("spec: {loadBalancerIPs: true}", "spec: {loadBalancerIPs: false}").into_bytes(), "all"),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    // Refused: by validation ("rejected"), or by the capacity check before any write ("not
    // applied").
    let refusals =
        |log: &str| log.matches(" rejected (").count() + log.matches(" not applied: ").count();
    for (name, bytes, expected) in &cases {
        let start = topo.agent_log().len();
        let path = topo.dir.join("services.yaml.tmp");
        std::fs::write(&path, bytes).unwrap();
        std::fs::rename(&path, topo.config_path()).unwrap();
        topo.wait_until(Duration::from_secs(5), name, |t| {
            refusals(&t.agent_log()[start..]) > 0
        })
        .unwrap_or_else(|e| panic!("{name}: not refused ({e:#}):\n{}", topo.agent_log()));
        let log = topo.agent_log();
        let errors: Vec<&str> = log[start..]
            .lines()
            .filter(|l| l.contains("ERROR") && !l.contains(" rejected ("))
            .collect();
        println!(
            "{name}: {}",
            errors
                .first()
                .map_or("?", |e| e.split("] ").nth(1).unwrap_or(e))
        );
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{name}: no error naming {expected:?}: {errors:?}"
        );
        assert_eq!(
            lb_tests::dump_maps(&topo.bpffs()),
            before,
            "{name}: the maps changed"
        );
        // Traffic keeps flowing on the last good state.
        let answered = topo.client(|| {
            Conversation::open(std::net::SocketAddr::from((CLUSTER_IP, TCP_PORT)))
                .and_then(|mut c| c.ask())
                .is_ok()
        });
        assert!(answered, "{name}: the ClusterIP stopped answering");
    }
    // And the good file applies again.
    topo.write_config(&good()).unwrap();
    drop(topo.stop_agent());
}

/// A write the maps refuse part-way (the capacity checks passed: here another process filled
/// LB_SERVICE_NAMES behind the agent's back) is logged, counted in `lbctl stats`, and retried
/// with backoff until it goes in, with no new config; the last good state keeps forwarding.
#[test]
fn a_refused_write_is_retried_with_backoff() {
    let mut topo = Topology::new(2).unwrap();
    topo.write_config(&Topology::service_yaml(&[1])).unwrap();
    topo.start_agent(&[]).unwrap();
    let mut maps = PinnedMaps::open(&topo.bpffs(), true).unwrap();
    let mut junk = Vec::new();
    for key in 1000u32.. {
        if maps
            .service_names
            .insert(key, lb_common::ServiceName::new("junk"), 0)
            .is_err()
        {
            break;
        }
        junk.push(key);
    }
    println!(
        "LB_SERVICE_NAMES filled with {} foreign entries",
        junk.len()
    );
    let other = Topology::service_yaml(&[2])
        .replace("echo", "other")
        .replace("10.96.0.10", "10.96.0.11");
    topo.write_config(&format!("{}\n---\n{other}", Topology::service_yaml(&[1])))
        .unwrap();
    let stats = |t: &Topology| -> serde_json::Value {
        serde_json::from_str(&t.lbctl(&["stats", "-o", "json"]).unwrap()).unwrap()
    };
    topo.wait_until(Duration::from_secs(5), "three refused attempts", |t| {
        stats(t)["agent"]["retry"]["attempt"].as_u64() >= Some(3)
    })
    .unwrap();
    let s = stats(&topo);
    println!("while refused: {}", s["agent"]);
    assert!(s["agent"]["map_write_errors"].as_u64() >= Some(3), "{s}");
    assert!(
        s["agent"]["retry"]["error"]
            .as_str()
            .unwrap()
            .contains("service name"),
        "{s}"
    );
    assert!(
        topo.agent_log().contains("retrying in 200 ms"),
        "backoff doubles"
    );
    // The last good state keeps forwarding.
    let name = topo.client(|| {
        Conversation::open((CLUSTER_IP, TCP_PORT).into())
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    assert_eq!(name, "backend-1");
    // The space comes back: the next retry goes in, no new config needed.
    for key in junk {
        maps.service_names.remove(&key).unwrap();
    }
    topo.wait_until(Duration::from_secs(40), "the retry applied", |t| {
        t.agent_log().contains("applied after")
    })
    .unwrap();
    assert!(stats(&topo)["agent"]["retry"].is_null());
    let name = topo.client(|| {
        Conversation::open(([10, 96, 0, 11], TCP_PORT).into())
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    assert_eq!(name, "backend-2");
}

/// A corrupt status.json (LoadBalancer allocations) is reported at start and set aside for the
/// operator, not silently dropped; the agent allocates afresh and serves.
#[test]
fn a_corrupt_state_file_is_reported_and_kept_aside() {
    let mut topo = Topology::new(1).unwrap();
    topo.write_config(&Topology::service_yaml(&[1])).unwrap();
    std::fs::create_dir_all(topo.state_dir()).unwrap();
    let status = topo.state_dir().join("status.json");
    std::fs::write(&status, "{\"lb_status\": [ cut off").unwrap();
    topo.start_agent(&[]).unwrap();
    let log = topo.agent_log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("status.json"))
        .unwrap_or_else(|| panic!("not reported:\n{log}"));
    println!("{line}");
    assert!(line.contains("allocations lost"), "{line}");
    let aside = topo.state_dir().join("status.json.corrupt");
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        "{\"lb_status\": [ cut off"
    );
    let name = topo.client(|| {
        Conversation::open((CLUSTER_IP, TCP_PORT).into())
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    assert_eq!(name, "backend-1");
}
