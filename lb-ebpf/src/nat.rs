//! Address translation and the way out: DNAT (client → backend) or rev-NAT (backend → client),
//! then the next hop, TTL and MACs, and the send.
//!
//! The next hop is decided before anything is rewritten, so XDP can give a packet it cannot
//! deliver (no route or neighbour yet, a target that does not take XDP frames, too big for the
//! way out) to tc untouched. tc hands a packet it cannot send itself to the kernel translated
//! (the kernel resolves the neighbour and forwards it), except one too big for the way out with
//! DF set: that one is answered with ICMP "fragmentation needed" about the packet as the sender
//! sent it, so the sender's path-MTU discovery works through the frontend.

use aya_ebpf::bindings::bpf_fib_lookup;
use lb_common::{NEXTHOP_CACHE_NS, NextHop, csum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    icmp,
    packet::{Packet, ptr_at},
    parse::Flow,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Which side of the flow a translation replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// DNAT: the destination becomes the backend.
    Destination,
    /// rev-NAT: the source becomes the frontend.
    Source,
}

/// Why the FIB gave no next hop.
#[derive(Clone, Copy)]
pub enum NoRoute {
    /// No route, no neighbour entry yet, forwarding off: the kernel's to handle.
    Unresolved,
    /// Longer than the egress MTU (given).
    TooBig(u16),
}

/// Translates `side` of `flow` to `addr:port` (and the other side's port to `other_port`,
/// unless 0: a flow moved off a clashing client port) and sends the packet toward its (new)
/// destination, with the next hop from `cache` while it is fresh for that destination, else from
/// the FIB (and cached there).
#[inline(always)]
pub fn translate<P: Packet>(
    ctx: &P,
    flow: &Flow,
    side: Side,
    (addr, port): (u32, u16),
    other_port: u16,
    now: u64,
    cache: Option<&mut NextHop>,
) -> u32 {
    let dst = side == Side::Destination;
    let (src_addr, dst_addr) = if dst {
        (flow.src_addr, addr)
    } else {
        (addr, flow.dst_addr)
    };
    let (mut src_port, mut dst_port) = if dst {
        (flow.src_port, port)
    } else {
        (port, flow.dst_port)
    };
    if other_port != 0 {
        if dst {
            src_port = other_port;
        } else {
            dst_port = other_port;
        }
    }
    let hop = next_hop(
        ctx,
        flow,
        (src_addr, src_port),
        (dst_addr, dst_port),
        now,
        cache,
    );
    let hop = match hop {
        Ok((ifindex, macs)) if ctx.can_send(ifindex) => Some((ifindex, macs)),
        // tc on this interface finishes it.
        _ if P::IS_XDP => return P::PASS,
        Err(NoRoute::TooBig(mtu)) if flow.dont_fragment => {
            return icmp::reply_error(ctx, flow, icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu)
                .unwrap_or(P::DROP);
        }
        _ => None,
    };
    if ctx.rewrite(flow, dst, addr, port).is_err() {
        return P::DROP;
    }
    if other_port != 0 {
        let old = if dst { flow.src_port } else { flow.dst_port };
        if ctx.rewrite_port(flow, !dst, old, other_port).is_err() {
            return P::DROP;
        }
    }
    let Some((ifindex, macs)) = hop else {
        return P::PASS;
    };
    if set_l2(ctx, flow.l3, &macs).is_err() {
        return P::DROP;
    }
    ctx.send(ifindex)
}

/// Sends a packet whose addresses are already final (an ICMP error translated in place) toward
/// its destination, or to the kernel when the FIB cannot tell the way.
#[inline(always)]
pub fn deliver<P: Packet>(ctx: &P, flow: &Flow) -> u32 {
    match fib(ctx, flow, (flow.src_addr, 0), (flow.dst_addr, 0)) {
        Ok((ifindex, macs)) if ctx.can_send(ifindex) => {
            if set_l2(ctx, flow.l3, &macs).is_err() {
                return P::DROP;
            }
            ctx.send(ifindex)
        }
        _ => P::PASS,
    }
}

