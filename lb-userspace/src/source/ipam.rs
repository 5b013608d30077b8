//! One IPAM writer at a time: the agent holding the Lease writes Service and pool status
//! ([`super::kube_status`]). Every agent computes the same allocation from the same objects
//! (the addresses already in Service status are the hints), so the maps of every node agree
//! whoever writes; the Lease only keeps two agents from writing at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use log::{info, warn};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

use super::kube_status::StatusWriter;
use crate::{
    lbipam::{LbStatus, PoolUsage},
    lease::LeaseLock,
    metrics::Metrics,
};

/// Lease timing, as client-go's leader election defaults: a lease of 15 s, tried every 2 s,
/// given up by a leader that could not renew for 10 s.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub duration: Duration,
    pub retry: Duration,
    pub renew_deadline: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// The Services and the allocation of the last build (a copy: holding the desired state
/// itself would make the next incremental build copy all of it).
#[derive(Clone)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub lb_status: Vec<LbStatus>,
    pub pool_usage: Vec<PoolUsage>,
}

pub struct Ipam {
    snapshots: watch::Sender<Option<Snapshot>>,
    leader: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Ipam {
    pub const LEASE_NAME: &str = "lb-agent-ipam";

    pub fn start(
        client: Client,
        namespace: &str,
        identity: &str,
        timing: LeaseTiming,
        metrics: &Metrics,
    ) -> Self {
        let (snapshots, rx) = watch::channel(None);
        let leader = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = oneshot::channel();
        let lock = LeaseLock::new(
            client.clone(),
            namespace,
            Self::LEASE_NAME,
            identity,
            timing.duration,
        );
        let task = tokio::spawn(run(
            lock,
            StatusWriter::new(client),
            rx,
            leader.clone(),
            stopped,
            timing,
            metrics.clone(),
        ));
        Ipam {
            snapshots,
            leader,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Hands the leader the latest build (only the newest one is kept).
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshots.send_replace(Some(snapshot));
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Gives the Lease up (so another agent takes over at once) and ends the task.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

impl Drop for Ipam {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn run(
    mut lock: LeaseLock,
    mut writer: StatusWriter,
    mut snapshots: watch::Receiver<Option<Snapshot>>,
    leader: Arc<AtomicBool>,
    mut stopped: oneshot::Receiver<()>,
    timing: LeaseTiming,
    metrics: Metrics,
) {
    let mut tick = tokio::time::interval(timing.retry);
    let mut renewed = Instant::now();
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let was = leader.load(Ordering::Relaxed);
                match lock.try_acquire_or_renew().await {
                    Ok(true) => {
                        renewed = Instant::now();
                        if !was {
                            info!("IPAM: this agent writes Service and pool status (holds Lease {})", lock.name());
                            writer.reset();
                            dirty = true;
                            leader.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(false) => {
                        if was {
                            warn!("IPAM: Lease {} taken by another agent; no longer writing status", lock.name());
                        }
                        leader.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        metrics.api_errors.inc();
                        warn!("IPAM: Lease {}: {e}", lock.name());
                        if was && renewed.elapsed() > timing.renew_deadline {
                            warn!("IPAM: could not renew for {:?}; no longer writing status", timing.renew_deadline);
                            leader.store(false, Ordering::Relaxed);
                        }
                    }
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            _ = &mut stopped => {
                leader.store(false, Ordering::Relaxed);
                metrics.ipam_leader.set(0);
                if let Err(e) = lock.release().await {
                    warn!("IPAM: releasing Lease {}: {e}", lock.name());
                }
                break;
            }
        }
        metrics
            .ipam_leader
            .set(i64::from(leader.load(Ordering::Relaxed)));
        if !dirty || !leader.load(Ordering::Relaxed) {
            continue;
        }
        let Some(snapshot) = snapshots.borrow_and_update().clone() else {
            continue;
        };
        match writer
            .write(
                &snapshot.services,
                &snapshot.lb_status,
                &snapshot.pool_usage,
            )
            .await
        {
            Ok(w) => {
                dirty = false;
                if w.services + w.pools > 0 {
                    info!(
                        "IPAM: status written for {} Services and {} pools",
                        w.services, w.pools
                    );
                }
            }
            // Retried at the next tick.
            Err(e) => {
                metrics.api_errors.inc();
                warn!("IPAM: writing status: {e}");
            }
        }
    }
}
