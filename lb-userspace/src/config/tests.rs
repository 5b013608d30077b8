use super::{documents::split_documents, *};

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.0.1.2"]
  conditions: {ready: true}
- addresses: ["10.0.1.1"]
- addresses: ["10.0.1.3"]
  conditions: {ready: false}
- addresses: ["10.0.1.4"]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;

#[test]
fn joins_services_with_slices() {
    let (desired, objects) = load_str(GOOD).unwrap();
    assert_eq!(objects.ignored.len(), 1);
    let http = &desired.services["default/web:http"];
    assert_eq!(http.frontends.len(), 1);
    assert_eq!(http.frontends[0].endpoint.to_string(), "10.96.0.10:80/TCP");
    let backends: Vec<String> = http
        .backends
        .iter()
        .map(|b| format!("{} {:?}", b.endpoint, b.condition))
        .collect();
    assert_eq!(
        backends,
        [
            "10.0.1.1:8080/TCP Active",
            "10.0.1.2:8080/TCP Active",
            "10.0.1.4:8080/TCP Terminating"
        ]
    );
    let dns = &desired.services["default/web:dns"];
    assert_eq!(dns.backends[0].endpoint.to_string(), "10.0.1.1:5353/UDP");
}

fn error_of(text: &str) -> String {
    load_str(text).unwrap_err().to_string()
}

#[test]
fn errors_name_object_and_field() {
    let bad_port = GOOD.replace("port: 80,", "port: 70000,");
    assert_eq!(
        error_of(&bad_port),
        "Service default/web: spec.ports[0].port: 70000 is not a port (1-65535)"
    );
    let wrong_type = GOOD.replace("port: 80,", "port: eighty,");
    let e = error_of(&wrong_type);
    assert!(
        e.starts_with("Service default/web: spec.ports[0].port: "),
        "{e}"
    );
    let bad_ip = GOOD.replace("10.0.1.2", "10.0.1.300");
    assert_eq!(
        error_of(&bad_ip),
        "EndpointSlice default/web-abc: endpoints[0].addresses[0]: \"10.0.1.300\" is not an IP address"
    );
    // A user's own manifest without clusterIP: no ClusterIP frontend, nothing rejected.
    let no_cluster_ip = GOOD.replace("  clusterIP: 10.96.0.10\n", "");
    let (desired, _) = load_str(&no_cluster_ip).expect("accepted without clusterIP");
    assert!(desired.services["default/web:http"].frontends.is_empty());
    let sctp = GOOD.replace("protocol: UDP}\n---", "protocol: SCTP}\n---");
    assert_eq!(
        error_of(&sctp),
        "Service default/web: spec.ports[1].protocol: protocol \"SCTP\" not supported (TCP or UDP)"
    );
    let no_label = GOOD.replace("  labels: {kubernetes.io/service-name: web}\n", "");
    assert_eq!(
        error_of(&no_label),
        "EndpointSlice default/web-abc: metadata.labels: label kubernetes.io/service-name missing"
    );
    let broken = format!("{GOOD}\n---\nkind: [oops");
    assert!(
        error_of(&broken).starts_with("document 4: invalid YAML"),
        "{}",
        error_of(&broken)
    );
}

#[test]
fn duplicate_frontends_are_rejected() {
    let twice = format!(
        "{GOOD}\n---\n{}",
        GOOD.split("---")
            .next()
            .unwrap()
            .replace("name: web", "name: web2")
    );
    let e = error_of(&twice);
    assert!(e.contains("Service default/web2: spec.ports[0].port: frontend 10.96.0.10:80/TCP is already used by default/web:http"), "{e}");
}

#[test]
fn headless_and_external_name_are_skipped() {
    let headless = GOOD.replace("clusterIP: 10.96.0.10", "clusterIP: None");
    assert!(load_str(&headless).unwrap().0.services.is_empty());
}

const LB: &str = r#"
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: home}
spec:
  blocks:
  - {start: 192.168.30.60, stop: 192.168.30.80}
  - {cidr: "fd00::/120"}
