//! Benchmark 5: ARP under a request flood. The generator (`lb_gen` in ARP mode, live frames)
//! XDP_TXes "who has 192.168.30.60" requests into the node interface `cl`; `lb_sink` on the
//! generator side counts the replies that come back. a) ours: `lb` on `cl` answers from LB_ARP
//! with XDP_TX; b) the kernel: no XDP on `cl`, the address configured on it, the kernel's ARP
//! code answers. Answered % and replies per second are the figures.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use lb_common::{GEN_ARP, GenConfig};
use lb_tests::{
    lab::{CLIENT_IF, XdpLab},
    sh,
};

use crate::{
    forward::{gen_maps, peer_mac},
    report::{Plot, Table, Target},
    services::lab_options,
};

const ANNOUNCED: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 60);

pub struct Settings {
    pub requests: u32,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        Self {
            requests: if quick { 100_000 } else { 1_000_000 },
        }
    }
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    eprintln!("arp: flood of {} requests …", s.requests);
    let mut lab = XdpLab::new(lab_options(251, 1, 16, 16))?;
    let ns = lab.ns.clone();
    lab.announce(ANNOUNCED)?;
    let gen_if = lb_tests::lab::ifindex("cl-peer")?;
    let gen_mac = peer_mac(&ns, "cl-peer")?;
    let sink = lab.attach("lb_sink", "cl-peer")?;
    let (mut config, counters) = gen_maps(&lab)?;
    let count = |i: u32| -> Result<u64> { Ok(counters.get(&i, 0)?.iter().sum()) };
    let mut macs = [0xffu8; 12];
    macs[6..].copy_from_slice(&gen_mac.octets());
    config.set(
        0,
        GenConfig {
            vip_base: u32::from(ANNOUNCED),
            vip_count: 1,
            src_base: u32::from(Ipv4Addr::new(10, 0, 0, 1)),
            flows: 1,
            macs,
            dport: 0,
            mode: GEN_ARP,
        },
        0,
    )?;
    let template = lb_tests::frames::arp_request(gen_mac, Ipv4Addr::new(10, 0, 0, 1), ANNOUNCED);

    let mut rows = Vec::new();
    for kernel in [false, true] {
        let link = if kernel {
            sh(&format!(
                "ip -n {ns} addr add {ANNOUNCED}/32 dev {CLIENT_IF}"
            ))?;
            sh(&format!("ip netns exec {ns} ethtool -K {CLIENT_IF} gro on"))?;
            None
        } else {
            Some(lab.attach("lb", CLIENT_IF)?)
        };
        let (sent0, got0) = (count(0)?, count(1)?);
        let elapsed = lab.run_live("lb_gen", &template, gen_if, s.requests)?;
        std::thread::sleep(Duration::from_millis(200));
        let (sent, got) = (count(0)? - sent0, count(1)? - got0);
        rows.push((
            if kernel {
                "kernel (address on the interface)"
            } else {
                "ours (XDP_TX from LB_ARP)"
            },
            sent,
            got,
            elapsed.as_secs_f64(),
        ));
        if let Some(link) = link {
            lab.detach("lb", link)?;
        }
    }
    lab.detach("lb_sink", sink)?;

    let mut table = Table::new(
        "arp",
        format!(
            "ARP request flood: {} requests (one core generates and answers)",
            s.requests
        ),
        &[
            "responder",
            "requests sent",
            "replies",
            "answered %",
            "replies/s",
        ],
    );
    for (name, sent, got, secs) in &rows {
        table.row(vec![
            name.to_string(),
            sent.to_string(),
            got.to_string(),
            format!("{:.1}", 100.0 * *got as f64 / (*sent).max(1) as f64),
            format!("{:.0}", *got as f64 / secs),
        ]);
    }
    Plot {
        title: "ARP replies per second under a request flood",
        x_label: "responder (1 = ours, 2 = kernel)",
        y_label: "replies/s",
        log_x: false,
        log_y: false,
        series: rows
            .iter()
            .enumerate()
            .map(|(i, (name, _, got, secs))| {
                (name.to_string(), vec![(i as f64 + 1.0, *got as f64 / secs)])
            })
            .collect(),
    }
    .write(&out.join("arp.png"))?;
    let (_, sent, got, _) = rows[0];
    let (_, _, kgot, ksecs) = rows[1];
    let targets = vec![
        Target::at_least(
            "arp flood: ours replies vs requests sent",
            got as f64,
            sent as f64,
            1.0,
            "100% answered",
        ),
        Target::at_least(
            "arp flood: ours replies/s vs kernel replies/s",
            got as f64 / rows[0].3,
            kgot as f64 / ksecs,
            1.0,
            "more than the kernel",
        ),
    ];
    Ok((table, targets))
}
