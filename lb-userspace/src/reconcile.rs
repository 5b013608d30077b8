//! Desired state → map writes, in an order that is safe under traffic:
//! backends first, then each changed Maglev table into a free block, then the frontends flipped
//! to it (one atomic hash update each), then stale frontends removed. A packet that looked a
//! frontend up just before its flip may still read the old table: released ids go to the back
//! of FIFO free lists, and a released Maglev block is quarantined for [`BLOCK_GRACE`] before
//! the allocator may hand it out again. A datapath program runs to completion in microseconds
//! (softirq, not preemptible), so no packet ever reads a table while it is being rewritten.
//!
//! Capacity is checked before the first write: a state that does not fit is rejected whole.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use anyhow::{Result, bail};
use lb_common::{
    Backend, Frontend, FrontendKey, backend_state, frontend_flags, ipv4_from_wire, ipv4_to_wire,
    maglev, port_from_wire, port_to_wire,
};
use log::info;

use crate::{
    blocks::{self, Blocks},
    maps::{Datastore, Snapshot},
    model::{BackendCondition, DesiredState, Endpoint, FrontendKind, Protocol},
};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Every service's table size, or 0: sized per service by [`maglev::auto_table_size`].
    pub maglev_size: u32,
    /// Slots in the flat Maglev array.
    pub maglev_capacity: u32,
    pub max_services: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
}

/// One service whose Maglev table changes: its new input and, when it had a table, that table
/// (backend ids) with the same slots expressed as index + 1 into `input` (0: backend gone).
struct TableJob<'a> {
    name: &'a String,
    input: Vec<(Endpoint, u32)>,
    size: u32,
    old: Option<(Vec<u32>, Vec<u32>)>,
}

/// Maglev slot tables (values: index + 1 into the input) for each job, built in parallel; each
/// starts from the job's old table, so only the slots the change forces move.
fn build_tables<'a>(
    jobs: &[TableJob<'a>],
) -> Result<std::collections::HashMap<&'a String, Vec<u32>>> {
    let build = |job: &TableJob<'a>| -> Result<(&'a String, Vec<u32>)> {
        let names: Vec<String> = job.input.iter().map(|(e, _)| e.to_string()).collect();
        let backends: Vec<maglev::MaglevBackend<'_>> = job
            .input
            .iter()
            .zip(&names)
            .map(|((_, weight), n)| maglev::MaglevBackend {
                name: n.as_bytes(),
                weight: *weight,
            })
            .collect();
        let previous = job.old.as_ref().map_or(&[][..], |(_, p)| p.as_slice());
        let slots = maglev::update_table(&backends, previous, job.size)
            .map_err(|e| anyhow::anyhow!("service {}: {e}", job.name))?;
        Ok((job.name, slots))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if jobs.len() < 8 || threads == 1 {
        return jobs.iter().map(build).collect();
    }
    let chunk = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(build).collect::<Result<Vec<_>>>()))
            .collect();
        let mut all = std::collections::HashMap::new();
        for w in workers {
            all.extend(w.join().expect("table builder panicked")?);
        }
        Ok(all)
    })
}

/// Services handled per round of step 3: bounds the tables held in memory at once.
const TABLE_CHUNK: usize = 512;

/// Order of the largest block the Maglev array is cut into: the largest table there can be.
pub fn max_order(limits: &Limits) -> u32 {
    match limits.maglev_size {
        0 => blocks::order_of(maglev::AUTO_MAX_SIZE),
        m => blocks::order_of(m),
    }
}

pub fn frontend_key(e: &Endpoint) -> FrontendKey {
    FrontendKey::new(e.addr.octets(), e.port, e.proto.number())
}

fn endpoint_of(addr: u32, port: u16, proto: u8) -> Option<Endpoint> {
    Some(Endpoint {
        addr: ipv4_from_wire(addr).into(),
        port: port_from_wire(port),
        proto: Protocol::from_number(proto)?,
    })
}

#[derive(Debug, Clone)]
struct ServiceState {
    id: u32,
    /// Where its table is in the flat Maglev array, and its size M.
    offset: u32,
    size: u32,
    /// (backend, weight) pairs the table was built from; None when adopted from an earlier run,
    /// so the first apply checks it.
    table_input: Option<Vec<(Endpoint, u32)>>,
    /// loadBalancerSourceRanges entries written for this service.
    source_ranges: Vec<(std::net::Ipv4Addr, u8)>,
    /// The service as last applied: an equal one next time needs no work at all.
    applied: Option<crate::model::ServicePort>,
}

#[derive(Debug, Clone, Copy)]
struct FrontendState {
    id: u32,
    value: Frontend,
    /// Name of the owning service port.
    owner_service_id: u32,
}

#[derive(Debug, Clone, Copy)]
struct BackendState {
    id: u32,
    state: u8,
}

/// What one apply changed, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_rebuilt: usize,
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub tables: Vec<TableChange>,
}

/// A rebuilt Maglev table of a service that already had one.
#[derive(Debug, Clone)]
pub struct TableChange {
    pub service: String,
    pub slots: u32,
    pub slots_moved: usize,
    /// The fraction a perfect consistent hash would move: the share of removed or added backends.
    pub ideal_fraction: f64,
}

/// An apply refused by the capacity checks, before any write: the state does not fit the maps
/// and will not until it changes (retrying is pointless; the maps are as they were).
#[derive(Debug)]
pub struct DoesNotFit(pub String);

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DoesNotFit {}

