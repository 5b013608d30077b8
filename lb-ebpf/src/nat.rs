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
use lb_common::{DSR_OPTION_LEN, NEXTHOP_CACHE_NS, NextHop, csum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    dsr, icmp,
    packet::{Packet, ptr_at},
    parse::Flow,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Which side of the flow a translation replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// DNAT: the destination becomes the backend.
    Destination,
    /// rev-NAT: the source becomes the frontend.
    Source,
}

/// What the FIB says about the way to a destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Out of `ifindex` to `macs`.
    Ready,
    /// No route, forwarding off, a local destination: the kernel's to handle.
    Unresolved,
    /// Out of `ifindex`, but no neighbour entry yet: the kernel resolves it.
    NoNeighbour,
    /// Longer than the egress MTU (`mtu`).
    TooBig,
}

/// The next hop. A plain struct, every field always set: the BPF verifier refuses to copy the
/// uninitialised bytes an enum with payloads would leave.
#[derive(Clone, Copy)]
pub struct Hop {
    pub route: Route,
    pub mtu: u16,
    pub ifindex: u32,
    /// Destination then source MAC.
    pub macs: [u8; 12],
}

impl Hop {
    const fn without(route: Route, ifindex: u32, mtu: u16) -> Self {
        Self {
            route,
            mtu,
            ifindex,
            macs: [0; 12],
        }
    }

    /// The interface the packet leaves by, when the FIB knows it.
    #[inline(always)]
    pub fn egress(&self) -> Option<u32> {
        match self.route {
            Route::Ready | Route::NoNeighbour => Some(self.ifindex),
            _ => None,
        }
    }

    /// Can this hook send the packet there itself?
    #[inline(always)]
    pub fn sendable<P: Packet>(&self, ctx: &P) -> bool {
        self.route == Route::Ready && ctx.can_send(self.ifindex)
    }
}

/// Translates `side` of `flow` to `addr:port`, and the other side's address and port to
/// `other` where non-zero (a SNATed flow, or one moved off a clashing client port), and sends
/// the packet toward its (new) destination, with the next hop from `cache` while it is fresh for
/// that destination, else from the FIB (and cached there). A `carry` frontend (non-zero) goes
/// with the packet in the DSR option.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn translate<P: Packet>(
    ctx: &P,
    flow: &Flow,
    side: Side,
    to: (u32, u16),
    other: (u32, u16),
    carry: (u32, u16),
    now: u64,
    cache: Option<&mut NextHop>,
) -> u32 {
    let (src, dst) = translated(flow, side, to, other);
    let hop = next_hop(ctx, flow, src, dst, growth(carry), now, cache);
    send_translated(ctx, flow, side, to, other, carry, hop)
}

/// Bytes a packet grows by on its way out: the DSR option when it carries a frontend.
#[inline(always)]
pub fn growth(carry: (u32, u16)) -> u16 {
    if carry.0 != 0 {
        DSR_OPTION_LEN as u16
    } else {
        0
    }
}

/// The (source, destination) of `flow` once translated as [`translate`] does.
#[inline(always)]
pub fn translated(
    flow: &Flow,
    side: Side,
    (addr, port): (u32, u16),
    (other_addr, other_port): (u32, u16),
) -> ((u32, u16), (u32, u16)) {
    let pick = |new: u32, old: u32| if new != 0 { new } else { old };
    let pick_port = |new: u16, old: u16| if new != 0 { new } else { old };
    if side == Side::Destination {
        (
            (
                pick(other_addr, flow.src_addr),
                pick_port(other_port, flow.src_port),
            ),
            (addr, port),
        )
    } else {
        (
            (addr, port),
            (
                pick(other_addr, flow.dst_addr),
                pick_port(other_port, flow.dst_port),
            ),
        )
    }
}

/// [`translate`] with the next hop already looked up.
#[inline(always)]
pub fn send_translated<P: Packet>(
    ctx: &P,
    flow: &Flow,
    side: Side,
    (addr, port): (u32, u16),
    (other_addr, other_port): (u32, u16),
    carry: (u32, u16),
    hop: Hop,
) -> u32 {
    let dst = side == Side::Destination;
    let send = hop.sendable(ctx);
    if !send {
        // tc on this interface finishes it.
        if P::IS_XDP {
            return P::PASS;
        }
        if hop.route == Route::TooBig && flow.dont_fragment {
            // What the sender may send: the way out's MTU less what we add.
            let mtu = hop.mtu.saturating_sub(growth(carry));
            return icmp::reply_error(ctx, flow, icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu)
                .unwrap_or(P::DROP);
        }
    }
    if ctx.rewrite(flow, dst, addr, port).is_err() {
        return P::DROP;
    }
    let old_port = if dst { flow.src_port } else { flow.dst_port };
    if other_addr != 0 {
        let port = if other_port != 0 {
            other_port
        } else {
            old_port
        };
        if ctx.rewrite(flow, !dst, other_addr, port).is_err() {
            return P::DROP;
        }
    } else if other_port != 0 && ctx.rewrite_port(flow, !dst, old_port, other_port).is_err() {
        return P::DROP;
    }
    if carry.0 != 0 && dsr::add(ctx, carry).is_err() {
        return P::DROP;
    }
    if !send {
        if hop.route == Route::NoNeighbour {
            // tc (XDP returned above): the kernel resolves the neighbour on the way out.
            if set_l2(ctx, flow.l3, None).is_err() {
                return P::DROP;
            }
            return ctx.send_resolving(hop.ifindex);
        }
        return P::PASS;
    }
    if set_l2(ctx, flow.l3, Some(&hop.macs)).is_err() {
        return P::DROP;
    }
    ctx.send(hop.ifindex)
}

