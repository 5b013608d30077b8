//! Benchmark 2 (part): TCP to a ClusterIP with real sockets in the netns topology of the tests,
//! every veth at kernel defaults (client → node → 3 backends running lb-test-server). A client
//! process (lb-test-client) measures connect+request+close per second, then request/response
//! latency p50/p99 on one open connection, several runs each:
//! - direct: to a backend address, no service (the floor the socket hooks are held to);
//! - ours, socket: the client in lb-agent's --cgroup: connect() goes straight to a backend;
//! - ours, tc: the client outside it: the packet path on the node's veths (`--attach auto`,
//!   which gives veths tc);
//! - ours, XDP + tc (`--attach xdp`): the lab-tuned best case, the only row not on kernel
//!   defaults: XDP frames into a veth need NAPI on its peer and full checksums from the sender,
//!   so here the client's and backends' veths have TX checksum offload off and GRO on;
//! - kube-proxy-style iptables and nftables DNAT on the node.
//!
//! In the same run, iperf3 (the Debian package, a real client) measures bulk TCP throughput
//! through a second ClusterIP (one backend: iperf3's control and data connections must meet
//! the same server) and straight to that backend.
//!
//! Every run of every datapath gets a fresh topology (namespaces, servers, agent or rules),
//! and the datapaths take turns in a rotating order: a run never inherits the TIME_WAIT
//! sockets of an earlier one (which, toward the same ClusterIP:port, left later datapaths
//! hunting for a free source port: 4,720 connects/s for the first, ~300/s after).

use std::path::Path;

use anyhow::{Context, Result};
use lb_tests::{BACKEND_TCP_PORT, CLUSTER_IP, TCP_PORT, Topology, sh};

use crate::report::{Plot, Table, Target, median, num, spread};

pub struct Settings {
    pub seconds: f64,
    pub requests: usize,
    pub runs: usize,
    /// Whole seconds (iperf3's -t).
    pub iperf_seconds: f64,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                seconds: 0.3,
                requests: 200,
                runs: 2,
                iperf_seconds: 1.0,
            }
        } else {
            Self {
                seconds: 1.0,
                requests: 3000,
                runs: 5,
                iperf_seconds: 2.0,
            }
        }
    }
}

/// One datapath's runs.
struct Figures {
    connects_per_s: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    iperf_gbps: Vec<f64>,
}

/// The ClusterIP iperf3 is measured through (port 5201, backend 1 alone).
const IPERF_IP: &str = "10.96.0.11";
const IPERF_PORT: u16 = 5201;

fn iperf_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: iperf, namespace: default}}\nspec:\n  clusterIP: {IPERF_IP}\n  ports:\n  \
         - {{name: iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: iperf-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: iperf}}\n\
         addressType: IPv4\nports:\n- {{name: iperf, port: {IPERF_PORT}, protocol: TCP}}\n\
         endpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
        BACKENDS[0]
    )
}

/// iperf3 from the client namespace (inside `cgroup` when given) to `host`, `seconds` long:
/// received Gbit/s.
fn iperf(topo: &Topology, host: &str, cgroup: Option<&Path>, seconds: f64) -> Result<f64> {
    let enter = cgroup.map_or(String::new(), |cg| {
        format!("echo $$ > {}/cgroup.procs && ", cg.display())
    });
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{enter}exec ip netns exec {} iperf3 -J -c {host} -p {IPERF_PORT} -t {}",
            topo.client,
            // iperf3 takes whole seconds (0 would mean: forever).
            seconds.ceil().max(1.0)
        ))
        .stdin(std::process::Stdio::null())
        .output()
        .context("running iperf3")?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
    if let Some(e) = report.get("error") {
        anyhow::bail!("iperf3 to {host}: {e}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no end.sum_received.bits_per_second in iperf3's report")
}

/// One run of lb-test-client in the client namespace, inside `cgroup` when given, added to `f`.
fn measure(
    topo: &Topology,
    to: &str,
    cgroup: Option<&Path>,
    s: &Settings,
    f: &mut Figures,
) -> Result<()> {
    let iperf_to = if to.starts_with(BACKENDS[0]) {
        BACKENDS[0]
    } else {
        IPERF_IP
    };
    f.iperf_gbps
        .push(iperf(topo, iperf_to, cgroup, s.iperf_seconds)?);
    let (seconds, requests) = (s.seconds.to_string(), s.requests.to_string());
    let args = ["rate", to, &seconds, &requests];
    {
        let lines = match cgroup {
            Some(cg) => Topology::client_in_cgroup(&topo.client, cg, &args)?,
            None => Topology::client_process(&topo.client, &args)?,
        };
        let line = lines.first().context("lb-test-client printed nothing")?;
        let field = |name: &str| -> Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .with_context(|| format!("no {name} in {line:?}"))
        };
        f.connects_per_s.push(field("connects_per_s")?);
        f.p50_us.push(field("p50_us")?);
        f.p99_us.push(field("p99_us")?);
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Socket,
    Tc,
    Xdp,
    Iptables,
    Nftables,
}

const MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::Socket,
    Mode::Tc,
    Mode::Xdp,
    Mode::Iptables,
    Mode::Nftables,
];

/// One run of `mode` on a topology made for it alone.
fn fresh_run(mode: Mode, s: &Settings, f: &mut Figures) -> Result<()> {
    let mut topo = Topology::new(3)?;
    let vip = format!("{CLUSTER_IP}:{TCP_PORT}");
    let rules = topo.dir.join("rules");
    for b in &topo.backends {
        sh(&format!(
            "ip netns exec {b} iperf3 -s -D -1 -B {} -p {IPERF_PORT}",
            backend_of(b)
        ))?;
    }
    let services = format!(
        "{}---\n{}",
        Topology::service_yaml(&[1, 2, 3]),
        iperf_yaml()
    );
    match mode {
        Mode::Direct => {
            let backend = format!("{}:{BACKEND_TCP_PORT}", BACKENDS[0]);
            return measure(&topo, &backend, None, s, f);
        }
        Mode::Socket | Mode::Tc => {
            topo.write_config(&services)?;
            let cgroup = topo.test_cgroup()?;
            topo.start_agent(&["--cgroup", cgroup.to_str().context("path")?])?;
            let inside = (mode == Mode::Socket).then_some(cgroup.as_path());
            measure(&topo, &vip, inside, s, f)?;
            topo.stop_agent()?;
        }
        Mode::Xdp => {
            // The lab tuning XDP on veths needs (see the module doc), on every sender and peer.
            for ns in std::iter::once(&topo.client).chain(&topo.backends) {
                sh(&format!("ip netns exec {ns} ethtool -K eth0 tx off gro on"))?;
            }
            topo.write_config(&services)?;
            topo.start_agent(&["--attach", "xdp"])?;
            measure(&topo, &vip, None, s, f)?;
            topo.stop_agent()?;
        }
        Mode::Iptables => {
            std::fs::write(&rules, iptables(&CLUSTER_IP.to_string()))?;
            sh(&format!(
                "ip netns exec {} iptables-restore < {}",
                topo.node,
                rules.display()
            ))?;
            measure(&topo, &vip, None, s, f)?;
        }
        Mode::Nftables => {
            std::fs::write(&rules, nft(&CLUSTER_IP.to_string()))?;
            sh(&format!(
                "ip netns exec {} nft -f {}",
                topo.node,
                rules.display()
            ))?;
            measure(&topo, &vip, None, s, f)?;
        }
    }
    Ok(())
}

const BACKENDS: [&str; 3] = ["10.0.1.2", "10.0.2.2", "10.0.3.2"];

/// The address of the backend in namespace `ns` (its name ends in b<i>).
fn backend_of(ns: &str) -> String {
    let i = ns.rsplit('b').next().unwrap_or("1");
    format!("10.0.{i}.2")
}

fn iptables(vip: &str) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ECHO - [0:0]\n");
    for i in 0..3 {
        r += &format!(":KUBE-SEP-{i} - [0:0]\n");
    }
    r += &format!(
        "-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ECHO\n"
    );
    r += &format!(
        "-A KUBE-SERVICES -d {IPERF_IP}/32 -p tcp -m tcp --dport {IPERF_PORT} -j DNAT --to-destination {}:{IPERF_PORT}\n",
        BACKENDS[0]
    );
    for (i, b) in BACKENDS.iter().enumerate() {
        let left = 3 - i;
        if left > 1 {
            r += &format!(
                "-A KUBE-SVC-ECHO -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}\n",
                1.0 / left as f64
            );
        } else {
            r += &format!("-A KUBE-SVC-ECHO -j KUBE-SEP-{i}\n");
        }
        r += &format!("-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {b}:8080\n");
    }
    r + "COMMIT\n"
}

