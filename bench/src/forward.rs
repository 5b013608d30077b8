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
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: vec![1, 100],
                ours_only: vec![],
                packets: 100_000,
            }
        } else {
            Self {
                services: vec![1, 1000, 10_000],
                ours_only: vec![100_000],
                packets: 1_000_000,
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
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ours => "ours (XDP)",
            Mode::OursTc => "ours (tc)",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
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
    sent: u64,
    delivered: u64,
    seconds: f64,
}

impl Sample {
    fn pps(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }
}

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
            Mode::OursTc => {
                sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
                tc_link = Some(lab.attach_tc(CLIENT_IF)?);
            }
            Mode::Iptables => {
                sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
                load(&ns, "iptables-restore", &iptables_rules(n, PER, "udp"))?;
            }
            Mode::Nftables => load(&ns, "nft -f -", &nft_rules(n, PER, "udp"))?,
        }
        for new_flows in [true, false] {
            let src_base =
                u32::from(Ipv4Addr::new(10, 1, 0, 1)) + if new_flows { 0 } else { 0x8000 };
            start_flows(
                &mut lab,
                &mut config,
                (&frame, gen_if, macs),
                n,
                src_base,
                new_flows,
            )?;
            let (sent0, got0) = (count(0)?, count(1)?);
            let elapsed = lab.run_live("lb_gen", &frame, gen_if, s.packets)?;
            std::thread::sleep(Duration::from_millis(100));
            let (sent1, got1) = (count(0)?, count(1)?);
            samples.push(Sample {
                services: n,
                mode,
                new_flows,
                sent: sent1 - sent0,
                delivered: got1 - got0,
                seconds: elapsed.as_secs_f64(),
            });
        }
        match mode {
            Mode::Ours => lab.detach("lb", link.take().expect("attached"))?,
            Mode::OursTc => lab.detach_tc(tc_link.take().expect("attached"))?,
            Mode::Iptables => sh(&format!(
                "ip netns exec {ns} sh -c 'iptables -t nat -F && iptables -t nat -X'"
            ))?,
            Mode::Nftables => sh(&format!("ip netns exec {ns} nft flush ruleset"))?,
        }
    }
    lab.detach("lb_sink", sink)?;
    Ok(samples)
}

/// Sets the generator to send to `vips` ClusterIPs from `src_base` on: every packet a new flow,
/// or [`ESTABLISHED_FLOWS`] flows over and over, which are then sent once each (warm-up).
pub fn start_flows(
    lab: &mut XdpLab,
    config: &mut Array<MapData, GenConfig>,
    (frame, gen_if, macs): (&[u8], u32, [u8; 12]),
    vips: u32,
    src_base: u32,
    new_flows: bool,
) -> Result<()> {
    config.set(
        0,
        GenConfig {
            vip_base: u32::from(Ipv4Addr::new(10, 96, 0, 1)),
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
        samples.extend(measure(
            s,
            n,
            &[Mode::Ours, Mode::OursTc, Mode::Iptables, Mode::Nftables],
        )?);
    }
    for &n in &s.ours_only {
        samples.extend(measure(s, n, &[Mode::Ours, Mode::OursTc])?);
    }
    let mut table = Table::new(
        "forwarding",
        format!(
            "Forwarding over veth, 64-byte UDP, {} packets per run, {PER} endpoints per service (delivered Mpps; one core does generator and node)",
            s.packets
        ),
        &[
            "services",
            "flows",
            "ours XDP Mpps (lab-tuned)",
            "ours tc Mpps (defaults)",
            "iptables Mpps",
            "nftables Mpps",
            "XDP / iptables",
            "XDP / nftables",
            "tc / iptables",
            "tc / nftables",
            "delivered % (xdp/tc/ipt/nft)",
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
            let o = find(n, Mode::Ours, new_flows).unwrap();
            let t = find(n, Mode::OursTc, new_flows).unwrap();
            let pct =
                |x: &Sample| format!("{:.0}", 100.0 * x.delivered as f64 / x.sent.max(1) as f64);
            let flows = if new_flows {
                "new every packet".to_string()
            } else {
                format!("{ESTABLISHED_FLOWS} established")
            };
            let (Some(i), Some(f)) = (
                find(n, Mode::Iptables, new_flows),
                find(n, Mode::Nftables, new_flows),
            ) else {
                table.row(vec![
                    n.to_string(),
                    flows,
                    format!("{:.3}", o.pps() / 1e6),
                    format!("{:.3}", t.pps() / 1e6),
                    "not loaded".into(),
                    "not loaded".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    format!("{}/{}/-/-", pct(o), pct(t)),
                ]);
                continue;
            };
            table.row(vec![
                n.to_string(),
                flows,
                format!("{:.3}", o.pps() / 1e6),
                format!("{:.3}", t.pps() / 1e6),
                format!("{:.3}", i.pps() / 1e6),
                format!("{:.3}", f.pps() / 1e6),
                format!("{:.2}×", o.pps() / i.pps().max(1.0)),
                format!("{:.2}×", o.pps() / f.pps().max(1.0)),
                format!("{:.2}×", t.pps() / i.pps().max(1.0)),
                format!("{:.2}×", t.pps() / f.pps().max(1.0)),
                format!("{}/{}/{}/{}", pct(o), pct(t), pct(i), pct(f)),
            ]);
        }
    }
    let mut series = Vec::new();
    for mode in [Mode::Ours, Mode::OursTc, Mode::Iptables, Mode::Nftables] {
        for new_flows in [true, false] {
            let pts = sizes
                .iter()
                .filter_map(|&n| find(n, mode, new_flows).map(|x| (n as f64, x.pps() / 1e6)))
                .collect();
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
    let (o, t, i, f) = (
        find(at, Mode::Ours, true).unwrap(),
        find(at, Mode::OursTc, true).unwrap(),
        find(at, Mode::Iptables, true).unwrap(),
        find(at, Mode::Nftables, true).unwrap(),
    );
    targets.push(Target::at_least(
        &format!("forwarding new flows pps at {at} services: ours XDP (lab-tuned) vs iptables"),
        o.pps(),
        i.pps(),
        5.0,
        ">= 5x iptables",
    ));
    targets.push(Target::at_least(
        &format!("forwarding new flows pps at {at} services: ours XDP (lab-tuned) vs nftables"),
        o.pps(),
        f.pps(),
        2.0,
        ">= 2x nftables",
    ));
    targets.push(Target::at_least(
        &format!("forwarding new flows pps at {at} services: ours tc (default veths) vs iptables"),
        t.pps(),
        i.pps(),
        5.0,
        ">= 5x iptables",
    ));
    targets.push(Target::at_least(
        &format!("forwarding new flows pps at {at} services: ours tc (default veths) vs nftables"),
        t.pps(),
        f.pps(),
        2.0,
        ">= 2x nftables",
    ));
    let first = find(s.services[0], Mode::Ours, true).unwrap();
    let largest = *sizes.iter().max().expect("sizes");
    targets.push(Target::at_least(
        &format!(
            "forwarding ours new flows pps at {largest} vs {} services (flat curve)",
            s.services[0]
        ),
        find(largest, Mode::Ours, true).unwrap().pps(),
        first.pps(),
        0.9,
        "flat from 1 to 100k",
    ));
    Ok((table, targets))
}
