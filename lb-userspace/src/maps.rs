//! The pinned BPF maps, opened by path: the agent writes them, `lbctl` reads them (also while the
//! agent is down).

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
};

use anyhow::{Context, Result, bail};
use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use lb_common::{
    AffinityEntry, AffinityKey, ArpEntry, ArpKey, Backend, Counters, CtEntry, CtKey, Frontend,
    FrontendKey, ServiceName, SockRevEntry, SockRevKey, SourceRange, ipv4_to_wire, map_names,
};

/// What the reconciler needs from the datapath's maps. The in-memory implementation in
/// `reconcile` tests checks the write order without a kernel.
pub trait Datastore {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn write_maglev(&mut self, offset: u32, table: &[u32]) -> Result<()>;
    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>>;
    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<()>;
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<()>;
    fn set_service_name(&mut self, id: u32, name: &str) -> Result<()>;
    fn remove_service_name(&mut self, id: u32) -> Result<()>;
    fn reset_frontend_stats(&mut self, id: u32) -> Result<()>;
    fn reset_backend_stats(&mut self, id: u32) -> Result<()>;
    /// Adds (`present`) or removes one loadBalancerSourceRanges entry of a service.
    fn set_source_range(
        &mut self,
        service_id: u32,
        range: (Ipv4Addr, u8),
        present: bool,
    ) -> Result<()>;
}

/// The flat Maglev array (created with BPF_F_MMAPABLE). The agent maps it shared and writable:
/// a whole table is a memory copy instead of M map updates (the kernel lays array elements out 8
/// bytes apart whatever their size, so each u32 slot occupies the low half of a u64). A reader
/// holds a read-only descriptor, which the kernel does not let anyone mmap shared, so it reads a
/// table with one BPF_MAP_LOOKUP_BATCH instead.
pub struct MaglevTable {
    mapping: Option<NonNull<u64>>,
    len: usize,
    map: MapData,
}

impl MaglevTable {
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let map = open_pinned(path, writable)?;
        let info = map.info().context("reading Maglev map info")?;
        let len = info.max_entries() as usize;
        if !writable {
            return Ok(Self {
                mapping: None,
                len,
                map,
            });
        }
        let bytes = len * size_of::<u64>();
        // SAFETY: mapping a BPF array map fd of `bytes` bytes; the kernel validates the size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of {} failed: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            mapping: Some(NonNull::new(ptr.cast()).expect("mmap returned null")),
            len,
            map,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u32>> {
        if offset + len > self.len {
            bail!("Maglev read {offset}+{len} beyond {} entries", self.len);
        }
        match self.mapping {
            // SAFETY: in bounds of the live mapping; u64 element reads of kernel-shared memory.
            Some(ptr) => Ok((0..len)
                .map(|i| unsafe { ptr.as_ptr().add(offset + i).read_volatile() } as u32)
                .collect()),
            None => self.lookup_batch(offset, len),
        }
    }

