//! `lbctl trace` on a running node: frames through the attached programs against the live maps,
//! every decision kind explained, the prediction checked against a real connection from the same
//! 5-tuple, and every pinned map (entries, timestamps, counters) byte-for-byte unchanged after
//! all the traces.

use std::{net::SocketAddr, process::Command, time::Duration};

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT, dump_raw, sibling_binary};
use serde_json::Value;

const STICKY: &str = "10.96.0.11";
const LB_IP: &str = "192.168.30.60";

fn config() -> String {
    let sticky = Topology::service_yaml(&[1, 2, 3])
        .replace("name: echo", "name: sticky")
        .replace("echo-1", "sticky-1")
        .replace("service-name: echo", "service-name: sticky")
        .replace(&CLUSTER_IP.to_string(), STICKY)
        .replacen(
            "spec:\n",
            "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
            1,
        );
    let guarded = Topology::service_yaml(&[1])
        .replace("name: echo", "name: guarded")
        .replace("echo-1", "guarded-1")
        .replace("service-name: echo", "service-name: guarded")
        .replace(&CLUSTER_IP.to_string(), "10.96.0.12")
        .replacen(
            "spec:\n",
            "spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/30]\n",
            1,
        );
    format!(
        "{}\n---\n{sticky}\n---\n{guarded}\n---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: lan}}\nspec: {{blocks: [{{cidr: {LB_IP}/32}}]}}\n---\n\
         apiVersion: lb.xdp.rs/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {{name: all}}\nspec: {{loadBalancerIPs: true, interfaces: [\"^c0$\"]}}\n",
        Topology::service_yaml(&[1, 2, 3])
    )
}

/// `lbctl ARGS` in the node's namespace (trace needs its interfaces).
fn lbctl_in_node(topo: &Topology, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &topo.node])
        .arg(sibling_binary("lbctl"))
        .arg("--bpffs")
        .arg(topo.bpffs())
        .arg("--state-dir")
        .arg(topo.state_dir())
        .args(args)
        .output()
        .unwrap()
}

/// `lbctl trace ARGS -o json` in the node's namespace.
fn trace(topo: &Topology, args: &[&str]) -> Value {
    let args = [&["trace"], args, &["--iface", "c0", "-o", "json"]].concat();
    let out = lbctl_in_node(topo, &args);
    assert!(
        out.status.success(),
        "lbctl trace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!(
        "trace {args:?}: {} by {} → {}",
        v["verdict"], v["explanation"]["decided_by"], v["explanation"]["backend"]
    );
    assert_eq!(v["consistent"], true, "{v:#}");
    v
}

