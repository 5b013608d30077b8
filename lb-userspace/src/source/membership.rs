//! One announcer per address, with API writes that grow with nodes, not Services.
//!
//! Every agent keeps a node Lease (`lb-agent-node-<node>`, renewed every second, 3 s long)
//! whose annotation lists the L2 announcement policies the node can serve (its nodeSelector
//! matches and a link its interfaces select is up). Every agent watches all node Leases and
//! computes, for each announced address, the same owner: the eligible live node with the
//! highest rendezvous hash of (node, address). Eligible: its Lease is live, it serves one of
//! the address's policies and, for externalTrafficPolicy: Local, it has a ready endpoint. A
//! node that owns an address answers ARP for it and sends gratuitous ARP when it takes it over.
//!
//! - graceful: a stopping agent stops answering, then deletes its Lease: the next owner takes
//!   over within one watch event;
//! - link down: the node's policies change, its Lease is rewritten at once, same;
//! - crash: the Lease is no longer renewed; the others see it expire after its duration (by
//!   their own clocks, from when they last saw it change) and the dead node's datapath stops
//!   answering at the same moment (LB_ANNOUNCE, pushed forward only by renewals).
//!
//! Cilium uses a Lease per Service (writes grow with Services, first come first served);
//! MetalLB ranks by a hash among memberlist-live speakers (no API writes, slow to notice a
//! dead node). This is MetalLB's ranking over Kubernetes' own liveness, at nodes × 60 writes a
//! minute.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use log::{info, warn};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::{
    maps::{AnnounceDeadline, monotonic_coarse_ns},
    metrics::Metrics,
    model::DesiredState,
};

pub const LEASE_PREFIX: &str = "lb-agent-node-";
/// Label on node Leases (the watch selects them by it).
pub const LEASE_LABEL: &str = "lb.xdp.rs/node-lease";
/// Annotation of a node Lease: the L2 announcement policies the node serves, comma-separated.
pub const POLICIES_ANNOTATION: &str = "lb.xdp.rs/l2-policies";

/// How long after its Lease shows a policy a node starts claiming that policy's addresses
/// (the others notice a Lease change within their 50 ms poll).
const JOIN_SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy)]
pub struct AnnounceTiming {
    /// How long a node Lease lives without renewal (`--announce-lease-duration`).
    pub duration: Duration,
    /// How often it is renewed (a third of the duration).
    pub renew: Duration,
}

impl AnnounceTiming {
    pub fn new(duration: Duration) -> Self {
        AnnounceTiming {
            duration,
            renew: duration / 3,
        }
    }
}

struct Member {
    policies: BTreeSet<String>,
    version: String,
    /// When this agent saw the Lease change (renewals change it).
    seen: Instant,
    duration: Duration,
    /// Released (holderIdentity cleared).
    released: bool,
}

#[derive(Default)]
struct State {
    members: BTreeMap<String, Member>,
    /// The Leases were listed once.
    synced: bool,
    /// The policies this node serves, as last computed by the agent.
    mine: Option<BTreeSet<String>>,
    /// When the last successful write of our own Lease was sent (before the API server
    /// stored it: no other node can have seen it earlier).
    renewed: Option<Instant>,
    /// Policies our Lease has shown for at least JOIN_SETTLE: we claim addresses only for
    /// those, so the others have seen the change and let go first (no address answered
    /// twice). Policies we stop serving are dropped at once.
    settled: BTreeSet<String>,
    /// Policies written last, when they differ from `settled`, and when they were written.
    pending: Option<(BTreeSet<String>, Instant)>,
    /// The live, eligible set last reported, to notice expiries.
    last_live: BTreeMap<String, BTreeSet<String>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Arc<Notify>,
}

pub struct Membership {
    shared: Arc<Shared>,
    me: String,
    timing: AnnounceTiming,
    policies: watch::Sender<Option<BTreeSet<String>>>,
    api: Api<Lease>,
    tasks: Vec<JoinHandle<()>>,
}

