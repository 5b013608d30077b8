//! Socket-level balancing for clients on the node, in any network namespace (cgroup v2 sock_addr
//! hooks, as Cilium's socket LB): connect() and sendmsg() to a frontend go straight to a backend
//! chosen by the same Maglev table and affinity as packets, so those flows need no per-packet
//! NAT, no checksum fix-up and no conntrack. getpeername() and the source of received datagrams
//! show the frontend again, from LB_SOCK_REVNAT (socket cookie, backend) → frontend.
//!
//! Choices:
//! - The Maglev slot comes from the socket cookie: one socket keeps its backend (a UDP client
//!   sending with sendto() talks to one backend), different sockets spread.
//! - ClientIP affinity keys on the client's network namespace (its netns cookie, folded to 32
//!   bits): all sockets of one pod, or of the host, stick together.
//! - loadBalancerSourceRanges are not applied: the node's own clients are let in, as kube-proxy
//!   lets the node's addresses in.
//! - A service without endpoints fails connect()/sendmsg() at once with ECONNREFUSED.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, SockRevEntry, SockRevKey, hash::flow_hash};

use crate::{
    maps::LB_SOCK_REVNAT,
    service::{self, NoPick},
};

/// Verdicts of a sock_addr program.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect4 / sendmsg4: a frontend destination becomes a backend.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == IPPROTO_TCP as u32 => IPPROTO_TCP,
        p if p == IPPROTO_UDP as u32 => IPPROTO_UDP,
        _ => return ALLOW,
    };
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    let Some(frontend) = service::frontend(addr, port, proto) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let hash = flow_hash(cookie as u32, addr, (cookie >> 32) as u16, port, proto);
    let client = (netns ^ (netns >> 32)) as u32;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let pick = match service::pick(&frontend, hash, client, now, false) {
        Ok(pick) => pick,
        Err(NoPick::NoEndpoint) => {
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
        // Tables in flux: the packet path takes it.
        Err(NoPick::Unavailable) => return ALLOW,
    };
    let key = SockRevKey {
        cookie,
        addr: pick.backend.addr,
        port: pick.backend.port,
        _pad: 0,
    };
    let entry = SockRevEntry {
        addr,
        port,
        proto,
        _pad: 0,
        backend_id: pick.backend_id,
        frontend_id: pick.frontend_id,
    };
    // An unconnected UDP socket comes here for every datagram: write only what is new.
    if unsafe { LB_SOCK_REVNAT.get(&key) } != Some(&entry) {
        let _ = LB_SOCK_REVNAT.insert(&key, &entry, 0);
    }
    sa.user_ip4 = pick.backend.addr;
    sa.user_port = pick.backend.port as u32;
    ALLOW
}

/// getpeername4 / recvmsg4: a backend this socket was balanced to shows as its frontend.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    if let Some(entry) = unsafe { LB_SOCK_REVNAT.get(&key) } {
        sa.user_ip4 = entry.addr;
        sa.user_port = entry.port as u32;
    }
    ALLOW
}
