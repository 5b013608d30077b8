//! XDP service load balancer. The packet path reads top to bottom:
//!
//! Ethernet → IPv4 (no fragments) → TCP/UDP →
//!   conntrack hit on the 5-tuple (one lookup serves both directions):
//!     forward entry (client → frontend) → DNAT to the backend it holds;
//!     reply entry (backend → client) → rewrite the source back to the frontend;
//!   else frontend hit (vip, port, proto): Maglev slot from the flow hash → backend; DNAT with
//!     incremental checksums; conntrack insert (forward + reply entry);
//!   else XDP_PASS untouched.
//! ARP requests for an address announced on the receiving interface (LoadBalancer IPs, per the
//! L2 announcement policies) are answered in place with XDP_TX; all other ARP passes untouched.
//! Rewritten packets go out by bpf_fib_lookup + redirect (or XDP_TX); when the FIB cannot resolve
//! the next hop the rewritten packet is passed to the kernel, which forwards it.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_tail,
        bpf_xdp_store_bytes,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    AffinityEntry, AffinityKey, ArpEntry, ArpKey, Backend, CT_DIR_FORWARD, CT_DIR_REPLY, Config,
    Counters, CtEntry, CtKey, DEFAULT_AFFINITY_SIZE, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAGLEV_SIZE,
    DEFAULT_MAX_ANNOUNCEMENTS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SOURCE_RANGES, Frontend, FrontendKey, GEN_ARP, GenConfig, IPPROTO_TCP, IPPROTO_UDP,
    MAGLEV_SPARE_BLOCKS, NEXTHOP_CACHE_NS, NextHop, REPLAY_MAX, ReplayFrame, SourceRange,
    backend_state, csum, ct_flags, frontend_flags, hash::flow_hash,
};
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

const BPF_F_MMAPABLE: u32 = 1 << 10;
const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Conntrack timestamps are refreshed at most this often, to keep hot entries' cache lines clean.
const CT_REFRESH_NS: u64 = 1_000_000_000;

#[map]
static LB_FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

#[map]
static LB_BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Flat array of Maglev blocks (block × M + slot → backend id), mmapped by the agent, which
/// writes a whole table into a free block before pointing frontends at it.
#[map]
static LB_MAGLEV: Array<u32> = Array::pinned(
    (DEFAULT_MAX_SERVICES + MAGLEV_SPARE_BLOCKS) * DEFAULT_MAGLEV_SIZE,
    BPF_F_MMAPABLE,
);

#[map]
static LB_CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(DEFAULT_CONNTRACK_SIZE, 0);

#[map]
static LB_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
static LB_FRONTEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(DEFAULT_MAX_FRONTENDS, 0);

#[map]
static LB_BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map]
static LB_ARP: HashMap<ArpKey, ArpEntry> = HashMap::pinned(DEFAULT_MAX_ANNOUNCEMENTS, 0);

#[map]
static LB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(DEFAULT_AFFINITY_SIZE, 0);

#[map]
static LB_SOURCE_RANGES: LpmTrie<SourceRange, u8> = LpmTrie::pinned(DEFAULT_MAX_SOURCE_RANGES, 0);

#[map]
static LB_GEN: Array<GenConfig> = Array::pinned(1, 0);

#[map]
static LB_GEN_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

#[map]
static LB_REPLAY: Array<ReplayFrame> = Array::pinned(1, 0);

#[map]
static LB_NEXTHOPS: Array<NextHop> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

const NO_NEXTHOP: NextHop = NextHop {
    addr: 0,
    ifindex: 0,
    macs: [0; 12],
    _pad: 0,
    checked_ns: 0,
};

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        // Parse errors (short or odd frames) fail open.
        Err(()) => xdp_action::XDP_PASS,
    }
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
    let src = (cfg.src_base + (rest / 60_000) as u32).to_be();
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
    let p: *mut [u8; UDP + 8] = ptr_at(ctx, 0)?;
    let p = unsafe { &mut *p };
    p[..12].copy_from_slice(&cfg.macs);
    p[IP + 8] = 64; // TTL
    p[IP + 10] = 0;
    p[IP + 11] = 0;
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
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// The floor for `lb_replay`: the same frame rewrite, then XDP_PASS.
#[xdp]
pub fn lb_replay_pass(ctx: XdpContext) -> u32 {
    if !replay(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
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
        // Source port and the low 16 bits of the source address from the run counter.
        let n = frame.counter;
        frame.counter = n.wrapping_add(1);
        const SRC: usize = EthHdr::LEN + 12;
        const SPORT: usize = EthHdr::LEN + Ipv4Hdr::LEN;
        let Ok(p) = ptr_at::<[u8; SPORT + 2]>(ctx, 0) else {
            return false;
        };
        let p = unsafe { &mut *p };
        p[SRC + 2..SRC + 4].copy_from_slice(&((n >> 16) as u16).to_be_bytes());
        p[SPORT..SPORT + 2].copy_from_slice(&((n as u16) | 1024).to_be_bytes());
    }
    true
}

