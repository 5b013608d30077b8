//! Types and pure logic shared by the XDP datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that no key ever carries
//! uninitialised bytes, and its size is pinned by a `const` assertion. Addresses and ports are
//! stored exactly as they appear on the wire (network byte order), so the datapath never swaps
//! bytes on the hot path; the agent converts with [`ipv4_to_wire`] / [`port_to_wire`].
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod csum;
pub mod hash;
#[cfg(feature = "user")]
pub mod maglev;

use core::mem::size_of;

/// Names of the maps in the eBPF object; the agent pins each under `<bpffs>/<name>`.
pub mod map_names {
    pub const FRONTENDS: &str = "LB_FRONTENDS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const FRONTEND_STATS: &str = "LB_FRONTEND_STATS";
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
    pub const ARP: &str = "LB_ARP";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
    /// Next hop of each backend, by backend id (for first packets).
    pub const NEXTHOPS: &str = "LB_NEXTHOPS";
    /// Interfaces that take XDP frames (a DEVMAP_HASH by ifindex).
    pub const XDP_TARGETS: &str = "LB_XDP_TARGETS";
    /// Socket-level balancing: what each balanced socket's backend stands for (LRU).
    pub const SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
    /// Per-CPU conntrack counters (see [`super::ct_stats`]).
    pub const CT_STATS: &str = "LB_CT_STATS";
    /// Ports of fragmented datagrams, learned from their first fragment (LRU).
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    /// Until when (CLOCK_MONOTONIC ns) the ARP responder may answer: the agent pushes it
    /// forward while its node Lease is renewed, so a node whose agent died stops answering
    /// when the other nodes take its addresses over. 0: no limit (no Lease, a file source).
    pub const ANNOUNCE: &str = "LB_ANNOUNCE";
    /// Source NAT: the reply tuple of each flow this node SNATs (backend → node address and
    /// port) → what to restore. A plain hash (not LRU): a live flow's port is never evicted, so
    /// no new flow can be handed it; new flows are refused when it is full.
    pub const NAT: &str = "LB_NAT";
    /// The node's uplinks by ifindex → the address flows leaving by them are SNATed to.
    pub const UPLINKS: &str = "LB_UPLINKS";
    /// Created by the agent, never read by the datapath: service names for `lbctl`.
    pub const SERVICE_NAMES: &str = "LB_SERVICE_NAMES";

    /// Every map a node pins, the agent's own last.
    pub const ALL: [&str; 19] = [
        FRONTENDS,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        CONFIG,
        FRONTEND_STATS,
        BACKEND_STATS,
        ARP,
        AFFINITY,
        SOURCE_RANGES,
        NEXTHOPS,
        XDP_TARGETS,
        SOCK_REVNAT,
        CT_STATS,
        FRAGMENTS,
        ANNOUNCE,
        NAT,
        UPLINKS,
        SERVICE_NAMES,
    ];

    /// Maps of the benchmark object only (`lb-bench`): generator settings and per-CPU counters
    /// (0: frames generated, 1: frames sunk that were sent to a backend, 2: other frames sunk),
    /// and the frame `lb_replay` restores before each run.
    pub const GEN: &str = "LB_GEN";
    pub const GEN_COUNTERS: &str = "LB_GEN_COUNTERS";
    pub const REPLAY: &str = "LB_REPLAY";
    /// Where `lb_redirect` (the forwarding benchmark's ceiling) sends every frame.
    pub const REDIRECT: &str = "LB_REDIRECT";
    pub const BENCH: [&str; 4] = [GEN, GEN_COUNTERS, REPLAY, REDIRECT];
}

/// Default capacities; the agent may resize maps at load time.
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
pub const DEFAULT_MAX_SERVICES: u32 = 1_024;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
pub const DEFAULT_MAGLEV_SIZE: u32 = 16_381;
/// Spare Maglev blocks beyond one per service: a table is always written into a free block and
/// the frontends are flipped to it afterwards; blocks freed by an update are reused only by the
/// next one.
pub const MAGLEV_SPARE_BLOCKS: u32 = 16;
/// ClientIP session affinity entries (LRU).
pub const DEFAULT_AFFINITY_SIZE: u32 = 65_536;
/// loadBalancerSourceRanges entries over all services.
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Announced (interface, address) pairs the ARP responder can hold.
pub const DEFAULT_MAX_ANNOUNCEMENTS: u32 = 4_096;
/// Sockets balanced at connect()/sendmsg() whose reverse translation is remembered (LRU).
pub const DEFAULT_SOCK_REVNAT_SIZE: u32 = 262_144;
/// Interfaces the XDP fast path may redirect to.
pub const DEFAULT_MAX_INTERFACES: u32 = 1_024;
/// Flows SNATed at once (LB_NAT entries, one per flow).
pub const DEFAULT_NAT_SIZE: u32 = 65_536;