/// How long a Maglev block no frontend points at any more stays unused: longer, by three orders
/// of magnitude, than any run of the datapath program that may have read its old frontend.
pub const BLOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Reconciler {
    limits: Limits,
    /// Blocks released by an apply, with when: free again after [`BLOCK_GRACE`].
    quarantined: Vec<(std::time::Instant, u32, u32)>,
    services: BTreeMap<String, ServiceState>,
    frontends: BTreeMap<Endpoint, FrontendState>,
    backends: BTreeMap<Endpoint, BackendState>,
    free_service_ids: VecDeque<u32>,
    free_frontend_ids: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
    blocks: Blocks,
    /// How many applied services use each backend, active and terminating; None until an apply
    /// succeeded (adopted state has no record of which service used what).
    refs: Option<HashMap<Endpoint, (u32, u32)>>,
}

/// What an apply has to look at beyond the services it rebuilds: every backend and frontend
/// (a full pass), or only those of services that changed.
struct Scope {
    /// Backends to (re)write with their state, or to remove (None).
    backends: HashMap<Endpoint, Option<u8>>,
    /// Frontends that may have become stale.
    frontend_candidates: Vec<Endpoint>,
    /// Frontends some desired service has (all of them, or all that changed services have).
    wanted_frontends: HashSet<Endpoint>,
    /// Reference counts after this apply: all of them (full pass), or the new counts of the
    /// backends it touched ((0, 0): gone).
    refs: HashMap<Endpoint, (u32, u32)>,
    full: bool,
}

fn backend_state_of(refs: (u32, u32)) -> Option<u8> {
    match refs {
        (0, 0) => None,
        (0, _) => Some(backend_state::TERMINATING),
        _ => Some(backend_state::ACTIVE),
    }
}

fn count_refs(
    refs: &mut HashMap<Endpoint, (u32, u32)>,
    service: &crate::model::ServicePort,
    add: bool,
) {
    for b in &service.backends {
        let r = refs.entry(b.endpoint).or_insert((0, 0));
        let field = match b.condition {
            BackendCondition::Active => &mut r.0,
            BackendCondition::Terminating => &mut r.1,
        };
        if add {
            *field += 1;
        } else {
            *field -= 1;
        }
    }
}

/// One desired service as this apply handles it.
struct Plan<'a> {
    name: &'a String,
    input: Vec<(Endpoint, u32)>,
    /// Table size M it gets.
    size: u32,
    /// Its table must be (re)built: new service, other backends, other size, or adopted.
    rebuild: bool,
    /// Exactly as last applied: nothing to write.
    unchanged: bool,
}

impl Reconciler {
    pub fn new(limits: Limits) -> Self {
        Self::adopt(limits, &Snapshot::default())
    }

    /// Starts from what pinned maps of an earlier run hold: ids stay stable (conntrack entries
    /// and counters refer to them) and every adopted table is rebuilt into a fresh block on the
    /// first apply.
    pub fn adopt(limits: Limits, snapshot: &Snapshot) -> Self {
        let names: BTreeMap<u32, &str> = snapshot
            .service_names
            .iter()
            .map(|(id, n)| (*id, n.as_str()))
            .collect();
        let mut services: BTreeMap<String, ServiceState> = BTreeMap::new();
        let mut frontends = BTreeMap::new();
        let mut blocks = Blocks::new(limits.maglev_capacity, max_order(&limits));
        for (key, value) in &snapshot.frontends {
            let Some(endpoint) = endpoint_of(key.addr, key.port, key.proto) else {
                continue;
            };
            if value.service_id >= limits.max_services || value.frontend_id >= limits.max_frontends
            {
                continue;
            }
            let name = names.get(&value.service_id).map_or_else(
                || format!("<service {}>", value.service_id),
                |n| n.to_string(),
            );
            match services.get(&name) {
                Some(s) if s.offset == value.maglev_offset && s.size == value.maglev_size => {}
                Some(_) => continue,
                None => {
                    if value.maglev_size == 0
                        || !blocks.reserve(value.maglev_offset, value.maglev_size)
                    {
                        continue;
                    }
                }
            }
            services.entry(name).or_insert(ServiceState {
                id: value.service_id,
                offset: value.maglev_offset,
                size: value.maglev_size,
                table_input: None,
                applied: None,
                source_ranges: snapshot
                    .source_ranges
                    .iter()
                    .filter(|(id, _)| *id == value.service_id)
                    .map(|(_, r)| *r)
                    .collect(),
            });
            frontends.insert(
                endpoint,
                FrontendState {
                    id: value.frontend_id,
                    value: *value,
                    owner_service_id: value.service_id,
                },
            );
        }
        let mut backends = BTreeMap::new();
        for (id, backend) in &snapshot.backends {
            if *id == 0 || *id >= limits.max_backends {
                continue;
            }
            if let Some(endpoint) = endpoint_of(backend.addr, backend.port, backend.proto) {
                backends.insert(
                    endpoint,
                    BackendState {
                        id: *id,
                        state: backend.state,
                    },
                );
            }
        }
        let used_services: BTreeSet<u32> = services.values().map(|s| s.id).collect();
        let used_frontends: BTreeSet<u32> = frontends.values().map(|f| f.id).collect();
        let used_backends: BTreeSet<u32> = backends.values().map(|b| b.id).collect();
        Self {
            limits,
            free_service_ids: (0..limits.max_services)
                .filter(|i| !used_services.contains(i))
                .collect(),
            free_frontend_ids: (0..limits.max_frontends)
                .filter(|i| !used_frontends.contains(i))
                .collect(),
            // Backend id 0 means "none".
            free_backend_ids: (1..limits.max_backends)
                .filter(|i| !used_backends.contains(i))
                .collect(),
            blocks,
            quarantined: Vec::new(),
            refs: None,
            services,
            frontends,
            backends,
        }
    }