/// Benchmark sink: counts and drops what reaches it.
#[xdp]
pub fn lb_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = LB_GEN_COUNTERS.get_ptr_mut(1) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Where the L4 ports and checksum live, so one rewrite routine serves TCP and UDP.
struct L4 {
    proto: u8,
    src_port: *mut [u8; 2],
    dst_port: *mut [u8; 2],
    check: *mut [u8; 2],
    tcp_flags: u8,
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Arp as u16 {
        return arp_reply(ctx, eth);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let vihl = unsafe { (*ip).vihl };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Ok(xdp_action::XDP_PASS);
    }
    // Fragments carry no (or only the first) L4 header; leave them to the kernel.
    if u16::from_be_bytes(unsafe { (*ip).frags }) & 0x3fff != 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    let l4_off = EthHdr::LEN + ihl;
    let proto = unsafe { (*ip).proto };
    let l4 = match proto {
        IPPROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4_off)?;
            // Flags live in the 14th byte of the TCP header (inside the bounds-checked header).
            let flags = unsafe { (tcp as *const u8).add(13) };
            unsafe {
                L4 {
                    proto,
                    src_port: &raw mut (*tcp).source,
                    dst_port: &raw mut (*tcp).dest,
                    check: &raw mut (*tcp).check,
                    tcp_flags: *flags,
                }
            }
        }
        IPPROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4_off)?;
            unsafe {
                L4 {
                    proto,
                    src_port: &raw mut (*udp).src,
                    dst_port: &raw mut (*udp).dst,
                    check: &raw mut (*udp).check,
                    tcp_flags: 0,
                }
            }
        }
        _ => return Ok(xdp_action::XDP_PASS),
    };
    let src_addr = u32::from_ne_bytes(unsafe { (*ip).src_addr });
    let dst_addr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let src_port = u16::from_ne_bytes(unsafe { *l4.src_port });
    let dst_port = u16::from_ne_bytes(unsafe { *l4.dst_port });
    let packet_len = (ctx.data_end() - ctx.data()) as u64;

    // One conntrack lookup first: established flows in both directions need nothing else.
    let ct_key = CtKey {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        _pad: [0; 3],
    };
    let closing = l4.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let new_connection = l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(entry) = LB_CONNTRACK.get_ptr_mut(&ct_key) {
        let entry = unsafe { &mut *entry };
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if entry.dir == CT_DIR_REPLY {
            // Backend → client: restore the frontend as the source.
            refresh(entry, now);
            let (frontend_addr, frontend_port) = (entry.nat_addr, entry.nat_port);
            unsafe {
                rewrite(
                    ip,
                    &l4,
                    &raw mut (*ip).src_addr,
                    src_addr,
                    frontend_addr,
                    l4.src_port,
                    src_port,
                    frontend_port,
                );
            }
            return Ok(redirect(ctx, eth, ip, &l4, now, Some(&mut entry.nexthop)));
        }
        // Client → frontend. A fresh SYN on a tuple whose flow ended, or whose backend left,
        // picks again through the frontend; everything else sticks to the backend it had, even
        // one no longer configured.
        let keep = !new_connection
            || (entry.flags & ct_flags::CLOSING == 0
                && backend_is(entry.backend_id, entry.nat_addr, entry.nat_port));
        if keep {
            if closing && entry.flags & ct_flags::CLOSING == 0 {
                entry.flags |= ct_flags::CLOSING;
            }
            refresh(entry, now);
            let (backend_addr, backend_port) = (entry.nat_addr, entry.nat_port);
            count(&LB_FRONTEND_STATS, entry.frontend_id, packet_len);
            count(&LB_BACKEND_STATS, entry.backend_id, packet_len);
            return Ok(forward(
                ctx,
                eth,
                ip,
                &l4,
                (dst_addr, dst_port),
                (backend_addr, backend_port),
                now,
                Some(&mut entry.nexthop),
            ));
        }
    }

    let frontend_key = FrontendKey {
        addr: dst_addr,
        port: dst_port,
        proto,
        _pad: 0,
    };
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(&frontend_key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let frontend = *frontend;
    // loadBalancerSourceRanges: sources outside the service's ranges are dropped here.
    if frontend.flags & frontend_flags::SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SourceRange {
                service_id_be: frontend.service_id.to_be(),
                addr: src_addr,
            },
        );
        if LB_SOURCE_RANGES.get(&key).is_none() {
            return Ok(xdp_action::XDP_DROP);
        }
    }
    if frontend.backend_count == 0 {
        return no_endpoint(ctx, proto, l4.tcp_flags, ihl);
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let affinity = frontend.flags & frontend_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        service_id: frontend.service_id,
        client: src_addr,
    };
    let mut backend_id = 0;
    if affinity {
        if let Some(a) = unsafe { LB_AFFINITY.get(&affinity_key) } {
            let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_seen_ns) < timeout_ns && backend_is_active(a.backend_id) {
                backend_id = a.backend_id;
            }
        }
    }
    if backend_id == 0 {
        if frontend.maglev_size == 0 {
            return Ok(xdp_action::XDP_PASS);
        }
        let slot = flow_hash(src_addr, dst_addr, src_port, dst_port, proto) % frontend.maglev_size;
        backend_id = match LB_MAGLEV.get(frontend.maglev_offset + slot) {
            Some(id) if *id != 0 => *id,
            _ => return Ok(xdp_action::XDP_PASS),
        };
    }
    let backend = match LB_BACKENDS.get(backend_id) {
        Some(b) if b.state == backend_state::ACTIVE => *b,
        _ => return Ok(xdp_action::XDP_PASS),
    };
    if affinity {
        let entry = AffinityEntry {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = LB_AFFINITY.insert(&affinity_key, &entry, 0);
    }
    // First packets use the backend's next hop, which the flow's own entry starts from.
    let nexthop = LB_NEXTHOPS
        .get_ptr_mut(backend_id)
        .map(|n| unsafe { &mut *n });
    let forward_entry = CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        dir: CT_DIR_FORWARD,
        backend_id,
        frontend_id: frontend.frontend_id,
        last_seen_ns: now,
        // The backend's next hop as last resolved (checked again before use, like any cache).
        nexthop: nexthop.as_ref().map_or(NO_NEXTHOP, |n| **n),
    };
    let reply_key = CtKey {
        src_addr: backend.addr,
        dst_addr: src_addr,
        src_port: backend.port,
        dst_port: src_port,
        proto,
        _pad: [0; 3],
    };
    let reply_entry = CtEntry {
        nat_addr: dst_addr,
        nat_port: dst_port,
        dir: CT_DIR_REPLY,
        nexthop: NO_NEXTHOP,
        ..forward_entry
    };
    // Reply entry first: once the forward entry exists, replies can arrive.
    let _ = LB_CONNTRACK.insert(&reply_key, &reply_entry, 0);
    let _ = LB_CONNTRACK.insert(&ct_key, &forward_entry, 0);
    count(&LB_FRONTEND_STATS, frontend.frontend_id, packet_len);
    count(&LB_BACKEND_STATS, backend_id, packet_len);
    Ok(forward(
        ctx,
        eth,
        ip,
        &l4,
        (dst_addr, dst_port),
        (backend.addr, backend.port),
        now,
        nexthop,
    ))
}

