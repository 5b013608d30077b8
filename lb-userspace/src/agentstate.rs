//! `--state-dir`/agent.json: the running agent as `lbctl status` shows it (process, source,
//! sync, IPAM leadership, the last reload and its result). Rewritten after every reload; it is
//! runtime information, so it is renamed into place without an fsync.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub const AGENT_FILE: &str = "agent.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub version: String,
    /// "config /etc/lb/services.yaml" or "kubernetes https://…".
    pub source: String,
    pub started_unix: u64,
    /// The first complete view was applied.
    pub synced: bool,
    /// With --kubernetes: whether this agent writes Service status.
    pub ipam_leader: Option<bool>,
    pub last_reload: Option<Reload>,
    /// What the agent builds with besides the objects, so `lbctl diff` builds the same.
    #[serde(default)]
    pub context: Option<BuildInputs>,
    /// Applies the maps refused since the agent started.
    #[serde(default)]
    pub map_write_errors: u64,
    /// Set while the last apply failed and a retry is scheduled.
    #[serde(default)]
    pub retry: Option<Retry>,
}

/// The retry of an apply the maps refused: the desired state is applied again, with backoff,
/// until it goes in (or a newer one replaces it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Retry {
    /// Failed attempts in a row.
    pub attempt: u32,
    pub at_unix_ms: u64,
    pub error: String,
}

/// The parts of the agent's build context a diff needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildInputs {
    pub node_ips: Vec<std::net::Ipv4Addr>,
    pub node_name: Option<String>,
    /// "30000-32767".
    pub node_port_range: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reload {
    pub at_unix: u64,
    /// "applied", "rejected" (the objects had errors) or "not applied" (the maps refused).
    pub result: String,
    pub detail: String,
    pub duration_ms: f64,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentState {
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::state::write_volatile(dir, AGENT_FILE, self)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        crate::state::read(dir, AGENT_FILE)
    }

    /// Is the process that wrote this still an lb-agent?
    pub fn running(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("lb-agent"))
    }
}

/// `--state-dir`/maglev.json: the last Maglev table rewrites of each Service port, with slots
/// moved against the ideal of that change, for `lbctl maglev`.
pub const MAGLEV_FILE: &str = "maglev.json";
/// Rewrites kept per Service port.
pub const MAGLEV_KEPT: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRewrite {
    pub at_unix: u64,
    pub slots: u32,
    pub slots_moved: usize,
    /// What a perfect consistent hash would move (the share of backends removed or added).
    pub ideal_fraction: f64,
}

/// Service port ("namespace/name:port") → its last rewrites, oldest first.
pub type TableRewrites = std::collections::BTreeMap<String, Vec<TableRewrite>>;

/// Adds `changes` to `kept` (at most [`MAGLEV_KEPT`] a Service port) and writes the file.
pub fn record_rewrites(
    dir: &Path,
    kept: &mut TableRewrites,
    changes: &[crate::reconcile::TableChange],
) -> Result<()> {
    for c in changes {
        let list = kept.entry(c.service.clone()).or_default();
        list.push(TableRewrite {
            at_unix: now_unix(),
            slots: c.slots,
            slots_moved: c.slots_moved,
            ideal_fraction: c.ideal_fraction,
        });
        if list.len() > MAGLEV_KEPT {
            list.remove(0);
        }
    }
    crate::state::write_volatile(dir, MAGLEV_FILE, kept)
}
