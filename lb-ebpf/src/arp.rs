//! ARP responder: a request for an address announced on the receiving interface (LoadBalancer
//! IPs, per the L2 announcement policies) is turned into the reply in place and sent back out of
//! that interface. Gratuitous requests (sender = target) and everything else go to the kernel.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::ArpKey;
use network_types::{arp::ArpHdr, eth::EthHdr};

use crate::{
    maps::{LB_ANNOUNCE, LB_ARP},
    packet::{Packet, ptr_at},
};

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

#[inline(always)]
pub fn reply<P: Packet>(ctx: &P) -> Result<u32, ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let arp: *mut ArpHdr = ptr_at(ctx, EthHdr::LEN)?;
    let a = unsafe { &mut *arp };
    if u16::from_be_bytes(a.htype) != 1
        || u16::from_be_bytes(a.ptype) != 0x0800
        || a.hlen != 6
        || a.plen != 4
        || u16::from_be_bytes(a.oper) != ARP_REQUEST
        || a.spa == a.tpa
    {
        return Ok(P::PASS);
    }
    let key = ArpKey {
        ifindex: ctx.ifindex(),
        addr: u32::from_ne_bytes(a.tpa),
    };
    let Some(entry) = LB_ARP.get_ptr_mut(&key) else {
        return Ok(P::PASS);
    };
    // This node's claim on its addresses lapsed (its agent stopped renewing its Lease):
    // another node answers now.
    let until = LB_ANNOUNCE.get(0).copied().unwrap_or(0);
    if until != 0 && unsafe { bpf_ktime_get_coarse_ns() } > until {
        return Ok(P::PASS);
    }
    let mac = unsafe { (*entry).mac };
    // Plain increment: the BPF target has no 64-bit atomic add in core, and two CPUs answering
    // the same address in the same instant only loses a count, never a reply.
    if !ctx.tracing() {
        unsafe { (*entry).replies += 1 };
    }
    let (requester_mac, requester_ip) = (a.sha, a.spa);
    a.oper = ARP_REPLY.to_be_bytes();
    a.tha = requester_mac;
    a.tpa = requester_ip;
    a.sha = mac;
    a.spa = key.addr.to_ne_bytes();
    unsafe {
        (*eth).dst_addr = requester_mac;
        (*eth).src_addr = mac;
    }
    Ok(ctx.send(ctx.ifindex()))
}