/// Source NAT settings, a read-only global of the programs set at load (`NAT_CONFIG`).
/// A flow leaving by an uplink after arriving on one (external traffic to a backend elsewhere)
/// gets the uplink's address as source; a backend calling its own Service (hairpin) gets
/// `loopback_addr`. Ports come from `port_min..=port_max` (host byte order), which must lie
/// outside the node's ephemeral range so no local socket ever holds the same tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Network byte order (as on the wire); 0: hairpin SNAT off.
    pub loopback_addr: u32,
    pub port_min: u16,
    pub port_max: u16,
    /// `--lb-mode`: which external flows to a backend elsewhere use direct server return
    /// instead of SNAT ([`lb_mode`]).
    pub mode: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<NatConfig>() == 12);

impl NatConfig {
    /// Cilium's service loopback address 169.254.42.1, ports above Linux's default
    /// ip_local_port_range (32768-60999), SNAT.
    pub const DEFAULT: Self = Self {
        loopback_addr: u32::from_ne_bytes([169, 254, 42, 1]),
        port_min: 61_000,
        port_max: 65_535,
        mode: lb_mode::SNAT,
        _pad: [0; 3],
    };
}

/// How external traffic reaches a backend on another node (`--lb-mode`).
pub mod lb_mode {
    /// Source NAT to this node's address: the reply comes back through it.
    pub const SNAT: u8 = 0;
    /// Direct server return: the request carries the frontend to the backend's node in an IPv4
    /// option ([`super::DSR_OPTION_TYPE`]), whose datapath answers the client directly with the
    /// frontend as source.
    pub const DSR: u8 = 1;
    /// DSR for TCP, SNAT for UDP.
    pub const HYBRID: u8 = 2;
}

/// The IPv4 option a DSR request carries: type (copied into fragments, class 0, number 30: the
/// experimental option of RFC 4727), length 8, frontend port, frontend address (both as on the
/// wire). The frontend node inserts it right after the 20-byte header; the backend's node reads
/// and removes it.
pub const DSR_OPTION_TYPE: u8 = 0x9e;

/// `lbctl trace` marks the frame it runs through the datapath with BPF_PROG_TEST_RUN with these
/// four words (XDP: 16 bytes of metadata before the frame; tc: the skb's `cb[0..4]`). A marked
/// frame changes no map: no conntrack, NAT, affinity, fragment or next-hop entry, no counter.
/// Nothing but a test run sets XDP metadata before our program, and 128 bits of cb matching by
/// chance is not a concern.
pub const TRACE_MAGIC: [u32; 4] = [0x6c62_6374, 0x6c20_7472, 0x6163_6521, 0x9e37_79b9];
pub const DSR_OPTION_LEN: usize = 8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Frontend (service address) lookup key: `vip:port/proto`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FrontendKey>() == 8);

/// Frontend kinds, kept in the low bits of [`Frontend::flags`].
pub mod frontend_type {
    pub const CLUSTER_IP: u16 = 1;
    pub const NODE_PORT: u16 = 2;
    pub const LOAD_BALANCER: u16 = 3;
    pub const EXTERNAL_IP: u16 = 4;
    pub const MASK: u16 = 0x000f;

    pub fn name(flags: u16) -> &'static str {
        match flags & MASK {
            CLUSTER_IP => "ClusterIP",
            NODE_PORT => "NodePort",
            LOAD_BALANCER => "LoadBalancer",
            EXTERNAL_IP => "ExternalIP",
            _ => "Unknown",
        }
    }
}

/// What the datapath needs to balance one frontend. Written last on every change: a packet sees
/// either the old complete Maglev table or the new complete one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Datapath service (one Kubernetes Service port); shared by all its frontends.
    pub service_id: u32,
    /// Index into the per-frontend counters.
    pub frontend_id: u32,
    /// Start of this service's table in the flat Maglev array.
    pub maglev_offset: u32,
    /// Backends in the table; 0 means "no endpoint": TCP is answered with a RST, UDP dropped.
    pub backend_count: u16,
    /// Kind (low bits, [`frontend_type`]) and policies ([`frontend_flags`]).
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds (with [`frontend_flags::AFFINITY`]).
    pub affinity_timeout_s: u32,
    /// Slots M of this service's table (the flow hash is taken modulo M).
    pub maglev_size: u32,
}
const _: () = assert!(size_of::<Frontend>() == 24);

