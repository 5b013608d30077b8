//! Address translation and the way out: DNAT (client → backend) or rev-NAT (backend → client),
//! then the next hop, TTL and MACs, and the send.
//!
//! The next hop is decided before anything is rewritten, so XDP can give a packet it cannot
//! deliver (no route or neighbour yet, a target that does not take XDP frames) to tc untouched.
//! tc hands such a packet to the kernel translated; the kernel forwards it (and decrements TTL).

use aya_ebpf::bindings::bpf_fib_lookup;
use lb_common::{NEXTHOP_CACHE_NS, NextHop, csum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    packet::{Packet, ptr_at},
    parse::Flow,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// Which side of the flow a translation replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// DNAT: the destination becomes the backend.
    Destination,
    /// rev-NAT: the source becomes the frontend.
    Source,
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
    let hop = match cache {
        Some(n)
            if n.ifindex != 0
                && n.addr == dst_addr
                && now.wrapping_sub(n.checked_ns) < NEXTHOP_CACHE_NS =>
        {
            Some((n.ifindex, n.macs))
        }
        cache => {
            let hop = fib(ctx, flow, (src_addr, src_port), (dst_addr, dst_port));
            if let (Some((ifindex, macs)), Some(n)) = (hop, cache) {
                *n = NextHop {
                    addr: dst_addr,
                    ifindex,
                    macs,
                    _pad: 0,
                    checked_ns: now,
                };
            }
            hop
        }
    };
    let deliverable = match hop {
        Some((ifindex, _)) => ctx.can_send(ifindex),
        None => false,
    };
    if !deliverable && P::IS_XDP {
        // tc on this interface finishes it.
        return P::PASS;
    }
    if ctx.rewrite(flow, dst, addr, port).is_err() {
        return P::DROP;
    }
    if other_port != 0 {
        let old = if dst { flow.src_port } else { flow.dst_port };
        if ctx.rewrite_port(flow, !dst, old, other_port).is_err() {
            return P::DROP;
        }
    }
    let Some((ifindex, macs)) = hop.filter(|_| deliverable) else {
        return P::PASS;
    };
    if set_l2(ctx, flow, &macs).is_err() {
        return P::DROP;
    }
    ctx.send(ifindex)
}

/// Decrements TTL (we forward instead of the kernel) and sets the next hop's MACs.
#[inline(always)]
fn set_l2<P: Packet>(ctx: &P, flow: &Flow, macs: &[u8; 12]) -> Result<(), ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, flow.l3)?;
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

/// The egress interface and (destination, source) MACs toward `dst`, from the FIB.
#[inline(always)]
fn fib<P: Packet>(
    ctx: &P,
    flow: &Flow,
    (src_addr, src_port): (u32, u16),
    (dst_addr, dst_port): (u32, u16),
) -> Option<(u32, [u8; 12])> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, flow.l3).ok()?;
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = flow.proto;
        params.sport = src_port;
        params.dport = dst_port;
        // XDP: the kernel checks this length against the egress MTU. tc: 0 lets it check the
        // skb itself, which also knows about GSO.
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
    if ctx.fib(&mut params) != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    Some((params.ifindex, macs))
}
