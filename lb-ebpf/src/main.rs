//! The node's object: thin entry points over the packet paths in the library.
//! - `lb` (XDP) on interfaces whose driver runs XDP natively and delivers full checksums: the fast
//!   path; what it cannot finish (targets that do not take XDP frames, unresolved next hops) it
//!   leaves untouched to `lb_tc` on the same interface.
//! - `lb_tc` (tcx ingress) everywhere else (veths: partial checksums, no NAPI on the peer), and
//!   behind `lb`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_ebpf::lb::balance;

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    // Parse errors (short or odd frames) fail open.
    balance(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    balance(&ctx).map_or(TC_ACT_OK as i32, |v| v as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
