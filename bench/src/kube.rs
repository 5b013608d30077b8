//! Benchmark: the `--kubernetes` source against the API server double (real wire protocol,
//! pages of 500 as a real server returns for kube-rs's limit), with the real agent in a node
//! namespace.
//!
//! - initial sync: S Services × E endpoints listed → maps programmed (agent start to its ready
//!   line, cold maps each run);
//! - one EndpointSlice event → maps written: the double stores the change (the watch event goes
//!   out), the bench polls the Service's frontend entry until it points at the new table;
//! - API writes per minute in a steady state with 1k and 10k announced LoadBalancer Services
//!   (ours: one node Lease renewal a second plus the IPAM Lease; Cilium's model, computed: one
//!   Lease per Service renewed every 2 s);
//! - announcement hand-over on the two-node cluster: graceful stop, link down, kill -9.

use std::{
    net::{Ipv4Addr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    Topology,
    apiserver::{ApiServer, fixture},
    cluster::Cluster,
    http_get, in_netns,
    l2cluster::{self, Macs},
    sh,
};
use lb_userspace::{inspect, maps::PinnedMaps};
use serde_json::{Value, json};

use crate::{
    report::{Plot, Table, Target, num},
    services::{endpoint, vip},
};

pub struct Settings {
    pub services: u32,
    pub endpoints: u32,
    pub sync_runs: usize,
    pub changes: usize,
    /// Announced LoadBalancer Services in the two API-write runs.
    pub announced: [u32; 2],
    /// How long API writes are counted in a steady state.
    pub window: Duration,
    /// Hand-overs of each kind.
    pub failovers: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: 500,
                endpoints: 10,
                sync_runs: 1,
                changes: 10,
                announced: [100, 1_000],
                window: Duration::from_secs(5),
                failovers: 1,
            }
        } else {
            Self {
                services: 10_000,
                endpoints: 10,
                sync_runs: 3,
                changes: 100,
                announced: [1_000, 10_000],
                window: Duration::from_secs(30),
                failovers: 5,
            }
        }
    }
}

fn service(i: u32) -> Value {
    let mut s = fixture("service");
    s["metadata"]["name"] = json!(format!("svc-{i}"));
    s["metadata"]["namespace"] = json!("bench");
    s["spec"]["clusterIP"] = json!(vip(i).to_string());
    s["spec"]["clusterIPs"] = json!([vip(i).to_string()]);
    s["spec"]["ports"] =
        json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]);
    s
}

/// Service i's EndpointSlice; `moved` replaces its first endpoint by 10.200.0.0 + moved.
fn slice(i: u32, per: u32, moved: Option<u32>) -> Value {
    let mut s = fixture("endpointslice");
    s["metadata"]["name"] = json!(format!("svc-{i}-1"));
    s["metadata"]["namespace"] = json!("bench");
    s["metadata"]["labels"]["kubernetes.io/service-name"] = json!(format!("svc-{i}"));
    let template = s["endpoints"][0].clone();
    s["endpoints"] = (0..per)
        .map(|k| {
            let mut e = template.clone();
            let a = match moved {
                Some(m) if k == 0 => Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + m),
                _ => endpoint(i, k, per),
            };
            e["addresses"] = json!([a.to_string()]);
            e
        })
        .collect();
    s["ports"] = json!([{"name": "http", "protocol": "TCP", "port": 8080}]);
    s
}

fn node() -> Value {
    let mut n = fixture("node");
    n["metadata"]["name"] = json!("node-a");
    n
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    format!("{} ({}–{})", num(percentile(v, 0.5)), num(min), num(max))
}

/// A one-backend topology with the API server double on 127.0.0.1 in its node namespace
/// (pages of 500, as a real server answers kube-rs), holding `objects`; and a kubeconfig path
/// for it.
fn node_with_api(
    objects: impl FnOnce(&mut lb_tests::apiserver::State),
) -> Result<(Topology, ApiServer, String)> {
    let topo = Topology::new(1)?;
    let listener = in_netns(&topo.node, || TcpListener::bind("127.0.0.1:0"))?;
    let api = ApiServer::serve_paged(listener, 500)?;
    api.with(objects);
    let path = topo.dir.join("kubeconfig");
    std::fs::write(&path, api.kubeconfig())?;
    Ok((topo, api, path.display().to_string()))
}

