//! Kubernetes objects from a multi-document YAML file → validated [`DesiredState`]:
//! [`documents`] (split, parse, cache) → [`fields`] → [`pools`] and [`desired`] (validation and the
//! join) → [`incremental`] (EndpointSlice-only changes).
//!
//! Objects are parsed into the real Kubernetes types (k8s-openapi), so a manifest that works
//! against an API server works here. Every error names the object and the field. Validation is
//! all-or-nothing: one bad object rejects the whole file and the last good state stays in force.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::{
    lbipam::{self, IpPool, L2Policy, LbRequest, Pool},
    model::{
        Announcement, BackendCondition, BackendSpec, DesiredState, Endpoint, FrontendKind,
        FrontendSpec, HealthCheck, L2Scope, Protocol, ServicePort,
    },
    nodeports::{self, NodePortRange},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One problem with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// "Service default/web", "EndpointSlice default/web-abc" or "document 3".
    pub object: String,
    /// "spec.ports[0].port"; empty when the problem is the object as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The objects we understand, as parsed.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<slice::Slice>>,
    /// LoadBalancer IP pools: (kind as written, object).
    pub pools: Vec<(String, Arc<IpPool>)>,
    pub l2_policies: Vec<(String, Arc<L2Policy>)>,
    /// Kinds we do not handle (Deployments next to the Services, say): reported, not fatal.
    pub ignored: Vec<String>,
}

/// What building the desired state needs besides the objects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildContext {
    /// Addresses NodePort frontends listen on.
    pub node_ips: Vec<Ipv4Addr>,
    /// This node's name, matched against EndpointSlice `nodeName` for externalTrafficPolicy Local.
    pub node_name: Option<String>,
    /// LoadBalancer addresses each Service ("namespace/name") had before: kept when still valid.
    pub lb_hints: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Where NodePorts a manifest leaves out are allocated (`--node-port-range`).
    pub node_port_range: NodePortRange,
}

fn err(
    object: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError {
        object: object.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn object_name(value: &serde_yaml_ng::Value) -> String {
    let meta = &value["metadata"];
    let name = meta["name"].as_str().unwrap_or("<unnamed>");
    let namespace = meta["namespace"].as_str().unwrap_or("default");
    format!("{namespace}/{name}")
}

/// Pools and policies are cluster-scoped: "Kind default/name" → "name".
fn cluster_name(object: &str) -> &str {
    let name = object.split_once(' ').map_or(object, |(_, n)| n);
    name.split_once('/').map_or(name, |(_, n)| n)
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
    object: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        err(object, field, e.into_inner().to_string())
    })
}

mod announce;
mod desired;
mod documents;
mod fields;
mod incremental;
mod pools;
mod ports;
mod service;
pub mod slice;
mod slices;
mod tolerant;

use announce::*;
use desired::*;
pub use desired::{build_desired, status_ingress_ips};
pub use documents::{ConfigCache, parse_objects};
use fields::*;
use incremental::*;
use pools::*;
use ports::*;
use service::*;
use slices::*;
pub use tolerant::{Tolerated, build_tolerant};

/// Parse and validate a whole file (no node addresses, no earlier allocation).
pub fn load_str(text: &str) -> Result<(DesiredState, Objects), ConfigErrors> {
    load_str_with(text, &BuildContext::default())
}

pub fn load_str_with(
    text: &str,
    ctx: &BuildContext,
) -> Result<(DesiredState, Objects), ConfigErrors> {
    let objects = parse_objects(text)?;
    Ok((build_desired(&objects, ctx)?, objects))
}

/// As [`load_str_with`], reusing the documents `cache` parsed before, and the desired state it
/// built last when only EndpointSlices changed. The cache keeps the returned state: drop it
/// before the next call and that call updates it without copying.
pub fn load_cached(
    cache: &mut ConfigCache,
    text: &str,
    ctx: &BuildContext,
) -> Result<(Arc<DesiredState>, Arc<Objects>), ConfigErrors> {
    let objects = Arc::new(cache.parse(text)?);
    let desired = cache.built.build(&objects, ctx)?;
    Ok((desired, objects))
}

/// The objects, context and desired state of the last successful build: when only
/// EndpointSlices changed since (objects nobody touched are the same `Arc`s), the next build
/// rebuilds just their Services on top of it.
#[derive(Default)]
pub struct DesiredCache {
    last: Option<(Arc<Objects>, BuildContext, Arc<DesiredState>)>,
    /// Builds that took that shortcut.
    pub incremental_builds: u64,
}

impl DesiredCache {
    /// [`build_desired`], incrementally where it can. The cache keeps the returned state: drop
    /// it before the next call and that call updates it without copying.
    pub fn build(
        &mut self,
        objects: &Arc<Objects>,
        ctx: &BuildContext,
    ) -> Result<Arc<DesiredState>, ConfigErrors> {
        let desired = match self.last.take() {
            Some((old, old_ctx, mut previous)) if old_ctx == *ctx => {
                match endpoint_slice_change(&old, objects, &previous, ctx) {
                    Some(affected) => {
                        match rebuild_services(
                            Arc::make_mut(&mut previous),
                            objects,
                            &affected,
                            ctx,
                        ) {
                            Some(Ok(())) => {
                                self.incremental_builds += 1;
                                previous
                            }
                            Some(Err(e)) => {
                                self.last = Some((old, old_ctx, previous));
                                return Err(e);
                            }
                            None => Arc::new(build_desired(objects, ctx)?),
                        }
                    }
                    None => Arc::new(build_desired(objects, ctx)?),
                }
            }
            _ => Arc::new(build_desired(objects, ctx)?),
        };
        self.last = Some((objects.clone(), ctx.clone(), desired.clone()));
        Ok(desired)
    }
}

#[cfg(test)]
mod tests;
