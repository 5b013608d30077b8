//! ICMP, both ways:
//! - errors the node sends itself, about a packet as its sender sent it (untranslated):
//!   "fragmentation needed" when a translated packet does not fit the way out (so the sender's
//!   path-MTU discovery works through a frontend), "port unreachable" for UDP to a Service without
//!   endpoints (kube-proxy's REJECT);
//! - errors others send about a translated flow (fragmentation needed, port unreachable, time
//!   exceeded, parameter problem): the packet quoted inside is translated back, and the outer
//!   address when it is the backend's or the frontend's, so the host they reach recognizes its
//!   own flow. Found through conntrack with the quoted packet's reversed tuple. The quoted L4
//!   checksum is left as it is: receivers do not verify it (it covers bytes not quoted).

use lb_common::{CT_DIR_REPLY, CtKey, IPPROTO_TCP, IPPROTO_UDP, csum};
use network_types::eth::EthHdr;

use crate::{
    maps::LB_CONNTRACK,
    nat,
    packet::{Packet, ptr_at},
    parse::Flow,
    reject::{fold, reply_headers, sum_words},
    snat,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const DEST_UNREACH: u8 = 3;
pub const PORT_UNREACH: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;

/// Answers `flow`'s packet with an ICMP error `kind`/`code` from its destination (the frontend
/// a client asked for), back out of the interface it came in on: Ethernet and addresses swapped,
/// then the original IPv4 header and the first 8 bytes of its payload (RFC 792); `mtu` is the
/// next-hop MTU of "fragmentation needed".
#[inline(always)]
pub fn reply_error<P: Packet>(
    ctx: &P,
    flow: &Flow,
    kind: u8,
    code: u8,
    mtu: u16,
) -> Result<u32, ()> {
    if flow.l4 != flow.l3 + 20 {
        return Ok(P::DROP);
    }
    const IP: usize = EthHdr::LEN;
    const ICMP: usize = IP + 20;
    const QUOTE: usize = ICMP + 8;
    const LEN: usize = QUOTE + 28;
    let old: *const [u8; QUOTE] = ptr_at(ctx, 0)?;
    let old = unsafe { &*old };
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&old[..12]);
    let mut quote = [0u8; 28];
    quote.copy_from_slice(&old[IP..QUOTE]);
    if ctx.resize(LEN).is_err() {
        return Ok(P::DROP);
    }
    let p: *mut [u8; LEN] = ptr_at(ctx, 0)?;
    let p = unsafe { &mut *p };
    p[IP + 4..IP + 6].copy_from_slice(&[0, 0]);
    // TOS internetwork control, as the kernel sends its ICMP errors.
    reply_headers(
        &mut p[..ICMP],
        &macs,
        (&flow.dst_addr.to_ne_bytes(), &flow.src_addr.to_ne_bytes()),
        (0xc0, 0),
        IPPROTO_ICMP,
        (LEN - IP) as u16,
    );
    p[ICMP] = kind;
    p[ICMP + 1] = code;
    p[ICMP + 2..ICMP + 6].copy_from_slice(&[0, 0, 0, 0]);
    p[ICMP + 6..ICMP + 8].copy_from_slice(&mtu.to_be_bytes());
    p[QUOTE..LEN].copy_from_slice(&quote);
    let icmp_sum = sum_words(&p[ICMP..LEN], 0);
    p[ICMP + 2..ICMP + 4].copy_from_slice(&fold(icmp_sum).to_be_bytes());
    ctx.checksum_complete();
    Ok(ctx.send(ctx.ifindex()))
}

