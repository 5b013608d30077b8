//! Fuzzed frames through both production packet programs (XDP `lb`, tc `lb_tc`) with
//! BPF_PROG_TEST_RUN, over maps holding Services with several backends, one without endpoints,
//! session affinity, a LoadBalancer IP guarded by source ranges and an announced ARP address.
//!
//! Every frame is checked against invariants, not expected bytes:
//! - the verdict is one the hook defines (never XDP_ABORTED), and the run never fails;
//! - a frame not addressed to a frontend address (nor a reply from a backend, nor ARP) leaves
//!   unchanged with "pass";
//! - a changed frame is one of: a request DNATed to a backend of the frontend it was sent to, a
//!   reply of a backend translated back to that frontend, an ICMP error translated, a RST /
//!   ICMP error the node answers a frontend's client with, or an ARP reply for an announced
//!   address. Its IPv4 header checksum is valid and its L4 checksum is as valid as it arrived:
//!   the one's-complement residual of the L4 sum is preserved, so a good checksum stays good, a
//!   partial one (what a sender with TX offload leaves) stays partial, and a bad one stays bad.
//!
//! Frames: valid requests and replies; truncation at every offset; IP options; fragments; bad
//! IHL, total length and header checksum; VLAN and QinQ tags; IPv6; ARP oddities; partial and
//! zero checksums; random byte flips and random bytes. `LB_FUZZ_FRAMES` sets the count per
//! program (default 1,000,000); `LB_FUZZ_SEED` the seed (default fixed; printed, so a failure
//! can be replayed). `cargo xtask soak` runs it with fresh seeds and ten times the frames.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_tests::{
    lab::{BACKEND_IF_MAC, CLIENT_IF_MAC, XdpLab, backend_mac},
    testrun::{Hook, lab_options, service},
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

const ANNOUNCED: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 60);
const NOT_ANNOUNCED: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 61);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);

/// A small deterministic generator (xorshift64*): no dependency, replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What the maps hold, as the oracle knows it: frontend (addr, port, proto) → its backends.
struct World {
    frontends: BTreeMap<(Ipv4Addr, u16, u8), BTreeSet<(Ipv4Addr, u16)>>,
    frontend_addrs: BTreeSet<Ipv4Addr>,
    backend_addrs: Vec<Ipv4Addr>,
}

fn world() -> World {
    let mut frontends = BTreeMap::new();
    let b = |x: u8| Ipv4Addr::new(10, 0, x, 2);
    for (vip, backends) in [
        (Ipv4Addr::new(10, 96, 0, 10), vec![b(1)]),
        (Ipv4Addr::new(10, 96, 0, 11), vec![b(1), b(2), b(3)]),
        (Ipv4Addr::new(10, 96, 0, 13), vec![]),
        (Ipv4Addr::new(10, 96, 0, 14), vec![b(4)]),
        (ANNOUNCED, vec![b(4)]),
        (Ipv4Addr::new(10, 96, 0, 15), vec![b(1), b(2), b(3)]),
    ] {
        for (port, target, proto) in [(80, 8080, TCP), (53, 8053, UDP)] {
            frontends.insert(
                (vip, port, proto),
                backends.iter().map(|&a| (a, target)).collect(),
            );
        }
    }
    World {
        frontend_addrs: frontends.keys().map(|k| k.0).collect(),
        frontends,
        backend_addrs: (1..=4).map(b).collect(),
    }
}

fn lab() -> XdpLab {
    let mut lab = XdpLab::new(lab_options(lb_common::CtTimeouts::DEFAULT)).expect("lab");
    let b = |x: u8| Ipv4Addr::new(10, 0, x, 2);
    let yaml = [
        service("echo", Ipv4Addr::new(10, 96, 0, 10), &[b(1)]),
        service("trio", Ipv4Addr::new(10, 96, 0, 11), &[b(1), b(2), b(3)]),
        service("empty", Ipv4Addr::new(10, 96, 0, 13), &[]),
        "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: pool}\nspec: {blocks: [{cidr: 192.168.30.60/32}]}\n---\n".into(),
        service("guarded", Ipv4Addr::new(10, 96, 0, 14), &[b(4)]).replacen(
            "spec:\n",
            "spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/30]\n",
            1,
        ),
        service("sticky", Ipv4Addr::new(10, 96, 0, 15), &[b(1), b(2), b(3)]).replacen(
            "spec:\n",
            "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
            1,
        ),
    ]
    .concat();
    lab.apply_yaml(&yaml).expect("config");
    lab.announce(ANNOUNCED).expect("arp");
    lab
}