#[test]
fn trace_explains_every_decision_and_changes_nothing() {
    let mut topo = Topology::new(3).unwrap();
    topo.write_config(&config()).unwrap();
    topo.start_agent(&[]).unwrap();
    let vip = |port| SocketAddr::from((CLUSTER_IP, port));
    // Live state for the traces to read: an open connection, a UDP flow, an affinity entry.
    let (mut held, held_port, sticky_name) = topo.client(move || {
        let mut c = Conversation::open(vip(TCP_PORT)).unwrap();
        c.ask().unwrap();
        lb_tests::udp_ask(vip(UDP_PORT)).unwrap();
        let sticky = Conversation::open(SocketAddr::from(([10, 96, 0, 11], TCP_PORT)))
            .and_then(|mut s| s.ask())
            .unwrap();
        let port = c.local().unwrap().port();
        (c, port, sticky)
    });
    let held_backend = held.ask().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = dump_raw(&topo.bpffs());
    assert!(!before["LB_CONNTRACK"].is_empty() && !before["LB_AFFINITY"].is_empty());

    // The table form, as an operator reads it.
    let text = lbctl_in_node(
        &topo,
        &["trace", "--src", "10.0.0.1:45000", "--dst", "10.96.0.10:80"],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(
        text.contains("decided by: maglev") && text.contains("slot"),
        "{text}"
    );
    // A new connection: Maglev decides.
    let new = trace(
        &topo,
        &["--src", "10.0.0.1:45000", "--dst", "10.96.0.10:80"],
    );
    assert_eq!(new["explanation"]["decided_by"], "maglev", "{new:#}");
    assert!(new["explanation"]["maglev"]["slot"].is_u64());
    assert_eq!(new["explanation"]["frontend"], "10.96.0.10:80/TCP");
    let predicted = new["explanation"]["backend"].as_str().unwrap().to_string();
    let out = &new["steps"].as_array().unwrap().last().unwrap()["output"];
    assert_eq!(out["dst"], predicted.as_str(), "{new:#}");
    assert_eq!(out["src"], "10.0.0.1:45000");
    // An open connection's next packet: conntrack decides, its own backend.
    let open = trace(
        &topo,
        &[
            "--src",
            &format!("10.0.0.1:{held_port}"),
            "--dst",
            "10.96.0.10:80",
            "--flags",
            "ack",
        ],
    );
    assert_eq!(open["explanation"]["decided_by"], "conntrack", "{open:#}");
    let n = held_backend.trim_start_matches("backend-");
    assert_eq!(
        open["explanation"]["backend"],
        format!("10.0.{n}.2:8080"),
        "{open:#}"
    );
    // UDP, affinity, not ours, source ranges, ARP.
    let udp = trace(
        &topo,
        &[
            "--src",
            "10.0.0.1:5353",
            "--dst",
            "10.96.0.10:53",
            "--proto",
            "udp",
        ],
    );
    assert_eq!(udp["explanation"]["decided_by"], "maglev");
    let sticky = trace(
        &topo,
        &["--src", "10.0.0.1:45001", "--dst", "10.96.0.11:80"],
    );
    assert_eq!(
        sticky["explanation"]["decided_by"], "affinity",
        "{sticky:#}"
    );
    let n = sticky_name.trim_start_matches("backend-");
    assert_eq!(sticky["explanation"]["backend"], format!("10.0.{n}.2:8080"));
    let foreign = trace(
        &topo,
        &["--src", "10.0.0.1:45002", "--dst", "10.0.1.2:8080"],
    );
    assert_eq!(foreign["verdict"], "pass");
    assert!(
        foreign["explanation"]["decided_by"]
            .as_str()
            .unwrap()
            .starts_with("not ours")
    );
    let denied = trace(
        &topo,
        &["--src", "10.0.0.9:45003", "--dst", &format!("{LB_IP}:80")],
    );
    assert_eq!(
        denied["explanation"]["decided_by"], "source ranges",
        "{denied:#}"
    );
    assert_eq!(denied["verdict"], "drop");
    let admitted = trace(
        &topo,
        &["--src", "10.0.0.1:45003", "--dst", &format!("{LB_IP}:80")],
    );
    assert_eq!(
        admitted["explanation"]["backend"], "10.0.1.2:8080",
        "{admitted:#}"
    );
    let arp = trace(&topo, &["arp", "--who-has", LB_IP]);
    let out = &arp["steps"].as_array().unwrap().last().unwrap()["output"];
    assert_eq!(out["kind"], "ARP reply", "{arp:#}");
    let other = trace(&topo, &["arp", "--who-has", "192.168.30.61"]);
    assert_eq!(other["verdict"], "pass", "{other:#}");
    assert!(other["steps"][0]["output"].is_null());

    // Nothing changed: entries, timestamps, counters, reply counts.
    let after = dump_raw(&topo.bpffs());
    for (name, entries) in &before {
        assert!(
            after[name] == *entries,
            "{name} changed after the traces ({} entries before, {} after)",
            entries.len(),
            after[name].len()
        );
    }

    // The prediction is what happens: a real connection from the traced 5-tuple.
    let real = topo.client(move || connect_from(45000, vip(TCP_PORT)));
    assert_eq!(
        real, predicted,
        "the traced backend and the real one differ"
    );
    assert_eq!(held.ask().unwrap(), held_backend);
}

/// Connects from client port `port` and returns the `ip:port` of the backend that answered.
fn connect_from(port: u16, to: SocketAddr) -> String {
    let name = {
        // SAFETY: a plain IPv4 TCP socket bound to `port` before connecting.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip),
            },
            sin_zero: [0; 8],
        };
        let local = addr([10, 0, 0, 1], port);
        let SocketAddr::V4(to4) = to else {
            unreachable!()
        };
        let remote = addr(to4.ip().octets(), to4.port());
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const _,
                4,
            );
            assert_eq!(
                libc::bind(fd, &local as *const _ as *const _, len),
                0,
                "bind"
            );
            assert_eq!(
                libc::connect(fd, &remote as *const _ as *const _, len),
                0,
                "connect: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the connected descriptor, owned from here on.
        let stream: std::net::TcpStream = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        std::io::Write::write_all(&mut &stream, b"who\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        line.trim().to_string()
    };
    let n = name.trim_start_matches("backend-");
    format!("10.0.{n}.2:8080")
}
