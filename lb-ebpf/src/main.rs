//! The node's object: thin entry points over the packet paths in the library.
//! - `lb` (XDP) on interfaces whose driver runs XDP natively and delivers full checksums: the fast
//!   path; what it cannot finish (targets that do not take XDP frames, unresolved next hops) it
//!   leaves untouched to `lb_tc` on the same interface.
//! - `lb_tc` (tcx ingress) everywhere else (veths: partial checksums, no NAPI on the peer), and
//!   behind `lb`.
//! - `lb_connect4`, `lb_sendmsg4`, `lb_recvmsg4`, `lb_getpeername4` (cgroup v2) for clients on
//!   the node itself, host and pods alike.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_ebpf::{lb::balance, sock};

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    // Parse errors (short or odd frames) fail open.
    balance(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    balance(&ctx).map_or(TC_ACT_OK as i32, |v| v as i32)
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
