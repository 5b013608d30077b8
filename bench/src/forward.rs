//! Benchmark 2: forwarding through the node over veth, ours vs kube-proxy-style iptables and
//! nftables rules, same topology, same generator, same flows.
//!
//! Inside one namespace the lab made (see `lb_tests::lab`): the generator program `lb_gen` runs
//! in BPF_PROG_TEST_RUN live-frames mode on `cl-peer` and XDP_TXes 64-byte UDP frames into the
//! node interface `cl`; the node DNATs them to one of the service's endpoints (10.128.0.0/9,
//! routed out of `bk`), and `lb_sink` on `bk-peer` counts and drops what arrives. Delivered
//! packets per second of wall time is the figure. "new flows": every packet a new 5-tuple
//! (conntrack cannot help iptables); "established": 4096 flows over and over.
//!
//! a) ours (XDP): `lb` attached to `cl` and `bk` listed as an XDP target, the lab-tuned best
//! case (XDP frames into a veth need NAPI on its peer: `bk-peer` runs the sink); a') ours (tc):
//! `lb_tc` at `cl`'s tcx ingress, what a node gets on veths left at kernel defaults (auto);
//! b) iptables-restore of the kube-proxy iptables ruleset (KUBE-SERVICES → KUBE-SVC-* statistic
//! random → KUBE-SEP-* DNAT); c) nft -f of the kube-proxy nftables ruleset (verdict map +
//! numgen). For a', b and c `cl` runs no XDP: it gets GRO so that the generator's XDP frames
//! reach its stack at all (a property of this generator, not of the node).
//!
//! Two references on the same path, so the table shows what the rules cost and how close to
//! this machine's limit each datapath is: the floor, kernel forwarding with no rules at all
//! (the generator sends straight to the endpoints; GRO on `cl`, as for a', b, c); and the
//! ceiling, an XDP program on `cl` that only rewrites the MACs and redirects (`lb_redirect`).
//! Every cell is measured `runs` times: median (min–max).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use aya::maps::{Array, MapData, PerCpuArray};
use lb_common::{GenConfig, map_names};
use lb_tests::{
    Topology,
    lab::{self, CLIENT_IF, CLIENT_IF_MAC, XdpLab},
    sh,
};
use lb_userspace::model::Protocol;
use pnet::util::MacAddr;

use crate::{
    control::{iptables_rules, nft_rules},
    report::{Plot, Table, Target},
    services::lab_options,
    services::state_proto,
};

const PER: u32 = 10;
pub const ESTABLISHED_FLOWS: u32 = 4096;

pub struct Settings {
    pub services: Vec<u32>,
    /// Larger sizes measured for ours only: kube-proxy rulesets of that size take too long to
    /// load (nft -f of 10k services already takes minutes).
    pub ours_only: Vec<u32>,
    pub packets: u32,
    pub runs: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: vec![1, 100],
                ours_only: vec![],
                packets: 100_000,
                runs: 2,
            }
        } else {
            Self {
                services: vec![1, 1000, 10_000],
                ours_only: vec![100_000],
                packets: 1_000_000,
                runs: 5,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ours,
    OursTc,
    Iptables,
    Nftables,
    /// Kernel forwarding, no rules: to the endpoints directly.
    Floor,
    /// XDP that only redirects.
    Ceiling,
}

const MODES: [Mode; 6] = [
    Mode::Ours,
    Mode::OursTc,
    Mode::Iptables,
    Mode::Nftables,
    Mode::Floor,
    Mode::Ceiling,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ours => "ours (XDP)",
            Mode::OursTc => "ours (tc)",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Floor => "kernel forwarding, no rules (floor)",
            Mode::Ceiling => "XDP redirect only (ceiling)",
        }
    }
}

/// The generator's settings and its counters (0: frames sent, 1: frames that reached `lb_sink`).
pub fn gen_maps(lab: &XdpLab) -> Result<(Array<MapData, GenConfig>, PerCpuArray<MapData, u64>)> {
    let open = |name: &str| -> Result<aya::maps::Map> {
        Ok(aya::maps::Map::from_map_data(MapData::from_pin(
            lab.bpffs().join(name),
        )?)?)
    };
    Ok((
        Array::try_from(open(map_names::GEN)?)?,
        PerCpuArray::try_from(open(map_names::GEN_COUNTERS)?)?,
    ))
}

