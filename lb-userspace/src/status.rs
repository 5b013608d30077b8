//! The status file (`--state-dir`/status.json) the agent writes after every applied change:
//! LoadBalancer allocations, pool usage and announcements, read by `lbctl pools` / `lbctl arp`
//! and, as allocation hints, by the agent's next run.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    l2::Announcer,
    lbipam::{LbStatus, PoolUsage},
    model::DesiredState,
};

/// One announced address on one interface, as `lbctl arp` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    pub address: Ipv4Addr,
    pub interface: String,
    pub mac: String,
    pub service: String,
    /// Unix seconds of the last gratuitous ARP sent for it.
    pub last_garp: Option<u64>,
}

/// The status file the agent writes after every applied change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub load_balancers: Vec<LbStatus>,
    pub pools: Vec<PoolUsage>,
    pub announced: Vec<Announced>,
}

pub const STATUS_FILE: &str = "status.json";

impl Status {
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::state::write(dir, STATUS_FILE, self)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        crate::state::read(dir, STATUS_FILE)
    }

    /// The status of an earlier run, None on a first run; a corrupt file is an error.
    pub fn read_if_present(dir: &Path) -> Result<Option<Self>> {
        crate::state::read_if_present(dir, STATUS_FILE)
    }
}

/// Which LoadBalancer addresses each Service had, from the status of an earlier run.
pub fn hints(status: &Status) -> BTreeMap<String, Vec<Ipv4Addr>> {
    status
        .load_balancers
        .iter()
        .filter(|s| !s.addresses.is_empty())
        .map(|s| (s.service.clone(), s.addresses.clone()))
        .collect()
}

impl Status {
    pub fn new(desired: &DesiredState, announcer: &Announcer) -> Self {
        Self {
            load_balancers: desired.lb_status.clone(),
            pools: desired.pool_usage.clone(),
            announced: announcer.announced(),
        }
    }
}
