//! Table-driven BPF_PROG_TEST_RUN cases: the real programs (XDP `lb` and tc `lb_tc`) over their
//! own maps, input frame → verdict + exact output bytes. Expected frames are built from scratch
//! by pnet (full checksums, not incremental ones), so a byte-equal output also proves the
//! datapath's checksums. Each table runs on both hooks in a fresh lab.

use std::net::Ipv4Addr;

use lb_common::{ArpKey, FrontendKey, hash::flow_hash, ipv4_to_wire};
use lb_tests::{
    frames::{Frame, L4, TCP_ACK, TCP_RST, TCP_SYN, arp_reply, arp_request, verify_checksums},
    lab::{BACKEND_IF_MAC, CLIENT, CLIENT_IF_MAC, CLIENT_MAC, XdpLab, backend_mac},
    sh,
    testrun::*,
};
use lb_userspace::datapath::Options;

const XDP_REDIRECT: u32 = 4;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TRIO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LONELY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const GUARDED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const GUARDED_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 60);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const M: u32 = 251;

fn options() -> Options {
    lab_options(lb_common::CtTimeouts::DEFAULT)
}

fn lab() -> XdpLab {
    let mut lab = XdpLab::new(options()).expect("lab");
    let yaml = [
        service("echo", VIP, &[BACKEND]),
        service(
            "trio",
            TRIO_VIP,
            &[
                Ipv4Addr::new(10, 0, 1, 2),
                Ipv4Addr::new(10, 0, 2, 2),
                Ipv4Addr::new(10, 0, 3, 2),
            ],
        ),
        service("lonely", LONELY_VIP, &[UNRESOLVED_BACKEND]),
        // No endpoints at all.
        service("empty", EMPTY_VIP, &[]),
        // LoadBalancer with loadBalancerSourceRanges admitting 10.0.0.0/30 only.
        "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: pool}\nspec: {blocks: [{cidr: 192.168.30.60/32}]}\n---\n".into(),
        service("guarded", GUARDED_VIP, &[BACKEND]).replacen(
            "spec:\n",
            "spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/30]\n",
            1,
        ),
        // sessionAffinity: ClientIP over three backends.
        service("sticky", STICKY_VIP, &[Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 3, 2)])
            .replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n", 1),
    ]
    .concat();
    lab.apply_yaml(&yaml).expect("apply config");
    // No neighbour entry: bpf_fib_lookup cannot resolve this backend's MAC.
    sh(&format!(
        "ip -n {} neigh del {UNRESOLVED_BACKEND} dev bk",
        lab.ns
    ))
    .expect("neigh del");
    lab
}

fn with_udp_zero_checksum(mut f: Frame) -> Frame {
    f.l4 = L4::Udp {
        zero_checksum: true,
    };
    f
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    from_backend: bool,
    verdict: Verdict,
    /// None: the output must equal the input.
    output: Option<Vec<u8>>,
}

fn case(name: &'static str, input: &Frame, verdict: Verdict, output: Option<&Frame>) -> Case {
    let from_backend = input.dst_mac == BACKEND_IF_MAC;
    Case {
        name,
        input: input.bytes(),
        from_backend,
        verdict,
        output: output.map(Frame::bytes),
    }
}

fn raw(name: &'static str, input: Vec<u8>) -> Case {
    Case {
        name,
        input,
        from_backend: false,
        verdict: Pass,
        output: None,
    }
}

#[test]
fn test_run_cases_xdp() {
    test_run_cases(Hook::Xdp);
}

#[test]
fn test_run_cases_tc() {
    test_run_cases(Hook::Tc);
}