impl Membership {
    pub fn start(
        client: Client,
        namespace: &str,
        me: &str,
        timing: AnnounceTiming,
        deadline: Option<AnnounceDeadline>,
        metrics: &Metrics,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Arc::new(Notify::new()),
        });
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let (policies, policies_rx) = watch::channel(None);
        let tasks = vec![
            tokio::spawn(follow(api.clone(), shared.clone(), metrics.clone())),
            tokio::spawn(renew(
                api.clone(),
                shared.clone(),
                me.to_string(),
                timing,
                policies_rx,
                deadline,
                metrics.clone(),
            )),
            tokio::spawn(expire(shared.clone(), me.to_string(), timing)),
        ];
        Membership {
            shared,
            me: me.to_string(),
            timing,
            policies,
            api,
            tasks,
        }
    }

    /// The L2 policies this node serves now; a change is written to its Lease at once.
    pub fn set_policies(&self, policies: BTreeSet<String>) {
        self.shared.state.lock().expect("membership").mine = Some(policies.clone());
        self.policies.send_if_modified(|p| {
            let changed = p.as_ref() != Some(&policies);
            *p = Some(policies);
            changed
        });
    }

    /// Notified when the live nodes or their policies changed.
    pub fn notifier(&self) -> Arc<Notify> {
        self.shared.changed.clone()
    }

    /// The announced addresses of `desired` this node owns.
    pub fn owned(&self, desired: &DesiredState) -> BTreeSet<Ipv4Addr> {
        let state = self.shared.state.lock().expect("membership");
        let live = live_members(&state, &self.me, self.timing);
        if !state.synced || !live.contains_key(&self.me) {
            return BTreeSet::new();
        }
        desired
            .announcements
            .iter()
            .filter(|(addr, a)| {
                let local = desired.local_nodes.get(&a.service);
                let owner = live
                    .iter()
                    .filter(|(node, policies)| {
                        a.policies.iter().any(|p| policies.contains(p))
                            && local.is_none_or(|nodes| nodes.contains(*node))
                    })
                    .max_by_key(|(node, _)| rank(node, **addr))
                    .map(|(node, _)| node.as_str());
                owner == Some(self.me.as_str())
            })
            .map(|(addr, _)| *addr)
            .collect()
    }

    /// Deletes this node's Lease (after the caller stopped answering ARP): the other nodes
    /// take its addresses over at once.
    pub async fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let name = format!("{LEASE_PREFIX}{}", self.me);
        match tokio::time::timeout(
            Duration::from_secs(2),
            self.api.delete(&name, &DeleteParams::default()),
        )
        .await
        {
            Ok(Ok(_)) => info!("announcements: Lease {name} deleted; other nodes take over"),
            Ok(Err(e)) => warn!("announcements: deleting Lease {name}: {e}"),
            Err(_) => warn!("announcements: deleting Lease {name}: timed out"),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long after a renewal every node takes a Lease of `duration` as expired, and its own
/// datapath stops answering: half a renewal period (renewals come every third of the
/// duration) short of it, so one late renewal is forgiven and a crash is noticed within the
/// duration even with the 50 ms poll (3 s → 2.5 s).
pub fn expiry(duration: Duration) -> Duration {
    duration - duration / 6
}

/// Rendezvous rank of `node` for `addr`: FNV-1a over both, finished with splitmix64, so every
/// agent (of any version) ranks alike.
pub fn rank(node: &str, addr: Ipv4Addr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0]).chain(addr.octets()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Live nodes and their policies; our own entry comes from what we last wrote.
fn live_members(
    state: &State,
    me: &str,
    timing: AnnounceTiming,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut live: BTreeMap<String, BTreeSet<String>> = state
        .members
        .iter()
        .filter(|(node, m)| *node != me && !m.released && m.seen.elapsed() < expiry(m.duration))
        .map(|(node, m)| (node.clone(), m.policies.clone()))
        .collect();
    if let (Some(renewed), Some(mine)) = (state.renewed, &state.mine)
        && renewed.elapsed() < expiry(timing.duration)
    {
        let settled: BTreeSet<String> = mine.intersection(&state.settled).cloned().collect();
        if !settled.is_empty() {
            live.insert(me.to_string(), settled);
        }
    }
    live
}

fn member_of(lease: &Lease) -> Option<(String, Member)> {
    let node = lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(LEASE_PREFIX)?
        .to_string();
    let spec = lease.spec.clone().unwrap_or_default();
    let policies = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POLICIES_ANNOTATION))
        .map(|p| {
            p.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((
        node,
        Member {
            policies,
            version: lease.metadata.resource_version.clone().unwrap_or_default(),
            seen: Instant::now(),
            duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(3).max(1) as u64),
            released: spec.holder_identity.is_none_or(|h| h.is_empty()),
        },
    ))
}