    /// Slots `offset..offset + len` by BPF_MAP_LOOKUP_BATCH (an array's batch token is its index).
    fn lookup_batch(&self, offset: usize, len: usize) -> Result<Vec<u32>> {
        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
        #[repr(C)]
        struct Batch {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        let mut values = vec![0u32; len];
        let mut keys = vec![0u32; len];
        let mut done = 0;
        while done < len {
            // The batch starts after the key `in_batch` names (none: at 0).
            let previous = ((offset + done) as u32).wrapping_sub(1);
            let mut next = 0u32;
            let mut attr = Batch {
                in_batch: if offset + done == 0 {
                    0
                } else {
                    &previous as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys[done..].as_mut_ptr() as u64,
                values: values[done..].as_mut_ptr() as u64,
                count: (len - done) as u32,
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: the kernel writes at most `count` keys and values into the buffers above.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut Batch,
                    size_of::<Batch>() as u32,
                )
            };
            let error = std::io::Error::last_os_error();
            if r < 0 && error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error).context("reading the Maglev table (BPF_MAP_LOOKUP_BATCH)");
            }
            if attr.count == 0 {
                bail!("Maglev read stopped at slot {}", offset + done);
            }
            done += attr.count as usize;
        }
        Ok(values)
    }

    pub fn write(&mut self, offset: usize, table: &[u32]) -> Result<()> {
        let Some(ptr) = self.mapping else {
            bail!("the Maglev table was opened read-only");
        };
        if offset + table.len() > self.len {
            bail!(
                "Maglev write {offset}+{} beyond {} entries",
                table.len(),
                self.len
            );
        }
        // SAFETY: in bounds; the block being written is referenced by no frontend yet.
        for (i, &id) in table.iter().enumerate() {
            unsafe { ptr.as_ptr().add(offset + i).write(u64::from(id)) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevTable {
    fn drop(&mut self) {
        if let Some(ptr) = self.mapping {
            // SAFETY: unmapping exactly what open() mapped.
            unsafe { libc::munmap(ptr.as_ptr().cast(), self.len * size_of::<u64>()) };
        }
    }
}

/// All maps of the datapath, opened from their pins under one bpffs directory.
pub struct PinnedMaps {
    pub dir: PathBuf,
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: Array<MapData, Backend>,
    pub maglev: MaglevTable,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub frontend_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub arp: HashMap<MapData, ArpKey, ArpEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u8>,
    pub sock_revnat: HashMap<MapData, SockRevKey, SockRevEntry>,
    pub ct_stats: PerCpuArray<MapData, u64>,
    /// Until when the ARP responder answers (see [`lb_common::map_names::ANNOUNCE`]).
    pub announce: Array<MapData, u64>,
    /// SNATed flows by reply tuple (see [`lb_common::map_names::NAT`]).
    pub nat: HashMap<MapData, CtKey, CtEntry>,
    /// Uplink ifindex → its SNAT address (wire order).
    pub uplinks: HashMap<MapData, u32, u32>,
}

/// The LPM key of one source range of a service.
pub fn source_range_key(service_id: u32, range: (Ipv4Addr, u8)) -> LpmKey<SourceRange> {
    LpmKey::new(
        32 + u32::from(range.1),
        SourceRange {
            service_id_be: service_id.to_be(),
            addr: ipv4_to_wire(range.0.octets()),
        },
    )
}

/// Opens the map pinned at `path`. Unless `writable`, the file descriptor is read-only
/// (BPF_OBJ_GET with BPF_F_RDONLY): the kernel refuses every update through it, so a reader such
/// as lbctl cannot change a map even by mistake, and needs only read permission on the pin.
pub fn open_pinned(path: &Path, writable: bool) -> Result<MapData> {
    let fd = obj_get(path, writable).with_context(|| {
        format!(
            "opening pinned map {} (is lb-agent running, or was it run with this --bpffs?)",
            path.display()
        )
    })?;
    MapData::from_fd(fd).with_context(|| format!("map {}", path.display()))
}

/// A descriptor of the BPF object (a link, a program) pinned at `path` (such objects take no
/// read-only flag).
pub fn open_pinned_object(path: &Path) -> Result<std::os::fd::OwnedFd> {
    obj_get(path, true).with_context(|| format!("opening {}", path.display()))
}

fn obj_get(path: &Path, writable: bool) -> Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    /// The BPF_OBJ_GET part of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", path.display()))?;
    let attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: if writable { 0 } else { BPF_F_RDONLY },
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `attr` (a valid, NUL-terminated path) and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

fn open_map(dir: &Path, name: &str, writable: bool) -> Result<Map> {
    let path = dir.join(name);
    let data = open_pinned(&path, writable)?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

impl PinnedMaps {
    /// Opens every map; `writable` false (lbctl, the metrics endpoint) gives read-only
    /// descriptors the kernel refuses updates through.
    pub fn open(dir: &Path, writable: bool) -> Result<Self> {
        let m = |name| open_map(dir, name, writable);
        Ok(Self {
            dir: dir.to_path_buf(),
            frontends: HashMap::try_from(m(map_names::FRONTENDS)?)?,
            backends: Array::try_from(m(map_names::BACKENDS)?)?,
            maglev: MaglevTable::open(&dir.join(map_names::MAGLEV), writable)?,
            conntrack: HashMap::try_from(m(map_names::CONNTRACK)?)?,
            frontend_stats: PerCpuArray::try_from(m(map_names::FRONTEND_STATS)?)?,
            backend_stats: PerCpuArray::try_from(m(map_names::BACKEND_STATS)?)?,
            service_names: HashMap::try_from(m(map_names::SERVICE_NAMES)?)?,
            arp: HashMap::try_from(m(map_names::ARP)?)?,
            affinity: HashMap::try_from(m(map_names::AFFINITY)?)?,
            source_ranges: LpmTrie::try_from(m(map_names::SOURCE_RANGES)?)?,
            sock_revnat: HashMap::try_from(m(map_names::SOCK_REVNAT)?)?,
            ct_stats: PerCpuArray::try_from(m(map_names::CT_STATS)?)?,
            announce: Array::try_from(m(map_names::ANNOUNCE)?)?,
            nat: HashMap::try_from(m(map_names::NAT)?)?,
            uplinks: HashMap::try_from(m(map_names::UPLINKS)?)?,
        })
    }

    /// Sums a per-CPU counter.
    pub fn sum(values: &PerCpuValues<Counters>) -> Counters {
        values.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        })
    }

    fn zero_counters() -> Result<PerCpuValues<Counters>> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(PerCpuValues::try_from(vec![Counters::default(); cpus])?)
    }
}

impl Datastore for PinnedMaps {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn write_maglev(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        self.maglev.write(offset as usize, table)
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        self.maglev.read(offset as usize, len as usize)
    }

    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<()> {
        self.frontends
            .insert(key, frontend, 0)
            .context("writing frontend")
    }

    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<()> {
        self.frontends.remove(key).context("removing frontend")
    }

    fn set_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        self.service_names
            .insert(id, ServiceName::new(name), 0)
            .context("writing service name")
    }

    fn remove_service_name(&mut self, id: u32) -> Result<()> {
        self.service_names
            .remove(&id)
            .context("removing service name")
    }

    fn set_source_range(
        &mut self,
        service_id: u32,
        range: (Ipv4Addr, u8),
        present: bool,
    ) -> Result<()> {
        let key = source_range_key(service_id, range);
        if present {
            self.source_ranges
                .insert(&key, 1, 0)
                .with_context(|| format!("adding source range {}/{}", range.0, range.1))
        } else {
            match self.source_ranges.remove(&key) {
                Ok(()) => Ok(()),
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => {
                    Err(e).with_context(|| format!("removing source range {}/{}", range.0, range.1))
                }
            }
        }
    }

    fn reset_frontend_stats(&mut self, id: u32) -> Result<()> {
        self.frontend_stats
            .set(id, Self::zero_counters()?, 0)
            .context("resetting frontend counters")
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<()> {
        self.backend_stats
            .set(id, Self::zero_counters()?, 0)
            .context("resetting backend counters")
    }
}

/// What the maps hold, for an agent that starts over pinned maps from an earlier run.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (service id, range) of every loadBalancerSourceRanges entry.
    pub source_ranges: Vec<(u32, (Ipv4Addr, u8))>,
    pub frontends: Vec<(FrontendKey, Frontend)>,
    pub backends: Vec<(u32, Backend)>,
    pub service_names: Vec<(u32, String)>,
}