/// Refreshes a conntrack entry's timestamp (at most once a second).
#[inline(always)]
fn refresh(entry: &mut CtEntry, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// DNAT from the frontend to the backend, then on its way.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    (dst_addr, dst_port): (u32, u16),
    (backend_addr, backend_port): (u32, u16),
    now: u64,
    cache: Option<&mut NextHop>,
) -> u32 {
    unsafe {
        rewrite(
            ip,
            l4,
            &raw mut (*ip).dst_addr,
            dst_addr,
            backend_addr,
            l4.dst_port,
            dst_port,
            backend_port,
        );
    }
    redirect(ctx, eth, ip, l4, now, cache)
}

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// Answers an Ethernet/IPv4 ARP request for an address announced on this interface by turning
/// the request into the reply in place and sending it back out (XDP_TX). Gratuitous requests
/// (sender = target) and everything else go to the kernel.
#[inline(always)]
fn arp_reply(ctx: &XdpContext, eth: *mut EthHdr) -> Result<u32, ()> {
    let arp: *mut ArpHdr = ptr_at(ctx, EthHdr::LEN)?;
    let a = unsafe { &mut *arp };
    if u16::from_be_bytes(a.htype) != 1
        || u16::from_be_bytes(a.ptype) != 0x0800
        || a.hlen != 6
        || a.plen != 4
        || u16::from_be_bytes(a.oper) != ARP_REQUEST
        || a.spa == a.tpa
    {
        return Ok(xdp_action::XDP_PASS);
    }
    let key = ArpKey {
        ifindex: ctx.ingress_ifindex() as u32,
        addr: u32::from_ne_bytes(a.tpa),
    };
    let Some(entry) = LB_ARP.get_ptr_mut(&key) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let mac = unsafe { (*entry).mac };
    // Plain increment: the BPF target has no 64-bit atomic add in core, and two CPUs answering
    // the same address in the same instant only loses a count, never a reply.
    unsafe { (*entry).replies += 1 };
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
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn backend_is_active(id: u32) -> bool {
    matches!(LB_BACKENDS.get(id), Some(b) if b.state == backend_state::ACTIVE)
}

/// A service without ready endpoints: TCP gets a RST back out of the interface it came in on
/// (the client fails at once, as with kube-proxy's REJECT, instead of retrying SYNs into a
/// void); UDP, and anything odd, is dropped.
#[inline(always)]
fn no_endpoint(ctx: &XdpContext, proto: u8, tcp_flags: u8, ihl: usize) -> Result<u32, ()> {
    if proto != IPPROTO_TCP || tcp_flags & TCP_RST != 0 || ihl != Ipv4Hdr::LEN {
        return Ok(xdp_action::XDP_DROP);
    }
    const IP: usize = EthHdr::LEN;
    const TCP: usize = EthHdr::LEN + Ipv4Hdr::LEN;
    const LEN: usize = TCP + 20;
    let old: *const [u8; LEN] = ptr_at(ctx, 0)?;
    let old = unsafe { &*old };
    let tot_len = u16::from_be_bytes([old[IP + 2], old[IP + 3]]) as u32;
    let doff = ((old[TCP + 12] >> 4) as u32) * 4;
    if doff < 20 || tot_len < 20 + doff {
        return Ok(xdp_action::XDP_DROP);
    }
    let seq = u32::from_be_bytes([old[TCP + 4], old[TCP + 5], old[TCP + 6], old[TCP + 7]]);
    let ack = u32::from_be_bytes([old[TCP + 8], old[TCP + 9], old[TCP + 10], old[TCP + 11]]);
    // RFC 793: answer an ACK with <SEQ=SEG.ACK><RST>, anything else with
    // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK> (SYN and FIN count one each).
    let (new_seq, new_ack, new_flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = tot_len - 20 - doff
            + (tcp_flags & TCP_SYN != 0) as u32
            + (tcp_flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&old[..12]);
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&old[IP + 12..IP + 20]);
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&old[TCP..TCP + 4]);

    let delta = LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, delta) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    let p: *mut [u8; LEN] = ptr_at(ctx, 0)?;
    let p = unsafe { &mut *p };
    p[..6].copy_from_slice(&macs[6..12]);
    p[6..12].copy_from_slice(&macs[..6]);
    p[IP] = 0x45;
    p[IP + 1] = 0;
    p[IP + 2..IP + 4].copy_from_slice(&40u16.to_be_bytes());
    p[IP + 6..IP + 8].copy_from_slice(&0x4000u16.to_be_bytes());
    p[IP + 8] = 64;
    p[IP + 9] = IPPROTO_TCP;
    p[IP + 10] = 0;
    p[IP + 11] = 0;
    p[IP + 12..IP + 16].copy_from_slice(&addrs[4..8]);
    p[IP + 16..IP + 20].copy_from_slice(&addrs[..4]);
    p[TCP..TCP + 2].copy_from_slice(&ports[2..4]);
    p[TCP + 2..TCP + 4].copy_from_slice(&ports[..2]);
    p[TCP + 4..TCP + 8].copy_from_slice(&new_seq.to_be_bytes());
    p[TCP + 8..TCP + 12].copy_from_slice(&new_ack.to_be_bytes());
    p[TCP + 12] = 5 << 4;
    p[TCP + 13] = new_flags;
    for b in &mut p[TCP + 14..TCP + 20] {
        *b = 0; // window, checksum, urgent pointer
    }
    let ip_sum = sum_words(&p[IP..IP + 20], 0);
    p[IP + 10..IP + 12].copy_from_slice(&fold(ip_sum).to_be_bytes());
    // Pseudo-header: addresses, protocol, TCP length 20.
    let pseudo = sum_words(&p[IP + 12..IP + 20], IPPROTO_TCP as u32 + 20);
    let tcp_sum = sum_words(&p[TCP..TCP + 20], pseudo);
    p[TCP + 16..TCP + 18].copy_from_slice(&fold(tcp_sum).to_be_bytes());
    Ok(xdp_action::XDP_TX)
}