---
apiVersion: lb.xdp.rs/v1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec:
  interfaces: ["^eth[0-9]+"]
  loadBalancerIPs: true
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: pinned, namespace: default, annotations: {io.cilium/lb-ipam-ips: "192.168.30.70"}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  ports: [{port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: clash, namespace: default}
spec:
  type: LoadBalancer
  loadBalancerIP: 192.168.30.70
  clusterIP: 10.96.0.22
  ports: [{port: 443}]
"#;

#[test]
fn load_balancer_and_node_port_frontends_and_announcements() {
    let ctx = BuildContext {
        node_ips: vec!["10.0.0.254".parse().unwrap()],
        ..Default::default()
    };
    let (desired, _) = load_str_with(LB, &ctx).unwrap();
    let web: Vec<String> = desired.services["default/web:http"]
        .frontends
        .iter()
        .map(|f| format!("{:?} {}", f.kind, f.endpoint))
        .collect();
    assert_eq!(
        web,
        [
            "NodePort 10.0.0.254:30080/TCP",
            "ClusterIp 10.96.0.20:80/TCP",
            "LoadBalancer 192.168.30.60:80/TCP"
        ]
    );
    let status: BTreeMap<&str, &lbipam::LbStatus> = desired
        .lb_status
        .iter()
        .map(|s| (s.service.as_str(), s))
        .collect();
    // Without history the clash goes by name order …
    assert_eq!(
        status["default/clash"].addresses,
        ["192.168.30.70".parse::<Ipv4Addr>().unwrap()]
    );
    let clash = status["default/pinned"].error.as_deref().unwrap();
    assert!(
        clash.contains("192.168.30.70 conflicts: already allocated to default/clash"),
        "{clash}"
    );
    // … but the Service that already holds the address keeps it.
    let mut with_history = ctx.clone();
    with_history.lb_hints.insert(
        "default/pinned".into(),
        vec!["192.168.30.70".parse().unwrap()],
    );
    let (again, _) = load_str_with(LB, &with_history).unwrap();
    let pinned = again
        .lb_status
        .iter()
        .find(|s| s.service == "default/pinned")
        .unwrap();
    assert_eq!(
        pinned.addresses,
        ["192.168.30.70".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(desired.pool_usage[0].used, 2);
    assert_eq!(desired.pool_usage[0].size, 21);
    let announced: Vec<String> = desired
        .announcements
        .keys()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(announced, ["192.168.30.60", "192.168.30.70"]);
    let a = &desired.announcements[&"192.168.30.60".parse().unwrap()];
    assert!(a.on("eth0") && a.on("eth12") && !a.on("veth0") && !a.on("wlan0"));
}

#[test]
fn bad_pools_and_policies_are_named() {
    let bad = r#"
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: a}
spec: {blocks: [{cidr: 192.168.30.0/24}]}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: b}
spec: {blocks: [{start: 192.168.30.200, stop: 192.168.31.10}, {cidr: 10.0.0.1/24}]}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: c}
spec: {blocks: [{cidr: 10.9.0.0/24}], serviceSelector: {matchExpressions: [{key: x, operator: Has}]}}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: p}
spec: {interfaces: ["eth[0-9"], loadBalancerIPs: true}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: q}
spec: {interfaces: ["eth0"]}
"#;
    let e = load_str(bad).unwrap_err().to_string();
    for want in [
        "LoadBalancerIPPool c: spec.serviceSelector: matchExpressions[0].operator: \"Has\"",
        "LoadBalancerIPPool b: spec.blocks[1]: cidr \"10.0.0.1/24\": host bits set",
        "LoadBalancerIPPool a: spec.blocks: 192.168.30.1-192.168.30.254 overlaps 192.168.30.200-192.168.31.10 of pool b",
        "L2AnnouncementPolicy p: spec.interfaces[0]: \"eth[0-9\" is not a regular expression",
        "L2AnnouncementPolicy q: spec: neither loadBalancerIPs nor externalIPs is true",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let typo = "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: c}\nspec: {blocks: [{cidr: 10.9.0.0/24}], colour: red}\n";
    assert!(
        load_str(typo)
            .unwrap_err()
            .to_string()
            .starts_with("LoadBalancerIPPool c: spec.colour: unknown field `colour`")
    );
}