impl PinnedMaps {
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        for item in self.frontends.iter() {
            snapshot.frontends.push(item?);
        }
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let range = (
                Ipv4Addr::from(lb_common::ipv4_from_wire(data.addr)),
                (key.prefix_len().saturating_sub(32)) as u8,
            );
            snapshot
                .source_ranges
                .push((u32::from_be(data.service_id_be), range));
        }
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend?;
            if backend.state != lb_common::backend_state::UNUSED {
                snapshot.backends.push((id as u32, backend));
            }
        }
        for item in self.service_names.iter() {
            let (id, name) = item?;
            snapshot.service_names.push((id, name.as_str().to_string()));
        }
        Ok(snapshot)
    }
}

impl PinnedMaps {
    /// max_entries of pinned map `name`.
    pub fn capacity(&self, name: &str) -> Result<u32> {
        let data = open_pinned(&self.dir.join(name), false)?;
        Ok(data.info()?.max_entries())
    }
}

impl PinnedMaps {
    /// Deletes the forward UDP conntrack entries (client → frontend) of backends that are no
    /// longer configured, so a client's next datagram on the same 5-tuple is balanced afresh
    /// instead of being sent to an endpoint that is gone (the UDP blackhole kube-proxy users
    /// know). Reply entries (and SNAT entries, keyed by the reply) stay until they expire: a
    /// reply already on its way back is still translated. Deleting them too lost it, about one
    /// removal in seventy under churn with a steady stream (tests/under_load.rs).
    /// TCP entries stay: a connection ends with its RST or FIN on its own.
    pub fn flush_udp_conntrack(
        &mut self,
        live: &std::collections::BTreeSet<(u32, u16)>,
    ) -> Result<usize> {
        let mut dead = Vec::new();
        for item in self.conntrack.iter() {
            let (k, e) = item?;
            if k.proto == lb_common::IPPROTO_UDP
                && e.dir == lb_common::CT_DIR_FORWARD
                && !live.contains(&(e.nat_addr, e.nat_port))
            {
                dead.push(k);
            }
        }
        for k in &dead {
            let _ = self.conntrack.remove(k);
        }
        Ok(dead.len())
    }
}

