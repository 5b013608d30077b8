//! Direct server return (`--lb-mode dsr`, or `hybrid` for TCP), the other way for external
//! traffic to reach a backend on another node without losing the client's address:
//!
//! - frontend node: DNAT only (the client's address stays), and every packet of the flow carries
//!   the frontend (address and port) in an IPv4 option ([`lb_common::DSR_OPTION_TYPE`]) inserted
//!   after the 20-byte header; replies never come back here;
//! - backend's node: a request from an uplink carrying the option leaves a reply entry (as a
//!   DNATed flow's) with that frontend, loses the option and goes on to the pod; the pod's
//!   replies are translated back to the frontend there and go straight to the client.
//!
//! The option adds 8 bytes: a packet that no longer fits the way out with DF set is answered with
//! "fragmentation needed" for 8 bytes less, so the client's path MTU makes room for it. A packet
//! with IPv4 options of its own, and later fragments, go without it (the backend's node knows the
//! flow from its first packet). Every backend must run behind a node with this datapath.

use lb_common::{
    CT_DIR_REPLY, CtEntry, CtKey, DSR_OPTION_LEN, DSR_OPTION_TYPE, IPPROTO_TCP, ct_flags, ct_stats,
    lb_mode,
};
use network_types::eth::EthHdr;

use crate::{
    conntrack::{NO_NEXTHOP, count},
    maps::{LB_CONNTRACK, LB_UPLINKS},
    packet::{Packet, ptr_at},
    parse::Flow,
    reject::{fold, sum_words},
};

const L3: usize = EthHdr::LEN;
const REFRESH_NS: u64 = 1_000_000_000;

/// Does a new external flow go by DSR under `mode`?
#[inline(always)]
pub fn wanted(mode: u8, flow: &Flow) -> bool {
    (mode == lb_mode::DSR || mode == lb_mode::HYBRID && flow.proto == IPPROTO_TCP)
        && can_carry(flow)
}

/// Can this packet carry the option (a 20-byte header, not a later fragment)?
#[inline(always)]
pub fn can_carry(flow: &Flow) -> bool {
    flow.l3 == L3 && flow.l4 == L3 + 20 && !flow.later_fragment
}

/// The frontend a request carries (backend's node), if it carries one.
#[inline(always)]
pub fn carried<P: Packet>(ctx: &P, flow: &Flow) -> Option<(u32, u16)> {
    if flow.l3 != L3 || flow.l4 != L3 + 20 + DSR_OPTION_LEN {
        return None;
    }
    let o: *const [u8; DSR_OPTION_LEN] = ptr_at(ctx, L3 + 20).ok()?;
    let o = unsafe { *o };
    if o[0] != DSR_OPTION_TYPE || o[1] as usize != DSR_OPTION_LEN {
        return None;
    }
    Some((
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u16::from_ne_bytes([o[2], o[3]]),
    ))
}

/// Backend's node: remembers `frontend` for the replies of `flow` (client → backend), removes
/// the option and leaves the request to the kernel, which forwards it to the pod. XDP leaves it
/// to tc; a request that did not come from an uplink is left alone.
#[inline(always)]
pub fn accept<P: Packet>(ctx: &P, flow: &Flow, frontend: (u32, u16), now: u64) -> Result<u32, ()> {
    if P::IS_XDP || unsafe { LB_UPLINKS.get(&ctx.ifindex()) }.is_none() {
        return Ok(P::PASS);
    }
    let key = CtKey {
        src_addr: flow.dst_addr,
        dst_addr: flow.src_addr,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let known = match LB_CONNTRACK.get_ptr_mut(&key) {
        Some(e) => {
            let e = unsafe { &mut *e };
            let same =
                e.dir == CT_DIR_REPLY && e.nat_addr == frontend.0 && e.nat_port == frontend.1;
            if same && !flow.trace && now.wrapping_sub(e.last_seen_ns) > REFRESH_NS {
                e.last_seen_ns = now;
            }
            same
        }
        None => false,
    };
    if !known && !flow.trace {
        let entry = CtEntry {
            nat_addr: frontend.0,
            nat_port: frontend.1,
            flags: ct_flags::DSR,
            dir: CT_DIR_REPLY,
            backend_id: 0,
            frontend_id: 0,
            last_seen_ns: now,
            client_port: 0,
            _pad: [0; 2],
            client_addr: 0,
            nexthop: NO_NEXTHOP,
        };
        let _ = LB_CONNTRACK.insert(&key, &entry, 0);
        count(ct_stats::INSERTED, 1);
    }
    ctx.close_after_ip_header()?;
    set_header(ctx, -(DSR_OPTION_LEN as i16))?;
    Ok(P::PASS)
}

/// Frontend node: inserts the option carrying `frontend` after the IPv4 header.
#[inline(always)]
pub fn add<P: Packet>(ctx: &P, (addr, port): (u32, u16)) -> Result<(), ()> {
    ctx.open_after_ip_header()?;
    let o: *mut [u8; DSR_OPTION_LEN] = ptr_at(ctx, L3 + 20)?;
    let p = port.to_ne_bytes();
    let a = addr.to_ne_bytes();
    unsafe {
        *o = [
            DSR_OPTION_TYPE,
            DSR_OPTION_LEN as u8,
            p[0],
            p[1],
            a[0],
            a[1],
            a[2],
            a[3],
        ]
    };
    set_header(ctx, DSR_OPTION_LEN as i16)
}

/// After the option went in (`delta` 8) or out (-8): header length, total length and the
/// header checksum, computed afresh.
#[inline(always)]
fn set_header<P: Packet>(ctx: &P, delta: i16) -> Result<(), ()> {
    if delta > 0 {
        let h: *mut [u8; 20 + DSR_OPTION_LEN] = ptr_at(ctx, L3)?;
        let h = unsafe { &mut *h };
        h[0] = 0x40 | ((20 + DSR_OPTION_LEN) / 4) as u8;
        fix_lengths(h, delta);
    } else {
        let h: *mut [u8; 20] = ptr_at(ctx, L3)?;
        let h = unsafe { &mut *h };
        h[0] = 0x45;
        fix_lengths(h, delta);
    }
    Ok(())
}

#[inline(always)]
fn fix_lengths<const N: usize>(h: &mut [u8; N], delta: i16) {
    let total = u16::from_be_bytes([h[2], h[3]]).wrapping_add(delta as u16);
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[10] = 0;
    h[11] = 0;
    let sum = fold(sum_words(h, 0));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}