fn scrape(topo: &Topology, name: &str) -> Result<f64> {
    let addr = topo.metrics_addr()?;
    let text = in_netns(&topo.node, move || http_get(addr, "/metrics"))?.1;
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("no {name} in the metrics"))
}

struct Sync {
    sync_ms: Vec<f64>,
    event_ms: Vec<f64>,
    /// From the agent's log, per event: (build ms, maps ms).
    phases: Vec<(f64, f64)>,
    /// The agent's own view: watch event seen → maps written, mean.
    agent_event_ms: f64,
}

fn sync_and_events(s: &Settings) -> Result<Sync> {
    let (n, per) = (s.services, s.endpoints);
    let (mut topo, api, kubeconfig) = node_with_api(|st| {
        st.put(node());
        for i in 0..n {
            st.put(service(i));
            st.put(slice(i, per, None));
        }
    })?;
    let (services, frontends, backends) = (
        (n + 64).to_string(),
        (n + 64).to_string(),
        (n * per + 1024).to_string(),
    );
    let args = [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        "node-a",
        "--max-services",
        &services,
        "--max-frontends",
        &frontends,
        "--max-backends",
        &backends,
        "--metrics-addr",
        "127.0.0.1:0",
        "--cleanup",
    ];
    let mut sync_ms = Vec::new();
    for run in 0..s.sync_runs {
        eprintln!(
            "kubernetes: initial sync of {n} Services × {per} endpoints, run {} …",
            run + 1
        );
        let start = Instant::now();
        topo.spawn_agent(&args)?;
        topo.wait_agent_log("lb-agent ready", Duration::from_secs(300))?;
        sync_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if run + 1 < s.sync_runs {
            topo.stop_agent()?;
        }
    }

    eprintln!("kubernetes: {} EndpointSlice events …", s.changes);
    let maps = PinnedMaps::open(&topo.bpffs(), false)?;
    // The agent's histogram also holds the initial sync: count only what the events add.
    let sum0 = scrape(&topo, "lb_network_programming_duration_seconds_sum")?;
    let count0 = scrape(&topo, "lb_network_programming_duration_seconds_count")?;
    let mut event_ms = Vec::new();
    for c in 0..s.changes {
        let i = (c as u32 * 7919) % n;
        let key = inspect::parse_frontend(&format!("{}:80/TCP", vip(i)))?;
        let before = maps.frontends.get(&key, 0)?;
        let change = slice(i, per, Some(c as u32 + 1));
        let start = Instant::now();
        api.put(change);
        loop {
            if maps.frontends.get(&key, 0)? != before {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "endpoint change of svc-{i} not in the maps after 10 s"
            );
            // A short nap, not a spin: the agent has the same two cores.
            std::thread::sleep(Duration::from_micros(100));
        }
        event_ms.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    let phases: Vec<(f64, f64)> = topo
        .agent_log()
        .lines()
        .filter_map(|l| {
            let rest = l.split(" applied in ").nth(1)?;
            let b = rest
                .split("(build ")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            let m = rest
                .split(", maps ")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()?;
            Some((b, m))
        })
        .collect();
    let phases = phases[phases.len().saturating_sub(s.changes)..].to_vec();
    let sum = scrape(&topo, "lb_network_programming_duration_seconds_sum")? - sum0;
    let count = scrape(&topo, "lb_network_programming_duration_seconds_count")? - count0;
    topo.stop_agent()?;
    Ok(Sync {
        sync_ms,
        event_ms,
        phases,
        agent_event_ms: sum / count.max(1.0) * 1e3,
    })
}

/// API writes a minute by one agent with `n` announced LoadBalancer Services, in a steady
/// state (after the IPAM leader wrote every status).
fn writes_per_minute(n: u32, window: Duration) -> Result<f64> {
    let (mut topo, api, kubeconfig) = node_with_api(|st| {
        st.put(node());
        st.put(
            json!({"apiVersion": "lb.xdp.rs/v1alpha1", "kind": "LoadBalancerIPPool",
            "metadata": {"name": "bench"}, "spec": {"blocks": [{"cidr": "10.64.0.0/16"}]}}),
        );
        st.put(json!({"apiVersion": "lb.xdp.rs/v1alpha1", "kind": "L2AnnouncementPolicy",
            "metadata": {"name": "bench"}, "spec": {"interfaces": ["^c0$"], "loadBalancerIPs": true}}));
        for i in 0..n {
            let mut s = service(i);
            s["spec"]["type"] = json!("LoadBalancer");
            st.put(s);
        }
    })?;
    let size = (n + 64).to_string();
    let arp = (2 * n + 64).to_string();
    topo.start_agent(&[
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        "node-a",
        "--max-services",
        &size,
        "--max-frontends",
        &(4 * n + 64).to_string(),
        "--node-port-range",
        "20000-60000",
        "--max-announcements",
        &arp,
        "--metrics-addr",
        "127.0.0.1:0",
    ])?;
    // Settled: every address announced, every status written, and no status write for 2 s.
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let owned = scrape(&topo, "lb_announcements_owned").unwrap_or(0.0);
        let written = api.lock().status_patches;
        if written != last.0 {
            last = (written, Instant::now());
        }
        if owned as u32 >= n && written >= u64::from(n) && last.1.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "{n} Services: {owned} announced, {written} statuses written after 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = api.lock().requests.len();
    std::thread::sleep(window);
    let writes: Vec<String> = api.lock().requests[before..]
        .iter()
        .filter(|r| !r.starts_with("GET "))
        .cloned()
        .collect();
    topo.stop_agent()?;
    let leases = writes.iter().filter(|r| r.contains("/leases/")).count();
    if leases != writes.len() {
        eprintln!(
            "kubernetes: {} writes besides Lease renewals in the window: {:?}",
            writes.len() - leases,
            &writes[..writes.len().min(10)]
        );
    }
    Ok(writes.len() as f64 * 60.0 / window.as_secs_f64())
}

/// Hand-over times (ms) of address 0 on the two-node cluster: graceful, link down, kill -9.
fn failovers(runs: usize) -> Result<[Vec<f64>; 3]> {
    let mut cluster = Cluster::new()?;
    let api = ApiServer::serve(cluster.api_listener())?;
    l2cluster::objects(&api);
    let kubeconfig = cluster.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let kubeconfig = kubeconfig.display().to_string();
    cluster.start_agent(0, &kubeconfig)?;
    cluster.start_agent(1, &kubeconfig)?;
    let macs = Macs(
        cluster
            .nodes
            .iter()
            .map(|n| Topology::mac_of(&n.ns, "eth1"))
            .collect::<Result<_>>()?,
    );
    let a = l2cluster::address(0);
    let x = l2cluster::owner(a, &[0, 1]);
    let y = 1 - x;
    let ns = cluster.nodes[x].ns.clone();
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for run in 0..runs {
        eprintln!("kubernetes: hand-overs, run {} …", run + 1);
        l2cluster::wait_settled(&cluster, &macs, &[0, 1], "start");
        let took = l2cluster::handover(&mut cluster, &macs, a, y, |c| {
            c.signal_agent(x, libc::SIGTERM).unwrap()
        });
        out[0].push(took.as_secs_f64() * 1e3);
        cluster.start_agent(x, &kubeconfig)?;
        l2cluster::wait_settled(&cluster, &macs, &[0, 1], "restart");
        let took = l2cluster::handover(&mut cluster, &macs, a, y, |_| {
            sh(&format!("ip -n {ns} link set eth1 down")).unwrap()
        });
        out[1].push(took.as_secs_f64() * 1e3);
        sh(&format!("ip -n {ns} link set eth1 up"))?;
        l2cluster::wait_settled(&cluster, &macs, &[0, 1], "link up");
        let took = l2cluster::handover(&mut cluster, &macs, a, y, |c| {
            c.signal_agent(x, libc::SIGKILL).unwrap()
        });
        out[2].push(took.as_secs_f64() * 1e3);
        cluster.start_agent(x, &kubeconfig)?;
    }
    Ok(out)
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let sync = sync_and_events(s)?;
    let [small, large] = s.announced;
    eprintln!("kubernetes: API writes with {small} announced Services …");
    let writes_small = writes_per_minute(small, s.window)?;
    eprintln!("kubernetes: API writes with {large} announced Services …");
    let writes_large = writes_per_minute(large, s.window)?;
    let handovers = failovers(s.failovers)?;

    let (n, per) = (s.services, s.endpoints);
    let mut table = Table::new(
        "kubernetes",
        format!(
            "Kubernetes source against the API server double: {n} Services × {per} endpoints; hand-overs on two nodes ({} runs each)",
            s.failovers
        ),
        &["what", "value", "note"],
    );
    table.row(vec![
        format!(
            "initial sync, agent start → maps programmed, ms, median (min–max) of {}",
            s.sync_runs
        ),
        spread(&sync.sync_ms),
        "lists of 500, cold maps each run".into(),
    ]);
    let (p50, p99) = (
        percentile(&sync.event_ms, 0.5),
        percentile(&sync.event_ms, 0.99),
    );
    table.row(vec![
        format!(
            "one EndpointSlice event → maps written, ms, p50 of {}",
            s.changes
        ),
        num(p50),
        "API double stores it → frontend points at the new table".into(),
    ]);
    table.row(vec![
        format!(
            "one EndpointSlice event → maps written, ms, p99 of {}",
            s.changes
        ),
        num(p99),
        String::new(),
    ]);
    let builds: Vec<f64> = sync.phases.iter().map(|p| p.0).collect();
    let writes: Vec<f64> = sync.phases.iter().map(|p| p.1).collect();
    if !builds.is_empty() {
        table.row(vec![
            "  agent: objects → desired state / map writes, ms, p50 and p99".into(),
            format!(
                "{} / {} and {} / {}",
                num(percentile(&builds, 0.5)),
                num(percentile(&writes, 0.5)),
                num(percentile(&builds, 0.99)),
                num(percentile(&writes, 0.99))
            ),
            "from its log".into(),
        ]);
    }
    table.row(vec![
        "  agent's own view (watch event seen → maps written), mean ms".into(),
        num(sync.agent_event_ms),
        "lb_network_programming_duration_seconds".into(),
    ]);
    for (services, writes) in [(small, writes_small), (large, writes_large)] {
        table.row(vec![
            format!("API writes/min, steady state, {services} announced Services, one node"),
            num(writes),
            format!(
                "Cilium's model (a Lease per Service, renewed every 2 s): {} (computed)",
                num(f64::from(services) * 30.0)
            ),
        ]);
    }
    for (what, v) in ["graceful stop", "link down", "kill -9"]
        .iter()
        .zip(&handovers)
    {
        table.row(vec![
            format!("hand-over after {what}, ms, median (min–max)"),
            spread(v),
            "never two ARP answers to one request".into(),
        ]);
    }
    Plot::sorted_samples(
        "EndpointSlice event to maps (sorted samples)",
        "API double → maps",
        &sync.event_ms,
    )
    .write(&out.join("kubernetes.png"))?;
    let targets = vec![
        Target::at_most(
            "kubernetes: EndpointSlice event → maps p99 ms (vs 20 ms)",
            p99,
            20.0,
            1.0,
            "p99 <= 20 ms",
        ),
        Target::at_most(
            &format!("kubernetes: API writes/min at {large} vs {small} announced Services"),
            writes_large,
            writes_small,
            1.1,
            "independent of the number of Services",
        ),
        Target::at_most(
            "kubernetes: graceful hand-over ms, worst of runs (vs 1000 ms)",
            handovers[0].iter().copied().fold(0.0, f64::max),
            1000.0,
            1.0,
            "<= 1 s",
        ),
        Target::at_most(
            "kubernetes: crash (kill -9) hand-over ms, worst of runs (vs 3000 ms)",
            handovers[2].iter().copied().fold(0.0, f64::max),
            3000.0,
            1.0,
            "<= 3 s",
        ),
    ];
    Ok((table, targets))
}