/// Policy bits of [`Frontend::flags`], above the kind.
pub mod frontend_flags {
    /// sessionAffinity: ClientIP: new flows of a client go to the backend it used last.
    pub const AFFINITY: u16 = 0x0010;
    /// loadBalancerSourceRanges: only sources in LB_SOURCE_RANGES for the service get in.
    pub const SOURCE_RANGES: u16 = 0x0020;
}

/// Settings of the benchmark traffic generator program `lb_gen` (LB_GEN[0]). Every frame it
/// sends gets flow number `n` (a per-CPU counter, modulo `flows` unless that is 0, so 0 means a
/// new 5-tuple every packet): destination `vip_base + n % vip_count`, then source port and
/// address from `n / vip_count`. Addresses in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    pub vip_base: u32,
    pub vip_count: u32,
    pub src_base: u32,
    pub flows: u32,
    /// Ethernet destination then source. Frames come back from the page pool as the node left
    /// them (DNATed, TTL decremented), so every header field is written afresh each time.
    pub macs: [u8; 12],
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`GEN_UDP`] or [`GEN_ARP`] (an ARP request from `src_base` for `vip_base + n % vip_count`).
    pub mode: u16,
}

/// Settings of `lb_redirect` (LB_REDIRECT[0]): every frame gets these MACs (destination then
/// source) and goes out of `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    pub ifindex: u32,
    pub macs: [u8; 12],
}

/// Largest frame `lb_replay` can restore (a power of two: the datapath masks the length).
pub const REPLAY_MAX: usize = 128;

/// The frame `lb_replay` writes over the packet before each run (LB_REPLAY[0]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayFrame {
    pub len: u32,
    /// Non-zero: every run gets a new 5-tuple (IPv4 source address and L4 source port, of a
    /// frame with a 20-byte IP header, from `counter`), so each run is a new flow.
    pub new_flow: u32,
    pub counter: u32,
    /// With `new_flow`: above 1, the destination address also moves, over `spread` consecutive
    /// addresses from the frame's own (every run another frontend: cache-cold lookups).
    pub spread: u32,
    pub data: [u8; REPLAY_MAX],
}
const _: () = assert!(size_of::<ReplayFrame>() == 144);

pub const GEN_UDP: u16 = 0;
pub const GEN_ARP: u16 = 1;
const _: () = assert!(size_of::<GenConfig>() == 32);

/// Session affinity key: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub service_id: u32,
    /// Client IPv4 address, network byte order.
    pub client: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<AffinityEntry>() == 16);

/// Data of an LB_SOURCE_RANGES LPM key: the service (all 32 bits always match, so the prefix
/// length is 32 + the CIDR's) then the source address, both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange {
    pub service_id_be: u32,
    pub addr: u32,
}
const _: () = assert!(size_of::<SourceRange>() == 8);

/// Backend states (in [`Backend::state`]).
pub mod backend_state {
    /// Slot not in use.
    pub const UNUSED: u8 = 0;
    pub const ACTIVE: u8 = 1;
    /// Kept for open flows, never picked for new ones.
    pub const TERMINATING: u8 = 2;
}

/// A backend (endpoint address and target port). Id 0 is reserved as "none", so a zero-filled
/// Maglev slot is detectable.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}
const _: () = assert!(size_of::<Backend>() == 8);

/// Conntrack direction, kept in the entry ([`CtEntry::dir`]). The key is the bare 5-tuple, so
/// one lookup serves a packet of either direction: a forward tuple (client → frontend address)
/// and a reply tuple (backend → client) cannot coincide, since a frontend address is never a
/// client's.
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// Conntrack flags.
pub mod ct_flags {
    /// TCP FIN or RST seen: a later SYN on the same tuple may pick a new backend, and the entry
    /// times out after [`super::CtTimeouts::tcp_closing`].
    pub const CLOSING: u8 = 1;
    /// A reply was seen (TCP: the connection is open; UDP: a stream, not a single datagram).
    pub const REPLIED: u8 = 2;
    /// Direct server return. Forward entry (frontend node): packets carry the frontend in an
    /// IPv4 option, replies never come back here. Reply entry (backend's node): learned from
    /// that option.
    pub const DSR: u8 = 4;
}