/// Sends a packet whose addresses are already final (an ICMP error translated in place) toward
/// its destination, or to the kernel when the FIB cannot tell the way.
#[inline(always)]
pub fn deliver<P: Packet>(ctx: &P, flow: &Flow) -> u32 {
    let mut mtu = 0;
    let hop = fib(
        ctx,
        flow,
        (flow.src_addr, 0),
        (flow.dst_addr, 0),
        0,
        &mut mtu,
    );
    if !hop.sendable(ctx) {
        return P::PASS;
    }
    if set_l2(ctx, flow.l3, Some(&hop.macs)).is_err() {
        return P::DROP;
    }
    ctx.send(hop.ifindex)
}

/// The next hop toward `dst` for the packet grown by `grow` bytes: the cached one while fresh
/// for that destination and the packet fits its MTU, else the FIB's (cached for next time).
#[inline(always)]
pub fn next_hop<P: Packet>(
    ctx: &P,
    flow: &Flow,
    src: (u32, u16),
    dst: (u32, u16),
    grow: u16,
    now: u64,
    cache: Option<&mut NextHop>,
) -> Hop {
    if let Some(n) = &cache {
        if n.ifindex != 0
            && n.addr == dst.0
            && now.wrapping_sub(n.checked_ns) < NEXTHOP_CACHE_NS
            && (n.mtu == 0 || ctx.len() + grow as u64 <= n.mtu as u64 + EthHdr::LEN as u64)
        {
            return Hop {
                route: Route::Ready,
                mtu: 0,
                ifindex: n.ifindex,
                macs: n.macs,
            };
        }
    }
    let mut mtu = 0;
    let hop = fib(ctx, flow, src, dst, grow, &mut mtu);
    if hop.route == Route::Ready {
        if let Some(n) = cache {
            *n = NextHop {
                addr: dst.0,
                ifindex: hop.ifindex,
                macs: hop.macs,
                mtu,
                checked_ns: now,
            };
        }
    }
    hop
}

/// Decrements TTL (we forward instead of the kernel) and sets the next hop's MACs (if known).
#[inline(always)]
fn set_l2<P: Packet>(ctx: &P, l3: usize, macs: Option<&[u8; 12]>) -> Result<(), ()> {
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
        if let Some(macs) = macs {
            (*eth).dst_addr.copy_from_slice(&macs[..6]);
            (*eth).src_addr.copy_from_slice(&macs[6..]);
        }
    }
    Ok(())
}

/// The egress interface and (destination, source) MACs toward `dst`, from the FIB, for the
/// packet grown by `grow` bytes; `mtu` gets the egress MTU when the kernel reports it (tc).
#[inline(always)]
fn fib<P: Packet>(
    ctx: &P,
    flow: &Flow,
    (src_addr, src_port): (u32, u16),
    (dst_addr, dst_port): (u32, u16),
    grow: u16,
    mtu: &mut u32,
) -> Hop {
    let Ok(ip) = ptr_at::<P, Ipv4Hdr>(ctx, flow.l3) else {
        return Hop::without(Route::Unresolved, 0, 0);
    };
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = flow.proto;
        params.sport = src_port;
        params.dport = dst_port;
        // XDP: the kernel checks this length (grown) against the egress MTU. tc: 0 lets it
        // check the skb itself, which also knows about GSO, and report the MTU (a packet that
        // grows is checked below).
        params.__bindgen_anon_1.tot_len = if P::IS_XDP {
            u16::from_be_bytes((*ip).tot_len).saturating_add(grow)
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
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            return Hop::without(Route::TooBig, 0, mtu);
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => return Hop::without(Route::NoNeighbour, params.ifindex, 0),
        _ => return Hop::without(Route::Unresolved, 0, 0),
    }
    if !P::IS_XDP {
        *mtu = unsafe { params.__bindgen_anon_1.mtu_result } as u32;
        // Each segment (the packet, or each of a GSO packet's) must fit grown.
        if grow != 0 && ctx.largest_segment(flow) + grow as u32 > *mtu {
            return Hop::without(Route::TooBig, 0, *mtu as u16);
        }
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    Hop {
        route: Route::Ready,
        mtu: 0,
        ifindex: params.ifindex,
        macs,
    }
}