fn nft(vip: &str) -> String {
    let eps: Vec<String> = (0..BACKENDS.len())
        .map(|i| format!("{i} : goto ep-{i}"))
        .collect();
    let chains: String = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  chain ep-{i} {{\n    meta l4proto tcp dnat to {b}:8080\n  }}\n"))
        .collect();
    format!(
        "table ip kube-proxy {{\n{chains}  chain ep-iperf {{\n    meta l4proto tcp dnat to {}:{IPERF_PORT}\n  }}\n  chain svc {{\n    numgen random mod 3 vmap {{ {} }}\n  }}\n  \
         map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {vip} . tcp . 80 : goto svc, {IPERF_IP} . tcp . {IPERF_PORT} : goto ep-iperf }}\n  }}\n  \
         chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n}}\n",
        BACKENDS[0],
        eps.join(", ")
    )
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    eprintln!("tcp: connect rate and request latency …");
    let mut figures: Vec<Figures> = MODES
        .iter()
        .map(|_| Figures {
            connects_per_s: Vec::new(),
            p50_us: Vec::new(),
            p99_us: Vec::new(),
            iperf_gbps: Vec::new(),
        })
        .collect();
    for run in 0..s.runs {
        // A rotating order: no datapath always runs first (or last) in a round.
        for k in 0..MODES.len() {
            let i = (run + k) % MODES.len();
            fresh_run(MODES[i], s, &mut figures[i])?;
        }
    }
    let [direct, socket, tc, xdp, ipt, nf]: [Figures; 6] = figures
        .try_into()
        .map_err(|_| anyhow::anyhow!("six datapaths"))?;

    let mut table = Table::new(
        "tcp",
        format!(
            "TCP to a ClusterIP over default veths (XDP row: lab-tuned): connect+request+close ({} s runs), request/response latency ({} requests on one connection), iperf3 bulk throughput ({} s, one backend); median of {} runs, min–max; every run on fresh namespaces, datapaths in rotating order",
            s.seconds, s.requests, s.iperf_seconds, s.runs
        ),
        &[
            "datapath",
            "connections/s",
            "spread",
            "cost vs direct",
            "p50 µs",
            "p99 µs",
            "iperf3 Gbit/s",
            "iperf3 spread",
            "iperf3 vs direct",
        ],
    );
    let rows = [
        ("direct to a backend (no service)", &direct),
        ("ours: socket (client in --cgroup)", &socket),
        ("ours: tc (client outside the cgroup)", &tc),
        ("ours: XDP + tc (--attach xdp, lab-tuned veths)", &xdp),
        ("iptables DNAT", &ipt),
        ("nftables DNAT", &nf),
    ];
    let direct_rate = median(&direct.connects_per_s);
    let direct_gbps = median(&direct.iperf_gbps);
    for (name, f) in rows {
        let rate = median(&f.connects_per_s);
        table.row(vec![
            name.into(),
            num(rate),
            spread(&f.connects_per_s),
            format!("{:.2}×", direct_rate / rate.max(1e-9)),
            num(median(&f.p50_us)),
            num(median(&f.p99_us)),
            num(median(&f.iperf_gbps)),
            spread(&f.iperf_gbps),
            format!("{:.2}×", median(&f.iperf_gbps) / direct_gbps.max(1e-9)),
        ]);
    }
    Plot {
        title: "TCP to a ClusterIP: request/response latency",
        x_label: "percentile",
        y_label: "µs",
        log_x: false,
        log_y: false,
        series: [
            ("direct", &direct),
            ("socket", &socket),
            ("tc", &tc),
            ("xdp (lab-tuned)", &xdp),
            ("iptables", &ipt),
            ("nftables", &nf),
        ]
        .iter()
        .map(|(n, f)| {
            (
                n.to_string(),
                vec![(50.0, median(&f.p50_us)), (99.0, median(&f.p99_us))],
            )
        })
        .collect(),
    }
    .write(&out.join("tcp.png"))?;
    // Cost per connection = 1 / rate: the socket path may cost at most 1.1× going direct.
    let targets = vec![
        Target::at_most(
            "tcp connect+request+close µs: ours socket vs direct to the backend",
            1e6 / median(&socket.connects_per_s),
            1e6 / direct_rate,
            1.1,
            "<= 1.1x direct",
        ),
        Target::at_least(
            "tcp connect rate: ours socket vs iptables",
            median(&socket.connects_per_s),
            median(&ipt.connects_per_s),
            1.0,
            "no slower than iptables",
        ),
        Target::at_least(
            "iperf3 Gbit/s through the ClusterIP: ours tc (default veths) vs direct to the backend",
            median(&tc.iperf_gbps),
            direct_gbps,
            0.9,
            ">= 0.9x direct",
        ),
        Target::at_least(
            "tcp connect rate: ours tc vs iptables",
            median(&tc.connects_per_s),
            median(&ipt.connects_per_s),
            1.0,
            "no slower than iptables",
        ),
    ];
    Ok((table, targets))
}