impl PinnedMaps {
    /// Connected UDP sockets the hooks balanced to backends no longer configured (`live` holds
    /// the configured UDP backends, wire format), with their reverse-translation keys.
    pub fn udp_sockets_of_removed_backends(
        &self,
        live: &std::collections::BTreeSet<(u32, u16)>,
    ) -> Result<Vec<SockRevKey>> {
        let mut dead = Vec::new();
        for item in self.sock_revnat.iter() {
            let (k, e) = item?;
            if e.proto == lb_common::IPPROTO_UDP && !live.contains(&(k.addr, k.port)) {
                dead.push(k);
            }
        }
        Ok(dead)
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of bpf_ktime_get_coarse_ns.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Conntrack counters summed over CPUs, by slot of [`lb_common::ct_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CtCounters {
    pub inserted: u64,
    pub expired: u64,
    pub clash_ports: u64,
    pub reply_restored: u64,
    pub agent_removed: u64,
    /// SNAT ports handed to new flows.
    pub nat_allocated: u64,
    /// New flows refused: no free SNAT port among those tried.
    pub nat_exhausted: u64,
    /// New flows refused: the NAT table was full.
    pub nat_full: u64,
}

impl PinnedMaps {
    /// Deletes the conntrack and NAT entries that have expired by `timeouts` (the datapath's
    /// own rule): an expired NAT entry's port is free for new flows.
    pub fn sweep_conntrack(&mut self, timeouts: &lb_common::CtTimeouts) -> Result<usize> {
        let now = monotonic_coarse_ns();
        let mut removed = 0;
        for map in [&mut self.conntrack, &mut self.nat] {
            let mut dead = Vec::new();
            for item in map.iter() {
                let (k, e) = item?;
                if timeouts.expired(k.proto, e.flags, e.last_seen_ns, now) {
                    dead.push(k);
                }
            }
            for k in &dead {
                if map.remove(k).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Makes LB_UPLINKS exactly `uplinks` (ifindex → SNAT address).
    pub fn set_uplinks(
        &mut self,
        uplinks: &std::collections::BTreeMap<u32, Ipv4Addr>,
    ) -> Result<()> {
        let stale: Vec<u32> = self
            .uplinks
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !uplinks.contains_key(k))
            .collect();
        for (ifindex, addr) in uplinks {
            self.uplinks
                .insert(ifindex, ipv4_to_wire(addr.octets()), 0)
                .with_context(|| format!("LB_UPLINKS: ifindex {ifindex}"))?;
        }
        for k in stale {
            let _ = self.uplinks.remove(&k);
        }
        Ok(())
    }

    /// Adds `n` to the entries the agent removed (CPU 0's slot; the datapath never writes it).
    pub fn count_agent_removed(&mut self, n: u64) {
        let slot = lb_common::ct_stats::AGENT_REMOVED;
        let Ok(values) = self.ct_stats.get(&slot, 0) else {
            return;
        };
        let mut values: Vec<u64> = values.iter().copied().collect();
        values[0] += n;
        if let Ok(values) = PerCpuValues::try_from(values) {
            let _ = self.ct_stats.set(slot, values, 0);
        }
    }

    pub fn ct_counters(&self) -> Result<CtCounters> {
        use lb_common::ct_stats as s;
        let sum = |slot: u32| -> Result<u64> { Ok(self.ct_stats.get(&slot, 0)?.iter().sum()) };
        // Slots a map pinned by an older release does not have read as 0.
        let newer = |slot: u32| sum(slot).unwrap_or(0);
        Ok(CtCounters {
            inserted: sum(s::INSERTED)?,
            expired: sum(s::EXPIRED)?,
            clash_ports: sum(s::CLASH_PORTS)?,
            reply_restored: sum(s::REPLY_RESTORED)?,
            agent_removed: sum(s::AGENT_REMOVED)?,
            nat_allocated: newer(s::NAT_ALLOCATED),
            nat_exhausted: newer(s::NAT_EXHAUSTED),
            nat_full: newer(s::NAT_FULL),
        })
    }
}

impl PinnedMaps {
    /// Drops ClientIP affinity entries whose backend is no longer in their service's table, or
    /// whose service is gone (ids are reused: an entry must never steer another service's
    /// clients). `tables` gives the backend ids of the services asked for (see
    /// [`crate::reconcile::Reconciler::table_backends`]); only services that have entries are
    /// asked about, so an apply without affinity entries costs one empty map walk.
    pub fn prune_affinity(
        &mut self,
        tables: impl FnOnce(
            &std::collections::HashSet<u32>,
        ) -> std::collections::HashMap<u32, std::collections::HashSet<u32>>,
    ) -> Result<usize> {
        let mut entries = Vec::new();
        for item in self.affinity.iter() {
            entries.push(item?);
        }
        if entries.is_empty() {
            return Ok(0);
        }
        let services = entries.iter().map(|(k, _)| k.service_id).collect();
        let tables = tables(&services);
        let mut dead = 0;
        for (k, e) in &entries {
            let live = tables
                .get(&k.service_id)
                .is_some_and(|ids| ids.contains(&e.backend_id));
            if !live && self.affinity.remove(k).is_ok() {
                dead += 1;
            }
        }
        Ok(dead)
    }
}

/// LB_ANNOUNCE on its own, for the task that renews this node's Lease: it pushes the ARP
/// responder's deadline forward after each renewal, whatever the agent's main loop is doing.
pub struct AnnounceDeadline(std::sync::Mutex<Array<MapData, u64>>);

impl AnnounceDeadline {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self(std::sync::Mutex::new(Array::try_from(open_map(
            dir,
            map_names::ANNOUNCE,
            true,
        )?)?)))
    }

    /// Lets the ARP responder answer until `until_ns` (CLOCK_MONOTONIC_COARSE; 0: no limit).
    pub fn set(&self, until_ns: u64) -> Result<()> {
        self.0.lock().expect("LB_ANNOUNCE").set(0, until_ns, 0)?;
        Ok(())
    }
}

impl PinnedMaps {
    /// Lets the ARP responder answer until `until_ns` (CLOCK_MONOTONIC_COARSE; 0: no limit).
    pub fn set_announce_deadline(&mut self, until_ns: u64) -> Result<()> {
        self.announce.set(0, until_ns, 0)?;
        Ok(())
    }
}
