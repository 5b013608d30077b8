//! What the IPAM leader writes back: each LoadBalancer Service of our class (no
//! `spec.loadBalancerClass`, or `lb.xdp.rs/lb`) gets its addresses in
//! `status.loadBalancer.ingress` and a condition `lb.xdp.rs/AddressAllocated` saying why when it
//! has none (pool exhausted, requested address taken, no pool); each LoadBalancerIPPool gets
//! its counts. Written with JSON merge patches of the status subresource, only where the status
//! differs from what the API server holds, so a steady state costs no writes.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    config::status_ingress_ips,
    lbipam::{self, LbStatus, LoadBalancerIPPool, PoolUsage},
};

/// The condition type of our allocation on a Service.
pub const CONDITION: &str = "lb.xdp.rs/AddressAllocated";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub services: usize,
    pub pools: usize,
}

pub struct StatusWriter {
    client: Client,
    /// Per Service: the patch last written and the resourceVersion it produced, so a snapshot
    /// older than our own write does not cause the same write again.
    services: HashMap<String, (Value, u64)>,
    /// Per pool: the status last written.
    pools: HashMap<String, Value>,
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        StatusWriter {
            client,
            services: HashMap::new(),
            pools: HashMap::new(),
        }
    }

    /// Forgets what was written (a new term as leader writes everything that differs).
    pub fn reset(&mut self) {
        self.services.clear();
        self.pools.clear();
    }

    /// Brings the status of `services` (the API server's current objects) and of the pools in
    /// line with the allocation.
    pub async fn write(
        &mut self,
        services: &[Arc<Service>],
        lb_status: &[LbStatus],
        pool_usage: &[PoolUsage],
    ) -> Result<Written, kube::Error> {
        let mut written = Written::default();
        let allocations: BTreeMap<&str, &LbStatus> =
            lb_status.iter().map(|s| (s.service.as_str(), s)).collect();
        for service in services {
            let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
            let Some(name) = service.metadata.name.as_deref() else {
                continue;
            };
            let key = format!("{namespace}/{name}");
            let Some(patch) = service_patch(service, allocations.get(key.as_str()).copied()) else {
                continue;
            };
            let version = version_of(service);
            if let Some((last, at)) = self.services.get(&key)
                && *last == patch
                && version.is_some_and(|v| v <= *at)
            {
                continue;
            }
            let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let after = api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            self.services
                .insert(key, (patch, version_of(&after).unwrap_or(0)));
            written.services += 1;
        }
        for usage in pool_usage {
            let status = json!({"status": {
                "total": usage.size,
                "used": usage.used,
                "available": usage.size.saturating_sub(usage.used),
            }});
            if self.pools.get(&usage.pool) == Some(&status) {
                continue;
            }
            let api: Api<LoadBalancerIPPool> = Api::all(self.client.clone());
            match api
                .patch_status(&usage.pool, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                Ok(_) => {}
                // A Cilium-kind pool from a file, or one deleted meanwhile.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
            self.pools.insert(usage.pool.clone(), status);
            written.pools += 1;
        }
        Ok(written)
    }
}

fn version_of(service: &Service) -> Option<u64> {
    service.metadata.resource_version.as_deref()?.parse().ok()
}

/// The merge patch that gives `service` the status `allocation` calls for; None when it
/// already has it or is not ours to write.
fn service_patch(service: &Service, allocation: Option<&LbStatus>) -> Option<Value> {
    let spec = service.spec.as_ref()?;
    let ours = lbipam::our_class(spec.load_balancer_class.as_deref());
    let conditions: Vec<Condition> = service
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let current = conditions.iter().find(|c| c.type_ == CONDITION);
    let ingress = status_ingress_ips(service);
    let (want_ingress, want_condition): (Vec<Ipv4Addr>, Option<(&str, &str, String)>) =
        match allocation {
            Some(a) if ours => match &a.error {
                None => (
                    a.addresses.clone(),
                    Some((
                        "True",
                        "Allocated",
                        format!(
                            "{} from pool {}",
                            join(&a.addresses),
                            a.pool.as_deref().unwrap_or("?")
                        ),
                    )),
                ),
                Some(e) => (
                    Vec::new(),
                    Some((
                        "False",
                        a.reason.as_deref().unwrap_or("NotAllocated"),
                        e.clone(),
                    )),
                ),
            },
            // No longer a LoadBalancer of ours: take back only what we wrote.
            _ if current.is_some() => (if ours { Vec::new() } else { ingress.clone() }, None),
            _ => return None,
        };
    let same_condition = match (&want_condition, current) {
        (None, None) => true,
        (Some((status, reason, message)), Some(c)) => {
            c.status == *status && c.reason == *reason && c.message == *message
        }
        _ => false,
    };
    if same_condition && want_ingress == ingress {
        return None;
    }
    let mut out: Vec<Value> = conditions
        .iter()
        .filter(|c| c.type_ != CONDITION)
        .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
        .collect();
    if let Some((status, reason, message)) = want_condition {
        // The transition time moves only when the status does.
        let since = current
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.0.to_string())
            .unwrap_or_else(|| Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        out.push(json!({
            "type": CONDITION,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": service.metadata.generation,
        }));
    }
    let ingress: Vec<Value> = want_ingress
        .iter()
        .map(|a| json!({"ip": a.to_string(), "ipMode": "VIP"}))
        .collect();
    Some(json!({"status": {"loadBalancer": {"ingress": ingress}, "conditions": out}}))
}

fn join(addresses: &[Ipv4Addr]) -> String {
    addresses
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
