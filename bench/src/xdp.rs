//! Benchmark 1: per-packet cost of the XDP program with BPF_PROG_TEST_RUN, against the empty
//! `lb_pass` program from the benchmark object, at 1, 1k, 10k and 100k frontends.
//!
//! BPF_PROG_TEST_RUN runs one frame R times in the kernel and reports the mean, every repetition
//! on the same buffer: a plain repeat of `lb` would, after the first DNAT, time its own output (a
//! miss). Repeats therefore go through `lb_replay`, which writes the original frame back over the
//! packet (one bpf_xdp_store_bytes) and then runs the datapath, against `lb_replay_pass` (the
//! same write, then XDP_PASS) as the floor. After its first run a flow's frame is a conntrack
//! hit: established flows, replies, misses. With `new_flow`, `lb_replay` also writes a new
//! source address and port into each run's frame, so every run is a first packet: frontend,
//! conntrack miss, Maglev, backend, two conntrack inserts, DNAT, FIB.
//!
//! New flows are timed against two conntrack states, each trial starting from the same one:
//! a table with room for every insert (emptied before the trial: a node whose flows expire),
//! and a full table, where every insert first evicts (LRU). Without that, each trial found the
//! table its predecessors left, and later cases timed eviction that earlier ones did not.

use std::net::Ipv4Addr;

use anyhow::Result;
use lb_tests::{
    frames::{Frame, TCP_ACK, TCP_SYN},
    lab::{BACKEND_IF_MAC, CLIENT, CLIENT_IF_MAC, CLIENT_MAC, XdpLab, backend_mac},
};
use lb_userspace::{
    datapath::Options,
    model::{DesiredState, Protocol},
};

use crate::{
    report::{Plot, Table, Target, num},
    services::lab_options,
    services::{active, clusterip, vip},
};

const M: u32 = 251;
const BACKEND_POOL: u32 = 32;

pub struct Settings {
    pub frontend_counts: Vec<u32>,
    pub repeat: u32,
    /// Runs of a new-flow trial: two inserts each must fit the table when it starts empty.
    pub new_flow_repeat: u32,
    pub trials: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                frontend_counts: vec![1, 1000],
                repeat: 100_000,
                new_flow_repeat: 50_000,
                trials: 1,
            }
        } else {
            Self {
                frontend_counts: vec![1, 1000, 10_000, 100_000],
                repeat: 1_000_000,
                new_flow_repeat: 100_000,
                trials: 7,
            }
        }
    }
}

fn backend_addr(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 1 + k as u8)
}

/// `n` services with one TCP port each (service 0 also has UDP 53), 3 backends each from a
/// shared pool of 32 addresses.
pub fn services(n: u32) -> DesiredState {
    let mut desired = DesiredState::default();
    for i in 0..n {
        let picks: Vec<u32> = (0..3).map(|k| (i + k * 7) % BACKEND_POOL).collect();
        let mut ports = vec![(Protocol::Tcp, 80, 8080, "tcp")];
        if i == 0 {
            ports.push((Protocol::Udp, 53, 8053, "udp"));
        }
        for (proto, port, target, pname) in ports {
            let backends = picks
                .iter()
                .map(|&k| active(backend_addr(k), target, proto))
                .collect();
            let name = format!("bench/svc-{i}:{pname}");
            desired
                .services
                .insert(name.clone(), clusterip(name, vip(i), port, proto, backends));
        }
    }
    desired
}

pub fn options(services: u32) -> Options {
    lab_options(M, services + 1, services + 2, 64)
}

fn client(f: Frame) -> Vec<u8> {
    Frame {
        src_mac: CLIENT_MAC,
        dst_mac: CLIENT_IF_MAC,
        ..f
    }
    .bytes()
}

