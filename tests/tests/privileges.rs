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

/// lbctl opens the pinned maps read-only: it reads every map with no write permission on the
/// pins (mode 0444, CAP_DAC_OVERRIDE dropped) and the kernel refuses updates through its
/// descriptors.
#[test]
fn lbctl_opens_the_maps_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let mut topo = Topology::new(1).unwrap();
    topo.write_config(&Topology::service_yaml(&[1])).unwrap();
    topo.start_agent(&[]).unwrap();
    topo.client(|| {
        Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))
            .and_then(|mut c| c.ask())
            .unwrap()
    });
    let pins: Vec<_> = std::fs::read_dir(topo.bpffs())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("LB_"))
        .collect();
    assert!(pins.len() >= 10, "{pins:?}");
    let modes: Vec<_> = pins
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().permissions())
        .collect();
    for p in &pins {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
    }

    // The writable open a reader must not do fails here; the read-only one works.
    let map = pins
        .iter()
        .find(|p| p.ends_with(lb_common::map_names::FRONTENDS))
        .unwrap()
        .clone();
    let (writable, read_only) = std::thread::spawn(move || {
        drop_dac_override();
        (
            aya::maps::MapData::from_pin(&map).map(|_| ()),
            lb_userspace::maps::open_pinned(&map, false).map(|_| ()),
        )
    })
    .join()
    .unwrap();
    assert!(writable.is_err(), "the pin is not protected: {writable:?}");
    read_only.unwrap();

    let lbctl = lb_tests::sibling_binary("lbctl");
    for args in [
        &["services"][..],
        &["stats", "-o", "json"],
        &["conntrack"],
        &["maglev", &format!("{CLUSTER_IP}:{TCP_PORT}/tcp")],
        &["arp"],
    ] {
        let out = std::process::Command::new("setpriv")
            .args(["--bounding-set", "-all,+bpf,+perfmon", "--"])
            .arg(&lbctl)
            .arg("--bpffs")
            .arg(topo.bpffs())
            .arg("--state-dir")
            .arg(topo.state_dir())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lbctl {args:?} without write permission: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (p, mode) in pins.iter().zip(modes) {
        std::fs::set_permissions(p, mode).unwrap();
    }

    // Updates through a read-only descriptor are refused by the kernel.
    let maps = lb_userspace::maps::PinnedMaps::open(&topo.bpffs(), false).unwrap();
    let mut frontends = maps.frontends;
    // A read-only reader sees the same Maglev slots as the agent's shared mapping.
    let writable = lb_userspace::maps::PinnedMaps::open(&topo.bpffs(), true).unwrap();
    for (offset, len) in [(0, 70_000), (1, 1000), (65_536, 3)] {
        assert_eq!(
            maps.maglev.read(offset, len).unwrap(),
            writable.maglev.read(offset, len).unwrap(),
            "slots {offset}+{len}"
        );
    }
    assert!(maps.maglev.read(0, 70_000).unwrap().iter().any(|&b| b != 0));
    let (key, value) = frontends.iter().next().unwrap().unwrap();
    let e = frontends.insert(key, value, 0).unwrap_err();
    println!("insert through a read-only fd: {e}");
    drop(topo.stop_agent());
}

/// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this thread's effective set (capset is
/// per thread), so file modes apply to it as to any user.
fn drop_dac_override() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and two data words, this thread only.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !((1 << 1) | (1 << 2));
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
    }
}