/// An ICMP error (outer IPv4 header at `l3`, 20 bytes) about a flow we translate: translated
/// back and sent on. Anything else passes.
#[inline(always)]
pub fn translate_error<P: Packet>(ctx: &P, l3: usize) -> Result<u32, ()> {
    // Outer IPv4 (20) + ICMP (8) + quoted IPv4 (20) + quoted ports (4).
    const ICMP: usize = 20;
    const INNER: usize = 28;
    const PORTS: usize = 48;
    ctx.pull(l3 + PORTS + 4);
    let p: *mut [u8; PORTS + 4] = ptr_at(ctx, l3)?;
    let p = unsafe { &mut *p };
    if p[0] != 0x45
        || !matches!(p[ICMP], DEST_UNREACH | TIME_EXCEEDED | PARAMETER_PROBLEM)
        || p[INNER] != 0x45
        || !matches!(p[INNER + 9], IPPROTO_TCP | IPPROTO_UDP)
        || p[8] <= 1
    {
        return Ok(P::PASS);
    }
    let word = |b: &[u8; PORTS + 4], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let addr = |b: &[u8; PORTS + 4], at: usize| {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    };
    let proto = p[INNER + 9];
    let (inner_src, inner_dst) = (addr(p, INNER + 12), addr(p, INNER + 16));
    let (inner_sport, inner_dport) = (word(p, PORTS), word(p, PORTS + 2));
    // The quoted packet went inner_src → inner_dst; its reply direction is in conntrack.
    let key = CtKey {
        src_addr: inner_dst,
        dst_addr: inner_src,
        src_port: inner_dport,
        dst_port: inner_sport,
        proto,
        _pad: [0; 3],
    };
    let e = match unsafe { LB_CONNTRACK.get(&key) } {
        Some(e) => *e,
        // A SNATed flow's reply tuple is in LB_NAT.
        None => match snat::get(&key) {
            Some(e) => e,
            None => return Ok(P::PASS),
        },
    };
    let (outer_src, outer_dst) = (addr(p, 12), addr(p, 16));
    let mut icmp_sum = word(p, ICMP + 2);
    let mut inner_ip_sum = word(p, INNER + 10);
    let mut outer_ip_sum = word(p, 10);
    // (offset of the quoted address, old, new), (offset of the quoted port, old, new), and the
    // other quoted port's (old, new); then the outer address to change, if any.
    let (inner_addr_at, new_addr, inner_port_at, new_port, other_port_at, other_port) =
        if e.dir == CT_DIR_REPLY {
            // Quoted: client → backend, as DNATed. Back to client → frontend.
            let client_port = if e.client_port != 0 {
                e.client_port
            } else {
                inner_sport
            };
            (
                INNER + 16,
                e.nat_addr,
                PORTS + 2,
                e.nat_port,
                PORTS,
                client_port,
            )
        } else {
            // Quoted: frontend → client, as rev-NATed. Back to backend → client.
            let client_port = if e.client_port != 0 {
                e.client_port
            } else {
                inner_dport
            };
            (
                INNER + 12,
                e.nat_addr,
                PORTS,
                e.nat_port,
                PORTS + 2,
                client_port,
            )
        };
    let old_addr = addr(p, inner_addr_at);
    let old_port = word(p, inner_port_at);
    let old_other = word(p, other_port_at);
    p[inner_addr_at..inner_addr_at + 4].copy_from_slice(&new_addr.to_ne_bytes());
    p[inner_port_at..inner_port_at + 2].copy_from_slice(&new_port.to_ne_bytes());
    p[other_port_at..other_port_at + 2].copy_from_slice(&other_port.to_ne_bytes());
    let old_inner_ip_sum = inner_ip_sum;
    inner_ip_sum = csum::csum_replace4(inner_ip_sum, old_addr, new_addr);
    // A SNATed flow (reply entry in LB_NAT): the quoted source (this node) back to the client.
    let snat_node = if e.dir == CT_DIR_REPLY && e.client_addr != 0 {
        p[INNER + 12..INNER + 16].copy_from_slice(&e.client_addr.to_ne_bytes());
        inner_ip_sum = csum::csum_replace4(inner_ip_sum, inner_src, e.client_addr);
        icmp_sum = csum::csum_replace4(icmp_sum, inner_src, e.client_addr);
        inner_src
    } else {
        0
    };
    p[INNER + 10..INNER + 12].copy_from_slice(&inner_ip_sum.to_ne_bytes());
    icmp_sum = csum::csum_replace4(icmp_sum, old_addr, new_addr);
    icmp_sum = csum::csum_replace2(icmp_sum, old_port, new_port);
    icmp_sum = csum::csum_replace2(icmp_sum, old_other, other_port);
    icmp_sum = csum::csum_replace2(icmp_sum, old_inner_ip_sum, inner_ip_sum);
    p[ICMP + 2..ICMP + 4].copy_from_slice(&icmp_sum.to_ne_bytes());
    // The outer header: a backend reporting about its own flow speaks as the frontend; an error
    // sent to the frontend goes to the backend behind it.
    let (mut src, mut dst) = (outer_src, outer_dst);
    if snat_node != 0 && outer_dst == snat_node {
        // Sent to this node's SNAT address: it is the client's.
        dst = e.client_addr;
        p[16..20].copy_from_slice(&dst.to_ne_bytes());
        outer_ip_sum = csum::csum_replace4(outer_ip_sum, outer_dst, dst);
    }
    if e.dir == CT_DIR_REPLY && outer_src == old_addr {
        src = new_addr;
        p[12..16].copy_from_slice(&src.to_ne_bytes());
        outer_ip_sum = csum::csum_replace4(outer_ip_sum, outer_src, src);
    } else if e.dir != CT_DIR_REPLY && outer_dst == old_addr {
        dst = new_addr;
        p[16..20].copy_from_slice(&dst.to_ne_bytes());
        outer_ip_sum = csum::csum_replace4(outer_ip_sum, outer_dst, dst);
    }
    p[10..12].copy_from_slice(&outer_ip_sum.to_ne_bytes());
    let outer = Flow {
        l3,
        l4: l3 + ICMP,
        proto: IPPROTO_ICMP,
        src_addr: src,
        dst_addr: dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        ttl: p[8],
        later_fragment: false,
        dont_fragment: false,
        trace: false,
    };
    Ok(nat::deliver(ctx, &outer))
}
