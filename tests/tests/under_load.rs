//! The agent's lifecycle while traffic flows, on kernel-default veths:
//! - restart: 100 TCP connections held open and a steady UDP stream across kill -9 of the agent,
//!   its restart, and an upgrade (SIGTERM, then another binary file started on the same pins);
//! - churn: 1,000 endpoint add/remove operations while clients keep opening new flows.
//!
//! A watcher reads the pinned maps (read-only) every few milliseconds throughout and checks that
//! every frontend is present and every slot of its Maglev table names a live backend of its
//! Service: no window where a frontend has no backends, no half-written table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_common::backend_state;
use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT, in_netns};
use lb_userspace::maps::PinnedMaps;

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

/// Samples the pinned maps until stopped: every frontend present, every Maglev slot of it a
/// backend that is in use and (while `allowed` says so) allowed for that frontend.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, Vec<String>)>,
}

/// Backend addresses the watcher must never see in a table (the churn's removed canary, once
/// its removal has been applied).
type Forbidden = Arc<Mutex<BTreeSet<Ipv4Addr>>>;

impl Watcher {
    fn start(bpffs: PathBuf, frontends: usize, forbidden: Forbidden) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = 0;
            let mut problems = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match sample(&bpffs, frontends, &forbidden.lock().unwrap().clone()) {
                    Ok(()) => {}
                    Err(e) if problems.len() < 10 => problems.push(e),
                    Err(_) => {}
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (samples, problems)
        });
        Self { stop, handle }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn sample(
    bpffs: &std::path::Path,
    frontends: usize,
    forbidden: &BTreeSet<Ipv4Addr>,
) -> Result<(), String> {
    let maps = PinnedMaps::open(bpffs, false).map_err(|e| format!("open: {e:#}"))?;
    let all: Vec<_> = maps.frontends.iter().filter_map(Result::ok).collect();
    if all.len() != frontends {
        return Err(format!("{} frontends, expected {frontends}", all.len()));
    }
    for (key, fe) in all {
        if let Err(e) = check_frontend(&maps, &key, &fe, forbidden) {
            // A sample is far slower than a packet: if the frontend flipped to a new table
            // while it read the old one (which the agent then retired), it proves nothing.
            if maps.frontends.get(&key, 0).ok() == Some(fe) {
                return Err(e);
            }
        }
    }
    Ok(())
}

fn check_frontend(
    maps: &PinnedMaps,
    key: &lb_common::FrontendKey,
    fe: &lb_common::Frontend,
    forbidden: &BTreeSet<Ipv4Addr>,
) -> Result<(), String> {
    {
        if fe.backend_count == 0 {
            return Err(format!("{key:?} has no backends"));
        }
        let table = maps
            .maglev
            .read(fe.maglev_offset as usize, fe.maglev_size as usize)
            .map_err(|e| format!("{e:#}"))?;
        let ids: BTreeSet<u32> = table.iter().copied().collect();
        for id in ids {
            let b = maps
                .backends
                .get(&id, 0)
                .map_err(|e| format!("backend {id}: {e}"))?;
            if id == 0 || b.state == backend_state::UNUSED {
                return Err(format!("{key:?}: slot points at unused backend {id}"));
            }
            let addr = Ipv4Addr::from(lb_common::ipv4_from_wire(b.addr));
            if forbidden.contains(&addr) {
                return Err(format!("{key:?}: slot points at removed backend {addr}"));
            }
        }
    }
    Ok(())
}

/// Client traffic until stopped: a steady UDP conversation on one 5-tuple (a datagram every
/// 2 ms, each answered before the next) and a new TCP connection plus a new UDP flow every
/// 10 ms. Counts what went unanswered and which backends answered new flows.
struct Traffic {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Tally>>,
}

#[derive(Default, Debug)]
struct Tally {
    udp_sent: u64,
    udp_lost: u64,
    new_flows: u64,
    new_flows_failed: u64,
    /// Backend name → new flows it answered, and when each was answered.
    answered_by: BTreeMap<String, Vec<Instant>>,
    failures: Vec<String>,
}