/// MAC of `iface` in namespace `ns`.
pub fn peer_mac(ns: &str, iface: &str) -> Result<MacAddr> {
    Topology::mac_of(ns, iface)?
        .parse()
        .map_err(|e| anyhow::anyhow!("{iface}: {e:?}"))
}

/// The 64-byte UDP template: 10.1.0.1:1024 → 10.96.0.1:80, checksum 0.
pub fn template(src_mac: MacAddr) -> Vec<u8> {
    let mut f = lb_tests::frames::Frame::udp(
        (Ipv4Addr::new(10, 1, 0, 1), 1024),
        (Ipv4Addr::new(10, 96, 0, 1), 80),
    );
    f.l4 = lb_tests::frames::L4::Udp {
        zero_checksum: true,
    };
    f.src_mac = src_mac;
    f.dst_mac = CLIENT_IF_MAC;
    f.payload = vec![0; 18];
    f.bytes()
}

struct Sample {
    services: u32,
    mode: Mode,
    new_flows: bool,
    /// One per run.
    sent: Vec<u64>,
    delivered: Vec<u64>,
    seconds: Vec<f64>,
}

impl Sample {
    fn rates(&self) -> Vec<f64> {
        self.delivered
            .iter()
            .zip(&self.seconds)
            .map(|(d, s)| *d as f64 / s)
            .collect()
    }

    /// Median delivered packets per second.
    fn pps(&self) -> f64 {
        let mut r = self.rates();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }

    fn spread(&self) -> String {
        let r = self.rates();
        let min = r.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.iter().copied().fold(0.0, f64::max);
        format!("{:.3}–{:.3}", min / 1e6, max / 1e6)
    }

    fn delivered_pct(&self) -> f64 {
        100.0 * self.delivered.iter().sum::<u64>() as f64
            / self.sent.iter().sum::<u64>().max(1) as f64
    }
}

/// The endpoints of the lab's services: 10.128.0.1 on, routed out of `bk`.
const ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);