    /// Returns quarantined blocks to the allocator once their grace is over; `wait`: sleeps
    /// until it is over for all of them.
    fn release_blocks(&mut self, wait: bool) {
        if wait && let Some(youngest) = self.quarantined.iter().map(|q| q.0).max() {
            std::thread::sleep(BLOCK_GRACE.saturating_sub(youngest.elapsed()));
        }
        let blocks = &mut self.blocks;
        self.quarantined.retain(|&(since, offset, size)| {
            let over = since.elapsed() >= BLOCK_GRACE;
            if over {
                blocks.free(offset, size);
            }
            !over
        });
    }

    /// Backend ids in the Maglev tables of services `ids`, by service id: what their ClientIP
    /// affinity entries may point at. Services gone, or adopted from an earlier run and not yet
    /// applied, are left out.
    pub fn table_backends(&self, ids: &HashSet<u32>) -> HashMap<u32, HashSet<u32>> {
        self.services
            .values()
            .filter(|s| ids.contains(&s.id))
            .filter_map(|s| {
                let input = s.table_input.as_ref()?;
                let backends = input
                    .iter()
                    .filter_map(|(e, _)| self.backends.get(e).map(|b| b.id))
                    .collect();
                Some((s.id, backends))
            })
            .collect()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Maglev input of one service: its active backends with weights, sorted.
    fn table_input(service: &crate::model::ServicePort) -> Vec<(Endpoint, u32)> {
        service
            .backends
            .iter()
            .filter(|b| b.condition == BackendCondition::Active && b.weight > 0)
            .map(|b| (b.endpoint, b.weight))
            .collect()
    }

    /// Rejects a desired state that cannot be applied whole.
    /// The backends and frontends this apply must look at. With reference counts from the last
    /// apply, only those of changed, added and removed services (an endpoint change touches one
    /// service's, not 100k); otherwise all of them.
    fn scope(
        &self,
        desired: &DesiredState,
        plan: &[Plan<'_>],
        removed: &[String],
        refs: Option<&HashMap<Endpoint, (u32, u32)>>,
    ) -> Scope {
        let changed: Vec<&String> = plan
            .iter()
            .filter(|p| !p.unchanged)
            .map(|p| p.name)
            .collect();
        if let Some(all) = refs {
            // Counts of the touched backends only, starting from the current ones.
            let mut refs: HashMap<Endpoint, (u32, u32)> = HashMap::new();
            let mut touched = HashSet::new();
            let mut frontend_candidates = Vec::new();
            let old = changed
                .iter()
                .map(|n| n.as_str())
                .chain(removed.iter().map(String::as_str))
                .filter_map(|n| self.services.get(n)?.applied.as_ref());
            for service in old
                .clone()
                .chain(changed.iter().map(|n| &desired.services[*n]))
            {
                for b in &service.backends {
                    refs.entry(b.endpoint)
                        .or_insert_with(|| all.get(&b.endpoint).copied().unwrap_or((0, 0)));
                }
            }
            for service in old {
                count_refs(&mut refs, service, false);
                touched.extend(service.backends.iter().map(|b| b.endpoint));
                frontend_candidates.extend(service.frontends.iter().map(|f| f.endpoint));
            }
            let mut wanted_frontends = HashSet::new();
            for name in &changed {
                let service = &desired.services[*name];
                count_refs(&mut refs, service, true);
                touched.extend(service.backends.iter().map(|b| b.endpoint));
                wanted_frontends.extend(service.frontends.iter().map(|f| f.endpoint));
            }
            let backends = touched
                .into_iter()
                .map(|e| (e, refs.get(&e).copied().and_then(backend_state_of)))
                .collect();
            return Scope {
                backends,
                frontend_candidates,
                wanted_frontends,
                refs,
                full: false,
            };
        }
        let mut refs = HashMap::with_capacity(self.backends.len());
        for service in desired.services.values() {
            count_refs(&mut refs, service, true);
        }
        let mut backends: HashMap<Endpoint, Option<u8>> = refs
            .iter()
            .map(|(e, r)| (*e, backend_state_of(*r)))
            .collect();
        for e in self.backends.keys() {
            backends.entry(*e).or_insert(None);
        }
        Scope {
            backends,
            frontend_candidates: self.frontends.keys().copied().collect(),
            wanted_frontends: desired
                .services
                .values()
                .flat_map(|s| s.frontends.iter().map(|f| f.endpoint))
                .collect(),
            refs,
            full: true,
        }
    }

    fn check_capacity(
        &self,
        desired: &DesiredState,
        plan: &[Plan<'_>],
        scope: &Scope,
    ) -> Result<()> {
        let l = &self.limits;
        if desired.services.len() > l.max_services as usize {
            bail!(
                "{} service ports exceed the capacity of {} (--max-services)",
                desired.services.len(),
                l.max_services
            );
        }
        // Old and new are both in the maps for a moment during the update.
        let frontends = self.frontends.len()
            + scope
                .wanted_frontends
                .iter()
                .filter(|e| !self.frontends.contains_key(e))
                .count();
        if frontends > l.max_frontends as usize {
            bail!(
                "{frontends} frontends (old and new during the update) exceed the capacity of {} (--max-frontends)",
                l.max_frontends
            );
        }
        let backends = self.backends.len()
            + scope
                .backends
                .iter()
                .filter(|(e, s)| s.is_some() && !self.backends.contains_key(e))
                .count();
        if backends >= l.max_backends as usize {
            bail!(
                "{backends} backends (old and new during the update) exceed the capacity of {} (--max-backends)",
                l.max_backends - 1
            );
        }
        // loadBalancerSourceRanges: new ranges go in before old ones leave.
        let ranges = desired
            .services
            .values()
            .map(|s| s.source_ranges.len())
            .sum::<usize>()
            + self
                .services
                .values()
                .map(|s| s.source_ranges.len())
                .sum::<usize>();
        if ranges > lb_common::DEFAULT_MAX_SOURCE_RANGES as usize {
            bail!(
                "{ranges} loadBalancerSourceRanges entries (old and new during the update) exceed the capacity of {}",
                lb_common::DEFAULT_MAX_SOURCE_RANGES
            );
        }
        let sizes: Vec<u32> = plan.iter().filter(|p| p.rebuild).map(|p| p.size).collect();
        if !self.blocks.fits(&sizes) {
            bail!(
                "{} Maglev tables ({} slots) to write but only {} slots free in the Maglev array; raise --maglev-capacity",
                sizes.len(),
                sizes.iter().map(|&s| s as u64).sum::<u64>(),
                self.blocks.free_slots()
            );
        }
        Ok(())
    }

    /// Step 3 for one service: its table (when rebuilt) into a free block unless it came out
    /// identical to the old one, its name, source ranges and frontends flipped to the block.
    #[allow(clippy::too_many_arguments)]
    fn apply_service(
        &mut self,
        name: &String,
        service: &crate::model::ServicePort,
        input: Vec<(Endpoint, u32)>,
        size: u32,
        slots: Option<Vec<u32>>,
        old_table: Option<Vec<u32>>,
        released_blocks: &mut Vec<(u32, u32)>,
        report: &mut ApplyReport,
        store: &mut impl Datastore,
    ) -> Result<()> {
        let existing = self.services.get(name).cloned();
        let offset = match (slots, &existing) {
            (Some(slots), _) => {
                // Backend ids looked up once per backend, not once per slot.
                let ids: Vec<u32> = input.iter().map(|(e, _)| self.backends[e].id).collect();
                let table: Vec<u32> = slots
                    .iter()
                    .map(|&s| if s == 0 { 0 } else { ids[s as usize - 1] })
                    .collect();
                match (&existing, old_table) {
                    // Adopted or re-weighted to the same slots: nothing to write.
                    (Some(old), Some(before)) if before == table => old.offset,
                    (old, before) => {
                        let offset = self.blocks.alloc(size).expect("capacity checked");
                        if let (Some(old), Some(before)) = (old, before) {
                            report.tables.push(table_change(name, &before, &table));
                            released_blocks.push((old.offset, old.size));
                        }
                        store.write_maglev(offset, &table)?;
                        report.tables_rebuilt += 1;
                        offset
                    }
                }
            }
            (None, Some(old)) => old.offset,
            (None, None) => unreachable!("a new service always has a table built"),
        };
        let service_id = match &existing {
            Some(s) => s.id,
            None => {
                let id = self.free_service_ids.pop_front().expect("capacity checked");
                store.set_service_name(id, name)?;
                report.services_added += 1;
                id
            }
        };
        // Source ranges are in place before a frontend's flag asks for them, and stale ones
        // go only after the frontends were rewritten.
        let old_ranges = existing
            .as_ref()
            .map(|s| s.source_ranges.clone())
            .unwrap_or_default();
        for range in service
            .source_ranges
            .iter()
            .filter(|r| !old_ranges.contains(r))
        {
            store.set_source_range(service_id, *range, true)?;
        }
        for frontend in &service.frontends {
            let current = self.frontends.get(&frontend.endpoint).copied();
            let frontend_id = match current {
                Some(f) => f.id,
                None => {
                    let id = self
                        .free_frontend_ids
                        .pop_front()
                        .expect("capacity checked");
                    store.reset_frontend_stats(id)?;
                    id
                }
            };
            let value = Frontend {
                service_id,
                frontend_id,
                maglev_offset: offset,
                backend_count: input.len().min(u16::MAX as usize) as u16,
                flags: frontend.kind.flags()
                    | if service.affinity_timeout_s > 0 {
                        frontend_flags::AFFINITY
                    } else {
                        0
                    }
                    | if frontend.kind == FrontendKind::LoadBalancer
                        && !service.source_ranges.is_empty()
                    {
                        frontend_flags::SOURCE_RANGES
                    } else {
                        0
                    },
                affinity_timeout_s: service.affinity_timeout_s,
                maglev_size: size,
            };
            if current.is_none_or(|f| f.value != value) {
                store.set_frontend(&frontend_key(&frontend.endpoint), &value)?;
                report.frontends_written += 1;
            }
            self.frontends.insert(
                frontend.endpoint,
                FrontendState {
                    id: frontend_id,
                    value,
                    owner_service_id: service_id,
                },
            );
        }
        for range in old_ranges
            .iter()
            .filter(|r| !service.source_ranges.contains(r))
        {
            store.set_source_range(service_id, *range, false)?;
        }
        self.services.insert(
            name.clone(),
            ServiceState {
                id: service_id,
                offset,
                size,
                table_input: Some(input),
                source_ranges: service.source_ranges.clone(),
                applied: Some(service.clone()),
            },
        );
        Ok(())
    }

    pub fn apply(
        &mut self,
        desired: &DesiredState,
        store: &mut impl Datastore,
    ) -> Result<ApplyReport> {
        let mut plan: Vec<Plan<'_>> = desired
            .services
            .iter()
            .map(|(name, service)| {
                let existing = self.services.get(name);
                if existing.is_some_and(|s| s.applied.as_ref() == Some(service)) {
                    return Plan {
                        name,
                        input: Vec::new(),
                        size: 0,
                        rebuild: false,
                        unchanged: true,
                    };
                }
                let input = Self::table_input(service);
                let size = match self.limits.maglev_size {
                    0 => maglev::auto_table_size(existing.map(|s| s.size), input.len()),
                    m => m,
                };
                let rebuild = existing
                    .is_none_or(|s| s.size != size || s.table_input.as_ref() != Some(&input));
                Plan {
                    name,
                    input,
                    size,
                    rebuild,
                    unchanged: false,
                }
            })
            .collect();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|n| !desired.services.contains_key(*n))
            .cloned()
            .collect();
        // Taken while the maps change: a failure half-way leaves the counts unknown.
        let refs = self.refs.take();
        let scope = self.scope(desired, &plan, &removed, refs.as_ref());
        self.release_blocks(false);
        let mut fits = self.check_capacity(desired, &plan, &scope);
        if fits.is_err() && !self.quarantined.is_empty() {
            // Space still in quarantine: wait out its grace rather than refuse.
            self.release_blocks(true);
            fits = self.check_capacity(desired, &plan, &scope);
        }
        if let Err(e) = fits.map_err(|e| anyhow::Error::new(DoesNotFit(format!("{e:#}")))) {
            self.refs = refs;
            return Err(e);
        }
        let mut report = ApplyReport::default();
        let mut released_blocks = Vec::new();
        let desired_frontends = &scope.wanted_frontends;

        // 1. Backends: new ones get an id and their entry before any table can point at them.
        let value = |endpoint: &Endpoint, state: u8| Backend {
            addr: ipv4_to_wire(endpoint.addr.octets()),
            port: port_to_wire(endpoint.port),
            proto: endpoint.proto.number(),
            state,
        };
        let mut new = Vec::new();
        for (endpoint, state) in scope.backends.iter().filter_map(|(e, s)| Some((e, (*s)?))) {
            match self.backends.get_mut(endpoint) {
                Some(current) if current.state == state => {}
                Some(current) => {
                    store.set_backend(current.id, &value(endpoint, state))?;
                    current.state = state;
                }
                None => new.push((*endpoint, state)),
            }
        }
        // New ids in endpoint order, so they do not depend on hashing.
        new.sort_unstable();
        for (endpoint, state) in new {
            let id = self.free_backend_ids.pop_front().expect("capacity checked");
            store.reset_backend_stats(id)?;
            store.set_backend(id, &value(&endpoint, state))?;
            self.backends.insert(endpoint, BackendState { id, state });
            report.backends_added += 1;
        }

        // 2. Services that are gone: their frontends go (unless another service takes the
        //    address over below), then their names; blocks are released at the end.
        for name in removed {
            let state = self.services.remove(&name).expect("listed above");
            let stale: Vec<Endpoint> = self
                .frontends
                .iter()
                .filter(|(e, f)| f.owner_service_id == state.id && !desired_frontends.contains(e))
                .map(|(e, _)| *e)
                .collect();
            for endpoint in stale {
                let f = self.frontends.remove(&endpoint).expect("listed above");
                store.remove_frontend(&frontend_key(&endpoint))?;
                self.free_frontend_ids.push_back(f.id);
                report.frontends_removed += 1;
            }
            for range in &state.source_ranges {
                store.set_source_range(state.id, *range, false)?;
            }
            store.remove_service_name(state.id)?;
            self.free_service_ids.push_back(state.id);
            released_blocks.push((state.offset, state.size));
            report.services_removed += 1;
        }

        // 3. Each desired service: table into a free block if its backends changed, then flip.
        //    Tables are built a chunk of services at a time, on every core, each from the table
        //    it replaces (adopted ones too, so a restart moves nothing).
        for chunk in plan.chunks_mut(TABLE_CHUNK) {
            let mut jobs = Vec::new();
            for p in chunk.iter().filter(|p| p.rebuild) {
                let old = match self.services.get(p.name) {
                    Some(s) => {
                        let ids = store.read_maglev(s.offset, s.size)?;
                        let index: std::collections::HashMap<u32, u32> = p
                            .input
                            .iter()
                            .enumerate()
                            .map(|(i, (e, _))| (self.backends[e].id, i as u32 + 1))
                            .collect();
                        let previous: Vec<u32> = ids
                            .iter()
                            .map(|id| index.get(id).copied().unwrap_or(0))
                            .collect();
                        Some((ids, maglev::resize(&previous, p.size)))
                    }
                    None => None,
                };
                jobs.push(TableJob {
                    name: p.name,
                    input: p.input.clone(),
                    size: p.size,
                    old,
                });
            }
            let mut built = build_tables(&jobs)?;
            let mut old_tables: std::collections::HashMap<&String, Vec<u32>> = jobs
                .into_iter()
                .filter_map(|j| j.old.map(|(ids, _)| (j.name, ids)))
                .collect();
            for p in chunk.iter_mut().filter(|p| !p.unchanged) {
                let name = p.name;
                self.apply_service(
                    name,
                    &desired.services[name],
                    std::mem::take(&mut p.input),
                    p.size,
                    built.remove(name),
                    old_tables.remove(name),
                    &mut released_blocks,
                    &mut report,
                    store,
                )?;
            }
        }

        // 4. Frontends nobody wants any more.
        for endpoint in &scope.frontend_candidates {
            if desired_frontends.contains(endpoint) {
                continue;
            }
            let Some(f) = self.frontends.remove(endpoint) else {
                continue;
            };
            store.remove_frontend(&frontend_key(endpoint))?;
            self.free_frontend_ids.push_back(f.id);
            report.frontends_removed += 1;
        }

        // 5. Backends no service references: open flows keep their cached address in conntrack.
        let mut unused: Vec<Endpoint> = scope
            .backends
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(e, _)| *e)
            .collect();
        unused.sort_unstable();
        for endpoint in unused {
            let Some(b) = self.backends.remove(&endpoint) else {
                continue;
            };
            store.set_backend(b.id, &Backend::default())?;
            self.free_backend_ids.push_back(b.id);
            report.backends_removed += 1;
        }

        // 6. Blocks no frontend points at any more.
        let now = std::time::Instant::now();
        self.quarantined.extend(
            released_blocks
                .into_iter()
                .map(|(offset, size)| (now, offset, size)),
        );
        self.refs = Some(match (scope.full, refs) {
            (false, Some(mut all)) => {
                for (e, r) in scope.refs {
                    if r == (0, 0) {
                        all.remove(&e);
                    } else {
                        all.insert(e, r);
                    }
                }
                all
            }
            (_, _) => scope.refs,
        });

        for change in &report.tables {
            info!(
                "service {}: Maglev table rebuilt, {}/{} slots moved ({:.2}%, ideal {:.2}%)",
                change.service,
                change.slots_moved,
                change.slots,
                100.0 * change.slots_moved as f64 / change.slots as f64,
                100.0 * change.ideal_fraction
            );
        }
        Ok(report)
    }
}

fn table_change(service: &str, before: &[u32], after: &[u32]) -> TableChange {
    let old: BTreeSet<u32> = before.iter().copied().filter(|&i| i != 0).collect();
    let new: BTreeSet<u32> = after.iter().copied().filter(|&i| i != 0).collect();
    let removed = old.difference(&new).count() as f64 / old.len().max(1) as f64;
    let added = new.difference(&old).count() as f64 / new.len().max(1) as f64;
    TableChange {
        service: service.to_string(),
        slots: after.len() as u32,
        slots_moved: maglev::slots_moved(&maglev::resize(before, after.len() as u32), after),
        ideal_fraction: removed.max(added),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config;

    /// A datastore in memory that also checks the safety rule: a frontend is only ever written
    /// pointing at a block whose table is complete and whose backends all exist.
    #[derive(Default)]
    struct MemStore {
        m: u32,
        backends: HashMap<u32, Backend>,
        maglev: HashMap<u32, Vec<u32>>,
        frontends: HashMap<FrontendKey, Frontend>,
        names: HashMap<u32, String>,
        log: Vec<String>,
    }

    impl Datastore for MemStore {
        fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
            self.log.push(format!("backend {id}"));
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn write_maglev(&mut self, offset: u32, table: &[u32]) -> Result<()> {
            if self.m != 0 {
                assert_eq!(table.len() as u32, self.m);
            }
            assert!(
                !self.frontends.values().any(|f| f.maglev_offset == offset),
                "block at {offset} rewritten while a frontend points at it"
            );
            for id in table.iter().filter(|&&i| i != 0) {
                assert!(
                    self.backends
                        .get(id)
                        .is_some_and(|b| b.state == backend_state::ACTIVE),
                    "table names backend {id} before it exists"
                );
            }
            self.log.push(format!("maglev {offset}"));
            self.maglev.insert(offset, table.to_vec());
            Ok(())
        }
        fn read_maglev(&self, offset: u32, _len: u32) -> Result<Vec<u32>> {
            Ok(self.maglev[&offset].clone())
        }
        fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<()> {
            let table = self
                .maglev
                .get(&frontend.maglev_offset)
                .expect("frontend flipped to an unwritten block");
            for id in table.iter().filter(|&&i| i != 0) {
                assert!(
                    self.backends
                        .get(id)
                        .is_some_and(|b| b.state == backend_state::ACTIVE)
                );
            }
            self.log.push(format!("frontend {}", frontend.frontend_id));
            self.frontends.insert(*key, *frontend);
            Ok(())
        }
        fn remove_frontend(&mut self, key: &FrontendKey) -> Result<()> {
            self.frontends
                .remove(key)
                .expect("removing a frontend that is not there");
            Ok(())
        }
        fn set_service_name(&mut self, id: u32, name: &str) -> Result<()> {
            self.names.insert(id, name.to_string());
            Ok(())
        }
        fn remove_service_name(&mut self, id: u32) -> Result<()> {
            self.names.remove(&id);
            Ok(())
        }
        fn set_source_range(
            &mut self,
            id: u32,
            range: (std::net::Ipv4Addr, u8),
            present: bool,
        ) -> Result<()> {
            self.log.push(format!(
                "source range {id} {}/{} {present}",
                range.0, range.1
            ));
            Ok(())
        }
        fn reset_frontend_stats(&mut self, _id: u32) -> Result<()> {
            Ok(())
        }
        fn reset_backend_stats(&mut self, _id: u32) -> Result<()> {
            Ok(())
        }
    }

    const LIMITS: Limits = Limits {
        maglev_size: 251,
        maglev_capacity: 6 * 256,
        max_services: 4,
        max_frontends: 8,
        max_backends: 16,
    };

    fn desired(backends: &[&str]) -> DesiredState {
        let endpoints: Vec<String> = backends
            .iter()
            .map(|b| format!("- addresses: [\"{b}\"]"))
            .collect();
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.10\n  externalIPs: [192.0.2.10]\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{}\n",
            endpoints.join("\n")
        );
        config::load_str(&text).unwrap().0
    }

    fn store() -> MemStore {
        MemStore {
            m: LIMITS.maglev_size,
            ..Default::default()
        }
    }

    #[test]
    fn first_apply_writes_backends_then_table_then_frontends() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        let report = r
            .apply(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), &mut store)
            .unwrap();
        assert_eq!(
            (
                report.services_added,
                report.backends_added,
                report.frontends_written
            ),
            (1, 3, 2)
        );
        assert_eq!(store.log[..3], ["backend 1", "backend 2", "backend 3"]);
        assert_eq!(store.log[3], "maglev 0");
        assert_eq!(store.frontends.len(), 2);
        // Reapplying the same state writes nothing.
        store.log.clear();
        let report = r
            .apply(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), &mut store)
            .unwrap();
        assert_eq!(report.tables_rebuilt, 0);
        assert!(store.log.is_empty(), "{:?}", store.log);
    }

    #[test]
    fn backend_removal_uses_a_fresh_block_and_reports_disruption() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        r.apply(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), &mut store)
            .unwrap();
        let report = r
            .apply(&desired(&["10.0.0.1", "10.0.0.2"]), &mut store)
            .unwrap();
        assert_eq!(report.tables_rebuilt, 1);
        assert_eq!(report.backends_removed, 1);
        let change = &report.tables[0];
        assert!((change.ideal_fraction - 1.0 / 3.0).abs() < 1e-9);
        // Only the removed backend's slots (about a third) move.
        let moved = change.slots_moved as f64 / change.slots as f64;
        assert!(moved < 0.36, "{moved}");
        let offsets: BTreeSet<u32> = store.frontends.values().map(|f| f.maglev_offset).collect();
        assert_eq!(offsets, BTreeSet::from([256]), "the next 256-slot block");
        // The removed backend's entry is cleared.
        assert_eq!(store.backends[&3], Backend::default());
    }

    /// A block released by an apply is not handed out again before [`BLOCK_GRACE`]: a packet
    /// that read the frontend just before its flip still reads the old, complete table.
    #[test]
    fn released_blocks_wait_out_their_grace() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        let offset = |store: &MemStore| -> BTreeSet<u32> {
            store.frontends.values().map(|f| f.maglev_offset).collect()
        };
        r.apply(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), &mut store)
            .unwrap();
        assert_eq!(offset(&store), BTreeSet::from([0]));
        r.apply(&desired(&["10.0.0.1", "10.0.0.2"]), &mut store)
            .unwrap();
        assert_eq!(offset(&store), BTreeSet::from([256]));
        // At once: block 0 is still in quarantine, the lowest free one is 512.
        r.apply(&desired(&["10.0.0.1"]), &mut store).unwrap();
        assert_eq!(offset(&store), BTreeSet::from([512]));
        std::thread::sleep(BLOCK_GRACE);
        r.apply(&desired(&["10.0.0.1", "10.0.0.4"]), &mut store)
            .unwrap();
        assert_eq!(
            offset(&store),
            BTreeSet::from([0]),
            "free again after the grace"
        );
    }

    #[test]
    fn state_that_does_not_fit_is_rejected_before_any_write() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        let many: Vec<String> = (1..=20).map(|i| format!("10.0.1.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = r.apply(&desired(&many), &mut store).unwrap_err();
        assert!(e.to_string().contains("exceed the capacity of 15"), "{e}");
        assert!(store.log.is_empty());
        // loadBalancerSourceRanges count too (their LPM trie is a map like the others).
        let mut ranged = desired(&["10.0.1.1"]);
        for s in ranged.services.values_mut() {
            s.source_ranges = (0..=lb_common::DEFAULT_MAX_SOURCE_RANGES)
                .map(|i| (std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24))
                .collect();
        }
        let e = r.apply(&ranged, &mut store).unwrap_err();
        assert!(e.to_string().contains("loadBalancerSourceRanges"), "{e}");
        assert!(store.log.is_empty());
    }

    #[test]
    fn adopting_pinned_state_keeps_ids_and_tables() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        r.apply(&desired(&["10.0.0.1", "10.0.0.2"]), &mut store)
            .unwrap();
        let snapshot = Snapshot {
            frontends: store.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: store.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            service_names: store.names.iter().map(|(k, v)| (*k, v.clone())).collect(),
            source_ranges: Vec::new(),
        };
        let ids_before: BTreeSet<u32> = store.frontends.values().map(|f| f.frontend_id).collect();
        store.log.clear();
        let mut adopted = Reconciler::adopt(LIMITS, &snapshot);
        let report = adopted
            .apply(&desired(&["10.0.0.1", "10.0.0.2"]), &mut store)
            .unwrap();
        assert_eq!(report.backends_added, 0);
        assert_eq!(report.services_added, 0);
        // The pinned table already is the one the backends call for: nothing is rewritten.
        assert_eq!(report.tables_rebuilt, 0);
        assert!(
            !store.log.iter().any(|l| l.starts_with("maglev")),
            "{:?}",
            store.log
        );
        let ids_after: BTreeSet<u32> = store.frontends.values().map(|f| f.frontend_id).collect();
        assert_eq!(ids_before, ids_after);
    }

    #[test]
    fn automatic_sizes_grow_with_the_backends_without_moving_flows() {
        let limits = Limits {
            maglev_size: 0,
            maglev_capacity: 1 << 17,
            max_services: 4,
            max_frontends: 8,
            max_backends: 64,
        };
        let mut store = MemStore::default();
        let mut r = Reconciler::new(limits);
        let few: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}")).collect();
        let few: Vec<&str> = few.iter().map(String::as_str).collect();
        r.apply(&desired(&few), &mut store).unwrap();
        let sizes: BTreeSet<u32> = store.frontends.values().map(|f| f.maglev_size).collect();
        assert_eq!(sizes, BTreeSet::from([512]), "3 backends: 300 slots → 512");
        let many: Vec<String> = (1..=30).map(|i| format!("10.0.0.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let report = r.apply(&desired(&many), &mut store).unwrap();
        let fe = *store.frontends.values().next().unwrap();
        assert_eq!(fe.maglev_size, 4096, "30 backends: grown to 4096");
        // Only what the 27 new backends take moves (27/30 of the flows), nothing more.
        let change = &report.tables[0];
        let moved = change.slots_moved as f64 / change.slots as f64;
        assert!(moved <= 27.0 / 30.0 + 0.01, "moved {moved}");
        // Back to 3: 4096 slots is above 800 a backend, so the table shrinks to 512 again and
        // names exactly the 3 remaining backends.
        r.apply(&desired(&few), &mut store).unwrap();
        let fe = *store.frontends.values().next().unwrap();
        assert_eq!(fe.maglev_size, 512);
        let table = &store.maglev[&fe.maglev_offset];
        assert_eq!(table.len(), 512);
        let ids: BTreeSet<u32> = table.iter().copied().collect();
        assert_eq!(ids.len(), 3);
        assert!(
            ids.iter()
                .all(|id| store.backends[id].state == backend_state::ACTIVE)
        );
    }

    /// Services "web" (ClusterIP 10.96.0.10) and "api" (10.96.0.11, absent when `api` is None)
    /// with the given ready (and "~addr": terminating) endpoints.
    fn two(web: &[&str], api: Option<&[&str]>) -> DesiredState {
        let service = |name: &str, ip: &str, backends: &[&str]| {
            let endpoints: Vec<String> = backends
                .iter()
                .map(|b| match b.strip_prefix('~') {
                    Some(a) => format!("- addresses: [\"{a}\"]\n  conditions: {{ready: false, serving: true, terminating: true}}"),
                    None => format!("- addresses: [\"{b}\"]"),
                })
                .collect();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{}\n---\n",
                endpoints.join("\n")
            )
        };
        let mut text = service("web", "10.96.0.10", web);
        if let Some(api) = api {
            text.push_str(&service("api", "10.96.0.11", api));
        }
        config::load_str(&text).unwrap().0
    }

    /// What the maps say, independent of ids: backends by address with state, and frontends with
    /// the backends their tables name.
    fn contents(store: &MemStore) -> (BTreeSet<(u32, u8)>, BTreeMap<FrontendKey, BTreeSet<u32>>) {
        let backends = store
            .backends
            .values()
            .filter(|b| **b != Backend::default())
            .map(|b| (b.addr, b.state))
            .collect();
        let frontends = store
            .frontends
            .iter()
            .map(|(k, f)| {
                let names = store.maglev[&f.maglev_offset]
                    .iter()
                    .map(|id| store.backends[id].addr)
                    .collect();
                (*k, names)
            })
            .collect();
        (backends, frontends)
    }

    /// Applying a sequence of changes one after the other (the incremental pass after the first)
    /// leaves the maps as a fresh agent applying the last state at once.
    #[test]
    fn incremental_applies_equal_a_full_apply() {
        let limits = Limits {
            maglev_size: 251,
            maglev_capacity: 64 * 256,
            max_services: 8,
            max_frontends: 8,
            max_backends: 32,
        };
        let steps: [(&[&str], Option<&[&str]>); 6] = [
            (&["10.0.0.1", "10.0.0.2"], Some(&["10.0.0.2", "10.0.0.3"])),
            (&["10.0.0.1", "10.0.0.4"], Some(&["10.0.0.2", "10.0.0.3"])),
            (&["10.0.0.1", "~10.0.0.4"], Some(&["10.0.0.4", "10.0.0.3"])),
            (&["10.0.0.1"], None),
            (&["10.0.0.1", "10.0.0.3"], Some(&["10.0.0.3"])),
            (&["~10.0.0.3", "10.0.0.5"], Some(&["10.0.0.6"])),
        ];
        let mut store = MemStore::default();
        let mut r = Reconciler::new(limits);
        for (i, (web, api)) in steps.iter().enumerate() {
            let d = two(web, *api);
            r.apply(&d, &mut store).unwrap();
            let mut fresh_store = MemStore::default();
            Reconciler::new(limits).apply(&d, &mut fresh_store).unwrap();
            assert_eq!(contents(&store), contents(&fresh_store), "step {i}");
            assert_eq!(
                r.backend_count(),
                fresh_store
                    .backends
                    .values()
                    .filter(|b| **b != Backend::default())
                    .count(),
                "step {i}"
            );
        }
    }

    #[test]
    fn removing_the_service_clears_everything() {
        let mut store = store();
        let mut r = Reconciler::new(LIMITS);
        r.apply(&desired(&["10.0.0.1"]), &mut store).unwrap();
        r.apply(&DesiredState::default(), &mut store).unwrap();
        assert!(store.frontends.is_empty());
        assert!(store.names.is_empty());
        assert!(store.backends.values().all(|b| *b == Backend::default()));
        assert_eq!(
            (r.service_count(), r.frontend_count(), r.backend_count()),
            (0, 0, 0)
        );
    }
}
