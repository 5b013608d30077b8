//! A `coordination.k8s.io/v1` Lease held by one agent at a time, by client-go's leader
//! election algorithm: GET, then CREATE or UPDATE with the read resourceVersion, so two agents
//! racing for it get one success and one 409 Conflict. Expiry is judged by the local clock
//! from when this agent last saw the record change (as client-go does), never by comparing
//! timestamps written by another node's clock.
//!
//! (kube-rs has no leader election; kube-lease-manager writes with server-side apply and
//! strategic merge patches. The plain GET/CREATE/UPDATE protocol is the one client-go and
//! kube-controller-manager use, and also serves the per-node heartbeat Leases.)

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// resourceVersion of the record as last seen, and when this agent saw it change.
    observed: Option<(String, Instant)>,
    holding: bool,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: None,
            holding: false,
        }
    }

    pub fn holding(&self) -> bool {
        self.holding
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the Lease if it is free or expired, renews it if held; Ok(false) when another
    /// holder's lease is live or another agent won the race (409).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let result = self.attempt().await;
        self.holding = matches!(result, Ok(true));
        result
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = self.duration.as_secs().max(1) as i32;
        let current = match self.api.get_opt(&self.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(l) => {
                        self.observe(&l);
                        Ok(true)
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let version = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(v, _)| *v != version) {
            self.observed = Some((version, Instant::now()));
        }
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let theirs = !holder.is_empty() && holder != self.identity;
        let their_duration =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
        let seen = self
            .observed
            .as_ref()
            .map(|(_, t)| *t)
            .unwrap_or_else(Instant::now);
        if theirs && seen.elapsed() < their_duration {
            return Ok(false);
        }
        let mut lease = current;
        let spec = lease.spec.get_or_insert_default();
        if holder != self.identity {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.observe(&l);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        self.observed = Some((version, Instant::now()));
    }

    /// Gives the Lease up at once (an agent that stops), so another takes it without waiting
    /// for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if !self.holding {
            return Ok(());
        }
        self.holding = false;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
