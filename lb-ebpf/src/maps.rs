//! Every map a node pins (types and sizes from lb-common; the agent resizes some at load time).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityEntry, AffinityKey, ArpEntry, ArpKey, Backend, Config, Counters, CtEntry, CtKey,
    DEFAULT_AFFINITY_SIZE, DEFAULT_CONNTRACK_SIZE, DEFAULT_FRAGMENTS_SIZE, DEFAULT_MAGLEV_SIZE,
    DEFAULT_MAX_ANNOUNCEMENTS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_INTERFACES,
    DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOURCE_RANGES, DEFAULT_NAT_SIZE, DEFAULT_SOCK_REVNAT_SIZE,
    FragmentKey, FragmentPorts, Frontend, FrontendKey, MAGLEV_SPARE_BLOCKS, NextHop, SockRevEntry,
    SockRevKey, SourceRange, ct_stats,
};

const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map]
pub static LB_FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

#[map]
pub static LB_BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Flat array of Maglev blocks (block × M + slot → backend id), mmapped by the agent, which
/// writes a whole table into a free block before pointing frontends at it.
#[map]
pub static LB_MAGLEV: Array<u32> = Array::pinned(
    (DEFAULT_MAX_SERVICES + MAGLEV_SPARE_BLOCKS) * DEFAULT_MAGLEV_SIZE,
    BPF_F_MMAPABLE,
);

#[map]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(DEFAULT_CONNTRACK_SIZE, 0);

#[map]
pub static LB_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub static LB_FRONTEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(DEFAULT_MAX_FRONTENDS, 0);

#[map]
pub static LB_BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static LB_ARP: HashMap<ArpKey, ArpEntry> = HashMap::pinned(DEFAULT_MAX_ANNOUNCEMENTS, 0);

/// Until when (CLOCK_MONOTONIC ns) LB_ARP may be answered; 0: no limit.
#[map]
pub static LB_ANNOUNCE: Array<u64> = Array::pinned(1, 0);

#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(DEFAULT_AFFINITY_SIZE, 0);

#[map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRange, u8> =
    LpmTrie::pinned(DEFAULT_MAX_SOURCE_RANGES, 0);

/// Next hop of each backend, by backend id: first packets start from it.
#[map]
pub static LB_NEXTHOPS: Array<NextHop> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Interfaces that take XDP frames (XDP_REDIRECT targets), by ifindex. The agent lists the
/// interfaces it runs XDP on; XDP hands anything bound elsewhere to tc untouched.
#[map]
pub static LB_XDP_TARGETS: DevMapHash = DevMapHash::pinned(DEFAULT_MAX_INTERFACES, 0);

/// Conntrack counters (slots in lb_common::ct_stats), per CPU.
#[map]
pub static LB_CT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(ct_stats::COUNT, 0);

/// Socket-level balancing: (socket cookie, backend) → the frontend it stands for. LRU, so it is
/// bounded; a socket whose entry was evicted shows the backend address to getpeername().
#[map]
pub static LB_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevEntry> =
    LruHashMap::pinned(DEFAULT_SOCK_REVNAT_SIZE, 0);

/// Source NAT: reply tuple (backend → node address and NAT port) of each SNATed flow → the
/// client and frontend to restore. Not LRU: a live flow's port is never given to another.
#[map]
pub static LB_NAT: HashMap<CtKey, CtEntry> = HashMap::pinned(DEFAULT_NAT_SIZE, 0);

/// The node's uplinks (ifindex → the address flows leaving by them are SNATed to).
#[map]
pub static LB_UPLINKS: HashMap<u32, u32> = HashMap::pinned(DEFAULT_MAX_INTERFACES, 0);

/// Ports of fragmented datagrams by (source, destination, IP id, protocol), written by the first
/// fragment and read by the later ones, which carry no L4 header.
#[map]
pub static LB_FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::pinned(DEFAULT_FRAGMENTS_SIZE, 0);