impl Traffic {
    fn start(ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let flag = stop.clone();
        let ns1 = ns.to_string();
        handles.push(std::thread::spawn(move || {
            in_netns(&ns1, move || {
                let mut t = Tally::default();
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(vip(UDP_PORT)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut buf = [0u8; 256];
                while !flag.load(Ordering::Relaxed) {
                    t.udp_sent += 1;
                    socket.send(b"who").unwrap();
                    if socket.recv(&mut buf).is_err() {
                        t.udp_lost += 1;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                t
            })
        }));
        let flag = stop.clone();
        let ns2 = ns.to_string();
        handles.push(std::thread::spawn(move || {
            in_netns(&ns2, move || {
                let mut t = Tally::default();
                while !flag.load(Ordering::Relaxed) {
                    let tcp = Conversation::open(vip(TCP_PORT)).and_then(|mut c| c.ask());
                    let udp = lb_tests::udp_ask(vip(UDP_PORT)).map(|(_, name)| name);
                    for r in [tcp, udp] {
                        t.new_flows += 1;
                        match r {
                            Ok(name) => t.answered_by.entry(name).or_default().push(Instant::now()),
                            Err(e) => {
                                t.new_flows_failed += 1;
                                if t.failures.len() < 5 {
                                    t.failures.push(format!("{e:#}"));
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                t
            })
        }));
        Self { stop, handles }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for h in self.handles {
            let t = h.join().unwrap();
            all.udp_sent += t.udp_sent;
            all.udp_lost += t.udp_lost;
            all.new_flows += t.new_flows;
            all.new_flows_failed += t.new_flows_failed;
            all.failures.extend(t.failures);
            for (name, times) in t.answered_by {
                all.answered_by.entry(name).or_default().extend(times);
            }
        }
        all
    }
}

/// `n` TCP connections to the ClusterIP held open, each with the backend that answered.
fn hold(topo: &Topology, n: usize) -> Vec<(Conversation, String)> {
    topo.client(move || {
        (0..n)
            .map(|_| {
                let mut c = Conversation::open(vip(TCP_PORT)).unwrap();
                let name = c.ask().unwrap();
                (c, name)
            })
            .collect()
    })
}

/// Asks every held connection again: each must answer, from the backend it had.
fn ask_all(
    topo: &Topology,
    held: Vec<(Conversation, String)>,
    when: &str,
) -> Vec<(Conversation, String)> {
    let when = when.to_string();
    topo.client(move || {
        held.into_iter()
            .map(|(mut c, first)| {
                let now = c
                    .ask()
                    .unwrap_or_else(|e| panic!("{when}: a held connection broke: {e:#}"));
                assert_eq!(now, first, "{when}: a held connection moved");
                (c, first)
            })
            .collect()
    })
}

#[test]
fn restart_kill_and_upgrade_under_traffic() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2, 3]))
        .unwrap();
    topo.start_agent(&[]).unwrap();
    let held = hold(&topo, 100);
    let spread: BTreeSet<&String> = held.iter().map(|(_, n)| n).collect();
    assert_eq!(spread.len(), 3, "{spread:?}");
    let watcher = Watcher::start(topo.bpffs(), 2, Forbidden::default());
    let traffic = Traffic::start(&topo.client);
    let pause = || std::thread::sleep(Duration::from_secs(1));
    pause();

    // kill -9: no cleanup, the pinned programs and maps keep forwarding.
    topo.kill_agent().unwrap();
    pause();
    let held = ask_all(&topo, held, "agent killed");
    topo.start_agent(&[]).unwrap();
    pause();
    let held = ask_all(&topo, held, "after the restart");

    // Upgrade: SIGTERM, then another binary file (its programs are loaded anew and swapped
    // into the pinned links; the maps are adopted).
    let program_ids = |t: &Topology| -> Vec<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&t.lbctl(&["status", "-o", "json"]).unwrap()).unwrap();
        let mut ids: Vec<u64> = status["programs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        ids.sort();
        ids
    };
    let before_upgrade = program_ids(&topo);
    topo.stop_agent().unwrap();
    let upgraded = topo.dir.join("lb-agent-upgraded");
    std::fs::copy(lb_tests::sibling_binary("lb-agent"), &upgraded).unwrap();
    topo.agent_binary = Some(upgraded);
    pause();
    topo.start_agent(&[]).unwrap();
    pause();
    let held = ask_all(&topo, held, "after the upgrade");
    // The programs now attached are the new process's (new ids), swapped in under traffic;
    // the old ones are gone.
    let after_upgrade = program_ids(&topo);
    assert!(!after_upgrade.is_empty());
    assert!(
        after_upgrade.iter().all(|id| !before_upgrade.contains(id)),
        "programs not replaced: {before_upgrade:?} → {after_upgrade:?}"
    );

    let tally = traffic.finish();
    let (samples, problems) = watcher.finish();
    println!(
        "restart: {} held connections all answered; UDP {} sent, {} lost; {} new flows, {} failed; {samples} map samples",
        held.len(),
        tally.udp_sent,
        tally.udp_lost,
        tally.new_flows,
        tally.new_flows_failed
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(samples > 200, "only {samples} samples");
    assert_eq!(tally.udp_lost, 0, "UDP datagrams lost across the restarts");
    assert_eq!(tally.new_flows_failed, 0, "{:?}", tally.failures);
    assert!(tally.udp_sent > 500 && tally.new_flows > 200, "{tally:?}");
    let log = topo.agent_log();
    assert!(log.contains("lb-agent ready"), "{log}");
}

/// The config of the churn: backends `present` of 1..=4.
fn churn_yaml(present: &BTreeSet<usize>) -> String {
    Topology::service_yaml(&present.iter().copied().collect::<Vec<_>>())
}

#[test]
fn a_thousand_endpoint_changes_under_load() {
    let mut topo = Topology::new(4).unwrap();
    let mut present: BTreeSet<usize> = [1, 2, 3, 4].into();
    topo.write_config(&churn_yaml(&present)).unwrap();
    topo.start_agent(&["--reload-interval-ms", "5"]).unwrap();
    // Connections held to every backend, backend-4 among them.
    let held = hold(&topo, 40);
    let forbidden = Forbidden::default();
    let watcher = Watcher::start(topo.bpffs(), 2, forbidden.clone());
    let traffic = Traffic::start(&topo.client);
    std::thread::sleep(Duration::from_millis(300));

    // Operation 1: backend-4 (the canary) leaves for good; its connections are ended.
    present.remove(&4);
    topo.write_config(&churn_yaml(&present)).unwrap();
    let applied = |t: &Topology| !t.lbctl(&["services"]).unwrap().contains("10.0.4.2");
    topo.wait_until(Duration::from_secs(5), "backend-4 removed", applied)
        .unwrap();
    let removed_at = Instant::now();
    forbidden.lock().unwrap().insert(Ipv4Addr::new(10, 0, 4, 2));
    let held: Vec<_> = held
        .into_iter()
        .filter(|(_, name)| name != "backend-4")
        .collect();

    // Operations 2..=1000: backends 1-3 leave and come back, one at a time, at least one left.
    let mut ops = 1;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    while ops < 1000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let b = 1 + (rng % 3) as usize;
        if present.contains(&b) {
            if present.len() == 1 {
                continue;
            }
            present.remove(&b);
        } else {
            present.insert(b);
        }
        // One operation, applied before the next (the agent polls the file every 5 ms).
        let before = topo.agent_log().matches(" applied in ").count();
        topo.write_config(&churn_yaml(&present)).unwrap();
        ops += 1;
        let deadline = Instant::now() + Duration::from_secs(5);
        while topo.agent_log().matches(" applied in ").count() <= before {
            assert!(Instant::now() < deadline, "operation {ops} not applied");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let churn = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.finish();
    let (samples, problems) = watcher.finish();
    let reloads = topo.agent_log().matches(" applied in ").count();
    // Held connections to backends 1-3 (removed and re-added meanwhile) still answer: TCP
    // conntrack entries outlive an endpoint's removal, as with kube-proxy.
    let held = topo.client(move || {
        held.into_iter()
            .filter_map(|(mut c, first)| c.ask().ok().map(|now| (now, first)))
            .collect::<Vec<_>>()
    });
    let late_canary = tally
        .answered_by
        .get("backend-4")
        .map(|times| times.iter().filter(|t| **t > removed_at).count())
        .unwrap_or(0);
    println!(
        "churn: {ops} endpoint operations in {:.1} s, {reloads} reloads applied; {} new flows ({} failed), by backend {:?}; UDP {} sent, {} lost; {} held connections answered; {samples} map samples",
        churn.as_secs_f64(),
        tally.new_flows,
        tally.new_flows_failed,
        tally
            .answered_by
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<BTreeMap<_, _>>(),
        tally.udp_sent,
        tally.udp_lost,
        held.len()
    );
    assert_eq!(
        late_canary, 0,
        "new flows reached backend-4 after its removal"
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(samples > 500, "only {samples} samples");
    assert_eq!(tally.new_flows_failed, 0, "{:?}", tally.failures);
    assert!(reloads >= 1000, "the agent applied only {reloads} reloads");
    assert_eq!(tally.udp_lost, 0, "UDP datagrams lost during the churn");
    assert!(held.iter().all(|(now, first)| now == first), "{held:?}");
}