/// kubectl-apply manifests: no clusterIP, no nodePort. NodePorts are allocated from the
/// range, the same on every build, past explicit ones; a full range is an error naming it.
#[test]
fn own_manifests_get_node_ports_from_the_range() {
    let ctx = BuildContext {
        node_ips: vec![Ipv4Addr::new(10, 0, 0, 254)],
        ..Default::default()
    };
    let service = |name: &str, node_port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, ports: [{{name: http, port: 80{node_port}}}]}}\n---\n"
        )
    };
    let node_port_of = |desired: &DesiredState, name: &str| {
        let fronts = &desired.services[&format!("default/{name}:http")].frontends;
        assert_eq!(fronts.len(), 1, "{fronts:?}");
        assert_eq!(fronts[0].kind, FrontendKind::NodePort);
        fronts[0].endpoint.port
    };
    let one = service("web", "");
    let (desired, _) = load_str_with(&one, &ctx).expect("accepted");
    let port = node_port_of(&desired, "web");
    assert!((30_000..=32_767).contains(&port), "{port}");
    // Same on every build; another Service taking that port explicitly moves it.
    let (again, _) = load_str_with(&one, &ctx).unwrap();
    assert_eq!(node_port_of(&again, "web"), port);
    let both = format!("{one}{}", service("api", &format!(", nodePort: {port}")));
    let (desired, _) = load_str_with(&both, &ctx).unwrap();
    assert_eq!(node_port_of(&desired, "api"), port);
    assert_ne!(node_port_of(&desired, "web"), port);
    let full = BuildContext {
        node_port_range: NodePortRange {
            first: port,
            last: port,
        },
        ..ctx.clone()
    };
    assert_eq!(
        load_str_with(&both, &full).unwrap_err().to_string(),
        format!(
            "Service default/web: spec.ports[0].nodePort: none given and --node-port-range {port}-{port} is full"
        )
    );
}

/// An EndpointSlice-only change rebuilds just its Service, with the same result as a full
/// build; a Service with an allocation problem takes the full build.
#[test]
fn endpoint_change_rebuilds_only_its_service_and_equals_a_full_build() {
    let slice = |service: &str, addr: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- addresses: [\"{addr}\"]\n"
        )
    };
    // LB has its own Service web (a file may not give one twice).
    let text =
        |web: &str, pinned: &str| format!("{LB}{}{}", slice("web", web), slice("pinned", pinned));
    let mut cache = ConfigCache::default();
    let mut ctx = BuildContext {
        node_ips: vec![Ipv4Addr::new(10, 0, 0, 254)],
        ..Default::default()
    };
    let (first, _) = load_cached(&mut cache, &text("10.0.5.1", "10.0.6.1"), &ctx).unwrap();
    // The agent hands the allocations back as hints.
    ctx.lb_hints = first
        .lb_status
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| (s.service.clone(), s.addresses.clone()))
        .collect();
    load_cached(&mut cache, &text("10.0.5.1", "10.0.6.1"), &ctx).unwrap();
    assert_eq!(
        cache.built.incremental_builds, 0,
        "the hints changed: full build"
    );
    // "pinned" lost its requested address to "clash" (which sorts first): no shortcut.
    for (web, pinned, incremental) in [
        ("10.0.5.2", "10.0.6.1", 1),
        ("10.0.5.3", "10.0.6.1", 2),
        ("10.0.5.3", "10.0.6.2", 2),
    ] {
        let t = text(web, pinned);
        let (desired, _) = load_cached(&mut cache, &t, &ctx).unwrap();
        let full = build_desired(&parse_objects(&t).unwrap(), &ctx).unwrap();
        assert_eq!(*desired, full, "web {web}, pinned {pinned}");
        assert_eq!(
            cache.built.incremental_builds, incremental,
            "web {web}, pinned {pinned}"
        );
    }
    // A bad address in the changed slice is still an error, and the cache recovers.
    let e = load_cached(&mut cache, &text("10.0.5.x", "10.0.6.2"), &ctx).unwrap_err();
    assert!(e.to_string().contains("EndpointSlice default/web-1"), "{e}");
    let t = text("10.0.5.4", "10.0.6.2");
    let (desired, _) = load_cached(&mut cache, &t, &ctx).unwrap();
    assert_eq!(
        *desired,
        build_desired(&parse_objects(&t).unwrap(), &ctx).unwrap()
    );
}

#[test]
fn cached_reload_equals_a_fresh_parse() {
    let mut cache = ConfigCache::default();
    let ctx = BuildContext::default();
    let (first, _) = load_cached(&mut cache, GOOD, &ctx).unwrap();
    assert_eq!(*first, load_str(GOOD).unwrap().0);
    let changed = GOOD.replace("10.0.1.2", "10.0.1.9");
    let (second, _) = load_cached(&mut cache, &changed, &ctx).unwrap();
    assert_eq!(*second, load_str(&changed).unwrap().0);
    assert_ne!(first, second);
    // A broken document is reported with its number even when the others come from the cache.
    let broken = changed.replacen("kind: EndpointSlice", "kind: [", 1);
    let e = load_cached(&mut cache, &broken, &ctx)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("document 2: invalid YAML"), "{e}");
    assert_eq!(
        split_documents("a: 1\n---\nb: 2\n...\n--- c: 3\n"),
        ["a: 1\n", "b: 2\n", "", "c: 3\n"]
    );
}

