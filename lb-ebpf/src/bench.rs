//! Benchmark-only programs and maps, in an object of their own so a node never loads or pins
//! them: the traffic generator `lb_gen`, the sink `lb_sink`, the replaying datapath `lb_replay`,
//! its floor `lb_replay_pass` and its conntrack work alone `lb_replay_conntrack`, the empty `lb_pass` and the redirect-only `lb_redirect`. They share the node's pinned maps
//! (and packet path) when loaded over the same bpffs directory.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{CtEntry, CtKey, GEN_ARP, GenConfig, REPLAY_MAX, RedirectConfig, ReplayFrame};
use lb_ebpf::{
    lb::balance,
    maps::LB_CONNTRACK,
    packet::ptr_at,
    reject::{fold, sum_words},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

#[map]
static LB_GEN: Array<GenConfig> = Array::pinned(1, 0);

#[map]
static LB_GEN_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(3, 0);

#[map]
static LB_REPLAY: Array<ReplayFrame> = Array::pinned(1, 0);

#[map]
static LB_REDIRECT: Array<RedirectConfig> = Array::pinned(1, 0);

/// The forwarding benchmark's ceiling: what this machine does when a program only rewrites the
/// MACs and redirects (no parsing, no lookups): the same path as the datapath's XDP_REDIRECT.
#[xdp]
pub fn lb_redirect(ctx: XdpContext) -> u32 {
    let Some(cfg) = LB_REDIRECT.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Ok(p) = ptr_at::<XdpContext, [u8; 12]>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    unsafe { *p = cfg.macs };
    unsafe { aya_ebpf::helpers::bpf_redirect(cfg.ifindex, 0) as u32 }
}

/// An empty program: the floor in benchmarks, and a way to give a veth peer the NAPI context that
/// XDP_REDIRECT into it needs.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark traffic generator (run with BPF_PROG_TEST_RUN live frames): rewrites the template
/// UDP frame's addresses and source port to the next flow (see [`GenConfig`]) and sends it with
/// XDP_TX. Not attached by the agent.
#[xdp]
pub fn lb_gen(ctx: XdpContext) -> u32 {
    try_gen(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn try_gen(ctx: &XdpContext) -> Result<u32, ()> {
    let cfg = *LB_GEN.get(0).ok_or(())?;
    let counter = LB_GEN_COUNTERS.get_ptr_mut(0).ok_or(())?;
    let n = unsafe { *counter };
    unsafe { *counter = n + 1 };
    let flow = if cfg.flows == 0 {
        n
    } else {
        n % cfg.flows as u64
    };
    let vips = cfg.vip_count.max(1) as u64;
    let rest = flow / vips;
    let dst = (cfg.vip_base + (flow % vips) as u32).to_be();
    // The counter is per CPU: a run that moves to another CPU would repeat its flows, so new
    // flows get the CPU in their source address (established flows are the same on any CPU).
    let cpu = if cfg.flows == 0 {
        (unsafe { bpf_get_smp_processor_id() }) << 16
    } else {
        0
    };
    let src = (cfg.src_base + (rest / 60_000) as u32 + cpu).to_be();
    let sport = (1024 + (rest % 60_000) as u16).to_be();
    if cfg.mode == GEN_ARP {
        // Ethernet + ARP request, all 42 bytes written: replies come back in the same pages.
        let p: *mut [u8; 42] = ptr_at(ctx, 0)?;
        let p = unsafe { &mut *p };
        p[..12].copy_from_slice(&cfg.macs);
        p[12] = 0x08;
        p[13] = 0x06;
        p[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        p[22..28].copy_from_slice(&cfg.macs[6..12]);
        p[28..32].copy_from_slice(&src.to_ne_bytes());
        p[32..38].copy_from_slice(&[0; 6]);
        p[38..42].copy_from_slice(&dst.to_ne_bytes());
        return Ok(xdp_action::XDP_TX);
    }
    const IP: usize = EthHdr::LEN;
    const UDP: usize = IP + Ipv4Hdr::LEN;
    let len = (ctx.data_end() - ctx.data()) as u16;
    let p: *mut [u8; UDP + 8] = ptr_at(ctx, 0)?;
    let p = unsafe { &mut *p };
    // Every header byte afresh: a node may have moved the headers of the frame this page held
    // (the DSR option is inserted by moving Ethernet and IPv4 toward the front).
    p[..12].copy_from_slice(&cfg.macs);
    p[12] = 0x08;
    p[13] = 0x00;
    p[IP] = 0x45;
    p[IP + 1] = 0;
    p[IP + 2..IP + 4].copy_from_slice(&(len - IP as u16).to_be_bytes());
    p[IP + 4..IP + 8].copy_from_slice(&[0x12, 0x34, 0x40, 0]);
    p[IP + 8] = 64; // TTL
    p[IP + 9] = 17; // UDP
    p[IP + 10] = 0;
    p[IP + 11] = 0;
    p[UDP + 4..UDP + 6].copy_from_slice(&(len - UDP as u16).to_be_bytes());
    p[IP + 12..IP + 16].copy_from_slice(&src.to_ne_bytes());
    p[IP + 16..IP + 20].copy_from_slice(&dst.to_ne_bytes());
    let sum = sum_words(&p[IP..IP + 20], 0);
    p[IP + 10..IP + 12].copy_from_slice(&fold(sum).to_be_bytes());
    p[UDP..UDP + 2].copy_from_slice(&sport.to_ne_bytes());
    p[UDP + 2..UDP + 4].copy_from_slice(&cfg.dport.to_ne_bytes());
    // UDP checksum 0: none.
    p[UDP + 6] = 0;
    p[UDP + 7] = 0;
    Ok(xdp_action::XDP_TX)
}

/// Benchmark replay (BPF_PROG_TEST_RUN with repeat): BPF_PROG_TEST_RUN runs every repetition on
/// the same buffer, so after its first run `lb` would see its own DNATed output (a miss). This
/// first writes the frame in LB_REPLAY[0] back over the packet, then runs the real datapath.
#[xdp]
pub fn lb_replay(ctx: XdpContext) -> u32 {
    if !replay(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    balance(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The floor for `lb_replay`: the same frame rewrite, then XDP_PASS.
#[xdp]
pub fn lb_replay_pass(ctx: XdpContext) -> u32 {
    if !replay(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_PASS
}

/// What conntrack alone costs a new flow, against the real (pinned) table: the replay, then
/// the datapath's map work for a first packet without the rest of its path: a lookup of the
/// 5-tuple (a miss), a lookup of the reply tuple (the clash check), and the two inserts, reply
/// then forward. Run with a new flow every run.
#[xdp]
pub fn lb_replay_conntrack(ctx: XdpContext) -> u32 {
    if !replay(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    // Ethernet + a 20-byte IPv4 header, then the ports (the replayed frames are built so).
    const IP: usize = EthHdr::LEN;
    let Ok(p) = ptr_at::<_, [u8; IP + Ipv4Hdr::LEN + 4]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let p = unsafe { &*p };
    let word = |at: usize| u32::from_ne_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let port = |at: usize| u16::from_ne_bytes([p[at], p[at + 1]]);
    let forward = CtKey {
        src_addr: word(IP + 12),
        dst_addr: word(IP + 16),
        src_port: port(IP + 20),
        dst_port: port(IP + 22),
        proto: p[IP + 9],
        _pad: [0; 3],
    };
    // Toward a backend (a fixed one: the key differs per run through the client's tuple).
    let reply = CtKey {
        src_addr: u32::from_ne_bytes([10, 1, 0, 1]),
        dst_addr: forward.src_addr,
        src_port: 8080u16.to_be(),
        dst_port: forward.src_port,
        ..forward
    };
    let entry: CtEntry = unsafe { core::mem::zeroed() };
    if LB_CONNTRACK.get_ptr(&forward).is_some() || unsafe { LB_CONNTRACK.get(&reply) }.is_some() {
        return xdp_action::XDP_DROP;
    }
    let _ = LB_CONNTRACK.insert(&reply, &entry, 0);
    let _ = LB_CONNTRACK.insert(&forward, &entry, 0);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn replay(ctx: &XdpContext) -> bool {
    let Some(frame) = LB_REPLAY.get_ptr_mut(0) else {
        return false;
    };
    let frame = unsafe { &mut *frame };
    let len = frame.len;
    if len == 0 || len as usize > REPLAY_MAX || len as usize != ctx.data_end() - ctx.data() {
        return false;
    }
    let stored = unsafe {
        bpf_xdp_store_bytes(
            ctx.as_ptr() as *mut _,
            0,
            frame.data.as_mut_ptr() as *mut _,
            // 1..=REPLAY_MAX in a form the verifier can follow (it equals len, checked above).
            ((len - 1) & (REPLAY_MAX as u32 - 1)) + 1,
        ) == 0
    };
    if !stored {
        return false;
    }
    if frame.new_flow != 0 {
        // Source port (1024..=65535) and the low 16 bits of the source address from the run
        // counter: a distinct 5-tuple for each of 64,512 × 65,536 runs.
        let n = frame.counter;
        frame.counter = n.wrapping_add(1);
        let (high, port) = (n / 64_512, (n % 64_512) as u16 + 1024);
        const SRC: usize = EthHdr::LEN + 12;
        const SPORT: usize = EthHdr::LEN + Ipv4Hdr::LEN;
        let Ok(p) = ptr_at::<_, [u8; SPORT + 2]>(ctx, 0) else {
            return false;
        };
        let p = unsafe { &mut *p };
        p[SRC + 2..SRC + 4].copy_from_slice(&(high as u16).to_be_bytes());
        p[SPORT..SPORT + 2].copy_from_slice(&port.to_be_bytes());
        if frame.spread > 1 {
            // The destination: the frame's own plus n mod spread (from the stored frame, not
            // the packet, which a run may have DNATed).
            const DST: usize = EthHdr::LEN + 16;
            let d = &frame.data;
            let base = u32::from_be_bytes([d[DST], d[DST + 1], d[DST + 2], d[DST + 3]]);
            let dst = base.wrapping_add(n % frame.spread);
            p[DST..DST + 4].copy_from_slice(&dst.to_be_bytes());
        }
        // The IPv4 header checksum again (the datapath drops a header that fails it).
        const IP: usize = EthHdr::LEN;
        p[IP + 10] = 0;
        p[IP + 11] = 0;
        let sum = sum_words(&p[IP..IP + Ipv4Hdr::LEN], 0);
        p[IP + 10..IP + 12].copy_from_slice(&fold(sum).to_be_bytes());
    }
    true
}

/// Benchmark sink: counts and drops what reaches it: IPv4 to a backend (10.128.0.0/9, the
/// benchmarks' endpoints) and valid ARP replies to the generator's questions in slot 1,
/// anything else in slot 2 (a packet the node did not translate still reaches the sink's link,
/// since the lab routes 10.0.0.0/8 there, and must not count as delivered; nor does an ARP
/// reply for an address nobody asked about, or one not addressed to the asker).
#[xdp]
pub fn lb_sink(ctx: XdpContext) -> u32 {
    let wanted = match ptr_at::<XdpContext, [u8; 34]>(&ctx, 0) {
        Ok(p) => {
            let p = unsafe { &*p };
            let ipv4_to_backend = p[12] == 0x08 && p[13] == 0 && p[30] == 10 && p[31] & 0x80 != 0;
            let arp = p[12] == 0x08 && p[13] == 0x06;
            ipv4_to_backend || (arp && valid_arp_reply(&ctx))
        }
        Err(()) => false,
    };
    if let Some(c) = LB_GEN_COUNTERS.get_ptr_mut(if wanted { 1 } else { 2 }) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

/// An Ethernet/IPv4 ARP reply ("X is at M") for an address the generator asks about
/// (LB_GEN's `vip_base`, `vip_count` of them), sent to the generator's MAC.
#[inline(always)]
fn valid_arp_reply(ctx: &XdpContext) -> bool {
    let Ok(p) = ptr_at::<XdpContext, [u8; 42]>(ctx, 0) else {
        return false;
    };
    let p = unsafe { &*p };
    let Some(cfg) = LB_GEN.get(0) else {
        return false;
    };
    let sender = u32::from_be_bytes([p[28], p[29], p[30], p[31]]);
    p[14..22] == [0, 1, 0x08, 0, 6, 4, 0, 2]
        && sender.wrapping_sub(cfg.vip_base) < cfg.vip_count.max(1)
        && p[0..6] == cfg.macs[6..12]
        && p[32..38] == cfg.macs[6..12]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