fn measure(s: &Settings, n: u32, modes: &[Mode]) -> Result<Vec<Sample>> {
    let mut lab = XdpLab::new(lab_options(1021, n + 16, n + 16, n * PER + 64))?;
    lab.apply_maps_only(&state_proto(n, PER, Protocol::Udp))?;
    let ns = lab.ns.clone();
    sh(&format!(
        "ip -n {ns} neigh replace 10.255.255.253 lladdr 02:00:00:00:ff:fd dev bk nud permanent"
    ))?;
    sh(&format!(
        "ip -n {ns} route add 10.128.0.0/9 via 10.255.255.253 dev bk"
    ))?;
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.cl.rp_filter=0"
    ))?;
    let sink = lab.attach("lb_sink", "bk-peer")?;
    let gen_if = lab::ifindex("cl-peer")?;
    let gen_mac = peer_mac(&ns, "cl-peer")?;
    let frame = template(gen_mac);
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&CLIENT_IF_MAC.octets());
    macs[6..].copy_from_slice(&gen_mac.octets());
    let (mut config, counters) = gen_maps(&lab)?;
    let count = |i: u32| -> Result<u64> { Ok(counters.get(&i, 0)?.iter().sum()) };

    let mut samples = Vec::new();
    for &mode in modes {
        eprintln!("forward: {n} services, {} …", mode.name());
        let mut link = None;
        let mut tc_link = None;
        match mode {
            Mode::Ours => link = Some(lab.attach("lb", CLIENT_IF)?),
            Mode::Ceiling => {
                let mut redirect: Array<MapData, lb_common::RedirectConfig> =
                    Array::try_from(aya::maps::Map::from_map_data(MapData::from_pin(
                        lab.bpffs().join(map_names::REDIRECT),
                    )?)?)?;
                let mut macs = [0u8; 12];
                macs[..6].copy_from_slice(&[0x02, 0, 0, 0, 0xff, 0xfd]);
                macs[6..].copy_from_slice(&lab::BACKEND_IF_MAC.octets());
                redirect.set(
                    0,
                    lb_common::RedirectConfig {
                        ifindex: lab.backend_ifindex,
                        macs,
                    },
                    0,
                )?;
                link = Some(lab.attach("lb_redirect", CLIENT_IF)?);
            }
            Mode::OursTc => {
                sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
                tc_link = Some(lab.attach_tc(CLIENT_IF)?);
            }
            Mode::Iptables => {
                sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
                load(&ns, "iptables-restore", &iptables_rules(n, PER, "udp"))?;
            }
            Mode::Nftables => {
                sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
                load(&ns, "nft -f -", &nft_rules(n, PER, "udp"))?
            }
            Mode::Floor => sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?,
        }
        // Floor and ceiling send to the endpoints themselves, as many as the services have.
        let to_endpoints = matches!(mode, Mode::Floor | Mode::Ceiling);
        for new_flows in [true, false] {
            let mut sample = Sample {
                services: n,
                mode,
                new_flows,
                sent: Vec::new(),
                delivered: Vec::new(),
                seconds: Vec::new(),
            };
            for run in 0..s.runs {
                // Each run its own sources: new flows stay new, established ones are warmed.
                let src_base = u32::from(Ipv4Addr::new(10, 1, 0, 1))
                    + if new_flows { 0 } else { 0x8000 }
                    + (run as u32) * 0x0100_0000 / 64;
                start_flows(
                    &mut lab,
                    &mut config,
                    (&frame, gen_if, macs),
                    if to_endpoints {
                        ENDPOINT_BASE
                    } else {
                        VIP_BASE
                    },
                    n,
                    src_base,
                    new_flows,
                )?;
                let (sent0, got0) = (count(0)?, count(1)?);
                let elapsed = lab.run_live("lb_gen", &frame, gen_if, s.packets)?;
                std::thread::sleep(Duration::from_millis(100));
                let (sent1, got1) = (count(0)?, count(1)?);
                sample.sent.push(sent1 - sent0);
                sample.delivered.push(got1 - got0);
                sample.seconds.push(elapsed.as_secs_f64());
            }
            samples.push(sample);
        }
        match mode {
            Mode::Ours => lab.detach("lb", link.take().expect("attached"))?,
            Mode::Ceiling => lab.detach("lb_redirect", link.take().expect("attached"))?,
            Mode::OursTc => lab.detach_tc(tc_link.take().expect("attached"))?,
            Mode::Iptables => sh(&format!(
                "ip netns exec {ns} sh -c 'iptables -t nat -F && iptables -t nat -X'"
            ))?,
            Mode::Nftables => sh(&format!("ip netns exec {ns} nft flush ruleset"))?,
            Mode::Floor => {}
        }
        if !matches!(mode, Mode::Ours | Mode::Ceiling) {
            sh(&format!(
                "ip netns exec {ns} ethtool -K {CLIENT_IF} gro off"
            ))?;
        }
    }
    lab.detach("lb_sink", sink)?;
    Ok(samples)
}

