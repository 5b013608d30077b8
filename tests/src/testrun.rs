//! What the BPF_PROG_TEST_RUN tables share: verdicts named once for both hooks, the config of a
//! Service, and the frames a client and a backend send through the lab (and what they become).

use std::net::Ipv4Addr;

use crate::{
    frames::Frame,
    lab::{BACKEND_IF_MAC, CLIENT_IF_MAC, CLIENT_MAC, Run, XdpLab, backend_mac},
};

/// A verdict, named once for both hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the kernel (XDP_PASS, TC_ACT_OK).
    Pass,
    /// Back out of the arrival interface (XDP_TX; tc redirects to its egress).
    Bounce,
    /// Out of another interface (XDP_REDIRECT, TC_ACT_REDIRECT).
    Redirect,
    /// XDP_DROP, TC_ACT_SHOT.
    Drop,
}
pub use Verdict::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn code(self, v: Verdict) -> u32 {
        match (self, v) {
            (Hook::Xdp, Pass) => 2,
            (Hook::Xdp, Bounce) => 3,
            (Hook::Xdp, Redirect) => 4,
            (Hook::Xdp, Drop) => 1,
            (Hook::Tc, Pass) => 0,
            (Hook::Tc, Bounce | Redirect) => 7,
            (Hook::Tc, Drop) => 2,
        }
    }

    pub fn run(self, lab: &mut XdpLab, frame: &[u8], ingress: u32) -> Run {
        match self {
            Hook::Xdp => lab.run("lb", frame, ingress),
            Hook::Tc => lab.run_tc(frame, ingress),
        }
        .unwrap_or_else(|e| panic!("{self:?}: test_run of {} bytes: {e:#}", frame.len()))
    }
}

/// A Service with TCP 80 → 8080 and UDP 53 → 8053 on `vip`, and its EndpointSlice.
pub fn service(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  \
         - {{name: udp, port: 53, targetPort: 8053, protocol: UDP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 8053, protocol: UDP}}\n\
         endpoints:\n{endpoints}---\n"
    )
}

/// A client frame as it arrives on the node's client-facing interface.
pub fn from_client(mut f: Frame) -> Frame {
    f.src_mac = CLIENT_MAC;
    f.dst_mac = CLIENT_IF_MAC;
    f
}

/// A backend frame as it arrives on the node's backend-facing interface.
pub fn from_backend(mut f: Frame) -> Frame {
    f.src_mac = backend_mac(f.src);
    f.dst_mac = BACKEND_IF_MAC;
    f
}

/// `f` after DNAT to `backend` and forwarding out of `bk`.
pub fn dnat(f: &Frame, backend: Ipv4Addr, port: u16) -> Frame {
    Frame {
        dst: backend,
        dport: port,
        ttl: f.ttl - 1,
        src_mac: BACKEND_IF_MAC,
        dst_mac: backend_mac(backend),
        ..f.clone()
    }
}

/// `f` after reverse NAT to the frontend and forwarding out of `cl`.
pub fn rev_nat(f: &Frame, vip: Ipv4Addr, port: u16) -> Frame {
    Frame {
        src: vip,
        sport: port,
        ttl: f.ttl - 1,
        src_mac: CLIENT_IF_MAC,
        dst_mac: CLIENT_MAC,
        ..f.clone()
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The ICMP error the node answers `original` (a frame it received) with: from the original
/// destination back to its source, MACs swapped, the original IPv4 header (20 bytes) and the
/// first 8 bytes after it quoted; checksums computed from scratch.
pub fn icmp_error(original: &[u8], kind: u8, code: u8, mtu: u16) -> Vec<u8> {
    use pnet::packet::util::checksum;
    let mut f = vec![0u8; 14 + 20 + 8 + 28];
    f[..6].copy_from_slice(&original[6..12]);
    f[6..12].copy_from_slice(&original[..6]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&56u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&original[14 + 16..14 + 20]);
    ip[16..20].copy_from_slice(&original[14 + 12..14 + 16]);
    let sum = checksum(&f[14..34], 5);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f[34] = kind;
    f[35] = code;
    f[40..42].copy_from_slice(&mtu.to_be_bytes());
    f[42..70].copy_from_slice(&original[14..42]);
    let sum = checksum(&f[34..70], 1);
    f[36..38].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Packets counted for frontend `vip:port/proto`, summed over CPUs.
pub fn frontend_packets(lab: &XdpLab, vip: Ipv4Addr, port: u16, proto: u8) -> u64 {
    let key = lb_common::FrontendKey::new(vip.octets(), port, proto);
    let frontend = lab.maps().frontends.get(&key, 0).expect("frontend");
    let per_cpu = lab
        .maps()
        .frontend_stats
        .get(&frontend.frontend_id, 0)
        .expect("stats");
    lb_userspace::maps::PinnedMaps::sum(&per_cpu).packets
}

/// Options of a small test_run lab: M=251, 16 services, 64 frontends and backends.
pub fn lab_options(ct_timeouts: lb_common::CtTimeouts) -> lb_userspace::datapath::Options {
    lb_userspace::datapath::Options {
        bpffs: Default::default(),
        maglev_size: 251,
        maglev_capacity: 0,
        max_services: 16,
        max_frontends: 64,
        max_backends: 64,
        conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
        sock_revnat_size: lb_common::DEFAULT_SOCK_REVNAT_SIZE,
        max_announcements: lb_common::DEFAULT_MAX_ANNOUNCEMENTS,
        ct_timeouts,
        nat: lb_common::NatConfig::DEFAULT,
        nat_size: lb_common::DEFAULT_NAT_SIZE,
    }
}
