//! Conntrack: one LRU map keyed by the bare 5-tuple, so one lookup serves a packet of either
//! direction. A flow has a forward entry (client → frontend, holding the backend) and a reply
//! entry (backend → client, holding the frontend to restore).

use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey, NextHop, ct_flags};

use crate::{
    maps::LB_CONNTRACK,
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    service::{Pick, backend_is},
};

/// Conntrack timestamps are refreshed at most this often, to keep hot entries' cache lines clean.
const REFRESH_NS: u64 = 1_000_000_000;

pub const NO_NEXTHOP: NextHop = NextHop {
    addr: 0,
    ifindex: 0,
    macs: [0; 12],
    _pad: 0,
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

/// Looks the 5-tuple up and refreshes what it finds. A fresh SYN on a tuple whose flow ended, or
/// whose backend left, is a miss (it picks again through the frontend); everything else sticks to
/// the backend it had, even one no longer configured.
#[inline(always)]
pub fn lookup(flow: &Flow, now: u64) -> Hit {
    let Some(entry) = LB_CONNTRACK.get_ptr_mut(&key(flow)) else {
        return Hit::Miss;
    };
    let e = unsafe { &mut *entry };
    if e.dir == CT_DIR_REPLY {
        refresh(e, now);
        return Hit::Reply(entry);
    }
    let new_connection = flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let keep = !new_connection
        || (e.flags & ct_flags::CLOSING == 0 && backend_is(e.backend_id, e.nat_addr, e.nat_port));
    if !keep {
        return Hit::Miss;
    }
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && e.flags & ct_flags::CLOSING == 0 {
        e.flags |= ct_flags::CLOSING;
    }
    refresh(e, now);
    Hit::Forward(entry)
}

#[inline(always)]
fn refresh(entry: &mut CtEntry, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// Records a new flow to `pick`: the reply entry first, since replies can arrive as soon as the
/// forward entry exists. The forward entry starts from the backend's cached next hop.
#[inline(always)]
pub fn insert(flow: &Flow, pick: &Pick, now: u64, nexthop: &NextHop) {
    let forward = CtEntry {
        nat_addr: pick.backend.addr,
        nat_port: pick.backend.port,
        flags: 0,
        dir: CT_DIR_FORWARD,
        backend_id: pick.backend_id,
        frontend_id: pick.frontend_id,
        last_seen_ns: now,
        nexthop: *nexthop,
    };
    let reply_key = CtKey {
        src_addr: pick.backend.addr,
        dst_addr: flow.src_addr,
        src_port: pick.backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        dir: CT_DIR_REPLY,
        nexthop: NO_NEXTHOP,
        ..forward
    };
    let _ = LB_CONNTRACK.insert(&reply_key, &reply, 0);
    let _ = LB_CONNTRACK.insert(&key(flow), &forward, 0);
}
