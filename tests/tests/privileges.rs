//! Least privilege: the agent runs the packet path with only the capabilities it documents
//! (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_NET_RAW; CAP_SYS_ADMIN only for socket balancing),
//! every other one dropped from its bounding set (setpriv), and refuses to start naming a
//! capability it lacks.

use std::{net::SocketAddr, time::Duration};

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology};

const DOCUMENTED: &str = "-all,+bpf,+net_admin,+perfmon,+net_raw";

fn limited(caps: &str) -> Vec<String> {
    ["setpriv", "--bounding-set", caps, "--"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn the_agent_runs_with_only_its_documented_capabilities() {
    let mut topo = Topology::new(2).unwrap();
    topo.write_config(&Topology::service_yaml(&[1, 2])).unwrap();
    topo.agent_prefix = limited(DOCUMENTED);
    topo.start_agent(&[]).unwrap();
    let pid = topo.agent_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let allowed: u64 = [39, 12, 38, 13].iter().map(|b| 1u64 << b).sum();
    println!("agent CapEff {eff:#x}");
    assert_eq!(
        eff, allowed,
        "the agent holds more than its documented capabilities"
    );
    let names = topo.client(|| {
        (0..20)
            .map(|_| {
                Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))
                    .and_then(|mut c| c.ask())
                    .unwrap()
            })
            .collect::<std::collections::BTreeSet<String>>()
    });
    assert_eq!(names.len(), 2, "{names:?}");
    // A reload under the same limits.
    topo.write_config(&Topology::service_yaml(&[1])).unwrap();
    topo.wait_until(Duration::from_secs(5), "the reload", |t| {
        t.agent_log().matches(" applied in ").count() >= 2
    })
    .unwrap();
    drop(topo.stop_agent());
}

#[test]
fn a_missing_capability_is_named() {
    for (caps, missing) in [
        ("-all,+net_admin,+perfmon,+net_raw", "CAP_BPF"),
        ("-all,+bpf,+perfmon,+net_raw", "CAP_NET_ADMIN"),
    ] {
        let mut topo = Topology::new(1).unwrap();
        topo.write_config(&Topology::service_yaml(&[1])).unwrap();
        topo.agent_prefix = limited(caps);
        let e = topo.start_agent(&[]).unwrap_err();
        let log = topo.agent_log();
        println!("{caps}: {}", log.lines().last().unwrap_or(""));
        assert!(
            log.contains("missing capabilities") && log.contains(missing),
            "{caps}: {e:#}\n{log}"
        );
        // Socket balancing needs CAP_SYS_ADMIN too.
        if missing == "CAP_BPF" {
            let mut topo = Topology::new(1).unwrap();
            topo.write_config(&Topology::service_yaml(&[1])).unwrap();
            topo.agent_prefix = limited(DOCUMENTED);
            let cgroup = topo.test_cgroup().unwrap().display().to_string();
            assert!(topo.start_agent(&["--cgroup", &cgroup]).is_err());
            assert!(
                topo.agent_log().contains("CAP_SYS_ADMIN"),
                "{}",
                topo.agent_log()
            );
        }
    }
}
