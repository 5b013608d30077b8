//! SNAT and DSR through BPF_PROG_TEST_RUN on both hooks, the lab's two interfaces both uplinks
//! (`cl` toward the client, `bk` toward the backend's node): input frame → verdict + exact
//! output bytes, built by pnet with full checksums.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{NatConfig, lb_mode};
use lb_tests::{
    frames::{Frame, verify_checksums, with_dsr_option},
    lab::{CLIENT, XdpLab},
    testrun::*,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The lab's `bk` address: what flows leaving by it are SNATed to.
const BK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 254);

fn lab(mode: u8) -> XdpLab {
    let mut opts = lab_options(lb_common::CtTimeouts::DEFAULT);
    opts.nat = NatConfig {
        mode,
        ..NatConfig::DEFAULT
    };
    let mut lab = XdpLab::new(opts).expect("lab");
    lab.apply_yaml(&service("echo", VIP, &[BACKEND]))
        .expect("config");
    with_uplinks(lab)
}

/// Both lab interfaces are uplinks.
fn with_uplinks(mut lab: XdpLab) -> XdpLab {
    let uplinks = BTreeMap::from([
        (lab.client_ifindex, Ipv4Addr::new(10, 0, 0, 254)),
        (lab.backend_ifindex, BK_ADDR),
    ]);
    lab.maps
        .as_mut()
        .expect("maps")
        .set_uplinks(&uplinks)
        .expect("uplinks");
    lab
}

fn run(lab: &mut XdpLab, hook: Hook, frame: &[u8], from_backend_side: bool) -> (u32, Vec<u8>) {
    let ingress = if from_backend_side {
        lab.backend_ifindex
    } else {
        lab.client_ifindex
    };
    let r = hook.run(lab, frame, ingress);
    (r.verdict, r.output)
}

#[test]
fn snat_to_the_uplink_address_and_back() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut lab = lab(lb_mode::SNAT);
        let request = from_client(Frame::udp((CLIENT, 5353), (VIP, 53)));
        let (verdict, out) = run(&mut lab, hook, &request.bytes(), false);
        assert_eq!(verdict, hook.code(Redirect), "{hook:?}");
        verify_checksums(&out).expect("checksums");
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((61_000..=65_535).contains(&port), "{hook:?}: port {port}");
        let snated = Frame {
            src: BK_ADDR,
            sport: port,
            ..dnat(&request, BACKEND, 8053)
        };
        assert_eq!(hex(&out), hex(&snated.bytes()), "{hook:?}: request");

        let reply = from_backend(Frame::udp((BACKEND, 8053), (BK_ADDR, port)));
        let (verdict, out) = run(&mut lab, hook, &reply.bytes(), true);
        assert_eq!(verdict, hook.code(Redirect), "{hook:?}");
        let back = Frame {
            dst: CLIENT,
            dport: 5353,
            ..rev_nat(&reply, VIP, 53)
        };
        assert_eq!(hex(&out), hex(&back.bytes()), "{hook:?}: reply");
    }
}

#[test]
fn dsr_carries_the_frontend_and_the_backend_node_answers_for_it() {
    for hook in [Hook::Xdp, Hook::Tc] {
        // Frontend node: DNAT only, the option after the header.
        let mut lab = lab(lb_mode::DSR);
        let request = from_client(Frame::udp((CLIENT, 5353), (VIP, 53)));
        let (verdict, out) = run(&mut lab, hook, &request.bytes(), false);
        assert_eq!(verdict, hook.code(Redirect), "{hook:?}");
        let expected = with_dsr_option(&dnat(&request, BACKEND, 8053).bytes(), (VIP, 53));
        assert_eq!(hex(&out), hex(&expected), "{hook:?}: request");
        verify_checksums(&out).expect("checksums");
        // The next packet of the flow carries it too.
        let (_, again) = run(&mut lab, hook, &request.bytes(), false);
        assert_eq!(hex(&again), hex(&expected), "{hook:?}: second packet");

        // Backend's node (tc; XDP leaves it to tc): the option arrives on an uplink, is
        // remembered and removed, and the request goes on to the kernel.
        let mut lab = lab_backend_node();
        let arriving = with_dsr_option(
            &from_client(Frame::udp((CLIENT, 5353), (BACKEND, 8053))).bytes(),
            (VIP, 53),
        );
        let (verdict, out) = run(&mut lab, hook, &arriving, false);
        assert_eq!(verdict, hook.code(Pass), "{hook:?}");
        if hook == Hook::Tc {
            let plain = from_client(Frame::udp((CLIENT, 5353), (BACKEND, 8053))).bytes();
            assert_eq!(hex(&out), hex(&plain), "{hook:?}: option removed");
            // The pod's reply leaves as the frontend.
            let reply = from_backend(Frame::udp((BACKEND, 8053), (CLIENT, 5353)));
            let (verdict, out) = run(&mut lab, hook, &reply.bytes(), true);
            assert_eq!(verdict, hook.code(Redirect), "{hook:?}");
            assert_eq!(
                hex(&out),
                hex(&rev_nat(&reply, VIP, 53).bytes()),
                "{hook:?}"
            );
        } else {
            assert_eq!(
                hex(&out),
                hex(&arriving),
                "{hook:?}: XDP leaves it untouched"
            );
        }
    }
}

/// A node where the backend runs (no Service needed): both interfaces uplinks.
fn lab_backend_node() -> XdpLab {
    let mut lab = XdpLab::new(lab_options(lb_common::CtTimeouts::DEFAULT)).expect("lab");
    lab.apply_yaml(&service("other", Ipv4Addr::new(10, 96, 0, 99), &[BACKEND]))
        .expect("config");
    with_uplinks(lab)
}
