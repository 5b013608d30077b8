//! Conntrack: one LRU map keyed by the bare 5-tuple, so one lookup serves a packet of either
//! direction. A flow has a forward entry (client → frontend, holding the backend) and a reply
//! entry (backend → client, holding the frontend to restore).
//!
//! Entries age by state ([`CtTimeouts`], set at load time): an expired entry found by a packet is
//! deleted and the packet treated as new, with or without the agent running (its sweeper only
//! reclaims entries no packet comes back for). Two flows from one client address and port to two
//! frontends that share a backend would meet the backend with the same tuple: the second gets
//! another source port. A reply entry the LRU evicted is restored from its forward entry.
//! A SNATed flow's reply entry lives in LB_NAT instead (see [`crate::snat`]), where no LRU
//! evicts it.

use lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey, CtTimeouts, NextHop, ct_flags, ct_stats,
};

use crate::{
    maps::{LB_CONNTRACK, LB_CT_STATS},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    service::{Pick, backend_is},
    snat,
};

/// Conntrack timestamps are refreshed at most this often, to keep hot entries' cache lines clean.
const REFRESH_NS: u64 = 1_000_000_000;
const BPF_NOEXIST: u64 = 1;
/// Source ports tried for a flow whose own would clash (the ephemeral range).
const CLASH_PORT_BASE: u32 = 32_768;
const CLASH_PORT_SPAN: u32 = 28_232;
const CLASH_TRIES: u32 = 8;

/// Set by the agent at load time (`--ct-timeout-*`).
#[unsafe(no_mangle)]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

#[inline(always)]
pub(crate) fn timeouts() -> CtTimeouts {
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) }
}

pub const NO_NEXTHOP: NextHop = NextHop {
    addr: 0,
    ifindex: 0,
    macs: [0; 12],
    mtu: 0,
    checked_ns: 0,
};

/// What conntrack says about a packet.
pub enum Hit {
    /// Client → frontend of a known flow: DNAT to the backend in the entry.
    Forward(*mut CtEntry),
    /// Backend → client: restore the frontend as the source.
    Reply(*mut CtEntry),
    /// Not a known flow (or a new connection that must pick again).
    Miss,
}

#[inline(always)]
pub fn key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
pub(crate) fn count(slot: u32, n: u64) {
    if let Some(c) = LB_CT_STATS.get_ptr_mut(slot) {
        unsafe { *c += n };
    }
}

/// Looks the 5-tuple up (in LB_NAT too, for replies to SNATed flows). An expired entry is
/// deleted and missed. A fresh SYN on a tuple whose flow ended, or whose backend left, is a
/// miss (it picks again through the frontend); everything else sticks to the backend it had,
/// even one no longer configured.
#[inline(always)]
pub fn lookup(flow: &Flow, now: u64) -> Hit {
    let key = key(flow);
    let (entry, nat) = match LB_CONNTRACK.get_ptr_mut(&key) {
        Some(e) => (e, false),
        None => match snat::lookup(&key) {
            Some(e) => (e, true),
            None => return Hit::Miss,
        },
    };
    let e = unsafe { &mut *entry };
    if timeouts().expired(flow.proto, e.flags, e.last_seen_ns, now) {
        if flow.trace {
            return Hit::Miss;
        }
        if nat {
            snat::remove(&key);
        } else {
            let _ = LB_CONNTRACK.remove(&key);
        }
        count(ct_stats::EXPIRED, 1);
        return Hit::Miss;
    }
    let closing = flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // A trace decides the same, without learning a state or refreshing an entry.
    if e.dir == CT_DIR_REPLY && flow.trace {
        return Hit::Reply(entry);
    }
    if e.dir == CT_DIR_REPLY {
        let learned = ct_flags::REPLIED | if closing { ct_flags::CLOSING } else { 0 };
        if e.flags & learned != learned {
            // Once per state change: the forward entry's timeout depends on it too.
            e.flags |= learned;
            if let Some(f) = LB_CONNTRACK.get_ptr_mut(&forward_key(flow, e)) {
                unsafe { (*f).flags |= learned };
            }
        }
        refresh(e, now);
        return Hit::Reply(entry);
    }
    let new_connection = flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let keep = !new_connection
        || (e.flags & ct_flags::CLOSING == 0 && backend_is(e.backend_id, e.nat_addr, e.nat_port));
    if !keep {
        return Hit::Miss;
    }
    if flow.trace {
        return Hit::Forward(entry);
    }
    if closing && e.flags & ct_flags::CLOSING == 0 {
        e.flags |= ct_flags::CLOSING;
        // The NAT entry ages as closing now too (its port is free 10 s later).
        if e.client_addr != 0 {
            snat::refresh(flow, e, now);
        }
    }
    if now.wrapping_sub(e.last_seen_ns) > REFRESH_NS {
        e.last_seen_ns = now;
        if e.client_addr != 0 {
            snat::refresh(flow, e, now);
        } else if e.flags & ct_flags::DSR == 0 {
            restore_reply(flow, e, now);
        }
    }
    Hit::Forward(entry)
}

