//! Benchmark: node A forwarding external traffic to a backend on node B, which needs SNAT (the
//! reply must come back through A) or DSR. Ours (LB_NAT port allocation + DNAT + SNAT; or DNAT +
//! the DSR option) vs kube-proxy's iptables mode (DNAT + KUBE-MARK-MASQ + MASQUERADE
//! --random-fully) and nftables mode (dnat + masquerade fully-random), same generator, same
//! flows. (For DSR the sink counts what node B receives; B's own cost, reading and removing the
//! option, is not in these rows.)
//!
//! Node A is the lab namespace of [`lb_tests::lab`]: the generator `lb_gen` XDP_TXes 64-byte
//! UDP frames (client 10.1.x.x → ClusterIP 10.96.0.1:80, as traffic reaching a ClusterIP from
//! outside the cluster) into its uplink `cl`; the Service's 10 endpoints (10.128.0.0/9) are on
//! "node B", reached through the second uplink `bk` (a next hop that `lb_sink` on `bk-peer`
//! stands for: it counts what node B would receive). Both are uplinks for ours (LB_UPLINKS), so
//! every flow is SNATed to `bk`'s address, as the two-node tests show it happen. Each run gets a
//! fresh namespace (fresh conntrack and NAT tables: no run inherits the previous one's entries);
//! runs are repeated and reported as median, min and max.
//!
//! ours (XDP) is the lab-tuned best case (XDP frames into a veth need NAPI on the peer, which
//! runs the sink); ours (tc) is what a node gets on veths at kernel defaults. For tc, iptables
//! and nftables `cl` gets GRO so that the generator's XDP frames reach its stack at all (a
//! property of this generator, not of the node).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, ensure};
use lb_common::NatConfig;
use lb_tests::{
    lab::{self, BACKEND_IF, CLIENT_IF, CLIENT_IF_MAC, XdpLab},
    sh,
};
use lb_userspace::model::Protocol;

use crate::{
    control::{iptables_rules, nft_rules},
    forward::{ESTABLISHED_FLOWS, gen_maps, peer_mac, start_flows},
    report::{Plot, Table, Target},
    services::{lab_options, state_proto},
};

const PER: u32 = 10;
/// SNAT ports of the benchmark: wide enough for a run of new flows over 10 backends.
const PORTS: (u16, u16) = (1024, 29_999);

pub struct Settings {
    pub runs: usize,
    pub packets: u32,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                runs: 2,
                packets: 50_000,
            }
        } else {
            Self {
                runs: 5,
                packets: 200_000,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    OursXdp,
    OursTc,
    DsrXdp,
    DsrTc,
    Iptables,
    Nftables,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::OursXdp,
        Mode::OursTc,
        Mode::DsrXdp,
        Mode::DsrTc,
        Mode::Iptables,
        Mode::Nftables,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::OursXdp => "ours SNAT (XDP, lab-tuned)",
            Mode::OursTc => "ours SNAT (tc, defaults)",
            Mode::DsrXdp => "ours DSR (XDP, lab-tuned)",
            Mode::DsrTc => "ours DSR (tc, defaults)",
            Mode::Iptables => "iptables DNAT + MASQUERADE",
            Mode::Nftables => "nftables dnat + masquerade",
        }
    }

    fn dsr(self) -> bool {
        matches!(self, Mode::DsrXdp | Mode::DsrTc)
    }
}

/// One run: delivered packets per second, and how many flows were source-NATed (ours: LB_NAT
/// entries; iptables/nftables: packets their MASQUERADE rule counted, i.e. new connections).
struct Run {
    pps: f64,
    sent: u64,
    delivered: u64,
    snated: u64,
}

/// kube-proxy's iptables ruleset for one Service, plus what it does for traffic from outside
/// the cluster (--cluster-cidr): mark it, and masquerade marked packets on the way out.
fn iptables_masquerade() -> String {
    iptables_rules(1, PER, "udp")
        .replacen(
            ":KUBE-MARK-MASQ - [0:0]\n",
            ":KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
            1,
        )
        .replacen(
            "-A KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment \"off-cluster traffic to a service\" -j KUBE-MARK-MASQ\n\
             -A KUBE-SERVICES",
            1,
        )
}

