//! lb-agent and lbctl: the control plane of the eBPF load balancer (XDP, tc and socket hooks).
//!
//! source (a YAML file or the API server) → config (Kubernetes objects → validated desired
//! state, the model) → reconcile (diff against what the maps hold, safe write order) → maps
//! (pinned BPF maps).

pub mod agentstate;
pub mod attach;
pub mod blocks;
pub mod caps;
pub mod config;
pub mod crd;
pub mod datapath;
pub mod healthcheck;
pub mod inspect;
pub mod interfaces;
pub mod l2;
pub mod lbipam;
pub mod lease;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod nodeports;
pub mod reconcile;
pub mod sockets;
pub mod source;
pub mod state;
pub mod status;
pub mod trace;
pub mod uplinks;

/// The node's eBPF object (XDP and tc programs) built from `lb-ebpf` by `build.rs`.
pub static LB_EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The benchmark-only object (traffic generator, sink, replay); never loaded by the agent.
pub static LB_BENCH_EBPF: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));