#[inline(always)]
fn refresh(entry: &mut CtEntry, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// The forward key of the flow a reply (backend → client) belongs to.
#[inline(always)]
fn forward_key(reply: &Flow, entry: &CtEntry) -> CtKey {
    CtKey {
        src_addr: if entry.client_addr != 0 {
            entry.client_addr
        } else {
            reply.dst_addr
        },
        dst_addr: entry.nat_addr,
        src_port: if entry.client_port != 0 {
            entry.client_port
        } else {
            reply.dst_port
        },
        dst_port: entry.nat_port,
        proto: reply.proto,
        _pad: [0; 3],
    }
}

/// The reply key of a forward flow toward backend `addr:port`, from source port `port_on_wire`.
#[inline(always)]
fn reply_key(flow: &Flow, (addr, port): (u32, u16), port_on_wire: u16) -> CtKey {
    CtKey {
        src_addr: addr,
        dst_addr: flow.src_addr,
        src_port: port,
        dst_port: port_on_wire,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// The reply entry of a forward flow (whose entry is `forward`): the frontend, and the client's
/// port and address where the flow leaves with others (a clash-free port; SNAT: both).
#[inline(always)]
pub(crate) fn reply_entry(flow: &Flow, forward: &CtEntry, now: u64) -> CtEntry {
    let snat = forward.client_addr != 0;
    CtEntry {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        dir: CT_DIR_REPLY,
        last_seen_ns: now,
        client_addr: if snat { flow.src_addr } else { 0 },
        client_port: if forward.client_port != 0 || snat {
            flow.src_port
        } else {
            0
        },
        nexthop: NO_NEXTHOP,
        ..*forward
    }
}

/// Checked about once a second per flow: a reply entry the LRU evicted comes back.
#[inline(always)]
fn restore_reply(flow: &Flow, forward: &CtEntry, now: u64) {
    let port_on_wire = if forward.client_port != 0 {
        forward.client_port
    } else {
        flow.src_port
    };
    let key = reply_key(flow, (forward.nat_addr, forward.nat_port), port_on_wire);
    if unsafe { LB_CONNTRACK.get(&key) }.is_none() {
        let _ = LB_CONNTRACK.insert(&key, &reply_entry(flow, forward, now), BPF_NOEXIST);
        count(ct_stats::REPLY_RESTORED, 1);
        count(ct_stats::INSERTED, 1);
    }
}

/// Records a new flow to `pick`: the reply entry first, since replies can arrive as soon as the
/// forward entry exists. With `snat_addr` (non-zero) the flow is SNATed to it and a NAT port;
/// with `dsr` it goes by direct server return (no reply entry: replies never come here).
/// Returns the source address and port the flow uses toward the backend if they change (0:
/// the client's own), or Err when no free port was found.
#[inline(always)]
pub fn insert(
    flow: &Flow,
    pick: &Pick,
    now: u64,
    nexthop: &NextHop,
    snat_addr: u32,
    dsr: bool,
) -> Result<(u32, u16), ()> {
    let backend = (pick.backend.addr, pick.backend.port);
    let mut forward = CtEntry {
        nat_addr: pick.backend.addr,
        nat_port: pick.backend.port,
        flags: 0,
        dir: CT_DIR_FORWARD,
        backend_id: pick.backend_id,
        frontend_id: pick.frontend_id,
        last_seen_ns: now,
        client_port: 0,
        _pad: [0; 2],
        client_addr: 0,
        nexthop: *nexthop,
    };
    if dsr {
        forward.flags = ct_flags::DSR;
        let _ = LB_CONNTRACK.insert(&key(flow), &forward, 0);
        count(ct_stats::INSERTED, 1);
        return Ok((0, 0));
    }
    if snat_addr != 0 {
        forward.client_addr = snat_addr;
        forward.client_port = snat::allocate(flow, backend, snat_addr, &forward, now)?;
        let _ = LB_CONNTRACK.insert(&key(flow), &forward, 0);
        count(ct_stats::INSERTED, 1);
        return Ok((snat_addr, forward.client_port));
    }
    let own = reply_key(flow, backend, flow.src_port);
    let clash = match unsafe { LB_CONNTRACK.get(&own) } {
        Some(r) => {
            (r.nat_addr != flow.dst_addr || r.nat_port != flow.dst_port || r.client_port != 0)
                && !timeouts().expired(flow.proto, r.flags, r.last_seen_ns, now)
        }
        None => false,
    };
    if !clash {
        let _ = LB_CONNTRACK.insert(&own, &reply_entry(flow, &forward, now), 0);
    } else {
        // The client's own port is part of the hash: one client's flows to one frontend try
        // different ports.
        let hash = lb_common::hash::flow_hash(
            flow.src_addr,
            flow.dst_addr,
            flow.src_port,
            flow.dst_port,
            flow.proto,
        );
        let mut chosen = 0u16;
        let mut i = 0;
        while i < CLASH_TRIES {
            let port = (CLASH_PORT_BASE
                + hash.wrapping_add(i.wrapping_mul(0x9e37)) % CLASH_PORT_SPAN)
                as u16;
            i += 1;
            forward.client_port = port.to_be();
            let key = reply_key(flow, backend, forward.client_port);
            // An expired flow's entry frees its port (another CPU may take it first).
            if let Some(r) = unsafe { LB_CONNTRACK.get(&key) } {
                if !timeouts().expired(flow.proto, r.flags, r.last_seen_ns, now) {
                    continue;
                }
                let _ = LB_CONNTRACK.remove(&key);
            }
            if LB_CONNTRACK
                .insert(&key, &reply_entry(flow, &forward, now), BPF_NOEXIST)
                .is_ok()
            {
                chosen = forward.client_port;
                break;
            }
        }
        if chosen == 0 {
            count(ct_stats::NAT_EXHAUSTED, 1);
            return Err(());
        }
        count(ct_stats::CLASH_PORTS, 1);
    }
    let _ = LB_CONNTRACK.insert(&key(flow), &forward, 0);
    count(ct_stats::INSERTED, 2);
    Ok((0, forward.client_port))
}