#[test]
fn dual_stack_services_use_their_ipv4_side_and_ipv6_only_ones_are_skipped() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: default}\nspec:\n  \
        clusterIP: fd00::10\n  clusterIPs: [fd00::10, 10.96.0.30]\n  ipFamilies: [IPv6, IPv4]\n  \
        externalIPs: [fd00::99, 192.0.2.9]\n  loadBalancerSourceRanges: [\"fd00::/64\", 10.0.0.0/8]\n  ports: [{port: 80}]\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: six, namespace: default}\nspec:\n  \
        clusterIP: fd00::11\n  clusterIPs: [fd00::11]\n  ipFamilies: [IPv6]\n  ports: [{port: 80}]\n";
    let (desired, _) = load_str(text).unwrap();
    let frontends: Vec<String> = desired
        .services
        .values()
        .flat_map(|s| {
            s.frontends
                .iter()
                .map(|f| format!("{}:{}", f.endpoint.addr, f.endpoint.port))
        })
        .collect();
    assert_eq!(frontends, ["10.96.0.30:80", "192.0.2.9:80"]);
}

#[test]
fn another_controllers_class_is_served_from_its_status_but_not_allocated_or_announced() {
    let text = format!(
        "{LB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: metal, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  loadBalancerClass: metallb.io/metallb\n  clusterIP: 10.96.0.23\n  ports: [{{port: 80}}]\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.50}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ours, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  loadBalancerClass: lb.xdp.rs/lb\n  clusterIP: 10.96.0.24\n  ports: [{{port: 80}}]\n"
    );
    let (desired, _) = load_str(&text).unwrap();
    let metal: Vec<String> = desired.services["default/metal:80"]
        .frontends
        .iter()
        .map(|f| f.endpoint.addr.to_string())
        .collect();
    assert_eq!(metal, ["10.96.0.23", "192.0.2.50"]);
    assert!(
        !desired
            .lb_status
            .iter()
            .any(|s| s.service == "default/metal")
    );
    assert!(
        !desired
            .announcements
            .contains_key(&"192.0.2.50".parse().unwrap())
    );
    let ours = desired
        .lb_status
        .iter()
        .find(|s| s.service == "default/ours")
        .unwrap();
    assert_eq!(ours.addresses.len(), 1, "{ours:?}");
}

#[test]
fn an_empty_file_is_refused_and_a_list_says_none_on_purpose() {
    for text in ["", "\n", "---\n# nothing here\n---\n"] {
        let e = load_str(text).unwrap_err();
        assert!(e.to_string().contains("no objects"), "{text:?}: {e}");
    }
    let (desired, _) = load_str("apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    assert!(desired.services.is_empty());
    // What `kubectl get svc,endpointslices -o yaml` writes: a List of the objects.
    let list = format!(
        "apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n{}",
        GOOD.split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| {
                let mut lines = d.lines();
                let first = lines.next().unwrap();
                let rest: String = lines.map(|l| format!("  {l}\n")).collect();
                format!("- {first}\n{rest}")
            })
            .collect::<String>()
    );
    let (from_list, _) = load_str(&list).unwrap();
    let (from_docs, _) = load_str(GOOD).unwrap();
    assert_eq!(from_list, from_docs);
    let e = load_str("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: x}\n  spec: {ports: [{port: 0}]}\n").unwrap_err();
    assert!(e.to_string().contains("spec.ports[0].port"), "{e}");
}

