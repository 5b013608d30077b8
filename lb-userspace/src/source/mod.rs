//! Where the Kubernetes objects come from: a YAML file ([`file`]) or the API server
//! ([`kubernetes`]). Both hand the same [`Objects`](crate::config::Objects) to the same build,
//! so the agent has one reconciler whatever the source.

pub mod file;
pub mod ipam;
pub mod kube_status;
pub mod kubernetes;
pub mod membership;

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    config::{BuildContext, ConfigError, ConfigErrors},
    model::DesiredState,
};

/// A desired state a source built.
pub struct Built {
    pub desired: Arc<DesiredState>,
    /// Objects of kinds the agent does not handle (a file's Deployments): reported, not fatal.
    pub ignored: Vec<String>,
    /// Objects with errors that a live source kept at their last good version or left out.
    pub set_aside: Vec<ConfigError>,
}

// One per agent: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    File(file::FileSource),
    Kubernetes(Box<kubernetes::KubeSource>),
}

impl Source {
    /// "config /etc/lb/services.yaml" or "kubernetes https://10.0.0.1:6443".
    pub fn describe(&self) -> String {
        match self {
            Source::File(f) => format!("config {}", f.path().display()),
            Source::Kubernetes(k) => format!("kubernetes {}", k.server()),
        }
    }

    /// Returns when the objects may have changed since the last [`Source::build`]
    /// (cancel-safe: usable in `select!`).
    pub async fn changed(&mut self) {
        match self {
            Source::File(f) => f.changed().await,
            Source::Kubernetes(k) => k.changed().await,
        }
    }

    /// The desired state of the current objects; None while the source has no complete view yet
    /// (the API server's initial lists), so nothing is programmed from a partial one.
    pub fn build(&mut self, ctx: &BuildContext) -> Option<Result<Built, ConfigErrors>> {
        match self {
            Source::File(f) => Some(f.build(ctx)),
            Source::Kubernetes(k) => k.build(ctx),
        }
    }

    /// Notified when who announces which address may have changed (None for a file).
    pub fn membership_notifier(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        match self {
            Source::File(_) => None,
            Source::Kubernetes(k) => Some(k.membership().notifier()),
        }
    }

    /// Ends what the source runs besides watching (the IPAM Lease is given up).
    pub async fn stop(&mut self) {
        if let Source::Kubernetes(k) = self {
            k.stop().await;
        }
    }

    /// This node's labels, when the source knows its Node object.
    pub fn node_labels(&self) -> Option<BTreeMap<String, String>> {
        match self {
            Source::File(_) => None,
            Source::Kubernetes(k) => k.node_labels(),
        }
    }
}