// ---------------------------------------------------------------- frames

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// An Ethernet/IPv4 frame, built field by field; `finish` sets lengths and checksums.
#[derive(Clone)]
struct Ip {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: Vec<u8>,
    frag: u16,
    ttl: u8,
    /// The L4 header and payload, checksum field included.
    l4: Vec<u8>,
}

impl Ip {
    fn new(
        proto: u8,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        flags: u8,
        payload: &[u8],
    ) -> Self {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&src.1.to_be_bytes());
        l4.extend_from_slice(&dst.1.to_be_bytes());
        match proto {
            TCP => {
                l4.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0, 0, 0, 0, 0x50, flags]);
                l4.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
            }
            _ => {
                l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
        }
        l4.extend_from_slice(payload);
        Self {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0xfe, 1],
            src: src.0,
            dst: dst.0,
            proto,
            options: Vec::new(),
            frag: 0x4000,
            ttl: 64,
            l4,
        }
    }

    fn checksum_at(&self) -> Option<usize> {
        match self.proto {
            TCP if self.l4.len() >= 18 => Some(16),
            UDP if self.l4.len() >= 8 => Some(6),
            ICMP if self.l4.len() >= 4 => Some(2),
            _ => None,
        }
    }

    /// The frame; `csum` chooses the L4 checksum: full, partial (pseudo-header only, as left
    /// by TX offload), zero, or a wrong one.
    fn bytes(&self, csum: Csum) -> Vec<u8> {
        let mut l4 = self.l4.clone();
        if let Some(at) = self.checksum_at() {
            l4[at] = 0;
            l4[at + 1] = 0;
            let pseudo = sum16(&self.src.octets())
                + sum16(&self.dst.octets())
                + u32::from(self.proto)
                + l4.len() as u32;
            let value = match (csum, self.proto) {
                (_, ICMP) => !fold(sum16(&l4)),
                (Csum::Full, _) => match !fold(pseudo + sum16(&l4)) {
                    0 if self.proto == UDP => 0xffff,
                    v => v,
                },
                (Csum::Partial, _) => fold(pseudo),
                (Csum::Zero, _) => 0,
                (Csum::Wrong(v), _) => v,
            };
            l4[at..at + 2].copy_from_slice(&value.to_be_bytes());
        }
        let ihl = 20 + self.options.len();
        let mut f = Vec::with_capacity(14 + ihl + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&self.options);
        let c = !fold(sum16(&f[14..14 + ihl]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }
}

#[derive(Clone, Copy)]
enum Csum {
    Full,
    Partial,
    Zero,
    Wrong(u16),
}

/// Recomputes the IPv4 header checksum of `f` (after a field was broken on purpose, so that the
/// broken field is the only thing wrong).
fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let c = !fold(sum16(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

fn arp_frame(op: u16, sender: Ipv4Addr, target: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The generator: one frame and the interface it arrives on (true: the backend side).
struct Gen<'w> {
    rng: Rng,
    world: &'w World,
}

impl Gen<'_> {
    fn client(&mut self) -> Ipv4Addr {
        let r = &mut self.rng;
        match r.below(4) {
            0 => Ipv4Addr::new(10, 0, 0, 1),
            1 => Ipv4Addr::new(10, 0, 0, 2 + r.below(30) as u8),
            2 => Ipv4Addr::new(172, 16, r.below(4) as u8, r.below(255) as u8),
            _ => Ipv4Addr::from(r.next() as u32),
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = self.rng.pick(&[0, 1, 7, 14, 33, 64, 200]);
        self.rng.bytes(n)
    }

    fn tcp_flags(&mut self) -> u8 {
        self.rng
            .pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x00, 0x3f, 0x01])
    }

    /// A well-formed request to a frontend, a reply of a backend, or traffic for neither.
    fn base(&mut self) -> (Ip, bool) {
        let w = self.world;
        let kind = self.rng.below(10);
        let proto = if self.rng.chance(50) { TCP } else { UDP };
        let flags = self.tcp_flags();
        let payload = self.payload();
        let sport = self
            .rng
            .pick(&[1024u16, 5353, 40000, 61000, 65535, 80, 0])
            .wrapping_add(self.rng.below(64) as u16);
        match kind {
            0..=4 => {
                let keys: Vec<_> = w.frontends.keys().copied().collect();
                let (vip, mut port, mut p) = self.rng.pick(&keys);
                if self.rng.chance(10) {
                    port = self.rng.next() as u16;
                }
                if self.rng.chance(5) {
                    p = if p == TCP { UDP } else { TCP };
                }
                let src = self.client();
                (
                    Ip::new(p, (src, sport), (vip, port), flags, &payload),
                    false,
                )
            }
            5..=6 => {
                let backend = self.rng.pick(&w.backend_addrs);
                let port = if proto == TCP { 8080 } else { 8053 };
                let dst = self.client();
                let mut ip = Ip::new(proto, (backend, port), (dst, sport), flags, &payload);
                ip.src_mac = backend_mac(backend).octets();
                ip.dst_mac = BACKEND_IF_MAC.octets();
                (ip, true)
            }
            7 => {
                // ICMP: an echo to a frontend, or an error from a backend quoting a request.
                let vip = self
                    .rng
                    .pick(&w.frontend_addrs.iter().copied().collect::<Vec<_>>());
                let src = self.client();
                let mut ip = Ip::new(ICMP, (src, 0), (vip, 0), 0, &[]);
                if self.rng.chance(50) {
                    ip.l4 = vec![8, 0, 0, 0, 0, 1, 0, 1];
                    ip.l4.extend(payload);
                    (ip, false)
                } else {
                    let backend = self.rng.pick(&w.backend_addrs);
                    let quoted = Ip::new(proto, (src, sport), (backend, 8080), flags, &[]);
                    let q = quoted.bytes(Csum::Full);
                    ip.src = backend;
                    ip.dst = src;
                    ip.l4 = vec![3, self.rng.pick(&[3, 4, 1]), 0, 0, 0, 0, 5, 0xdc];
                    ip.l4.extend_from_slice(&q[14..(14 + 28).min(q.len())]);
                    ip.src_mac = backend_mac(backend).octets();
                    ip.dst_mac = BACKEND_IF_MAC.octets();
                    (ip, true)
                }
            }
            _ => {
                // Neither: the node itself, a backend directly, anything.
                let dst = match self.rng.below(3) {
                    0 => NODE,
                    1 => self.rng.pick(&w.backend_addrs),
                    _ => Ipv4Addr::from(self.rng.next() as u32),
                };
                let src = self.client();
                (
                    Ip::new(proto, (src, sport), (dst, 80), flags, &payload),
                    false,
                )
            }
        }
    }

    fn csum(&mut self) -> Csum {
        match self.rng.below(10) {
            0..=5 => Csum::Full,
            6 | 7 => Csum::Partial,
            8 => Csum::Zero,
            _ => Csum::Wrong(self.rng.next() as u16),
        }
    }

    fn arp(&mut self) -> Vec<u8> {
        let target = self
            .rng
            .pick(&[ANNOUNCED, NOT_ANNOUNCED, NODE, Ipv4Addr::new(10, 96, 0, 10)]);
        let sender = self.client();
        let dst = if self.rng.chance(80) {
            [0xff; 6]
        } else {
            CLIENT_IF_MAC.octets()
        };
        let mut f = arp_frame(1, sender, target, dst);
        match self.rng.below(12) {
            0 => f[21] = self.rng.pick(&[2, 3, 4, 0]), // not a request
            1 => f[15] = 6,                            // hardware type
            2 => f[16] = 0x86,                         // protocol type
            3 => f[18] = self.rng.pick(&[0, 4, 8, 255]), // hardware length
            4 => f[19] = self.rng.pick(&[0, 6, 16]),   // protocol length
            5 => f[28..32].copy_from_slice(&target.octets()), // gratuitous
            6 => f.extend(self.rng.bytes(18)),         // padded to 60
            7 => f[38..42].copy_from_slice(&[255, 255, 255, 255]),
            8 => f[22..28].copy_from_slice(&[0xff; 6]), // broadcast sender MAC
            _ => {}
        }
        f
    }

    /// One frame and whether it arrives on the backend side.
    fn frame(&mut self) -> (Vec<u8>, bool) {
        let r = self.rng.below(100);
        if r < 8 {
            return (self.arp(), false);
        }
        if r < 10 {
            let n = self.rng.below(200);
            return (self.rng.bytes(n), self.rng.chance(50));
        }
        if r < 12 {
            // IPv6, or another EtherType.
            let n = 14 + 40 + self.rng.below(60);
            let mut f = self.rng.bytes(n);
            let ether: [u8; 2] =
                self.rng
                    .pick(&[[0x86, 0xdd], [0x88, 0xcc], [0x08, 0x06], [0x08, 0x00]]);
            f[12..14].copy_from_slice(&ether);
            return (f, self.rng.chance(50));
        }
        let (mut ip, from_backend) = self.base();
        if self.rng.chance(8) {
            // IP options: NOPs, a record-route, or junk, padded to a multiple of 4.
            let mut o = match self.rng.below(3) {
                0 => vec![1; 4 * (1 + self.rng.below(10))],
                1 => vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                _ => {
                    let n = 4 * (1 + self.rng.below(10));
                    self.rng.bytes(n)
                }
            };
            o.truncate(40);
            ip.options = o;
        }
        if self.rng.chance(5) {
            ip.frag = self.rng.pick(&[0x2000, 0x0001, 0x2010, 0x1fff, 0x8000]);
        }
        if self.rng.chance(3) {
            ip.ttl = self.rng.pick(&[0, 1]);
        }
        let csum = self.csum();
        let mut f = ip.bytes(csum);
        match self.rng.below(30) {
            0 => {
                // Bad IHL (0..4 or beyond the frame), everything else consistent.
                f[14] = 0x40 | self.rng.pick(&[0, 1, 4, 15]);
                fix_ip_checksum(&mut f);
            }
            1 => {
                // Total length longer than the frame, or shorter than the headers.
                let v = self.rng.pick(&[0u16, 19, 20, 27, 4000, 65535]);
                f[16..18].copy_from_slice(&v.to_be_bytes());
                fix_ip_checksum(&mut f);
            }
            2 => f[24] ^= 0x40, // header checksum wrong
            3 => f[14] = 0x65,  // IPv6 version in an IPv4 EtherType
            4 | 5 => {
                // VLAN or QinQ tag before the IP header.
                let tags: &[u8] = if self.rng.chance(50) {
                    &[0x81, 0x00, 0x00, 0x64]
                } else {
                    &[0x88, 0xa8, 0x00, 0x64, 0x81, 0x00, 0x00, 0x65]
                };
                let mut t = f[..12].to_vec();
                t.extend_from_slice(tags);
                t.extend_from_slice(&f[12..]);
                f = t;
            }
            6 | 7 => {
                // A few bytes flipped anywhere.
                for _ in 0..1 + self.rng.below(4) {
                    let at = self.rng.below(f.len());
                    f[at] ^= 1 << self.rng.below(8);
                }
            }
            8..=10 => {
                let at = self.rng.below(f.len());
                f.truncate(at);
            }
            11 => {
                // A trailer after the packet.
                let n = 1 + self.rng.below(20);
                f.extend(self.rng.bytes(n));
            }
            _ => {}
        }
        (f, from_backend)
    }
}

// ---------------------------------------------------------------- the oracle

/// The IPv4 view of a frame the oracle needs.
#[derive(Debug)]
struct View {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    /// Offset of the L4 header and its length (bounded by the frame and the total length).
    l4: usize,
    l4_len: usize,
    later_fragment: bool,
}

fn view(f: &[u8]) -> Option<View> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if ihl < 20 || total < ihl || f.len() < 14 + total {
        return None;
    }
    Some(View {
        src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        proto: f[23],
        l4: 14 + ihl,
        l4_len: total - ihl,
        later_fragment: u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0,
    })
}