fn test_run_cases(hook: Hook) {
    let mut lab = lab();

    let syn = from_client(Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let syn_ack = from_backend(Frame::tcp(
        (BACKEND, 8080),
        (CLIENT, 40000),
        TCP_SYN | TCP_ACK,
    ));
    let ack = from_client(Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK));
    let udp = from_client(Frame::udp((CLIENT, 5353), (VIP, 53)));
    let udp_reply = from_backend(Frame::udp((BACKEND, 8053), (CLIENT, 5353)));
    let udp_zero = with_udp_zero_checksum(from_client(Frame::udp((CLIENT, 5454), (VIP, 53))));
    let udp_zero_reply =
        with_udp_zero_checksum(from_backend(Frame::udp((BACKEND, 8053), (CLIENT, 5454))));
    let mut ttl1 = from_client(Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_SYN));
    ttl1.ttl = 1;
    let lonely = from_client(Frame::tcp((CLIENT, 40002), (LONELY_VIP, 80), TCP_SYN));

    let mut cases = vec![
        case(
            "TCP SYN to a ClusterIP: DNAT to the backend, out of bk",
            &syn,
            Redirect,
            Some(&dnat(&syn, BACKEND, 8080)),
        ),
        case(
            "SYN-ACK from the backend: reverse NAT to the ClusterIP, out of cl",
            &syn_ack,
            Redirect,
            Some(&rev_nat(&syn_ack, VIP, 80)),
        ),
        case(
            "ACK of the same flow: conntrack hit, same backend",
            &ack,
            Redirect,
            Some(&dnat(&ack, BACKEND, 8080)),
        ),
        case(
            "UDP with a checksum: DNAT",
            &udp,
            Redirect,
            Some(&dnat(&udp, BACKEND, 8053)),
        ),
        case(
            "UDP reply: reverse NAT",
            &udp_reply,
            Redirect,
            Some(&rev_nat(&udp_reply, VIP, 53)),
        ),
        case(
            "UDP with checksum 0: DNAT, checksum stays 0",
            &udp_zero,
            Redirect,
            Some(&dnat(&udp_zero, BACKEND, 8053)),
        ),
        case(
            "UDP reply with checksum 0: reverse NAT, stays 0",
            &udp_zero_reply,
            Redirect,
            Some(&rev_nat(&udp_zero_reply, VIP, 53)),
        ),
        case(
            "TTL 1: untouched, left to the kernel to answer",
            &ttl1,
            Pass,
            None,
        ),
        match hook {
            // XDP leaves what it cannot send itself to tc, untouched.
            Hook::Xdp => case(
                "next hop without neighbour entry: untouched, for tc",
                &lonely,
                Pass,
                None,
            ),
            // tc sends it translated with bpf_redirect_neigh: the kernel resolves the neighbour
            // and fills the MACs on the way out (the kernel's forwarding would drop a packet
            // SNATed to the node's own address as a martian).
            Hook::Tc => case(
                "next hop without neighbour entry: translated, out via redirect_neigh",
                &lonely,
                Redirect,
                Some(&Frame {
                    dst: UNRESOLVED_BACKEND,
                    dport: 8080,
                    ttl: lonely.ttl - 1,
                    ..lonely.clone()
                }),
            ),
        },
        case(
            "TCP to a frontend address on another port: untouched",
            &from_client(Frame::tcp((CLIENT, 40000), (VIP, 81), TCP_SYN)),
            Pass,
            None,
        ),
        case(
            "UDP to a TCP-only port: untouched",
            &from_client(Frame::udp((CLIENT, 40000), (VIP, 80))),
            Pass,
            None,
        ),
        case(
            "TCP to a non-service address: untouched",
            &from_client(Frame::tcp((CLIENT, 40000), (BACKEND, 8080), TCP_SYN)),
            Pass,
            None,
        ),
        case(
            "backend traffic without conntrack entry: untouched",
            &from_backend(Frame::tcp(
                (BACKEND, 8080),
                (CLIENT, 41000),
                TCP_SYN | TCP_ACK,
            )),
            Pass,
            None,
        ),
    ];

    // No endpoints: TCP is refused with a RST out of the interface it came in on, UDP dropped.
    let refused = from_client(Frame::tcp((CLIENT, 40010), (EMPTY_VIP, 80), TCP_SYN));
    // The RST the node sends back to the client: no window, no payload, node MAC to client MAC.
    let rst_to_client = |port: u16, flags: u8, seq: u32, ack: u32| Frame {
        seq,
        ack,
        window: 0,
        payload: Vec::new(),
        src_mac: CLIENT_IF_MAC,
        dst_mac: CLIENT_MAC,
        ..Frame::tcp((EMPTY_VIP, 80), (CLIENT, port), flags)
    };
    let rst_ack = rst_to_client(
        40010,
        TCP_RST | TCP_ACK,
        0,
        refused.seq + refused.payload.len() as u32 + 1,
    );
    cases.push(case(
        "SYN to a service without endpoints: RST+ACK back out of its interface",
        &refused,
        Bounce,
        Some(&rst_ack),
    ));
    let stray = from_client(Frame::tcp((CLIENT, 40011), (EMPTY_VIP, 80), TCP_ACK));
    let rst = rst_to_client(40011, TCP_RST, stray.ack, 0);
    cases.push(case(
        "ACK to a service without endpoints: RST with its ack as seq",
        &stray,
        Bounce,
        Some(&rst),
    ));
    let refused_udp = from_client(Frame::udp((CLIENT, 5353), (EMPTY_VIP, 53)));
    cases.push(Case {
        name: "UDP to a service without endpoints: ICMP port unreachable back",
        input: refused_udp.bytes(),
        from_backend: false,
        verdict: Bounce,
        output: Some(icmp_error(&refused_udp.bytes(), 3, 3, 0)),
    });
    // loadBalancerSourceRanges guard the LoadBalancer IP, not the ClusterIP.
    let admitted = from_client(Frame::tcp((CLIENT, 40020), (GUARDED_LB_IP, 80), TCP_SYN));
    cases.push(case(
        "LoadBalancer IP from a listed source: DNAT",
        &admitted,
        Redirect,
        Some(&dnat(&admitted, BACKEND, 8080)),
    ));
    let outsider = Ipv4Addr::new(10, 0, 0, 9);
    cases.push(case(
        "LoadBalancer IP from an unlisted source: dropped",
        &from_client(Frame::tcp((outsider, 40021), (GUARDED_LB_IP, 80), TCP_SYN)),
        Drop,
        None,
    ));
    let inside = from_client(Frame::tcp((outsider, 40022), (GUARDED_VIP, 80), TCP_SYN));
    cases.push(case(
        "ClusterIP of that Service from the same source: DNAT",
        &inside,
        Redirect,
        Some(&dnat(&inside, BACKEND, 8080)),
    ));

    let syn_bytes = syn.bytes();
    let mut truncated = syn_bytes[..14 + 20 + 10].to_vec();
    truncated[14 + 3] = 20 + 10; // IPv4 total length matches the cut
    cases.push(raw("TCP header cut short: untouched", truncated));
    cases.push(raw(
        "Ethernet header only: untouched",
        syn_bytes[..14].to_vec(),
    ));
    cases.push(raw(
        "IPv4 header cut short: untouched",
        syn_bytes[..14 + 12].to_vec(),
    ));
    let mut bad_ihl = syn_bytes.clone();
    bad_ihl[14] = 0x44;
    cases.push(raw("IHL below 5: untouched", bad_ihl));
    let mut not_v4 = syn_bytes.clone();
    not_v4[14] = 0x65;
    cases.push(raw("version 6 inside an IPv4 ethertype: untouched", not_v4));
    // A fragmented datagram: the first fragment is translated like any packet and records its
    // ports; a later one (no L4 header) gets the same backend, addresses only.
    let first_fragment = with_frags(&syn_bytes, 0x2000);
    cases.push(Case {
        name: "first fragment to the frontend: DNAT, ports recorded",
        input: first_fragment,
        from_backend: false,
        verdict: Redirect,
        output: Some(with_frags(&dnat(&syn, BACKEND, 8080).bytes(), 0x2000)),
    });
    let later_fragment = with_frags(&syn_bytes, 0x0010);
    let mut later_out = later_fragment.clone();
    later_out[..6].copy_from_slice(&backend_mac(BACKEND).octets());
    later_out[6..12].copy_from_slice(&BACKEND_IF_MAC.octets());
    later_out[14 + 8] -= 1;
    later_out[14 + 16..14 + 20].copy_from_slice(&BACKEND.octets());
    cases.push(Case {
        name: "later fragment of that datagram: same backend, addresses only",
        input: later_fragment,
        from_backend: false,
        verdict: Redirect,
        output: Some(with_frags(&later_out, 0x0010)),
    });
    let mut stray = with_frags(&syn_bytes, 0x0010);
    stray[14 + 4] ^= 0xff; // another IP id: its first fragment was never seen
    cases.push(raw(
        "later fragment of an unseen datagram: untouched",
        with_frags(&stray, 0x0010),
    ));
    let mut icmp = syn_bytes.clone();
    icmp[14 + 9] = 1;
    cases.push(raw("ICMP to the frontend: untouched", icmp));
    let mut ipv6 = syn_bytes.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(raw("IPv6 ethertype: untouched", ipv6));
    cases.push(raw(
        "ARP request: untouched",
        arp_request(CLIENT_MAC, CLIENT, Ipv4Addr::new(10, 0, 0, 254)),
    ));
    let mut vlan = syn_bytes.clone();
    vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    cases.push(raw("802.1Q tagged: untouched", vlan));

    let mut failures = Vec::new();
    for c in &cases {
        let ingress = if c.from_backend {
            lab.backend_ifindex
        } else {
            lab.client_ifindex
        };
        if hook == Hook::Tc && c.input.len() < 14 + 20 {
            // BPF_PROG_TEST_RUN refuses an skb whose IPv4 header is cut short (EINVAL).
            println!("{:<70} not runnable on tc", c.name);
            continue;
        }
        let run = hook.run(&mut lab, &c.input, ingress);
        let want = c.output.as_ref().unwrap_or(&c.input);
        let mut problems = Vec::new();
        if run.verdict != hook.code(c.verdict) {
            problems.push(format!(
                "verdict {} (want {:?} = {})",
                run.verdict,
                c.verdict,
                hook.code(c.verdict)
            ));
        }
        if &run.output != want {
            problems.push(format!(
                "output differs\n   got  {}\n   want {}",
                hex(&run.output),
                hex(want)
            ));
        }
        // A fragment's L4 checksum covers the whole datagram, so only whole packets are checked.
        let fragment = c.input.len() >= 22
            && u16::from_be_bytes([c.input[14 + 6], c.input[14 + 7]]) & 0x3fff != 0;
        if c.output.is_some() && !fragment {
            if let Err(e) = verify_checksums(&run.output) {
                problems.push(format!("checksum: {e}"));
            }
        }
        println!(
            "{:<70} {}",
            c.name,
            if problems.is_empty() { "ok" } else { "FAILED" }
        );
        if !problems.is_empty() {
            failures.push(format!("{}: {}", c.name, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{hook:?}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Client→service packets are counted per frontend (SYN, ACK and two fragments on TCP; two
    // UDP); misses, replies and what is left to the kernel untouched are not.
    for (port, proto, want) in [
        (80, lb_common::IPPROTO_TCP, 4),
        (53, lb_common::IPPROTO_UDP, 2),
    ] {
        assert_eq!(
            frontend_packets(&lab, VIP, port, proto),
            want,
            "packets counted for {VIP}:{port}/{proto}"
        );
    }
}

/// `frame` with the IPv4 flags/fragment-offset field set to `frags` and its header checksum
/// computed from scratch.
fn with_frags(frame: &[u8], frags: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = pnet::packet::util::checksum(&f[14..34], 5);
    f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    f
}

/// A backend behind an interface that does not take XDP frames (not in LB_XDP_TARGETS, like a
/// default veth): XDP leaves the packet untouched, and tc on the same interface, which runs next,
/// finds the flow XDP recorded and translates it to the same backend.
#[test]
fn xdp_leaves_what_it_cannot_send_to_tc() {
    let mut lab = lab();
    let (client_if, backend_if) = (lab.client_ifindex, lab.backend_ifindex);
    lab.set_xdp_target(backend_if, false).expect("targets");
    let syn = from_client(Frame::tcp((CLIENT, 42000), (VIP, 80), TCP_SYN));
    let run = Hook::Xdp.run(&mut lab, &syn.bytes(), client_if);
    assert_eq!(run.verdict, Hook::Xdp.code(Pass), "XDP verdict");
    assert_eq!(
        run.output,
        syn.bytes(),
        "XDP must leave the frame untouched"
    );
    let run = Hook::Tc.run(&mut lab, &run.output, client_if);
    assert_eq!(run.verdict, Hook::Tc.code(Redirect), "tc verdict");
    assert_eq!(run.output, dnat(&syn, BACKEND, 8080).bytes());
    // Counted once, by tc.
    assert_eq!(frontend_packets(&lab, VIP, 80, lb_common::IPPROTO_TCP), 1);
}

const ANNOUNCED: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 60);

/// The ARP responder: requests for an address announced on the receiving interface are answered
/// in place and sent back out of it, with the MAC from the map; anything else passes to the
/// kernel untouched.
#[test]
fn arp_responder_cases_xdp() {
    arp_responder_cases(Hook::Xdp);
}

#[test]
fn arp_responder_cases_tc() {
    arp_responder_cases(Hook::Tc);
}

fn arp_responder_cases(hook: Hook) {
    let mut lab = lab();
    lab.announce(ANNOUNCED).expect("arp entry");
    let mac = CLIENT_IF_MAC;

    let request = arp_request(CLIENT_MAC, CLIENT, ANNOUNCED);
    let (ci, bi) = (lab.client_ifindex, lab.backend_ifindex);
    let cases: Vec<(&str, Vec<u8>, u32, Verdict, Option<Vec<u8>>)> = vec![
        (
            "request for an announced address: reply from the interface MAC",
            request.clone(),
            ci,
            Bounce,
            Some(arp_reply(mac, ANNOUNCED, (CLIENT_MAC, CLIENT))),
        ),
        (
            "same request on an interface it is not announced on",
            request.clone(),
            bi,
            Pass,
            None,
        ),
        (
            "request for an unannounced address",
            arp_request(CLIENT_MAC, CLIENT, Ipv4Addr::new(192, 168, 30, 61)),
            ci,
            Pass,
            None,
        ),
        (
            "gratuitous ARP for the announced address",
            arp_request(CLIENT_MAC, ANNOUNCED, ANNOUNCED),
            ci,
            Pass,
            None,
        ),
        (
            "ARP reply about the announced address",
            arp_reply(CLIENT_MAC, ANNOUNCED, (mac, Ipv4Addr::new(10, 0, 0, 254))),
            ci,
            Pass,
            None,
        ),
        (
            "request cut short",
            request[..14 + 20].to_vec(),
            ci,
            Pass,
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (name, input, ingress, verdict, output) in &cases {
        let run = hook.run(&mut lab, input, *ingress);
        let want = output.as_ref().unwrap_or(input);
        let ok = run.verdict == hook.code(*verdict) && &run.output == want;
        println!("{name:<70} {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures.push(format!(
                "{hook:?}: {name}: verdict {} (want {verdict:?})\n   got  {}\n   want {}",
                run.verdict,
                hex(&run.output),
                hex(want)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let key = ArpKey {
        ifindex: lab.client_ifindex,
        addr: ipv4_to_wire(ANNOUNCED.octets()),
    };
    let replies = lab.maps().arp.get(&key, 0).expect("entry").replies;
    assert_eq!(replies, 1, "exactly one request was answered");
}

/// The kernel's flow hash and Maglev lookup agree with userspace's: for 300 flows the backend
/// the program picks is the one in the pinned table at slot flow_hash % M, and all 3 are used.
#[test]
fn maglev_pick_matches_the_userspace_table() {
    let mut lab = lab();
    let key = FrontendKey::new(TRIO_VIP.octets(), 80, lb_common::IPPROTO_TCP);
    let frontend = lab.maps().frontends.get(&key, 0).expect("trio frontend");
    let table = lab
        .maps()
        .maglev
        .read(frontend.maglev_offset as usize, M as usize)
        .expect("table");
    let mut used = std::collections::BTreeMap::new();
    for sport in 20000..20300u16 {
        let f = from_client(Frame::tcp((CLIENT, sport), (TRIO_VIP, 80), TCP_SYN));
        let run = lab.run("lb", &f.bytes(), lab.client_ifindex).expect("run");
        assert_eq!(run.verdict, XDP_REDIRECT);
        let got = Ipv4Addr::new(
            run.output[30],
            run.output[31],
            run.output[32],
            run.output[33],
        );
        let hash = flow_hash(
            ipv4_to_wire(CLIENT.octets()),
            ipv4_to_wire(TRIO_VIP.octets()),
            sport.to_be(),
            80u16.to_be(),
            lb_common::IPPROTO_TCP,
        );
        let id = table[(hash % M) as usize];
        let backend = lab.maps().backends.get(&id, 0).expect("backend");
        let want = Ipv4Addr::from(backend.addr.to_ne_bytes());
        assert_eq!(
            got, want,
            "source port {sport}: kernel picked {got}, table slot says {want}"
        );
        assert_eq!(run.output, dnat(&f, want, 8080).bytes());
        *used.entry(got).or_insert(0) += 1;
    }
    println!("flows per backend: {used:?}");
    assert_eq!(used.len(), 3, "{used:?}");
}

/// sessionAffinity: ClientIP: every new flow of a client goes to the backend of its first one.
#[test]
fn client_ip_affinity_pins_a_client_to_one_backend() {
    let mut lab = lab();
    let mut per_client = Vec::new();
    for client in [
        CLIENT,
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 0, 0, 3),
        Ipv4Addr::new(10, 0, 0, 4),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        for sport in 30000..30050u16 {
            let f = from_client(Frame::tcp((client, sport), (STICKY_VIP, 80), TCP_SYN));
            let run = lab.run("lb", &f.bytes(), lab.client_ifindex).expect("run");
            assert_eq!(run.verdict, XDP_REDIRECT);
            seen.insert(Ipv4Addr::new(
                run.output[30],
                run.output[31],
                run.output[32],
                run.output[33],
            ));
        }
        assert_eq!(seen.len(), 1, "50 flows of {client} went to {seen:?}");
        per_client.push(*seen.first().unwrap());
    }
    println!("backend per client: {per_client:?}");
}