/// A config of `services` (each: its ports as (port, target, udp), its endpoint count), in the
/// shape `kubectl get -o yaml` gives.
fn generated(services: &[(Vec<(u16, u16, bool)>, usize)]) -> String {
    let mut out = String::new();
    for (i, (ports, endpoints)) in services.iter().enumerate() {
        let proto = |udp: bool| if udp { "UDP" } else { "TCP" };
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports:\n",
            i / 250,
            i % 250 + 1
        );
        for (j, (port, target, udp)) in ports.iter().enumerate() {
            out += &format!(
                "  - {{name: p{j}, port: {port}, targetPort: {target}, protocol: {}}}\n",
                proto(*udp)
            );
        }
        out += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  namespace: ns\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports:\n"
        );
        for (j, (_, target, udp)) in ports.iter().enumerate() {
            out += &format!(
                "- {{name: p{j}, port: {target}, protocol: {}}}\n",
                proto(*udp)
            );
        }
        out += "endpoints:\n";
        for e in 0..*endpoints {
            out += &format!(
                "- addresses: [\"10.1.{i}.{}\"]\n  conditions: {{ready: true}}\n",
                e + 1
            );
        }
        if *endpoints == 0 {
            out.truncate(out.len() - "endpoints:\n".len());
            out += "endpoints: []\n";
        }
        out += "---\n";
    }
    out
}

/// Distinct (port, protocol) pairs per service: two ports of one Service may not share both.
fn distinct_ports() -> impl proptest::strategy::Strategy<Value = Vec<(u16, u16, bool)>> {
    use proptest::prelude::*;
    proptest::collection::btree_map((1u16.., any::<bool>()), 1u16.., 1..4)
        .prop_map(|m| m.into_iter().map(|((p, udp), t)| (p, t, udp)).collect())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Generated valid configs load to exactly the Services, frontends and backends they say.
    #[test]
    fn generated_configs_load_exactly(
        services in proptest::collection::vec((distinct_ports(), 0usize..6), 1..25)
    ) {
        let text = generated(&services);
        let (desired, _) = load_str(&text).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}\n{text}")))?;
        let expected: usize = services.iter().map(|(p, _)| p.len()).sum();
        proptest::prop_assert_eq!(desired.services.len(), expected);
        for (i, (ports, endpoints)) in services.iter().enumerate() {
            for (j, (port, target, udp)) in ports.iter().enumerate() {
                let s = &desired.services[&format!("ns/s{i}:p{j}")];
                proptest::prop_assert_eq!(s.frontends.len(), 1);
                let fe = s.frontends[0].endpoint;
                proptest::prop_assert_eq!(fe.port, *port);
                proptest::prop_assert_eq!(fe.proto == crate::model::Protocol::Udp, *udp);
                proptest::prop_assert_eq!(s.backends.len(), *endpoints);
                proptest::prop_assert!(s.backends.iter().all(|b| b.endpoint.port == *target));
            }
        }
    }

    /// Whatever a file holds after random damage (bytes cut, inserted or replaced, lines
    /// dropped or repeated, a cut anywhere), the parser returns, never panics; an error says
    /// something; a success never holds a frontend twice or a backend without a port.
    #[test]
    fn damaged_configs_never_panic(
        edits in proptest::collection::vec((0usize..4, proptest::num::usize::ANY, proptest::num::usize::ANY, "[ -~\n\t]{0,6}"), 1..6)
    ) {
        let mut text = format!("{GOOD}---\n{}", generated(&[(vec![(80, 8080, false), (53, 53, true)], 3)]));
        for (kind, a, b, insert) in edits {
            let at = a % (text.len() + 1);
            let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            match kind {
                0 => {
                    let end = (at + b % 16).min(text.len());
                    let end = (end..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap();
                    text.replace_range(at..end, &insert);
                }
                1 => text.insert_str(at, &insert),
                2 => {
                    let lines: Vec<&str> = text.lines().collect();
                    let i = b % lines.len().max(1);
                    let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    if a % 2 == 0 && !l.is_empty() { l.remove(i.min(l.len() - 1)); } else if !l.is_empty() { let dup = l[i.min(l.len() - 1)].clone(); l.insert(i.min(l.len() - 1), dup); }
                    text = l.join("\n");
                }
                _ => text.truncate(at),
            }
        }
        match load_str(&text) {
            Err(e) => proptest::prop_assert!(!e.to_string().trim().is_empty()),
            Ok((desired, _)) => {
                let mut seen = std::collections::BTreeSet::new();
                for s in desired.services.values() {
                    for f in &s.frontends {
                        proptest::prop_assert!(seen.insert(f.endpoint), "frontend {} twice", f.endpoint);
                    }
                    proptest::prop_assert!(s.backends.iter().all(|b| b.endpoint.port != 0));
                }
            }
        }
    }

    /// Random bytes (lossily UTF-8) never panic the parser.
    #[test]
    fn random_text_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = load_str(&text);
    }
}