fn ports(f: &[u8], v: &View) -> Option<(u16, u16)> {
    (v.l4_len >= 4 && !v.later_fragment).then(|| {
        let p = &f[v.l4..];
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
    })
}

fn ip_header_ok(f: &[u8]) -> bool {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    fold(sum16(&f[14..14 + ihl])) == 0xffff
}

/// The L4 checksum's one's-complement residual (0xffff: valid), or None when the frame has no
/// complete L4 checksum to speak of (or UDP's "none").
fn residual(f: &[u8], v: &View) -> Option<u16> {
    let body = &f[v.l4..v.l4 + v.l4_len];
    let at = match v.proto {
        TCP => 16,
        UDP => 6,
        ICMP => 2,
        _ => return None,
    };
    if v.later_fragment || body.len() < at + 2 {
        return None;
    }
    if v.proto == UDP && body[6..8] == [0, 0] {
        return None;
    }
    let pseudo = if v.proto == ICMP {
        0
    } else {
        sum16(&v.src.octets()) + sum16(&v.dst.octets()) + u32::from(v.proto) + v.l4_len as u32
    };
    Some(match fold(pseudo + sum16(body)) {
        0 => 0xffff,
        r => r,
    })
}

#[derive(Default, Debug)]
struct Tally {
    frames: u64,
    verdicts: BTreeMap<u32, u64>,
    unchanged: u64,
    dnat: u64,
    rev_nat: u64,
    node_replies: u64,
    icmp_translated: u64,
    arp_replies: u64,
    partial_dnat: u64,
    fragments: u64,
    clash_ports: u64,
    skipped_short: u64,
}

