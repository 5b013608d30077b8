//! Source NAT, so replies come back through the node that translated the request:
//!
//! - external traffic (arrived on an uplink) to a backend reached through an uplink (on another
//!   node, or outside the cluster) leaves with that uplink's address as source, as kube-proxy's
//!   MASQUERADE and Cilium's NodePort SNAT do; traffic to local backends and traffic from local
//!   pods keeps its client address;
//! - a backend that calls its own Service and is picked itself (hairpin) gets the service
//!   loopback address as source: its own address would make its kernel drop the packet.
//!
//! Each SNATed flow holds one LB_NAT entry, keyed by its reply tuple (backend → node address and
//! NAT port). Ports are taken with an exclusive insert, so two live flows never share a tuple;
//! LB_NAT is not LRU, so a live flow is never evicted for a new one: when no port is free (all
//! tried are held by live flows) or the table is full, the new flow is refused and counted.
//! Entries age like conntrack (by state): packets refresh them, an expired one is reclaimed by
//! the next flow that tries its port or by the agent's sweeper.

use lb_common::{CtEntry, CtKey, NatConfig, ct_flags, ct_stats};

use crate::{
    conntrack::{count, reply_entry, timeouts},
    maps::{LB_NAT, LB_UPLINKS},
    nat::Hop,
    packet::Packet,
    parse::Flow,
};

/// Set by the agent at load time (`--service-loopback-address`, `--snat-port-range`).
#[unsafe(no_mangle)]
static NAT_CONFIG: NatConfig = NatConfig::DEFAULT;

/// Ports tried for a new flow before it is refused.
const TRIES: u32 = 16;
const BPF_NOEXIST: u64 = 1;
const E2BIG: i32 = 7;

#[inline(always)]
fn config() -> NatConfig {
    unsafe { core::ptr::read_volatile(&NAT_CONFIG) }
}

/// Could `key` be a reply tuple of a SNATed flow (its destination port in the NAT range)?
/// Only those are looked up in LB_NAT.
#[inline(always)]
fn nat_reply(key: &CtKey) -> bool {
    let c = config();
    let port = u16::from_be(key.dst_port);
    port >= c.port_min && port <= c.port_max
}

/// The LB_NAT entry of a reply tuple (backend → node address and NAT port), if it is one.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    if !nat_reply(key) {
        return None;
    }
    LB_NAT.get_ptr_mut(key)
}

/// [`lookup`]'s entry, copied: for ICMP errors about a SNATed flow.
#[inline(always)]
pub fn get(key: &CtKey) -> Option<CtEntry> {
    lookup(key).map(|e| unsafe { *e })
}

/// How a new flow leaves: with `snat_addr` as source (0: the client's own), or by DSR.
pub struct Outbound {
    pub snat_addr: u32,
    pub dsr: bool,
}

/// How a new flow from `flow` to `backend_addr` leaving toward `hop` goes: a hairpin gets the
/// service loopback address; external traffic (arrived on an uplink) leaving by an uplink gets
/// the egress uplink's address, or DSR if `--lb-mode` says so; anything else keeps its source.
#[inline(always)]
pub fn outbound<P: Packet>(ctx: &P, flow: &Flow, backend_addr: u32, hop: &Hop) -> Outbound {
    let keep = Outbound {
        snat_addr: 0,
        dsr: false,
    };
    if backend_addr == flow.src_addr {
        return Outbound {
            snat_addr: config().loopback_addr,
            dsr: false,
        };
    }
    let Some(egress) = hop.egress() else {
        return keep;
    };
    if unsafe { LB_UPLINKS.get(&ctx.ifindex()) }.is_none() {
        return keep;
    }
    let Some(addr) = (unsafe { LB_UPLINKS.get(&egress) }).copied() else {
        return keep;
    };
    if crate::dsr::wanted(config().mode, flow) {
        return Outbound {
            snat_addr: 0,
            dsr: true,
        };
    }
    Outbound {
        snat_addr: addr,
        dsr: false,
    }
}