/// kube-proxy's nftables ruleset for one Service, plus marking traffic from outside the cluster
/// and masquerading marked packets (its `masquerading` chain).
fn nft_masquerade() -> Result<String> {
    let base = nft_rules(1, PER, "udp");
    let body = base
        .trim_end()
        .strip_suffix('}')
        .context("nftables ruleset shape")?
        .replacen(
            "    jump services\n",
            "    ip saddr != 10.244.0.0/16 jump mark-for-masquerade\n    jump services\n",
            1,
        );
    Ok(body
        + "  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    counter masquerade fully-random\n  }\n\
           chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n}\n")
}

fn one_run(s: &Settings, mode: Mode, new_flows: bool) -> Result<Run> {
    let mut opts = lab_options(1021, 17, 17, PER + 64);
    opts.nat = NatConfig {
        port_min: PORTS.0,
        port_max: PORTS.1,
        mode: if mode.dsr() {
            lb_common::lb_mode::DSR
        } else {
            lb_common::lb_mode::SNAT
        },
        ..NatConfig::DEFAULT
    };
    opts.nat_size = s.packets.next_power_of_two().max(65_536) * 2;
    opts.conntrack_size = opts.nat_size * 2;
    let mut lab = XdpLab::new(opts)?;
    lab.apply_maps_only(&state_proto(1, PER, Protocol::Udp))?;
    let ns = lab.ns.clone();
    sh(&format!(
        "ip -n {ns} neigh replace 10.255.255.253 lladdr 02:00:00:00:ff:fd dev {BACKEND_IF} nud permanent && \
         ip -n {ns} route add 10.128.0.0/9 via 10.255.255.253 dev {BACKEND_IF} && \
         ip netns exec {ns} sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.{CLIENT_IF}.rp_filter=0"
    ))?;
    lab.maps
        .as_mut()
        .expect("maps")
        .set_uplinks(&BTreeMap::from([
            (lab.client_ifindex, Ipv4Addr::new(10, 0, 0, 254)),
            (lab.backend_ifindex, Ipv4Addr::new(10, 255, 255, 254)),
        ]))?;
    let _sink = lab.attach("lb_sink", "bk-peer")?;
    let gen_if = lab::ifindex("cl-peer")?;
    let gen_mac = peer_mac(&ns, "cl-peer")?;
    let frame = crate::forward::template(gen_mac);
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&CLIENT_IF_MAC.octets());
    macs[6..].copy_from_slice(&gen_mac.octets());
    let (mut config, counters) = gen_maps(&lab)?;
    let count = |i: u32| -> Result<u64> { Ok(counters.get(&i, 0)?.iter().sum()) };
    match mode {
        Mode::OursXdp | Mode::DsrXdp => {
            lab.attach("lb", CLIENT_IF)?;
        }
        Mode::OursTc | Mode::DsrTc => {
            sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
            lab.attach_tc(CLIENT_IF)?;
        }
        Mode::Iptables => {
            sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
            crate::forward::load(&ns, "iptables-restore", &iptables_masquerade())?;
        }
        Mode::Nftables => {
            sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
            crate::forward::load(&ns, "nft -f -", &nft_masquerade()?)?;
        }
    }
    start_flows(
        &mut lab,
        &mut config,
        (&frame, gen_if, macs),
        Ipv4Addr::new(10, 96, 0, 1),
        1,
        u32::from(Ipv4Addr::new(10, 1, 0, 1)),
        new_flows,
    )?;
    let snated_before = snated(&lab, mode)?;
    let (sent0, got0) = (count(0)?, count(1)?);
    let elapsed = lab.run_live("lb_gen", &frame, gen_if, s.packets)?;
    std::thread::sleep(Duration::from_millis(100));
    let (sent1, got1) = (count(0)?, count(1)?);
    let run = Run {
        pps: (got1 - got0) as f64 / elapsed.as_secs_f64(),
        sent: sent1 - sent0,
        delivered: got1 - got0,
        snated: snated(&lab, mode)? - snated_before,
    };
    if new_flows {
        // The method holds only if every delivered flow really was source-NATed (or went by
        // DSR).
        ensure!(
            run.snated + run.snated / 50 >= run.delivered,
            "{}: {} delivered but only {} SNATed",
            mode.name(),
            run.delivered,
            run.snated
        );
    }
    Ok(run)
}