fn check(
    w: &World,
    hook: Hook,
    input: &[u8],
    verdict: u32,
    output: &[u8],
    tally: &mut Tally,
) -> Result<(), String> {
    let allowed: &[u32] = match hook {
        Hook::Xdp => &[1, 2, 3, 4],
        Hook::Tc => &[0, 2, 7],
    };
    if !allowed.contains(&verdict) {
        return Err(format!("verdict {verdict}"));
    }
    *tally.verdicts.entry(verdict).or_default() += 1;
    let drop = verdict == hook.code(lb_tests::testrun::Drop);
    let pass = verdict == hook.code(lb_tests::testrun::Pass);
    if !ours(w, input) {
        if !pass || output != input {
            return Err("a frame for none of our addresses was not passed unchanged".into());
        }
        tally.unchanged += 1;
        return Ok(());
    }
    if drop {
        return Ok(());
    }
    if output == input {
        if !pass {
            return Err("sent out again unchanged".into());
        }
        tally.unchanged += 1;
        return Ok(());
    }
    let vin = view(input);
    // Changed: ARP reply?
    if input.len() >= 42 && input[12..14] == [0x08, 0x06] {
        let asked = Ipv4Addr::new(input[38], input[39], input[40], input[41]);
        if asked != ANNOUNCED {
            return Err(format!("ARP reply for {asked}, which is not announced"));
        }
        if output.len() < 42
            || output[12..14] != [0x08, 0x06]
            || output[20..22] != [0, 2]
            || output[28..32] != ANNOUNCED.octets()
            || output[22..28] != CLIENT_IF_MAC.octets()
            || output[38..42] != input[28..32]
        {
            return Err("malformed ARP reply".into());
        }
        tally.arp_replies += 1;
        return Ok(());
    }
    let vi = vin.ok_or("changed a frame that is not valid IPv4")?;
    if !ip_header_ok(input) {
        return Err("acted on a frame whose IPv4 header checksum is wrong".into());
    }
    let header = match vi.proto {
        TCP => 20,
        UDP | ICMP => 8,
        _ => return Err(format!("acted on protocol {}", vi.proto)),
    };
    if vi.l4_len < header && !vi.later_fragment {
        return Err("acted on a packet whose L4 header is cut short".into());
    }
    let vo = view(output).ok_or("output is not valid IPv4")?;
    if !ip_header_ok(output) {
        return Err("output IPv4 header checksum wrong".into());
    }
    // The node answering the client (RST, port unreachable, fragmentation needed).
    if vo.src == vi.dst && vo.dst == vi.src && w.frontend_addrs.contains(&vi.dst) {
        if residual(output, &vo) != Some(0xffff) {
            return Err("node reply with a bad checksum".into());
        }
        tally.node_replies += 1;
        return Ok(());
    }
    if vo.proto != vi.proto {
        return Err(format!("protocol {} became {}", vi.proto, vo.proto));
    }
    if residual(output, &vo) != residual(input, &vi) {
        return Err(format!(
            "L4 checksum residual {:?} became {:?}",
            residual(input, &vi),
            residual(output, &vo)
        ));
    }
    if vi.proto == ICMP {
        tally.icmp_translated += 1;
        return Ok(());
    }
    let header = if vi.later_fragment {
        0
    } else {
        header.min(vi.l4_len)
    };
    if input[vi.l4 + header..vi.l4 + vi.l4_len] != output[vo.l4 + header..vo.l4 + vo.l4_len] {
        return Err("payload changed".into());
    }
    if vi.later_fragment {
        // Only the addresses are translated (the ports came with the first fragment).
        let member = |fe: Ipv4Addr, be: Ipv4Addr| {
            w.frontends
                .iter()
                .any(|(k, b)| k.0 == fe && k.2 == vi.proto && b.iter().any(|x| x.0 == be))
        };
        if (vo.src == vi.src && member(vi.dst, vo.dst))
            || (vo.dst == vi.dst && member(vo.src, vi.src))
        {
            tally.fragments += 1;
            return Ok(());
        }
        return Err("a later fragment translated to none of ours".into());
    }
    let (ip_, op_) = (
        ports(input, &vi).ok_or("ports of input")?,
        ports(output, &vo).ok_or("ports of output")?,
    );
    if let Some(backends) = w.frontends.get(&(vi.dst, ip_.1, vi.proto)) {
        if vo.src != vi.src {
            return Err("the client's address changed".into());
        }
        // A client port another flow to the same backend already holds is replaced (the
        // clash-free source port); the reply gets the original back.
        if op_.0 != ip_.0 {
            tally.clash_ports += 1;
        }
        if !backends.contains(&(vo.dst, op_.1)) {
            return Err(format!(
                "{}:{} is not a backend of {}:{}",
                vo.dst, op_.1, vi.dst, ip_.1
            ));
        }
        tally.dnat += 1;
        if residual(input, &vi).is_some_and(|r| r != 0xffff) {
            tally.partial_dnat += 1;
        }
        return Ok(());
    }
    if w.backend_addrs.contains(&vi.src) {
        let fits = w
            .frontends
            .iter()
            .any(|(k, b)| k.0 == vo.src && k.1 == op_.0 && b.contains(&(vi.src, ip_.0)));
        if !fits || vo.dst != vi.dst {
            return Err(format!(
                "reply of {}:{} became {}:{} → {}:{}",
                vi.src, ip_.0, vo.src, op_.0, vo.dst, op_.1
            ));
        }
        tally.rev_nat += 1;
        return Ok(());
    }
    Err("changed a frame that is neither for a frontend nor from a backend".into())
}

