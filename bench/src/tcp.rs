//! Benchmark 2 (part): TCP through the frontend with real sockets in the netns topology of the
//! tests (client → node → 3 backends running lb-test-server): connect/request/close rate and
//! request/response latency p50/p99 on an open connection, for ours (lb-agent), kube-proxy-style
//! iptables DNAT and nftables DNAT on the node.

use std::{net::SocketAddr, time::Instant};

use anyhow::Result;
use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, sh};

use crate::report::{Plot, Table, Target, num};

pub struct Settings {
    pub seconds: f64,
    pub requests: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                seconds: 0.5,
                requests: 200,
            }
        } else {
            Self {
                seconds: 3.0,
                requests: 5000,
            }
        }
    }
}

struct Figures {
    connects_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn measure(topo: &Topology, s: &Settings) -> Figures {
    let to = SocketAddr::from((CLUSTER_IP, TCP_PORT));
    let (seconds, requests) = (s.seconds, s.requests);
    topo.client(move || {
        let start = Instant::now();
        let mut connects = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            let mut c = Conversation::open(to).expect("connect");
            c.ask().expect("answer");
            connects += 1;
        }
        let rate = connects as f64 / start.elapsed().as_secs_f64();
        let mut c = Conversation::open(to).expect("connect");
        let mut rtts: Vec<f64> = (0..requests)
            .map(|_| {
                let t = Instant::now();
                c.ask().expect("answer");
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        Figures {
            connects_per_s: rate,
            p50_us: percentile(&mut rtts, 0.5),
            p99_us: percentile(&mut rtts, 0.99),
        }
    })
}

const BACKENDS: [&str; 3] = ["10.0.1.2", "10.0.2.2", "10.0.3.2"];

fn iptables(vip: &str) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ECHO - [0:0]\n");
    for i in 0..3 {
        r += &format!(":KUBE-SEP-{i} - [0:0]\n");
    }
    r += &format!(
        "-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ECHO\n"
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
        "table ip kube-proxy {{\n{chains}  chain svc {{\n    numgen random mod 3 vmap {{ {} }}\n  }}\n  \
         map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {vip} . tcp . 80 : goto svc }}\n  }}\n  \
         chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n}}\n",
        eps.join(", ")
    )
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    eprintln!("tcp: connect rate and request latency …");
    let mut topo = Topology::new(3)?;
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))?;
    topo.start_agent(&["--cleanup"])?;
    let ours = measure(&topo, s);
    topo.stop_agent()?;
    let vip = CLUSTER_IP.to_string();
    let rules = topo.dir.join("rules");
    std::fs::write(&rules, iptables(&vip))?;
    sh(&format!(
        "ip netns exec {} iptables-restore < {}",
        topo.node,
        rules.display()
    ))?;
    let ipt = measure(&topo, s);
    sh(&format!(
        "ip netns exec {} sh -c 'iptables -t nat -F && iptables -t nat -X'",
        topo.node
    ))?;
    std::fs::write(&rules, nft(&vip))?;
    sh(&format!(
        "ip netns exec {} nft -f {}",
        topo.node,
        rules.display()
    ))?;
    let nf = measure(&topo, s);
    drop(topo);

    let mut table = Table::new(
        "tcp",
        format!(
            "TCP through the ClusterIP over veth: connect+request+close rate ({} s), request/response latency ({} requests on one connection)",
            s.seconds, s.requests
        ),
        &["datapath", "connections/s", "p50 µs", "p99 µs"],
    );
    for (name, f) in [
        ("ours (XDP)", &ours),
        ("iptables DNAT", &ipt),
        ("nftables DNAT", &nf),
    ] {
        table.row(vec![
            name.into(),
            num(f.connects_per_s),
            num(f.p50_us),
            num(f.p99_us),
        ]);
    }
    Plot {
        title: "TCP request/response latency through the frontend",
        x_label: "percentile",
        y_label: "µs",
        log_x: false,
        log_y: false,
        series: [("ours", &ours), ("iptables", &ipt), ("nftables", &nf)]
            .iter()
            .map(|(n, f)| (n.to_string(), vec![(50.0, f.p50_us), (99.0, f.p99_us)]))
            .collect(),
    }
    .write(&out.join("tcp.png"))?;
    let targets = vec![Target::at_least(
        "tcp connect rate: ours vs iptables (context)",
        ours.connects_per_s,
        ipt.connects_per_s,
        1.0,
        "no slower than iptables",
    )];
    Ok((table, targets))
}