/// Flows source-NATed so far: LB_NAT entries (ours), packets the MASQUERADE rule saw (the first
/// of each connection: iptables, nftables).
fn snated(lab: &XdpLab, mode: Mode) -> Result<u64> {
    let ns = &lab.ns;
    Ok(match mode {
        Mode::OursXdp | Mode::OursTc => lab.maps().nat.keys().count() as u64,
        // Flows that went by DSR (their forward entries say so).
        Mode::DsrXdp | Mode::DsrTc => lab
            .maps()
            .conntrack
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(_, e)| e.flags & lb_common::ct_flags::DSR != 0)
            .count() as u64,
        Mode::Iptables => {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "iptables",
                    "-t",
                    "nat",
                    "-L",
                    "KUBE-POSTROUTING",
                ])
                .args(["-v", "-n", "-x"])
                .output()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains("MASQUERADE"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        }
        Mode::Nftables => {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "list",
                    "chain",
                    "ip",
                    "kube-proxy",
                ])
                .arg("masquerading")
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            text.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        }
    })
}

fn median_min_max(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let mut results: BTreeMap<(Mode, bool), Vec<Run>> = BTreeMap::new();
    for i in 0..s.runs {
        for mode in Mode::ALL {
            for new_flows in [true, false] {
                eprintln!("snat: run {}/{}, {} …", i + 1, s.runs, mode.name());
                let r = one_run(s, mode, new_flows)?;
                results.entry((mode, new_flows)).or_default().push(r);
            }
        }
    }
    let mut table = Table::new(
        "snat",
        format!(
            "SNAT (and DSR) through node A to backends on node B: 64-byte UDP to a ClusterIP from outside, {} packets per run, {} runs in fresh namespaces (delivered Mpps; one core does generator and node)",
            s.packets, s.runs
        ),
        &[
            "mode",
            "flows",
            "median Mpps",
            "min–max Mpps",
            "vs iptables",
            "vs nftables",
            "delivered %",
            "flows SNATed (DSR: sent by DSR) per run, median",
        ],
    );
    let median = |mode: Mode, new_flows: bool| {
        median_min_max(
            &results[&(mode, new_flows)]
                .iter()
                .map(|r| r.pps)
                .collect::<Vec<_>>(),
        )
    };
    for new_flows in [true, false] {
        let (ipt, _, _) = median(Mode::Iptables, new_flows);
        let (nft, _, _) = median(Mode::Nftables, new_flows);
        for mode in Mode::ALL {
            let runs = &results[&(mode, new_flows)];
            let (med, min, max) = median(mode, new_flows);
            let delivered: u64 = runs.iter().map(|r| r.delivered).sum();
            let sent: u64 = runs.iter().map(|r| r.sent).sum();
            let (snated, _, _) =
                median_min_max(&runs.iter().map(|r| r.snated as f64).collect::<Vec<_>>());
            table.row(vec![
                mode.name().into(),
                if new_flows {
                    "new every packet".into()
                } else {
                    format!("{ESTABLISHED_FLOWS} established")
                },
                format!("{:.3}", med / 1e6),
                format!("{:.3}–{:.3}", min / 1e6, max / 1e6),
                format!("{:.2}×", med / ipt.max(1.0)),
                format!("{:.2}×", med / nft.max(1.0)),
                format!("{:.0}", 100.0 * delivered as f64 / sent.max(1) as f64),
                format!("{snated:.0}"),
            ]);
        }
    }
    let series = Mode::ALL
        .iter()
        .flat_map(|&mode| {
            [true, false].map(|new_flows| {
                let points = results[&(mode, new_flows)]
                    .iter()
                    .enumerate()
                    .map(|(i, r)| ((i + 1) as f64, r.pps / 1e6))
                    .collect();
                let flows = if new_flows {
                    "new flows"
                } else {
                    "established"
                };
                (format!("{}, {flows}", mode.name()), points)
            })
        })
        .collect();
    Plot {
        title: "SNAT to a backend on another node (veth, 64-byte UDP), each run",
        x_label: "run",
        y_label: "delivered Mpps (log)",
        log_x: false,
        log_y: true,
        series,
    }
    .write(&out.join("snat.png"))?;

    let (tc_new, _, _) = median(Mode::OursTc, true);
    let (ipt_new, _, _) = median(Mode::Iptables, true);
    let (nft_new, _, _) = median(Mode::Nftables, true);
    let targets = vec![
        Target::at_least(
            "SNAT new flows pps to a backend on another node: ours tc (default veths) vs iptables MASQUERADE",
            tc_new,
            ipt_new,
            1.0,
            ">= 1x iptables (no slower)",
        ),
        Target::at_least(
            "SNAT new flows pps to a backend on another node: ours tc (default veths) vs nftables masquerade",
            tc_new,
            nft_new,
            1.0,
            ">= 1x nftables (no slower)",
        ),
    ];
    Ok((table, targets))
}
