//! Conntrack through BPF_PROG_TEST_RUN on both hooks: flows that would clash at a shared backend
//! get their own source port, entries age by state (in the datapath without the agent, and by the
//! agent's sweeper), a reply entry the LRU dropped is restored, and ClientIP affinity entries go
//! with their backend.

use std::{net::Ipv4Addr, thread::sleep, time::Duration};

use lb_common::{CtKey, CtTimeouts, IPPROTO_TCP, ipv4_to_wire};
use lb_tests::{
    frames::{Frame, TCP_ACK, TCP_SYN, verify_checksums},
    lab::{CLIENT, XdpLab},
    testrun::*,
};

const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const TRIO: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 1, 2),
    Ipv4Addr::new(10, 0, 2, 2),
    Ipv4Addr::new(10, 0, 3, 2),
];

fn lab(timeouts: CtTimeouts) -> XdpLab {
    let mut lab = XdpLab::new(lab_options(timeouts)).expect("lab");
    lab.apply_yaml(&config(&TRIO)).expect("config");
    lab
}

/// Two Services sharing BACKEND, and a ClientIP-affinity Service over `sticky`.
fn config(sticky: &[Ipv4Addr]) -> String {
    [
        service("a", VIP_A, &[BACKEND]),
        service("b", VIP_B, &[BACKEND]),
        service("sticky", STICKY, sticky).replacen(
            "spec:\n",
            "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
            1,
        ),
    ]
    .concat()
}

fn expect(lab: &mut XdpLab, hook: Hook, input: &Frame, verdict: Verdict, output: &Frame) {
    let ingress = if input.dst_mac == lb_tests::lab::BACKEND_IF_MAC {
        lab.backend_ifindex
    } else {
        lab.client_ifindex
    };
    let run = hook.run(lab, &input.bytes(), ingress);
    assert_eq!(run.verdict, hook.code(verdict), "{hook:?}: verdict");
    assert_eq!(
        hex(&run.output),
        hex(&output.bytes()),
        "{hook:?}: output frame"
    );
    verify_checksums(&run.output).expect("checksums");
}

/// Many client ports, each to both frontends: every second flow clashes and gets a port of its
/// own. (The ports tried once came from the client address and frontend alone, so after four
/// such flows all four were taken and the next was left to the kernel, which has no route to a
/// ClusterIP: ENETUNREACH, seen on the two-node cluster under load.)
#[test]
fn clashing_flows_from_many_client_ports_all_get_a_port() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut lab = lab(CtTimeouts::DEFAULT);
        let mut ports = std::collections::BTreeSet::new();
        for client_port in 41000..41040 {
            let to_a = from_client(Frame::tcp((CLIENT, client_port), (VIP_A, 80), TCP_SYN));
            expect(&mut lab, hook, &to_a, Redirect, &dnat(&to_a, BACKEND, 8080));
            let to_b = from_client(Frame::tcp((CLIENT, client_port), (VIP_B, 80), TCP_SYN));
            let i = lab.client_ifindex;
            let run = hook.run(&mut lab, &to_b.bytes(), i);
            assert_eq!(
                run.verdict,
                hook.code(Redirect),
                "{hook:?}: client port {client_port}"
            );
            let port = u16::from_be_bytes([run.output[34], run.output[35]]);
            assert!(ports.insert(port), "{hook:?}: port {port} handed out twice");
        }
    }
}