struct Row {
    frontends: u32,
    empty: f64,
    floor: f64,
    miss: f64,
    tcp_syn: f64,
    tcp_ct_hit: f64,
    udp_ct_hit: f64,
    rev_nat: f64,
    arp_reply: f64,
    /// Every run a new 5-tuple: frontend, Maglev, backend, two conntrack inserts, FIB; the
    /// table has room.
    syn_new: f64,
    udp_new: f64,
    /// New flows whose destination moves over every frontend (cache-cold lookups).
    syn_spread: f64,
    /// The same into a full table: every insert evicts.
    syn_new_full: f64,
    syn_spread_full: f64,
    /// The conntrack work of a new flow alone (two lookups, two inserts), table with room.
    conntrack_alone: f64,
}

/// How the runs of a case meet conntrack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flows {
    /// Every run on the same frame: after the first, a conntrack hit (or a miss, or ARP).
    Same,
    /// Every run a new flow (destination spread over this many frontends, when above 1), into
    /// a table emptied before the trial.
    NewWithRoom(u32),
    /// Every run a new flow into a table filled before the trial: each insert evicts.
    NewIntoFull(u32),
}

fn measure(s: &Settings, n: u32) -> Result<Row> {
    let mut lab = XdpLab::new(options(n))?;
    let desired = services(n);
    lab.apply(&desired)?;
    let frontends = desired.frontend_count() as u32;
    let (ci, bi) = (lab.client_ifindex, lab.backend_ifindex);

    let target = vip(n / 2);
    let syn = client(Frame::tcp((CLIENT, 40000), (target, 80), TCP_SYN));
    let ack = client(Frame::tcp((CLIENT, 40000), (target, 80), TCP_ACK));
    let udp = client(Frame::udp((CLIENT, 5353), (vip(0), 53)));
    let miss = client(Frame::tcp(
        (CLIENT, 40000),
        (Ipv4Addr::new(10, 200, 0, 1), 80),
        TCP_SYN,
    ));

    // Prime the flows and learn which backend the TCP one went to, for its reply.
    let first = lab.run("lb", &syn, ci)?;
    anyhow::ensure!(
        first.verdict == 4,
        "SYN to {target}: verdict {} (want XDP_REDIRECT)",
        first.verdict
    );
    let backend = Ipv4Addr::new(
        first.output[30],
        first.output[31],
        first.output[32],
        first.output[33],
    );
    lab.run("lb", &udp, ci)?;
    let reply = Frame {
        src_mac: backend_mac(backend),
        dst_mac: BACKEND_IF_MAC,
        ..Frame::tcp((backend, 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK)
    }
    .bytes();
    let check = lab.run("lb", &reply, bi)?;
    anyhow::ensure!(
        check.verdict == 4,
        "reply from {backend}: verdict {}",
        check.verdict
    );

    // ARP request for an announced LoadBalancer IP: answered in place.
    let announced = Ipv4Addr::new(192, 168, 30, 60);
    lab.announce(announced)?;
    let request = lb_tests::frames::arp_request(CLIENT_MAC, CLIENT, announced);
    anyhow::ensure!(
        lab.run("lb", &request, ci)?.verdict == 3,
        "ARP request not answered with XDP_TX"
    );
    // Trials interleave the cases, so a noisy moment on this shared machine hits all of them,
    // and each case keeps its best trial (noise only ever adds time).
    // A SYN to the first frontend; replayed with a spread, each run goes to the next one.
    let syn_first = client(Frame::tcp((CLIENT, 40000), (vip(0), 80), TCP_SYN));
    let capacity = lab.maps().capacity(lb_common::map_names::CONNTRACK)?;
    anyhow::ensure!(
        2 * s.new_flow_repeat < capacity,
        "{} new flows (two entries each) do not fit a conntrack table of {capacity}",
        s.new_flow_repeat
    );
    let cases: [(&str, &[u8], u32, Flows); 14] = [
        ("lb_pass", &syn, ci, Flows::Same),
        ("lb_replay_pass", &syn, ci, Flows::Same),
        ("lb_replay", &miss, ci, Flows::Same),
        ("lb_replay", &syn, ci, Flows::Same),
        ("lb_replay", &ack, ci, Flows::Same),
        ("lb_replay", &udp, ci, Flows::Same),
        ("lb_replay", &reply, bi, Flows::Same),
        ("lb_replay", &request, ci, Flows::Same),
        ("lb_replay", &syn, ci, Flows::NewWithRoom(0)),
        ("lb_replay", &udp, ci, Flows::NewWithRoom(0)),
        ("lb_replay", &syn_first, ci, Flows::NewWithRoom(n)),
        ("lb_replay", &syn, ci, Flows::NewIntoFull(0)),
        ("lb_replay", &syn_first, ci, Flows::NewIntoFull(n)),
        ("lb_replay_conntrack", &syn, ci, Flows::NewWithRoom(0)),
    ];
    let mut best = [f64::INFINITY; 14];
    for _ in 0..s.trials {
        for (b, (prog, frame, ingress, flows)) in best.iter_mut().zip(cases) {
            let t = match flows {
                Flows::Same if prog == "lb_pass" => lab.time(prog, frame, ingress, s.repeat)?,
                Flows::Same => lab.time_replayed(prog, frame, ingress, s.repeat, false, 0)?,
                Flows::NewWithRoom(spread) => {
                    lab.clear_conntrack()?;
                    lab.time_replayed(prog, frame, ingress, s.new_flow_repeat, true, spread)?
                }
                Flows::NewIntoFull(spread) => {
                    // Untimed: enough new flows to fill the table (two entries each) and more.
                    lab.time_replayed(prog, frame, ingress, capacity / 2 + 4096, true, spread)?;
                    lab.time_replayed(prog, frame, ingress, s.new_flow_repeat, true, spread)?
                }
            };
            *b = b.min(t);
        }
    }
    // The new-flow cases really are new flows through the whole path: each run inserted its
    // conntrack entries (a replayed frame the datapath refused would time a pass, not a flow).
    for (frame, what, spread) in [
        (&syn, "TCP SYN", 0),
        (&udp, "UDP", 0),
        (&syn_first, "TCP SYN spread over all frontends", n),
    ] {
        lab.clear_conntrack()?;
        let before = lab.maps().ct_counters()?.inserted;
        lab.time_replayed("lb_replay", frame, ci, s.new_flow_repeat, true, spread)?;
        let inserted = lab.maps().ct_counters()?.inserted - before;
        let held = lab.clear_conntrack()? as u64;
        anyhow::ensure!(
            inserted >= 2 * u64::from(s.new_flow_repeat) && held >= inserted,
            "{what}, new flow every run: {inserted} conntrack inserts in {} runs, {held} held",
            s.new_flow_repeat
        );
    }
    // `best` is in the order of `cases`.
    Ok(Row {
        frontends,
        empty: best[0],
        floor: best[1],
        miss: best[2],
        tcp_syn: best[3],
        tcp_ct_hit: best[4],
        udp_ct_hit: best[5],
        rev_nat: best[6],
        arp_reply: best[7],
        syn_new: best[8],
        udp_new: best[9],
        syn_spread: best[10],
        syn_new_full: best[11],
        syn_spread_full: best[12],
        conntrack_alone: best[13],
    })
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let mut rows = Vec::new();
    for &n in &s.frontend_counts {
        eprintln!("xdp: {n} services …");
        rows.push(measure(s, n)?);
    }
    let mut table = Table::new(
        "xdp_test_run",
        format!(
            "Per-packet cost, BPF_PROG_TEST_RUN (ns/packet; best of {} interleaved trials of {} runs, {} for new flows; every run starts from the same frame; new flows into a conntrack table emptied before each trial, or filled before it)",
            s.trials, s.repeat, s.new_flow_repeat
        ),
        &[
            "frontends",
            "empty prog (no replay)",
            "empty prog + replay (floor)",
            "miss",
            "TCP SYN (same tuple: conntrack hit)",
            "TCP ACK (conntrack hit)",
            "UDP (conntrack hit)",
            "reply rev-NAT",
            "ARP reply",
            "TCP SYN, new flow every run",
            "UDP, new flow every run",
            "TCP SYN, new flow and frontend every run (spread over all)",
            "TCP SYN, new flow, full table (evicting)",
            "TCP SYN, new flow and frontend, full table (evicting)",
            "conntrack work of a new flow alone (2 lookups, 2 LRU inserts)",
            "ACK / floor",
            "new SYN / floor",
        ],
    );
    for r in &rows {
        table.row(vec![
            r.frontends.to_string(),
            num(r.empty),
            num(r.floor),
            num(r.miss),
            num(r.tcp_syn),
            num(r.tcp_ct_hit),
            num(r.udp_ct_hit),
            num(r.rev_nat),
            num(r.arp_reply),
            num(r.syn_new),
            num(r.udp_new),
            num(r.syn_spread),
            num(r.syn_new_full),
            num(r.syn_spread_full),
            num(r.conntrack_alone),
            format!("{:.2}×", r.tcp_ct_hit / r.floor),
            format!("{:.2}×", r.syn_new / r.floor),
        ]);
    }
    let series = |name: &str, f: fn(&Row) -> f64| {
        (
            name.to_string(),
            rows.iter().map(|r| (r.frontends as f64, f(r))).collect(),
        )
    };
    Plot {
        title: "XDP per-packet cost (BPF_PROG_TEST_RUN)",
        x_label: "frontends",
        y_label: "ns / packet (log)",
        log_x: true,
        log_y: true,
        series: vec![
            series("empty program + frame replay (floor)", |r| r.floor),
            series("miss", |r| r.miss),
            series("TCP SYN, same tuple", |r| r.tcp_syn),
            series("TCP ACK, conntrack hit", |r| r.tcp_ct_hit),
            series("UDP conntrack hit", |r| r.udp_ct_hit),
            series("reply rev-NAT", |r| r.rev_nat),
            series("ARP reply", |r| r.arp_reply),
            series("TCP SYN, new flow every run", |r| r.syn_new),
            series("UDP, new flow every run", |r| r.udp_new),
            series("TCP SYN, new flow, full table (evicting)", |r| {
                r.syn_new_full
            }),
        ],
    }
    .write(&out.join("xdp_test_run.png"))?;

    let first = &rows[0];
    let last = rows.last().expect("rows");
    let mut targets = vec![
        Target::at_most(
            "xdp TCP SYN frontend hit, new flow (conntrack with room), ns vs floor (1 frontend)",
            first.syn_new,
            first.floor,
            6.0,
            "<= 6x floor (raised in issue 12 from 3x)",
        ),
        Target::at_most(
            "xdp UDP frontend hit, new flow (conntrack with room), ns vs floor (1 frontend)",
            first.udp_new,
            first.floor,
            6.0,
            "<= 6x floor (raised in issue 12 from 3x)",
        ),
        Target::at_most(
            "xdp TCP conntrack hit ns vs floor (1 frontend)",
            first.tcp_ct_hit,
            first.floor,
            3.0,
            "<= 3x floor",
        ),
        Target::at_most(
            "xdp UDP conntrack hit ns vs floor (1 frontend)",
            first.udp_ct_hit,
            first.floor,
            3.0,
            "<= 3x floor",
        ),
    ];
    if rows.len() > 1 {
        let label = |what: &str| {
            format!(
                "xdp {what} ns at {} frontends vs at {}",
                last.frontends, first.frontends
            )
        };
        targets.push(Target::at_most(
            &label("TCP conntrack hit"),
            last.tcp_ct_hit,
            first.tcp_ct_hit,
            1.1,
            "<= 1.1x",
        ));
        targets.push(Target::at_most(
            &label("TCP SYN new flow, spread over all frontends (cache-cold),"),
            last.syn_spread,
            first.syn_spread,
            1.1,
            "<= 1.1x",
        ));
    }
    Ok((table, targets))
}