/// Is `frame` (loosely) for this datapath: IPv4 to a frontend address or from a backend or a
/// frontend address (however broken the rest), or ARP for the announced address? Everything
/// else belongs to the kernel and must pass untouched.
fn ours(w: &World, f: &[u8]) -> bool {
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    match f.get(12..14) {
        Some([0x08, 0x00]) if f.len() >= 34 => {
            let ours = |a: Ipv4Addr| w.frontend_addrs.contains(&a) || w.backend_addrs.contains(&a);
            // An ICMP error from any router quoting a packet of one of our flows is ours too.
            let inner = 14 + usize::from(f[14] & 0x0f) * 4 + 8;
            let quoted = f[23] == ICMP
                && f.len() >= inner + 20
                && (ours(addr(inner + 12)) || ours(addr(inner + 16)));
            w.frontend_addrs.contains(&addr(30)) || ours(addr(26)) || quoted
        }
        Some([0x08, 0x06]) if f.len() >= 42 => addr(38) == ANNOUNCED,
        _ => false,
    }
}

fn frames_per_program() -> u64 {
    std::env::var("LB_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn seed() -> u64 {
    std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        // Fixed, so `cargo xtask test` is repeatable; `cargo xtask soak` draws new ones.
        .unwrap_or(0x5eed_f00d_1234_5679)
}

fn fuzz(hook: Hook) {
    let w = world();
    let mut lab = lab();
    let seed = seed();
    println!("{hook:?}: LB_FUZZ_SEED={seed}");
    let mut g = Gen {
        rng: Rng(seed),
        world: &w,
    };
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    let mut one = |lab: &mut XdpLab, tally: &mut Tally, frame: Vec<u8>, from_backend: bool| {
        // BPF_PROG_TEST_RUN refuses less than an Ethernet header (no NIC delivers one), and an
        // skb run refuses an IPv4 EtherType with less than an IPv4 header after it.
        if frame.len() < 14
            || (hook == Hook::Tc && frame[12..14] == [0x08, 0x00] && frame.len() < 34)
        {
            tally.skipped_short += 1;
            return;
        }
        let ingress = if from_backend {
            lab.backend_ifindex
        } else {
            lab.client_ifindex
        };
        let run = match hook {
            Hook::Xdp => lab.run("lb", &frame, ingress),
            Hook::Tc => lab.run_tc(&frame, ingress),
        };
        tally.frames += 1;
        let outcome = match run {
            Ok(r) => check(&w, hook, &frame, r.verdict, &r.output, tally)
                .map_err(|e| (e, r.verdict, r.output)),
            Err(e) => Err((format!("test_run failed: {e:#}"), 0, Vec::new())),
        };
        if let Err((e, verdict, output)) = outcome
            && failures.len() < 20
        {
            failures.push(format!(
                "{e}\n  in:  {}\n  out: {} (verdict {verdict})",
                lb_tests::testrun::hex(&frame),
                lb_tests::testrun::hex(&output)
            ));
        }
    };
    // Truncation at every offset of a few hundred well-formed frames (and ARP requests).
    for i in 0..300 {
        let frame = if i % 10 == 0 {
            g.arp()
        } else {
            let (ip, _) = g.base();
            ip.bytes(Csum::Full)
        };
        for cut in 14..frame.len() {
            one(&mut lab, &mut tally, frame[..cut].to_vec(), i % 2 == 1);
        }
    }
    let total = frames_per_program();
    while tally.frames < total {
        let (frame, from_backend) = g.frame();
        one(&mut lab, &mut tally, frame, from_backend);
    }
    println!(
        "{hook:?}: {} frames in {:.1} s: {tally:?}",
        tally.frames,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{hook:?} seed {seed}:\n{}",
        failures.join("\n")
    );
    // The invariants were exercised, not skipped past.
    let floor = total / 100;
    for (what, n) in [
        ("DNAT", tally.dnat),
        ("reverse NAT", tally.rev_nat),
        ("node replies", tally.node_replies),
        ("ARP replies", tally.arp_replies),
        ("DNAT of partial checksums", tally.partial_dnat),
    ] {
        assert!(n >= floor / 10, "{hook:?}: only {n} {what}");
    }
}

#[test]
fn fuzzed_frames_through_xdp() {
    fuzz(Hook::Xdp);
}

#[test]
fn fuzzed_frames_through_tc() {
    fuzz(Hook::Tc);
}