/// Conntrack entry. Forward entries (client → frontend) hold the backend chosen; reply entries
/// (backend → client) hold the frontend address to restore. The backend address is cached in the
/// entry so an open flow keeps working after its backend left the configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Forward: backend address; reply: frontend address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port; reply: frontend port. Network byte order.
    pub nat_port: u16,
    pub flags: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    pub backend_id: u32,
    pub frontend_id: u32,
    /// `bpf_ktime_get_coarse_ns` when last refreshed (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// A flow whose tuple toward the backend would clash with another flow's (the same client
    /// address and port to two frontends that share a backend) gets another source port, and
    /// a SNATed flow its NAT port. Forward: that port on the wire (0: the client's own); reply:
    /// the client's own port to restore (0: unchanged). Network byte order.
    pub client_port: u16,
    pub _pad: [u8; 2],
    /// SNAT. Forward: the source address on the wire toward the backend (0: the client's own);
    /// reply (in LB_NAT): the client's address to restore (0: unchanged).
    pub client_addr: u32,
    /// Next hop of this direction (the backend's for forward entries, the client's for reply
    /// entries).
    pub nexthop: NextHop,
}
const _: () = assert!(size_of::<CtEntry>() == 64);

/// How long a conntrack entry lives after its last packet, by state, in seconds. Defaults are
/// Cilium's for TCP (bpf-ct-timeout-regular-tcp-syn / -tcp / -tcp-fin) and the kernel's
/// nf_conntrack for UDP (nf_conntrack_udp_timeout / _stream), which kube-proxy users know.
/// Set once when the programs are loaded (a read-only global of the object).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP before any reply (an unanswered SYN).
    pub tcp_syn: u32,
    /// TCP with replies seen.
    pub tcp_established: u32,
    /// TCP after FIN or RST.
    pub tcp_closing: u32,
    /// UDP without a reply (single datagrams).
    pub udp: u32,
    /// UDP with replies seen.
    pub udp_stream: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CtTimeouts>() == 24);

impl CtTimeouts {
    pub const DEFAULT: Self = Self {
        tcp_syn: 60,
        tcp_established: 21_600,
        tcp_closing: 10,
        udp: 30,
        udp_stream: 120,
        _pad: 0,
    };

    /// Lifetime in nanoseconds after the last packet of an entry with these flags.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, flags: u8) -> u64 {
        let seconds = if proto == IPPROTO_TCP {
            if flags & ct_flags::CLOSING != 0 {
                self.tcp_closing
            } else if flags & ct_flags::REPLIED != 0 {
                self.tcp_established
            } else {
                self.tcp_syn
            }
        } else if flags & ct_flags::REPLIED != 0 {
            self.udp_stream
        } else {
            self.udp
        };
        seconds as u64 * 1_000_000_000
    }

    /// Has an entry last seen at `last_seen_ns` expired at `now_ns`?
    #[inline(always)]
    pub fn expired(&self, proto: u8, flags: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.wrapping_sub(last_seen_ns) > self.timeout_ns(proto, flags)
    }
}

/// Slots of the per-CPU conntrack counters (LB_CT_STATS).
pub mod ct_stats {
    /// Entries the datapath inserted (two per new flow, plus reply entries it restored).
    pub const INSERTED: u32 = 0;
    /// Entries found expired by the datapath (and deleted).
    pub const EXPIRED: u32 = 1;
    /// New flows that got another source port to avoid a tuple clash.
    pub const CLASH_PORTS: u32 = 2;
    /// Reply entries restored after the LRU evicted them.
    pub const REPLY_RESTORED: u32 = 3;
    /// Entries the agent removed (expired ones its sweeper found, UDP flows of removed
    /// endpoints); written by the agent into CPU 0's slot.
    pub const AGENT_REMOVED: u32 = 4;
    /// SNAT ports handed to new flows (LB_NAT entries made).
    pub const NAT_ALLOCATED: u32 = 5;
    /// New flows refused: every port tried was held by a live flow (SNAT ports, or the
    /// clash-free source ports of flows that keep the client's address).
    pub const NAT_EXHAUSTED: u32 = 6;
    /// New flows refused: the NAT table (LB_NAT) is full.
    pub const NAT_FULL: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// A next hop as bpf_fib_lookup last resolved it for destination `addr`: egress ifindex, then
/// destination and source MAC. Reused for [`NEXTHOP_CACHE_NS`] after `checked_ns`, and only for
/// that destination (ifindex 0: none). Kept in each conntrack entry and, for first packets, per
/// backend (LB_NEXTHOPS, by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub addr: u32,
    pub ifindex: u32,
    pub macs: [u8; 12],
    /// Egress MTU as the FIB reported it (tc lookups; 0: unknown). A packet longer than this
    /// asks the FIB again, which answers "fragmentation needed" when it does not fit.
    pub mtu: u32,
    pub checked_ns: u64,
}
const _: () = assert!(size_of::<NextHop>() == 32);