/// Follows the node Leases.
async fn follow(api: Api<Lease>, shared: Arc<Shared>, metrics: Metrics) {
    let config = watcher::Config::default().labels(&format!("{LEASE_LABEL}=true"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut relist: Option<BTreeMap<String, Member>> = None;
    while let Some(event) = events.next().await {
        let mut state = shared.state.lock().expect("membership");
        let upsert = |members: &mut BTreeMap<String, Member>, lease: &Lease| {
            if let Some((node, m)) = member_of(lease) {
                // Same version: not a renewal, keep when it was first seen.
                if members
                    .get(&node)
                    .is_some_and(|old| old.version == m.version)
                {
                    return;
                }
                members.insert(node, m);
            }
        };
        match event {
            Ok(Event::Init) => relist = Some(BTreeMap::new()),
            Ok(Event::InitApply(l)) => upsert(relist.get_or_insert_default(), &l),
            Ok(Event::InitDone) => {
                let mut fresh = relist.take().unwrap_or_default();
                // Leases the relist returns unchanged keep when they were seen.
                for (node, m) in fresh.iter_mut() {
                    if let Some(old) = state.members.get(node)
                        && old.version == m.version
                    {
                        m.seen = old.seen;
                    }
                }
                state.members = fresh;
                state.synced = true;
            }
            Ok(Event::Apply(l)) => upsert(&mut state.members, &l),
            Ok(Event::Delete(l)) => {
                if let Some((node, _)) = member_of(&l) {
                    state.members.remove(&node);
                }
            }
            Err(e) => {
                metrics.api_errors.inc();
                warn!("announcements: watching node Leases: {e}");
            }
        }
    }
}

/// Writes this node's Lease every `timing.renew`, and at once when its policies change.
async fn renew(
    api: Api<Lease>,
    shared: Arc<Shared>,
    me: String,
    timing: AnnounceTiming,
    mut policies: watch::Receiver<Option<BTreeSet<String>>>,
    deadline: Option<AnnounceDeadline>,
    metrics: Metrics,
) {
    let name = format!("{LEASE_PREFIX}{me}");
    let mut tick = tokio::time::interval(timing.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = policies.changed() => if changed.is_err() { return },
        }
        let Some(mine) = policies.borrow_and_update().clone() else {
            continue; // the agent has not said yet what this node serves
        };
        let sent = Instant::now();
        match write(&api, &name, &me, &mine, timing).await {
            Ok(()) => {
                // The datapath answers ARP as long as the others will take this node as live.
                let left = expiry(timing.duration).saturating_sub(sent.elapsed());
                if let Some(d) = &deadline
                    && let Err(e) = d.set(monotonic_coarse_ns() + left.as_nanos() as u64)
                {
                    warn!("announcements: LB_ANNOUNCE: {e:#}");
                }
                let mut state = shared.state.lock().expect("membership");
                state.renewed = Some(sent);
                if mine == state.settled {
                    state.pending = None;
                } else if state.pending.as_ref().is_none_or(|(p, _)| *p != mine) {
                    state.pending = Some((mine, sent));
                }
            }
            Err(e) => {
                metrics.api_errors.inc();
                warn!("announcements: renewing Lease {name}: {e}");
            }
        }
    }
}

async fn write(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    policies: &BTreeSet<String>,
    timing: AnnounceTiming,
) -> Result<(), kube::Error> {
    let annotation = policies.iter().cloned().collect::<Vec<_>>().join(",");
    let now = MicroTime(Timestamp::now());
    let seconds = timing.duration.as_secs().max(1) as i32;
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    labels: Some([(LEASE_LABEL.to_string(), "true".to_string())].into()),
                    annotations: Some([(POLICIES_ANNOTATION.to_string(), annotation)].into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_string()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await?;
        }
        Some(mut lease) => {
            lease
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(POLICIES_ANNOTATION.to_string(), annotation);
            lease
                .metadata
                .labels
                .get_or_insert_default()
                .insert(LEASE_LABEL.to_string(), "true".to_string());
            let spec = lease.spec.get_or_insert_default();
            if spec.holder_identity.as_deref() != Some(me) {
                spec.acquire_time = Some(now.clone());
            }
            spec.holder_identity = Some(me.to_string());
            spec.lease_duration_seconds = Some(seconds);
            spec.renew_time = Some(now);
            api.replace(name, &PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Wakes the agent when the live, eligible set changes (a Lease expired, came or changed).
async fn expire(shared: Arc<Shared>, me: String, timing: AnnounceTiming) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let mut state = shared.state.lock().expect("membership");
        if let Some((policies, at)) = state.pending.take() {
            if at.elapsed() >= JOIN_SETTLE {
                state.settled = policies;
            } else {
                state.pending = Some((policies, at));
            }
        }
        if !state.synced {
            continue;
        }
        let live = live_members(&state, &me, timing);
        if live != state.last_live {
            let gone: Vec<&String> = state
                .last_live
                .keys()
                .filter(|n| !live.contains_key(*n))
                .collect();
            if !gone.is_empty() {
                info!("announcements: nodes no longer live: {gone:?}");
            }
            state.last_live = live;
            drop(state);
            shared.changed.notify_one();
        }
    }
}