/// The ClusterIPs of the lab's services: 10.96.0.1 on.
const VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Sets the generator to send to `vips` addresses from `dst_base` on, from `src_base` on:
/// every packet a new flow, or [`ESTABLISHED_FLOWS`] flows over and over, which are then sent
/// once each (warm-up).
pub fn start_flows(
    lab: &mut XdpLab,
    config: &mut Array<MapData, GenConfig>,
    (frame, gen_if, macs): (&[u8], u32, [u8; 12]),
    dst_base: Ipv4Addr,
    vips: u32,
    src_base: u32,
    new_flows: bool,
) -> Result<()> {
    config.set(
        0,
        GenConfig {
            vip_base: u32::from(dst_base),
            vip_count: vips,
            src_base,
            flows: if new_flows { 0 } else { ESTABLISHED_FLOWS },
            macs,
            dport: 80u16.to_be(),
            mode: lb_common::GEN_UDP,
        },
        0,
    )?;
    if !new_flows {
        lab.run_live("lb_gen", frame, gen_if, ESTABLISHED_FLOWS * 2)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn load(ns: &str, cmd: &str, rules: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!("{ns}.rules"));
    std::fs::write(&path, rules)?;
    let r = sh(&format!("ip netns exec {ns} {cmd} < {}", path.display()));
    let _ = std::fs::remove_file(&path);
    r
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let mut samples = Vec::new();
    for &n in &s.services {
        samples.extend(measure(s, n, &MODES)?);
    }
    for &n in &s.ours_only {
        samples.extend(measure(
            s,
            n,
            &[Mode::Ours, Mode::OursTc, Mode::Floor, Mode::Ceiling],
        )?);
    }
    let mut table = Table::new(
        "forwarding",
        format!(
            "Forwarding over veth, 64-byte UDP, {} packets per run, {PER} endpoints per service; delivered Mpps, median of {} runs (min–max); one core does generator and node. \
             Floor: kernel forwarding without rules on the same path; ceiling: XDP that only redirects. Ours XDP is the lab-tuned case (XDP frames into a veth need NAPI on its peer); ours tc is a node on veths at kernel defaults",
            s.packets, s.runs
        ),
        &[
            "services",
            "flows",
            "datapath",
            "Mpps",
            "min–max",
            "delivered %",
            "× floor",
            "× ceiling",
        ],
    );
    let find = |n: u32, mode: Mode, new_flows: bool| {
        samples
            .iter()
            .find(|x| x.services == n && x.mode == mode && x.new_flows == new_flows)
    };
    let sizes: Vec<u32> = s.services.iter().chain(&s.ours_only).copied().collect();
    for &n in &sizes {
        for new_flows in [true, false] {
            let flows = if new_flows {
                "new every packet".to_string()
            } else {
                format!("{ESTABLISHED_FLOWS} established")
            };
            let floor = find(n, Mode::Floor, new_flows).map_or(f64::NAN, Sample::pps);
            let ceiling = find(n, Mode::Ceiling, new_flows).map_or(f64::NAN, Sample::pps);
            for mode in MODES {
                let Some(x) = find(n, mode, new_flows) else {
                    continue;
                };
                table.row(vec![
                    n.to_string(),
                    flows.clone(),
                    mode.name().into(),
                    format!("{:.3}", x.pps() / 1e6),
                    x.spread(),
                    format!("{:.0}", x.delivered_pct()),
                    format!("{:.2}", x.pps() / floor),
                    format!("{:.2}", x.pps() / ceiling),
                ]);
            }
        }
    }
    let mut series = Vec::new();
    for mode in MODES {
        for new_flows in [true, false] {
            let pts: Vec<(f64, f64)> = sizes
                .iter()
                .filter_map(|&n| find(n, mode, new_flows).map(|x| (n as f64, x.pps() / 1e6)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            series.push((
                format!(
                    "{}, {}",
                    mode.name(),
                    if new_flows {
                        "new flows"
                    } else {
                        "established"
                    }
                ),
                pts,
            ));
        }
    }
    Plot {
        title: "Forwarding rate through the node (veth, 64-byte UDP)",
        x_label: "services",
        y_label: "delivered Mpps (log)",
        log_x: true,
        log_y: true,
        series,
    }
    .write(&out.join("forwarding.png"))?;

    let mut targets = Vec::new();
    let at = if s.services.contains(&10_000) {
        10_000
    } else {
        *s.services.last().expect("sizes")
    };
    let pps = |n, mode, new_flows| find(n, mode, new_flows).expect("measured").pps();
    for (mode, label) in [
        (Mode::Ours, "ours XDP (lab-tuned)"),
        (Mode::OursTc, "ours tc (default veths)"),
    ] {
        targets.push(Target::at_least(
            &format!("forwarding new flows pps at {at} services: {label} vs iptables"),
            pps(at, mode, true),
            pps(at, Mode::Iptables, true),
            5.0,
            ">= 5x iptables",
        ));
        targets.push(Target::at_least(
            &format!("forwarding new flows pps at {at} services: {label} vs nftables"),
            pps(at, mode, true),
            pps(at, Mode::Nftables, true),
            2.0,
            ">= 2x nftables",
        ));
    }
    for (new_flows, bar, what) in [(false, 0.7, "established"), (true, 0.5, "new flows")] {
        targets.push(Target::at_least(
            &format!(
                "forwarding {what} pps at {at} services: ours XDP vs the XDP redirect-only ceiling"
            ),
            pps(at, Mode::Ours, new_flows),
            pps(at, Mode::Ceiling, new_flows),
            bar,
            &format!(">= {bar} of the ceiling"),
        ));
    }
    let largest = *sizes.iter().max().expect("sizes");
    targets.push(Target::at_least(
        &format!(
            "forwarding ours new flows pps at {largest} vs {} services (flat curve)",
            s.services[0]
        ),
        pps(largest, Mode::Ours, true),
        pps(s.services[0], Mode::Ours, true),
        0.9,
        "flat from 1 to 100k",
    ));
    Ok((table, targets))
}