/// The same client address and port to two frontends that share a backend: without care both
/// flows reach the backend as the same 5-tuple and the second overwrites the first's reply
/// entry. The second gets another source port; each direction is translated back correctly.
#[test]
fn flows_that_would_clash_at_a_shared_backend_get_their_own_port() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut lab = lab(CtTimeouts::DEFAULT);
        let to_a = from_client(Frame::tcp((CLIENT, 40000), (VIP_A, 80), TCP_SYN));
        expect(&mut lab, hook, &to_a, Redirect, &dnat(&to_a, BACKEND, 8080));

        let to_b = from_client(Frame::tcp((CLIENT, 40000), (VIP_B, 80), TCP_SYN));
        let run = {
            let i = lab.client_ifindex;
            hook.run(&mut lab, &to_b.bytes(), i)
        };
        assert_eq!(run.verdict, hook.code(Redirect));
        let port = u16::from_be_bytes([run.output[34], run.output[35]]);
        assert_ne!(
            port, 40000,
            "{hook:?}: the second flow kept the clashing port"
        );
        assert!(port >= 32768, "{hook:?}: port {port}");
        let moved = |f: &Frame| Frame {
            sport: port,
            ..dnat(f, BACKEND, 8080)
        };
        assert_eq!(hex(&run.output), hex(&moved(&to_b).bytes()), "{hook:?}");

        // Replies go back to their own frontend, the second to the client's own port.
        let reply_a = from_backend(Frame::tcp(
            (BACKEND, 8080),
            (CLIENT, 40000),
            TCP_SYN | TCP_ACK,
        ));
        expect(
            &mut lab,
            hook,
            &reply_a,
            Redirect,
            &rev_nat(&reply_a, VIP_A, 80),
        );
        let reply_b = from_backend(Frame::tcp(
            (BACKEND, 8080),
            (CLIENT, port),
            TCP_SYN | TCP_ACK,
        ));
        let back = Frame {
            dport: 40000,
            ..rev_nat(&reply_b, VIP_B, 80)
        };
        expect(&mut lab, hook, &reply_b, Redirect, &back);
        // Later packets of the second flow keep the port.
        let ack_b = from_client(Frame::tcp((CLIENT, 40000), (VIP_B, 80), TCP_ACK));
        expect(&mut lab, hook, &ack_b, Redirect, &moved(&ack_b));
        let ct = lab.maps().ct_counters().unwrap();
        assert_eq!(ct.clash_ports, 1, "{hook:?}: {ct:?}");
    }
}

fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> CtKey {
    CtKey {
        src_addr: ipv4_to_wire(src.0.octets()),
        dst_addr: ipv4_to_wire(dst.0.octets()),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// UDP single datagrams expire after 1 s here, UDP streams (a reply seen) after 4 s. A packet
/// finds its expired entry itself (no agent needed) and starts a new flow; the agent's sweeper
/// removes entries no packet comes back for.
#[test]
fn entries_age_by_state() {
    let timeouts = CtTimeouts {
        udp: 1,
        udp_stream: 4,
        ..CtTimeouts::DEFAULT
    };
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut lab = lab(timeouts);
        let single = from_client(Frame::udp((CLIENT, 5000), (VIP_A, 53)));
        let stream = from_client(Frame::udp((CLIENT, 5001), (VIP_A, 53)));
        let stream_reply = from_backend(Frame::udp((BACKEND, 8053), (CLIENT, 5001)));
        expect(
            &mut lab,
            hook,
            &single,
            Redirect,
            &dnat(&single, BACKEND, 8053),
        );
        expect(
            &mut lab,
            hook,
            &stream,
            Redirect,
            &dnat(&stream, BACKEND, 8053),
        );
        expect(
            &mut lab,
            hook,
            &stream_reply,
            Redirect,
            &rev_nat(&stream_reply, VIP_A, 53),
        );
        sleep(Duration::from_millis(2200));
        // The single datagram's entry has expired: the datapath drops it and starts over.
        expect(
            &mut lab,
            hook,
            &single,
            Redirect,
            &dnat(&single, BACKEND, 8053),
        );
        let ct = lab.maps().ct_counters().unwrap();
        assert_eq!(ct.expired, 1, "{hook:?}: {ct:?}");
        // The stream is younger than its 4 s: nothing for the sweeper yet.
        let sweep = |lab: &mut XdpLab| {
            let maps = lab.maps.as_mut().unwrap();
            maps.sweep_conntrack(&timeouts).unwrap()
        };
        assert_eq!(sweep(&mut lab), 0, "{hook:?}: swept a live entry");
        let stream_key = ct_key((CLIENT, 5001), (VIP_A, 53), lb_common::IPPROTO_UDP);
        assert!(lab.maps().conntrack.get(&stream_key, 0).is_ok());
        sleep(Duration::from_millis(3500));
        // Now everything is past its time: both flows, both directions.
        assert_eq!(sweep(&mut lab), 4, "{hook:?}: not all four entries swept");
        assert_eq!(lab.maps().conntrack.keys().count(), 0);
    }
}

/// A reply entry the LRU evicted is restored from the forward entry on the flow's next packet
/// after a second (the refresh), so the replies after it are translated again.
#[test]
fn evicted_reply_entry_is_restored() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut lab = lab(CtTimeouts::DEFAULT);
        let syn = from_client(Frame::tcp((CLIENT, 41000), (VIP_A, 80), TCP_SYN));
        expect(&mut lab, hook, &syn, Redirect, &dnat(&syn, BACKEND, 8080));
        let reply_key = ct_key((BACKEND, 8080), (CLIENT, 41000), IPPROTO_TCP);
        lab.maps
            .as_mut()
            .unwrap()
            .conntrack
            .remove(&reply_key)
            .unwrap();
        let reply = from_backend(Frame::tcp(
            (BACKEND, 8080),
            (CLIENT, 41000),
            TCP_SYN | TCP_ACK,
        ));
        // Without its entry the reply is not ours.
        expect(&mut lab, hook, &reply, Pass, &reply);
        sleep(Duration::from_millis(1100));
        let ack = from_client(Frame::tcp((CLIENT, 41000), (VIP_A, 80), TCP_ACK));
        expect(&mut lab, hook, &ack, Redirect, &dnat(&ack, BACKEND, 8080));
        expect(
            &mut lab,
            hook,
            &reply,
            Redirect,
            &rev_nat(&reply, VIP_A, 80),
        );
        let ct = lab.maps().ct_counters().unwrap();
        assert_eq!(ct.reply_restored, 1, "{hook:?}: {ct:?}");
    }
}

/// ClientIP affinity entries pointing at a backend that left the Service are dropped when the
/// change is applied (backend ids are reused, so a stale entry could steer a client elsewhere).
#[test]
fn affinity_entries_leave_with_their_backend() {
    let mut lab = lab(CtTimeouts::DEFAULT);
    let syn = from_client(Frame::tcp((CLIENT, 42000), (STICKY, 80), TCP_SYN));
    let run = {
        let i = lab.client_ifindex;
        Hook::Tc.run(&mut lab, &syn.bytes(), i)
    };
    assert_eq!(run.verdict, Hook::Tc.code(Redirect));
    let chosen = Ipv4Addr::new(
        run.output[30],
        run.output[31],
        run.output[32],
        run.output[33],
    );
    assert_eq!(lab.maps().affinity.keys().count(), 1);
    let rest: Vec<Ipv4Addr> = TRIO.iter().copied().filter(|a| *a != chosen).collect();
    lab.apply_yaml(&config(&rest)).expect("config");
    assert_eq!(
        lab.maps().affinity.keys().count(),
        0,
        "affinity entry of the removed backend {chosen} is still there"
    );
    // Removing another backend keeps entries that still point at a live one.
    let next = from_client(Frame::tcp((CLIENT, 42001), (STICKY, 80), TCP_SYN));
    let run = {
        let i = lab.client_ifindex;
        Hook::Tc.run(&mut lab, &next.bytes(), i)
    };
    let now = Ipv4Addr::new(
        run.output[30],
        run.output[31],
        run.output[32],
        run.output[33],
    );
    assert!(rest.contains(&now));
    let other: Vec<Ipv4Addr> = rest.iter().copied().filter(|a| *a == now).collect();
    lab.apply_yaml(&config(&other)).expect("config");
    assert_eq!(lab.maps().affinity.keys().count(), 1);
}