/// The LB_NAT key of a flow to `backend` SNATed to `addr:port`.
#[inline(always)]
fn key(proto: u8, (backend_addr, backend_port): (u32, u16), addr: u32, port: u16) -> CtKey {
    CtKey {
        src_addr: backend_addr,
        dst_addr: addr,
        src_port: backend_port,
        dst_port: port,
        proto,
        _pad: [0; 3],
    }
}

/// Is `e` the NAT entry of the flow `flow` (client → frontend)?
#[inline(always)]
fn same_flow(e: &CtEntry, flow: &Flow) -> bool {
    e.client_addr == flow.src_addr
        && e.client_port == flow.src_port
        && e.nat_addr == flow.dst_addr
        && e.nat_port == flow.dst_port
}

/// Takes a NAT port of `addr` for the new flow `flow` to `backend`, whose forward entry is
/// `forward`. The first port tried follows from the flow's tuple, so a flow whose forward entry
/// the conntrack LRU evicted finds its own port again. Returns the port (network byte order),
/// or Err when the flow is refused (counted).
#[inline(always)]
pub fn allocate(
    flow: &Flow,
    backend: (u32, u16),
    addr: u32,
    forward: &CtEntry,
    now: u64,
) -> Result<u16, ()> {
    let c = config();
    let span = (c.port_max as u32).saturating_sub(c.port_min as u32) + 1;
    let start = lb_common::hash::flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let reply = reply_entry(flow, forward, now);
    let mut i = 0;
    while i < TRIES {
        let port =
            ((c.port_min as u32 + start.wrapping_add(i.wrapping_mul(7919)) % span) as u16).to_be();
        i += 1;
        let key = key(flow.proto, backend, addr, port);
        if let Some(e) = LB_NAT.get_ptr_mut(&key) {
            let e = unsafe { &mut *e };
            if same_flow(e, flow) {
                *e = reply;
                return Ok(port);
            }
            if !timeouts().expired(flow.proto, e.flags, e.last_seen_ns, now) {
                continue;
            }
            // Expired: the port is free again (another CPU may win it first).
            let _ = LB_NAT.remove(&key);
        }
        match LB_NAT.insert(&key, &reply, BPF_NOEXIST) {
            Ok(()) => {
                count(ct_stats::NAT_ALLOCATED, 1);
                count(ct_stats::INSERTED, 1);
                return Ok(port);
            }
            Err(e) if e == -E2BIG => {
                count(ct_stats::NAT_FULL, 1);
                return Err(());
            }
            Err(_) => {}
        }
    }
    count(ct_stats::NAT_EXHAUSTED, 1);
    Err(())
}

/// About once a second per flow (from its forward entry): the NAT entry is refreshed and
/// learns the forward direction's state; one the agent's sweeper removed (the flow was idle
/// past its timeout) comes back if its port is still free.
#[inline(always)]
pub fn refresh(flow: &Flow, forward: &CtEntry, now: u64) {
    let key = key(
        flow.proto,
        (forward.nat_addr, forward.nat_port),
        forward.client_addr,
        forward.client_port,
    );
    match LB_NAT.get_ptr_mut(&key) {
        Some(e) => {
            let e = unsafe { &mut *e };
            if same_flow(e, flow) {
                e.last_seen_ns = now;
                e.flags |= forward.flags & (ct_flags::CLOSING | ct_flags::REPLIED);
            }
        }
        None => {
            if LB_NAT
                .insert(&key, &reply_entry(flow, forward, now), BPF_NOEXIST)
                .is_ok()
            {
                count(ct_stats::REPLY_RESTORED, 1);
                count(ct_stats::INSERTED, 1);
            }
        }
    }
}

/// Removes an expired NAT entry a reply found.
#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = LB_NAT.remove(key);
}