/// The next hop toward `dst`: the cached one while fresh for that destination and the packet
/// fits its MTU, else the FIB's (cached for next time).
#[inline(always)]
fn next_hop<P: Packet>(
    ctx: &P,
    flow: &Flow,
    src: (u32, u16),
    dst: (u32, u16),
    now: u64,
    cache: Option<&mut NextHop>,
) -> Result<(u32, [u8; 12]), NoRoute> {
    if let Some(n) = &cache {
        if n.ifindex != 0
            && n.addr == dst.0
            && now.wrapping_sub(n.checked_ns) < NEXTHOP_CACHE_NS
            && (n.mtu == 0 || ctx.len() <= n.mtu as u64 + EthHdr::LEN as u64)
        {
            return Ok((n.ifindex, n.macs));
        }
    }
    let mut mtu = 0;
    let hop = fib_with_mtu(ctx, flow, src, dst, &mut mtu)?;
    if let Some(n) = cache {
        *n = NextHop {
            addr: dst.0,
            ifindex: hop.0,
            macs: hop.1,
            mtu,
            checked_ns: now,
        };
    }
    Ok(hop)
}

/// Decrements TTL (we forward instead of the kernel) and sets the next hop's MACs.
#[inline(always)]
fn set_l2<P: Packet>(ctx: &P, l3: usize, macs: &[u8; 12]) -> Result<(), ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
    unsafe {
        let ttl = (*ip).ttl;
        // TTL shares a 16-bit checksum word with the protocol byte.
        let old_word = u16::from_ne_bytes([ttl, (*ip).proto]);
        let new_word = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check =
            csum::csum_replace2(u16::from_ne_bytes((*ip).check), old_word, new_word).to_ne_bytes();
        (*eth).dst_addr.copy_from_slice(&macs[..6]);
        (*eth).src_addr.copy_from_slice(&macs[6..]);
    }
    Ok(())
}

#[inline(always)]
fn fib<P: Packet>(
    ctx: &P,
    flow: &Flow,
    src: (u32, u16),
    dst: (u32, u16),
) -> Result<(u32, [u8; 12]), NoRoute> {
    let mut mtu = 0;
    fib_with_mtu(ctx, flow, src, dst, &mut mtu)
}

/// The egress interface and (destination, source) MACs toward `dst`, from the FIB; `mtu` gets
/// the egress MTU when the kernel reports it (tc).
#[inline(always)]
fn fib_with_mtu<P: Packet>(
    ctx: &P,
    flow: &Flow,
    (src_addr, src_port): (u32, u16),
    (dst_addr, dst_port): (u32, u16),
    mtu: &mut u32,
) -> Result<(u32, [u8; 12]), NoRoute> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, flow.l3).map_err(|_| NoRoute::Unresolved)?;
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = flow.proto;
        params.sport = src_port;
        params.dport = dst_port;
        // XDP: the kernel checks this length against the egress MTU. tc: 0 lets it check the
        // skb itself, which also knows about GSO, and report the MTU.
        params.__bindgen_anon_1.tot_len = if P::IS_XDP {
            u16::from_be_bytes((*ip).tot_len)
        } else {
            0
        };
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.ifindex = ctx.ifindex();
        params.__bindgen_anon_3.ipv4_src = src_addr;
        params.__bindgen_anon_4.ipv4_dst = dst_addr;
    }
    match ctx.fib(&mut params) {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            return Err(NoRoute::TooBig(unsafe {
                params.__bindgen_anon_1.mtu_result
            }));
        }
        _ => return Err(NoRoute::Unresolved),
    }
    if !P::IS_XDP {
        *mtu = unsafe { params.__bindgen_anon_1.mtu_result } as u32;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    Ok((params.ifindex, macs))
}