/// Adds big-endian 16-bit words of `bytes` (even length) to `sum`.
#[inline(always)]
fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// One's-complement fold of a 32-bit sum into the 16-bit checksum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Is backend `id` still configured, active, and the same address (ids are reused)?
#[inline(always)]
fn backend_is(id: u32, addr: u32, port: u16) -> bool {
    match LB_BACKENDS.get(id) {
        Some(b) => b.state == backend_state::ACTIVE && b.addr == addr && b.port == port,
        None => false,
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counters>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// Rewrites one address (source or destination) and the matching port, updating the IPv4 header
/// checksum and the L4 checksum (which covers the address through the pseudo-header)
/// incrementally. A UDP checksum of zero stays zero.
#[inline(always)]
unsafe fn rewrite(
    ip: *mut Ipv4Hdr,
    l4: &L4,
    addr_field: *mut [u8; 4],
    old_addr: u32,
    new_addr: u32,
    port_field: *mut [u8; 2],
    old_port: u16,
    new_port: u16,
) {
    unsafe {
        *addr_field = new_addr.to_ne_bytes();
        *port_field = new_port.to_ne_bytes();
        let ip_check = u16::from_ne_bytes((*ip).check);
        (*ip).check = csum::csum_replace4(ip_check, old_addr, new_addr).to_ne_bytes();
        let check = u16::from_ne_bytes(*l4.check);
        let check = if l4.proto == IPPROTO_UDP {
            csum::udp_csum_replace2(
                csum::udp_csum_replace4(check, old_addr, new_addr),
                old_port,
                new_port,
            )
        } else {
            csum::csum_replace2(
                csum::csum_replace4(check, old_addr, new_addr),
                old_port,
                new_port,
            )
        };
        *l4.check = check.to_ne_bytes();
    }
}

/// Sends a rewritten packet on its way: next hop from the flow's conntrack entry while fresh,
/// else from bpf_fib_lookup (and cached there); TTL decrement, MAC rewrite, then XDP_TX (same
/// interface) or bpf_redirect. Anything the FIB cannot resolve (no neighbour entry yet,
/// forwarding off, no route) or a TTL about to expire goes to the kernel, which forwards the
/// already-rewritten packet or answers with ICMP.
#[inline(always)]
fn redirect(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    now: u64,
    cache: Option<&mut NextHop>,
) -> u32 {
    let ttl = unsafe { (*ip).ttl };
    if ttl <= 1 {
        return xdp_action::XDP_PASS;
    }
    let dst = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let (ifindex, macs) = match cache {
        Some(n)
            if n.ifindex != 0
                && n.addr == dst
                && now.wrapping_sub(n.checked_ns) < NEXTHOP_CACHE_NS =>
        {
            (n.ifindex, n.macs)
        }
        cache => {
            let Some((ifindex, macs)) = fib(ctx, ip, l4) else {
                return xdp_action::XDP_PASS;
            };
            if let Some(n) = cache {
                *n = NextHop {
                    addr: dst,
                    ifindex,
                    macs,
                    _pad: 0,
                    checked_ns: now,
                };
            }
            (ifindex, macs)
        }
    };
    unsafe {
        // TTL shares a 16-bit checksum word with the protocol byte.
        let old_word = u16::from_ne_bytes([ttl, (*ip).proto]);
        let new_word = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check =
            csum::csum_replace2(u16::from_ne_bytes((*ip).check), old_word, new_word).to_ne_bytes();
        let e = &mut *eth;
        e.dst_addr.copy_from_slice(&macs[..6]);
        e.src_addr.copy_from_slice(&macs[6..]);
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// The egress interface and (destination, source) MACs for the packet's (rewritten) addresses.
#[inline(always)]
fn fib(ctx: &XdpContext, ip: *mut Ipv4Hdr, l4: &L4) -> Option<(u32, [u8; 12])> {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = l4.proto;
        params.sport = u16::from_ne_bytes(*l4.src_port);
        params.dport = u16::from_ne_bytes(*l4.dst_port);
        params.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.ifindex = ctx.ingress_ifindex() as u32;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
    }
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    Some((params.ifindex, macs))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
