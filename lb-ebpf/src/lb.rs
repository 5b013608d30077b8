//! The packet path of a node's interfaces, the same for XDP and tc. It reads top to bottom:
//!
//! Ethernet → ARP request for an announced address? answer it.
//! IPv4 → TCP/UDP (a later fragment takes its first fragment's ports) → TTL ≤ 1? the kernel's
//! (it answers Time Exceeded) →
//!   conntrack hit on the 5-tuple (one lookup serves both directions; replies to SNATed flows
//!   are in LB_NAT):
//!     forward entry (client → frontend) → DNAT to the backend it holds (and SNAT);
//!     reply entry (backend → client) → rewrite the source back to the frontend (and the
//!     destination back to the client);
//!   else frontend hit (vip, port, proto) → policies → Maglev → backend → next hop → SNAT
//!   needed? (external traffic leaving by an uplink, or a hairpin: [`snat`]) → conntrack insert
//!   (and a NAT port; none free: refused) → DNAT (and SNAT, or the DSR option: [`dsr`]);
//!   else untouched.
//! A request another node sent by DSR (it carries our IPv4 option) → its frontend remembered
//! for the replies, option removed, on to the pod.
//! ICMP errors about a translated flow → translated back (tc).
//! A frontend without endpoints answers TCP with a RST and UDP with ICMP port unreachable;
//! loadBalancerSourceRanges drop others.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{Counters, ct_flags, hash::flow_hash};

use crate::{
    arp,
    conntrack::{self, Hit, NO_NEXTHOP},
    dsr, icmp,
    maps::{LB_BACKEND_STATS, LB_FRONTEND_STATS, LB_NEXTHOPS},
    nat::{self, Side},
    packet::Packet,
    parse::{self, Parsed},
    reject,
    service::{self, NoPick},
    snat,
};

#[inline(always)]
pub fn balance<P: Packet>(ctx: &P) -> Result<u32, ()> {
    let flow = match parse::parse(ctx)? {
        Parsed::Arp => return arp::reply(ctx),
        // Rare: tc (behind XDP, or alone) handles ICMP errors.
        Parsed::Icmp(_) if P::IS_XDP => return Ok(P::PASS),
        Parsed::Icmp(l3) => return icmp::translate_error(ctx, l3),
        Parsed::Other => return Ok(P::PASS),
        Parsed::Flow(flow) => flow,
    };
    if flow.ttl <= 1 {
        return Ok(P::PASS);
    }
    let len = ctx.len();
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A request another node sent here by DSR: remember its frontend for the replies.
    if let Some(frontend) = dsr::carried(ctx, &flow) {
        return dsr::accept(ctx, &flow, frontend, now);
    }

    match conntrack::lookup(&flow, now) {
        Hit::Reply(entry) => {
            let entry = unsafe { &mut *entry };
            let frontend = (entry.nat_addr, entry.nat_port);
            let client = (entry.client_addr, entry.client_port);
            return Ok(nat::translate(
                ctx,
                &flow,
                Side::Source,
                frontend,
                client,
                (0, 0),
                now,
                (!flow.trace).then_some(&mut entry.nexthop),
            ));
        }
        Hit::Forward(entry) => {
            let entry = unsafe { &mut *entry };
            let backend = (entry.nat_addr, entry.nat_port);
            let (frontend_id, backend_id) = (entry.frontend_id, entry.backend_id);
            // DSR: every packet that can carries the frontend to the backend's node.
            let carry = if entry.flags & ct_flags::DSR != 0 && dsr::can_carry(&flow) {
                (flow.dst_addr, flow.dst_port)
            } else {
                (0, 0)
            };
            let client = (entry.client_addr, entry.client_port);
            let verdict = nat::translate(
                ctx,
                &flow,
                Side::Destination,
                backend,
                client,
                carry,
                now,
                (!flow.trace).then_some(&mut entry.nexthop),
            );
            count::<P>(&flow, verdict, frontend_id, backend_id, len);
            return Ok(verdict);
        }
        Hit::Miss => {}
    }

    let Some(frontend) = service::frontend(flow.dst_addr, flow.dst_port, flow.proto) else {
        return Ok(P::PASS);
    };
    if !service::source_allowed(&frontend, flow.src_addr) {
        return Ok(P::DROP);
    }
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let pick = match service::pick(&frontend, hash, flow.src_addr, now, flow.trace) {
        Ok(pick) => pick,
        Err(NoPick::NoEndpoint) => return reject::no_endpoint(ctx, &flow),
        Err(NoPick::Unavailable) => return Ok(P::PASS),
    };
    // The flow's entry starts from the backend's next hop (as last resolved, while fresh).
    let backend = (pick.backend.addr, pick.backend.port);
    let mut nexthop = LB_NEXTHOPS
        .get_ptr_mut(pick.backend_id)
        .filter(|_| !flow.trace)
        .map(|n| unsafe { &mut *n });
    let mut hop = nat::next_hop(
        ctx,
        &flow,
        (flow.src_addr, flow.src_port),
        backend,
        0,
        now,
        nexthop.as_deref_mut(),
    );
    if P::IS_XDP && !hop.sendable(ctx) {
        // tc on this interface takes the whole decision, SNAT included.
        return Ok(P::PASS);
    }
    let out = snat::outbound(ctx, &flow, backend.0, &hop);
    let carry = if out.dsr {
        // The way out again, for the packet with the option.
        let frontend = (flow.dst_addr, flow.dst_port);
        hop = nat::next_hop(
            ctx,
            &flow,
            (flow.src_addr, flow.src_port),
            backend,
            nat::growth(frontend),
            now,
            None,
        );
        if P::IS_XDP && !hop.sendable(ctx) {
            return Ok(P::PASS);
        }
        frontend
    } else {
        (0, 0)
    };
    // A trace inserts nothing: the source is shown SNATed with the client's own port (a real
    // packet gets a port from the allocator).
    let inserted = if flow.trace {
        Ok((
            out.snat_addr,
            if out.snat_addr != 0 { flow.src_port } else { 0 },
        ))
    } else {
        conntrack::insert(
            &flow,
            &pick,
            now,
            nexthop.as_ref().map_or(&NO_NEXTHOP, |n| &**n),
            out.snat_addr,
            out.dsr,
        )
    };
    let Ok(other) = inserted else {
        // No port free (SNAT, or a clash-free source port): the new flow is refused (counted),
        // open ones keep theirs. (The kernel could not serve it: the frontend is ours.)
        return Ok(P::DROP);
    };
    let verdict = nat::send_translated(ctx, &flow, Side::Destination, backend, other, carry, hop);
    count::<P>(&flow, verdict, pick.frontend_id, pick.backend_id, len);
    Ok(verdict)
}

/// Counts a forwarded packet once: not when XDP leaves it to tc.
#[inline(always)]
fn count<P: Packet>(flow: &parse::Flow, verdict: u32, frontend_id: u32, backend_id: u32, len: u64) {
    if (P::IS_XDP && verdict == P::PASS) || flow.trace {
        return;
    }
    for (map, index) in [
        (&LB_FRONTEND_STATS, frontend_id),
        (&LB_BACKEND_STATS, backend_id),
    ] {
        if let Some(c) = map.get_ptr_mut(index) {
            let c: &mut Counters = unsafe { &mut *c };
            c.packets += 1;
            c.bytes += len;
        }
    }
}