/// How long a flow reuses its cached next hop before asking the FIB again. bpf_fib_lookup is
/// most of an established packet's cost (about 170 of 300 ns here); a route or neighbour change
/// reaches open flows within this time (new flows see it at once).
pub const NEXTHOP_CACHE_NS: u64 = 1_000_000_000;

/// Packet and byte counters (per CPU in the kernel; summed by `lbctl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counters>() == 16);

/// Datapath configuration: a one-element array written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Maglev table size M of every service, or 0: sized per service ([`maglev::auto_table_size`]).
    /// Fixed for the life of the pinned maps.
    pub maglev_size: u32,
    /// Slots in the flat Maglev array.
    pub maglev_capacity: u32,
}
const _: () = assert!(size_of::<Config>() == 8);

/// A fragmented datagram: its later fragments carry no L4 header, so the ports its first
/// fragment showed are kept under this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragmentKey>() == 12);

/// Source and destination port of a fragmented datagram (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src_port: u16,
    pub dst_port: u16,
}
const _: () = assert!(size_of::<FragmentPorts>() == 4);

/// Datagrams whose fragments are in flight at once.
pub const DEFAULT_FRAGMENTS_SIZE: u32 = 8_192;

/// Socket-level balancing: a socket (by cookie) talking to a backend address it was given in
/// place of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockRevKey>() == 16);

/// The frontend a balanced socket's backend stands for: what getpeername() and the source of
/// received datagrams show.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevEntry {
    /// Frontend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub frontend_id: u32,
}
const _: () = assert!(size_of::<SockRevEntry>() == 16);

/// Service name for `lbctl` ("ns/name:port"), NUL padded.
pub const SERVICE_NAME_LEN: usize = 124;
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub len: u32,
    pub name: [u8; SERVICE_NAME_LEN],
}
const _: () = assert!(size_of::<ServiceName>() == 128);

/// ARP responder key: an address announced on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArpKey {
    pub ifindex: u32,
    /// IPv4 address, network byte order.
    pub addr: u32,
}
const _: () = assert!(size_of::<ArpKey>() == 8);

/// What the ARP responder answers with: the interface's MAC, and how many replies it sent
/// (one counter shared by all CPUs; ARP is rare enough for that).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpEntry {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub replies: u64,
}
const _: () = assert!(size_of::<ArpEntry>() == 16);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for ArpKey {}
    unsafe impl aya::Pod for NatConfig {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for CtTimeouts {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevEntry {}
    unsafe impl aya::Pod for GenConfig {}
    unsafe impl aya::Pod for RedirectConfig {}
    unsafe impl aya::Pod for ReplayFrame {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for ArpEntry {}
    use super::*;
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceName {}
}

/// An IPv4 address as the datapath stores it (the wire bytes read as a native u32).
#[inline(always)]
pub const fn ipv4_to_wire(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

#[inline(always)]
pub const fn ipv4_from_wire(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A port as the datapath stores it (network byte order).
#[inline(always)]
pub const fn port_to_wire(port: u16) -> u16 {
    port.to_be()
}

#[inline(always)]
pub const fn port_from_wire(port: u16) -> u16 {
    u16::from_be(port)
}

impl FrontendKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: ipv4_to_wire(addr),
            port: port_to_wire(port),
            proto,
            _pad: 0,
        }
    }
}

impl ServiceName {
    pub fn new(name: &str) -> Self {
        let bytes = name.as_bytes();
        let len = bytes.len().min(SERVICE_NAME_LEN);
        let mut out = [0u8; SERVICE_NAME_LEN];
        out[..len].copy_from_slice(&bytes[..len]);
        Self {
            len: len as u32,
            name: out,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid utf-8>")
    }
}
