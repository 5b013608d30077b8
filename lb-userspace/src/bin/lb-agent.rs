//! lb-agent: keeps the load balancer's maps and hooks (XDP, tc, cgroup) in line with Kubernetes
//! objects from a file or the API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use lb_common::{
    CtTimeouts, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FRONTENDS,
    DEFAULT_MAX_SERVICES, DEFAULT_SOCK_REVNAT_SIZE,
};
use lb_userspace::{
    agentstate,
    attach::{self, AttachMode},
    config::BuildContext,
    datapath::{self, Datapath, Options},
    healthcheck::HealthChecks,
    interfaces::{Changes, Selector},
    l2::{Announcer, Interface},
    maps::PinnedMaps,
    metrics::Metrics,
    model::{DesiredState, L2Scope, Protocol},
    reconcile::Reconciler,
    sockets,
    source::{
        Source,
        file::FileSource,
        ipam::LeaseTiming,
        kubernetes::{Connection, KubeSource},
        membership::AnnounceTiming,
    },
    status::{self, Status},
};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "eBPF service load balancer agent",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "kubernetes"])))]
struct Args {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// Multi-document YAML of v1 Service, discovery.k8s.io/v1 EndpointSlice, LoadBalancerIPPool
    /// and L2AnnouncementPolicy objects (Cilium's kinds accepted too); reloaded when it changes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Follow the API server instead of a file: Services and EndpointSlices (without the
    /// service-proxy-name and headless labels, as kube-proxy), LoadBalancerIPPools and
    /// L2AnnouncementPolicies (lb.xdp.rs/v1alpha1) and this node's Node.
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig for --kubernetes (default: KUBECONFIG, else the in-cluster service account).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL for --kubernetes, overriding the kubeconfig's or in-cluster
    /// KUBERNETES_SERVICE_HOST (which is usually a ClusterIP this agent itself programs: give
    /// the API server's own address so the agent never depends on its own datapath).
    #[arg(long, requires = "kubernetes")]
    api_server: Option<String>,
    /// Namespace of the agents' Leases with --kubernetes (default: POD_NAMESPACE, the
    /// DaemonSet's own namespace through the downward API, else kube-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// With --kubernetes: seconds this node's Lease lives without renewal (renewed every third
    /// of it). A crashed node's addresses move to another node after this long; each node
    /// writes its Lease 3 times per this period, whatever the number of Services.
    #[arg(long, default_value_t = 3)]
    announce_lease_duration: u64,
    /// Interface to balance traffic on (repeat for several). One that does not exist yet is
    /// attached when it appears.
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    /// Also every interface whose name matches this regular expression, as they come and go
    /// (e.g. the pods' "^(veth|lxc|cali)").
    #[arg(long)]
    interface_regex: Option<String>,
    /// Hooks per interface: auto (XDP with tc behind it on physical NICs with native XDP, tc on
    /// virtual interfaces such as veths), xdp (XDP + tc everywhere: only for labs whose veths
    /// deliver full checksums and have NAPI on every peer), tc (tc only).
    #[arg(long, default_value = "auto")]
    attach: AttachMode,
    /// cgroup v2 directory whose processes (host and pods alike) are balanced at the socket:
    /// connect()/sendmsg() to a frontend go straight to a backend. Default: the cgroup v2 mount
    /// root (every process on the node); "none" turns socket balancing off.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Sockets whose reverse translation (getpeername, source of received datagrams) is kept
    /// (LRU).
    #[arg(long, default_value_t = DEFAULT_SOCK_REVNAT_SIZE)]
    sock_revnat_size: u32,
    /// Conntrack: seconds a TCP flow lives without a reply (an unanswered SYN), as Cilium's
    /// bpf-ct-timeout-regular-tcp-syn.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_syn)]
    ct_timeout_tcp_syn: u32,
    /// Conntrack: seconds an open TCP connection lives after its last packet
    /// (bpf-ct-timeout-regular-tcp).
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_established)]
    ct_timeout_tcp: u32,
    /// Conntrack: seconds a TCP connection lives after FIN or RST (bpf-ct-timeout-regular-tcp-fin).
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_closing)]
    ct_timeout_tcp_fin: u32,
    /// Conntrack: seconds a UDP flow without replies lives (nf_conntrack_udp_timeout).
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.udp)]
    ct_timeout_udp: u32,
    /// Conntrack: seconds a UDP flow with replies lives (nf_conntrack_udp_timeout_stream).
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.udp_stream)]
    ct_timeout_udp_stream: u32,
    /// How often the agent deletes expired conntrack entries no packet came back for, in
    /// seconds (packets find and drop expired entries themselves, agent or not).
    #[arg(long, default_value_t = 30)]
    ct_gc_interval: u64,
    /// bpffs directory for pinned maps and links (mounted if it is not a bpffs yet).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Maglev table size M: "auto" sizes each service's table by its backends (a power of two
    /// near 100 slots a backend, 256 to 65536, grown without moving flows); a number (a prime
    /// such as 16381 or a power of two, 251 to 1048576) gives every service that size, as
    /// Cilium's maglev.tableSize does.
    #[arg(long, default_value = "auto", value_parser = parse_table_size)]
    maglev_table_size: u32,
    /// Slots of the flat Maglev array shared by all tables (default: enough for --max-services).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    maglev_capacity: u32,
    /// Service ports (one Maglev table each) the maps can hold.
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, default_value_t = DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// (interface, address) pairs the ARP responder can answer for.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_ANNOUNCEMENTS)]
    max_announcements: u32,
    /// Conntrack entries (LRU; two per flow).
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_SIZE)]
    conntrack_size: u32,
    /// How often --config's file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    reload_interval_ms: u64,
    /// On exit, detach the program and remove the pinned maps (default: keep forwarding).
    #[arg(long)]
    cleanup: bool,
    /// Node address for NodePort frontends (repeat for several). Default: the IPv4 addresses of
    /// the --interface interfaces.
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// Where NodePorts that a Service of type NodePort or LoadBalancer leaves out are allocated
    /// (deterministically, so every node and every run agrees), as an API server would.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: lb_userspace::nodeports::NodePortRange,
    /// This node's name as EndpointSlices give it (`nodeName`), for externalTrafficPolicy:
    /// Local, and its Node object with --kubernetes. Default: the NODE_NAME environment
    /// variable (a DaemonSet's downward API), else the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Directory for status.json (LoadBalancer allocations, pool usage, announcements), read by
    /// `lbctl pools` / `lbctl arp` and by the next agent run to keep allocations stable, also
    /// across a reboot (written atomically: temp file, fsync, rename, fsync of the directory).
    #[arg(long, default_value = "/var/lib/lb-agent")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, on this address
    /// (e.g. 0.0.0.0:9964).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// /healthz answers 503 once a seen change has waited this many seconds without being
    /// programmed (maps full, writes failing), as kube-proxy's healthz does.
    #[arg(long, default_value_t = lb_userspace::metrics::HEALTH_BOUND.as_secs())]
    health_timeout: u64,
    /// Re-send gratuitous ARP for every announced address this often, in seconds (0: only when
    /// an address starts being announced). Switches age their MAC tables.
    #[arg(long, default_value_t = 0)]
    garp_interval: u64,
    /// How traffic from outside reaches a backend on another node, as Cilium's
    /// loadBalancer.mode: snat (the request leaves with this node's address as source, so the
    /// reply comes back here), dsr (the request carries the frontend in an IPv4 option; the
    /// backend's node answers the client directly, which sees the frontend as source and whose
    /// address reaches the pod; every backend must be behind a node running this datapath),
    /// hybrid (dsr for TCP, snat for UDP).
    #[arg(long, value_enum, default_value = "snat")]
    lb_mode: LbMode,
    /// Source ports of SNATed flows (one port per flow and backend); must lie outside the
    /// node's ephemeral ports (net.ipv4.ip_local_port_range, unless reserved with
    /// ip_local_reserved_ports).
    #[arg(long, default_value = "61000-65535")]
    snat_port_range: lb_userspace::nodeports::NodePortRange,
    /// Source address of a backend's request to its own Service when it picks itself (hairpin),
    /// as Cilium's 169.254.42.1; the backend's reply comes back to this node.
    #[arg(long, default_value = "169.254.42.1")]
    service_loopback_address: Ipv4Addr,
    /// Flows SNATed at once (LB_NAT entries; a full table refuses new flows, counted in
    /// `lbctl stats`).
    #[arg(long, default_value_t = lb_common::DEFAULT_NAT_SIZE)]
    nat_size: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LbMode {
    Snat,
    Dsr,
    Hybrid,
}

#[derive(clap::Subcommand, Debug)]
enum AgentCommand {
    /// Print the CustomResourceDefinitions of lb.xdp.rs/v1alpha1 (LoadBalancerIPPool,
    /// L2AnnouncementPolicy) as YAML, for `kubectl apply -f -`.
    Crds,
}

struct Agent {
    source: Source,
    /// What announcing needs of the desired state last applied (announcements, Local
    /// Services' nodes, L2 policies). Not the whole state: holding it would make the next
    /// incremental build copy all of it.
    l2: DesiredState,
    metrics: Metrics,
    health_checks: HealthChecks,
    /// A desired state was applied (with --kubernetes: after the initial lists).
    synced: bool,
    /// What was last written to status.json.
    status: Status,
    /// status.json was written by this run.
    status_written: bool,
    /// What agent.json says.
    agent_state: agentstate::AgentState,
    /// maglev.json: the last table rewrites of each Service port.
    rewrites: agentstate::TableRewrites,
    state_dir: PathBuf,
    reconciler: Reconciler,
    maps: PinnedMaps,
    announcer: Announcer,
    ctx: BuildContext,
    datapath: Datapath,
    selector: Selector,
    attach_mode: AttachMode,
    /// Interfaces attached now, by name.
    attached: Vec<attach::Attached>,
    cgroup: Option<PathBuf>,
    /// `--node-ip` given: NodePort addresses do not follow the interfaces.
    fixed_node_ips: bool,
    /// What LB_UPLINKS holds (ifindex → SNAT address), once written by this run.
    uplinks: Option<BTreeMap<u32, Ipv4Addr>>,
    ct_timeouts: CtTimeouts,
    limits: lb_userspace::reconcile::Limits,
    /// The desired state the maps refused, to apply again unless a newer valid one comes first.
    retry: Option<PendingApply>,
}

struct PendingApply {
    at: tokio::time::Instant,
    /// The wait that led here (doubled after each refusal).
    backoff: Duration,
    desired: std::sync::Arc<DesiredState>,
}

/// Marks an apply a map write refused part-way (as opposed to one that does not fit).
#[derive(Debug)]
struct WriteRefused;

impl std::fmt::Display for WriteRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map write was refused")
    }
}

/// First retry after a refused apply; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl Agent {
    fn reload(&mut self) {
        let source = self.source.describe();
        let started = std::time::Instant::now();
        let desired = match self.source.build(&self.ctx) {
            // Nothing is programmed from a partial view; the pinned state keeps forwarding.
            None => return,
            Some(Ok(built)) => {
                for ignored in &built.ignored {
                    warn!("{source}: ignoring {ignored}");
                }
                for e in &built.set_aside {
                    error!("{source}: {e}; this object stays at its last good version");
                }
                self.metrics.rejected.inc_by(built.set_aside.len() as u64);
                built.desired
            }
            Some(Err(errors)) => {
                for e in &errors.0 {
                    error!("{source}: {e}");
                }
                error!(
                    "{source} rejected ({} errors); keeping the last good state",
                    errors.0.len()
                );
                self.metrics.rejected.inc();
                // Nothing more to program for this change.
                self.metrics.health.programmed();
                let first = errors
                    .0
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                self.record_reload(
                    started,
                    "rejected",
                    format!("{} errors, first: {first}", errors.0.len()),
                );
                return;
            }
        };
        self.apply(desired, started);
    }

    /// Applies the desired state kept by a refused apply again.
    fn retry(&mut self) {
        if let Some(desired) = self.retry.as_ref().map(|p| p.desired.clone()) {
            self.apply(desired, std::time::Instant::now());
        }
    }

    /// Programs `desired` (built from the source at `started`) into the maps, then everything
    /// that follows from it: announcements, UDP flows of removed endpoints, status.
    fn apply(&mut self, desired: std::sync::Arc<DesiredState>, started: std::time::Instant) {
        let source = self.source.describe();
        let path = &source;
        let built = started.elapsed();
        let fits = self.announcer.check_fits(&desired);
        let applied = fits.and_then(|()| {
            self.reconciler
                .apply(&desired, &mut self.maps)
                .map_err(
                    |e| match e.downcast::<lb_userspace::reconcile::DoesNotFit>() {
                        Ok(d) => anyhow::anyhow!("{d}"),
                        Err(e) => e.context(WriteRefused),
                    },
                )
        });
        let report = match applied {
            Ok(r) => {
                info!(
                    "{path} applied in {:.1} ms (build {:.1}, maps {:.1}): {} services, {} frontends, {} backends (+{}/-{} services, {} tables rebuilt, +{}/-{} backends)",
                    started.elapsed().as_secs_f64() * 1e3,
                    built.as_secs_f64() * 1e3,
                    (started.elapsed() - built).as_secs_f64() * 1e3,
                    self.reconciler.service_count(),
                    self.reconciler.frontend_count(),
                    self.reconciler.backend_count(),
                    r.services_added,
                    r.services_removed,
                    r.tables_rebuilt,
                    r.backends_added,
                    r.backends_removed
                );
                r
            }
            Err(e) if e.is::<WriteRefused>() => {
                self.refused(started, &format!("{e:#}"), desired);
                return;
            }
            Err(e) => {
                // Does not fit: refused before any write, not retried (it cannot fit until the
                // source changes). Counted as a refused write, and the change stays
                // unprogrammed: /healthz fails after --health-timeout, as kube-proxy's does.
                error!("{path} not applied: {e:#}; keeping the last good state");
                self.metrics.map_write_errors.inc();
                self.agent_state.map_write_errors += 1;
                self.retry = None;
                self.agent_state.retry = None;
                self.record_reload(started, "not applied", format!("{e:#}"));
                return;
            }
        };
        if let Some(r) = self.agent_state.retry.take() {
            info!("{path} applied after {} refused attempts", r.attempt);
        }
        self.retry = None;
        if !report.tables.is_empty()
            && let Err(e) =
                agentstate::record_rewrites(&self.state_dir, &mut self.rewrites, &report.tables)
        {
            warn!("{}: {e:#}", self.state_dir.display());
        }
        if report.tables_rebuilt > 0 || report.services_removed > 0 {
            let reconciler = &self.reconciler;
            match self
                .maps
                .prune_affinity(|ids| reconciler.table_backends(ids))
            {
                Ok(0) => {}
                Ok(n) => info!("dropped {n} ClientIP affinity entries of removed endpoints"),
                Err(e) => warn!("pruning affinity entries: {e:#}"),
            }
        }
        if report.backends_removed > 0 {
            let live: std::collections::BTreeSet<(u32, u16)> = desired
                .services
                .values()
                .flat_map(|s| s.backends.iter())
                .filter(|b| b.endpoint.proto == Protocol::Udp)
                .map(|b| {
                    (
                        lb_common::ipv4_to_wire(b.endpoint.addr.octets()),
                        lb_common::port_to_wire(b.endpoint.port),
                    )
                })
                .collect();
            match self.maps.flush_udp_conntrack(&live) {
                Ok(0) => {}
                Ok(n) => {
                    info!("flushed {n} UDP conntrack entries of removed endpoints");
                    self.maps.count_agent_removed(n as u64);
                }
                Err(e) => warn!("flushing UDP conntrack: {e:#}"),
            }
            self.destroy_udp_sockets(&live);
        }
        for s in &desired.lb_status {
            match &s.error {
                Some(e) => error!("Service {}: no LoadBalancer address: {e}", s.service),
                None => info!(
                    "Service {}: LoadBalancer {:?} from pool {}",
                    s.service,
                    s.addresses,
                    s.pool.as_deref().unwrap_or("?")
                ),
            }
        }
        for (port, e) in self.health_checks.apply(&desired.health_checks) {
            error!("healthCheckNodePort {port}: {e:#}");
        }
        self.l2 = DesiredState {
            announcements: desired.announcements.clone(),
            local_nodes: desired.local_nodes.clone(),
            l2_policies: desired.l2_policies.clone(),
            ..Default::default()
        };
        self.announce();
        self.write_status(&desired);
        self.ctx.lb_hints = status::hints(&self.status);
        self.synced = true;
        log::debug!(
            "reload done in {:.1} ms (cleanup, announcements and status included)",
            started.elapsed().as_secs_f64() * 1e3
        );
        self.record_reload(started, "applied", String::new());
        release_freed_memory();
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(seen) = self.metrics.health.programmed() {
            self.metrics
                .programming_seconds
                .observe(seen.elapsed().as_secs_f64());
        }
        self.update_ready();
    }

    /// The maps refused an apply part-way (a write failed: the capacity checks passed). What
    /// was written stays: each Service is either its old or its new self (tables before
    /// frontends), though not all Services may have moved. The reconciler starts again from
    /// what the maps hold, and the apply is retried with backoff until it goes in; the failure
    /// and the retry are in the log, the metrics, `lbctl stats` and `lbctl status`.
    fn refused(
        &mut self,
        started: std::time::Instant,
        error: &str,
        desired: std::sync::Arc<DesiredState>,
    ) {
        self.metrics.map_write_errors.inc();
        self.agent_state.map_write_errors += 1;
        match self.maps.snapshot() {
            Ok(snapshot) => self.reconciler = Reconciler::adopt(self.limits, &snapshot),
            Err(e) => warn!("re-reading the maps after a refused apply: {e:#}"),
        }
        let backoff = self
            .retry
            .as_ref()
            .map_or(RETRY_FIRST, |p| (p.backoff * 2).min(RETRY_MAX));
        self.retry = Some(PendingApply {
            at: tokio::time::Instant::now() + backoff,
            backoff,
            desired,
        });
        let attempt = self.agent_state.retry.as_ref().map_or(1, |r| r.attempt + 1);
        error!(
            "{} not applied (attempt {attempt}): {error}; the last good state keeps forwarding, retrying in {} ms",
            self.source.describe(),
            backoff.as_millis()
        );
        self.agent_state.retry = Some(agentstate::Retry {
            attempt,
            at_unix_ms: agentstate::now_unix() * 1000 + backoff.as_millis() as u64,
            error: error.to_string(),
        });
        self.record_reload(started, "not applied", error.to_string());
    }

    /// agent.json: the reload just done and its result, for `lbctl status`.
    fn record_reload(&mut self, started: std::time::Instant, result: &str, detail: String) {
        self.agent_state.synced = self.synced;
        self.agent_state.context = Some(agentstate::BuildInputs {
            node_ips: self.ctx.node_ips.clone(),
            node_name: self.ctx.node_name.clone(),
            node_port_range: format!(
                "{}-{}",
                self.ctx.node_port_range.first, self.ctx.node_port_range.last
            ),
        });
        self.agent_state.ipam_leader = match &self.source {
            Source::Kubernetes(k) => Some(k.ipam_leader()),
            Source::File(_) => None,
        };
        self.agent_state.last_reload = Some(agentstate::Reload {
            at_unix: agentstate::now_unix(),
            result: result.to_string(),
            detail,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            services: self.reconciler.service_count(),
            frontends: self.reconciler.frontend_count(),
            backends: self.reconciler.backend_count(),
        });
        if let Err(e) = self.agent_state.write(&self.state_dir) {
            warn!("{}: {e:#}", self.state_dir.display());
        }
    }

    /// Ready once the first sync is applied and the datapath is attached somewhere.
    fn update_ready(&self) {
        let attached = !self.attached.is_empty() || self.cgroup.is_some();
        self.metrics.health.ready.store(
            self.synced && attached,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Connected UDP sockets balanced to removed endpoints are destroyed (the application sees
    /// ECONNABORTED and reconnects to a live one) instead of sending into the void.
    fn destroy_udp_sockets(&mut self, live: &std::collections::BTreeSet<(u32, u16)>) {
        let dead = match self.maps.udp_sockets_of_removed_backends(live) {
            Ok(dead) if dead.is_empty() => return,
            Ok(dead) => dead,
            Err(e) => return warn!("listing balanced UDP sockets: {e:#}"),
        };
        let targets = dead
            .iter()
            .map(|k| sockets::Target {
                cookie: k.cookie,
                backend: (
                    std::net::Ipv4Addr::from(lb_common::ipv4_from_wire(k.addr)),
                    lb_common::port_from_wire(k.port),
                ),
            })
            .collect();
        match sockets::destroy_udp(&targets) {
            Ok(n) => info!(
                "destroyed {n} connected UDP sockets of removed endpoints ({} balanced to them)",
                dead.len()
            ),
            Err(e) => warn!("destroying UDP sockets of removed endpoints: {e:#}"),
        }
        for k in &dead {
            let _ = self.maps.sock_revnat.remove(k);
        }
    }

    /// Writes status.json when it changed (it is fsynced: an endpoint change must not pay for
    /// a disk flush of an unchanged file).
    fn write_status(&mut self, desired: &DesiredState) {
        let status = Status::new(desired, &self.announcer);
        if status != self.status || !self.status_written {
            self.status = status;
            self.save_status();
            self.status_written = true;
        }
    }

    fn save_status(&self) {
        if let Err(e) = self.status.write(&self.state_dir) {
            warn!("status {}: {e:#}", self.state_dir.display());
        }
    }

    /// Attaches interfaces that appeared (or were recreated: new ifindex), forgets those that
    /// went, and when anything changed re-announces and rebuilds (NodePort addresses follow the
    /// interfaces unless --node-ip was given).
    fn sync_interfaces(&mut self) {
        let present = self.selector.present();
        let mut changed = false;
        let gone: Vec<attach::Attached> = self
            .attached
            .iter()
            .filter(|a| {
                !present
                    .iter()
                    .any(|i| i.name == a.interface && i.index == a.ifindex)
            })
            .cloned()
            .collect();
        for a in gone {
            info!("{}: gone (ifindex {}); detaching", a.interface, a.ifindex);
            if let Err(e) = self.datapath.forget(&a.interface, a.ifindex) {
                warn!("{}: {e:#}", a.interface);
            }
            self.attached.retain(|x| x.interface != a.interface);
            changed = true;
        }
        for i in &present {
            if self.attached.iter().any(|a| a.interface == i.name) {
                continue;
            }
            match self.datapath.attach(i, self.attach_mode) {
                Ok(a) => {
                    self.attached.push(a);
                    changed = true;
                }
                // It may be gone again already; the next event retries.
                Err(e) => warn!("{}: not attached: {e:#}", i.name),
            }
        }
        let interfaces: Vec<Interface> = present
            .into_iter()
            .filter(|i| self.attached.iter().any(|a| a.interface == i.name))
            .collect();
        let node_ips = node_ips_of(&interfaces);
        if !self.fixed_node_ips && node_ips != self.ctx.node_ips {
            info!("NodePort addresses now {node_ips:?}");
            self.ctx.node_ips = node_ips;
            changed = true;
        }
        self.sync_uplinks(&interfaces);
        if !changed {
            // A link went down or came up: only who announces what may change.
            let state = |list: &[Interface]| -> Vec<(String, bool)> {
                list.iter().map(|i| (i.name.clone(), i.up)).collect()
            };
            if state(&interfaces) != state(self.announcer.interfaces()) {
                self.announcer.set_interfaces(interfaces);
                self.announce();
                self.status.announced = self.announcer.announced();
                self.save_status();
            }
            return;
        }
        self.attached.sort_by(|a, b| a.interface.cmp(&b.interface));
        self.announcer.set_interfaces(interfaces);
        self.write_interfaces();
        self.reload();
    }

    /// LB_UPLINKS follows the attached interfaces (see [`lb_userspace::uplinks::uplinks`]).
    fn sync_uplinks(&mut self, interfaces: &[Interface]) {
        let fixed = self.fixed_node_ips.then_some(self.ctx.node_ips.as_slice());
        let uplinks = lb_userspace::uplinks::uplinks(
            interfaces,
            fixed,
            &lb_userspace::uplinks::default_route_interfaces(),
        );
        if self.uplinks.as_ref() == Some(&uplinks) {
            return;
        }
        match self.maps.set_uplinks(&uplinks) {
            Ok(()) => {
                let names: Vec<String> = uplinks
                    .iter()
                    .map(|(index, addr)| {
                        let name = interfaces
                            .iter()
                            .find(|i| i.index == *index)
                            .map_or("?", |i| i.name.as_str());
                        format!("{name} (SNAT to {addr})")
                    })
                    .collect();
                info!(
                    "uplinks: {}",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                );
                self.uplinks = Some(uplinks);
            }
            Err(e) => error!("uplinks not written: {e:#}"),
        }
    }

    fn write_interfaces(&self) {
        let hooked = attach::Hooked {
            cgroup: self.cgroup.clone(),
            interfaces: self.attached.clone(),
        };
        if let Err(e) = attach::write_interfaces(&self.state_dir, &hooked) {
            warn!("{}: {e:#}", self.state_dir.display());
        }
    }

    /// Deletes expired conntrack entries that no packet came back for.
    fn sweep_conntrack(&mut self) {
        match self.maps.sweep_conntrack(&self.ct_timeouts) {
            Ok(0) => {}
            Ok(n) => {
                log::debug!("conntrack: {n} expired entries removed");
                self.maps.count_agent_removed(n as u64);
            }
            Err(e) => warn!("conntrack sweep: {e:#}"),
        }
    }

    /// Answers ARP for the announced addresses this node owns: all of them with a file; with
    /// --kubernetes those the node Leases give it (see [`lb_userspace::source::membership`]),
    /// after telling the others which L2 policies this node serves now.
    fn announce(&mut self) {
        let desired = &self.l2;
        let filtered;
        let owned: &DesiredState = match &self.source {
            Source::Kubernetes(k) => {
                let labels = k.node_labels().unwrap_or_default();
                let up: Vec<&str> = self
                    .announcer
                    .interfaces()
                    .iter()
                    .filter(|i| i.up)
                    .map(|i| i.name.as_str())
                    .collect();
                k.membership()
                    .set_policies(served_policies(&desired.l2_policies, &labels, &up));
                let owned = k.membership().owned(desired);
                filtered = DesiredState {
                    announcements: desired
                        .announcements
                        .iter()
                        .filter(|(a, _)| owned.contains(a))
                        .map(|(a, v)| (*a, v.clone()))
                        .collect(),
                    ..Default::default()
                };
                &filtered
            }
            Source::File(_) => desired,
        };
        match self.announcer.apply(owned, &mut self.maps.arp) {
            Ok((added, removed)) if added + removed > 0 => {
                info!("ARP announcements: +{added}/-{removed}")
            }
            Ok(_) => {}
            Err(e) => error!("ARP announcements not applied: {e:#}"),
        }
        self.metrics
            .announcements
            .set(self.announcer.announced().len() as i64);
    }

    /// The one line that says the agent is up (with --kubernetes: after the initial lists).
    fn log_ready(&self, bpffs: &std::path::Path) {
        let reconciler = &self.reconciler;
        let hooks: Vec<String> = self
            .attached
            .iter()
            .map(|a| format!("{} {}", a.interface, a.hooks))
            .collect();
        let sockets = self
            .cgroup
            .as_ref()
            .map_or("socket balancing off".to_string(), |c| {
                format!("sockets of cgroup {}", c.display())
            });
        info!(
            "lb-agent ready: {} services, {} frontends, {} backends; interfaces: {}; {sockets}; maps in {}",
            reconciler.service_count(),
            reconciler.frontend_count(),
            reconciler.backend_count(),
            if hooks.is_empty() {
                "none yet".to_string()
            } else {
                hooks.join(", ")
            },
            bpffs.display()
        );
    }

    /// Periodic gratuitous ARP for everything announced (`--garp-interval`).
    fn refresh_garp(&mut self) {
        self.announcer.refresh();
        self.status.announced = self.announcer.announced();
        self.save_status();
    }
}

/// The L2 announcement policies this node serves: their nodeSelector selects its labels and a
/// link their interfaces select is up.
fn served_policies(
    policies: &BTreeMap<String, L2Scope>,
    labels: &BTreeMap<String, String>,
    up: &[&str],
) -> BTreeSet<String> {
    policies
        .iter()
        .filter(|(_, p)| lb_userspace::lbipam::selects(p.node_selector.as_ref(), labels))
        .filter(|(_, p)| {
            p.interfaces.is_empty() && !up.is_empty()
                || p.interfaces.iter().any(|re| {
                    regex::Regex::new(&format!("^(?:{re})$"))
                        .is_ok_and(|r| up.iter().any(|name| r.is_match(name)))
                })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Waits for `notify`, or forever without one.
async fn notified(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// NodePort addresses by default: the IPv4 addresses of the attached interfaces.
fn node_ips_of(interfaces: &[Interface]) -> Vec<Ipv4Addr> {
    interfaces
        .iter()
        .flat_map(|i| i.ipv4.iter().copied())
        .collect()
}

/// `--maglev-table-size`: "auto" (0) or a size the builder accepts.
fn parse_table_size(v: &str) -> Result<u32, String> {
    if v == "auto" {
        return Ok(0);
    }
    let m: u32 = v
        .parse()
        .map_err(|_| format!("{v:?} is neither \"auto\" nor a number"))?;
    lb_common::maglev::validate_table_size(m).map_err(|e| e.to_string())?;
    Ok(m)
}

// Two workers: the watches and the Lease renewals go on while the main loop builds and writes
// maps (a 10k-Service rebuild must not let this node's Lease lapse).
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if let Some(AgentCommand::Crds) = args.command {
        print!("{}", lb_userspace::crd::crds_yaml()?);
        return Ok(());
    }
    let cgroup = match &args.cgroup {
        Some(dir) if dir.as_os_str() == "none" => None,
        Some(dir) => Some(dir.clone()),
        None => Some(datapath::cgroup2_root()?),
    };
    {
        use lb_userspace::caps;
        let mut needs = vec![&caps::BPF, &caps::NET_ADMIN, &caps::PERFMON, &caps::NET_RAW];
        if cgroup.is_some() {
            needs.push(&caps::SYS_ADMIN);
        }
        caps::require(caps::effective()?, &needs)?;
    }
    let (local_range, reserved) = lb_userspace::uplinks::local_ports()?;
    lb_userspace::uplinks::check_port_range(args.snat_port_range, local_range, &reserved)?;
    let opts = Options {
        nat: lb_common::NatConfig {
            loopback_addr: lb_common::ipv4_to_wire(args.service_loopback_address.octets()),
            port_min: args.snat_port_range.first,
            port_max: args.snat_port_range.last,
            mode: match args.lb_mode {
                LbMode::Snat => lb_common::lb_mode::SNAT,
                LbMode::Dsr => lb_common::lb_mode::DSR,
                LbMode::Hybrid => lb_common::lb_mode::HYBRID,
            },
            _pad: [0; 3],
        },
        nat_size: args.nat_size,
        maglev_capacity: args.maglev_capacity,
        bpffs: args.bpffs.clone(),
        maglev_size: args.maglev_table_size,
        max_services: args.max_services,
        max_frontends: args.max_frontends,
        max_backends: args.max_backends,
        conntrack_size: args.conntrack_size,
        sock_revnat_size: args.sock_revnat_size,
        max_announcements: args.max_announcements,
        ct_timeouts: CtTimeouts {
            tcp_syn: args.ct_timeout_tcp_syn,
            tcp_established: args.ct_timeout_tcp,
            tcp_closing: args.ct_timeout_tcp_fin,
            udp: args.ct_timeout_udp,
            udp_stream: args.ct_timeout_udp_stream,
            _pad: 0,
        },
    };
    let selector = Selector::new(args.interfaces.clone(), args.interface_regex.as_deref())?;
    let interfaces = selector.present();
    for name in selector.missing(&interfaces) {
        warn!("--interface {name}: not present; attached when it appears");
    }
    let node_ips = if args.node_ips.is_empty() {
        node_ips_of(&interfaces)
    } else {
        args.node_ips.clone()
    };
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name for --node-name")?
            .trim()
            .to_string(),
    };
    // Earlier allocations stay where they were (a missing file just means a first run; a
    // corrupt one is said, and the allocation starts over from the objects).
    let lb_hints = match Status::read_if_present(&args.state_dir) {
        Ok(s) => s.map(|s| status::hints(&s)).unwrap_or_default(),
        Err(e) => {
            // Kept aside for the operator: the next status write would replace it.
            let path = args.state_dir.join(lb_userspace::status::STATUS_FILE);
            let aside = path.with_extension("json.corrupt");
            let kept = match std::fs::rename(&path, &aside) {
                Ok(()) => format!("kept as {}", aside.display()),
                Err(re) => format!("could not be set aside: {re}"),
            };
            error!("{e:#}: earlier LoadBalancer allocations lost ({kept}); allocating afresh");
            Default::default()
        }
    };
    info!(
        "earlier LoadBalancer allocations ({}): {lb_hints:?}",
        args.state_dir.display()
    );

    let mut datapath = Datapath::load(&opts)?;
    let maps = PinnedMaps::open(&opts.bpffs, true)?;
    let reconciler = Reconciler::adopt(opts.limits()?, &maps.snapshot()?);
    let announcer = Announcer::new(
        Vec::new(),
        &maps.arp,
        maps.capacity(lb_common::map_names::ARP)?,
    )?;
    // Links an earlier run left on interfaces that are gone or no longer selected.
    let names: Vec<String> = interfaces.iter().map(|i| i.name.clone()).collect();
    datapath.forget_others(&names)?;
    datapath.attach_cgroup(cgroup.as_deref())?;
    // ARP answers: with a file, always; with --kubernetes, only once this node's Lease is
    // renewed (the renewal task pushes the deadline forward from then on).
    let mut maps = maps;
    maps.set_announce_deadline(if args.kubernetes { 1 } else { 0 })?;
    let mut metrics = Metrics::default();
    metrics.health = Arc::new(lb_userspace::metrics::Health::with_bound(
        Duration::from_secs(args.health_timeout),
    ));
    if let Some(addr) = args.metrics_addr {
        let bound = metrics.serve(addr, opts.bpffs.clone())?;
        info!("metrics, /healthz and /readyz on http://{bound}");
    }
    let source = match &args.config {
        Some(path) => {
            std::fs::metadata(path).with_context(|| format!("--config {}", path.display()))?;
            Source::File(FileSource::new(
                path.clone(),
                Duration::from_millis(args.reload_interval_ms.max(10)),
            ))
        }
        None => {
            let connection = Connection {
                kubeconfig: args.kubeconfig.clone(),
                api_server: args.api_server.clone(),
            };
            Source::Kubernetes(Box::new(
                KubeSource::start(
                    &connection,
                    &node_name,
                    &args.lease_namespace,
                    LeaseTiming::default(),
                    AnnounceTiming::new(Duration::from_secs(args.announce_lease_duration.max(1))),
                    Some(lb_userspace::maps::AnnounceDeadline::open(&opts.bpffs)?),
                    &metrics,
                )
                .await?,
            ))
        }
    };
    let source_name = source.describe();
    let mut agent = Agent {
        source,
        l2: DesiredState::default(),
        metrics: metrics.clone(),
        health_checks: HealthChecks::default(),
        synced: false,
        status: Status::default(),
        status_written: false,
        rewrites: lb_userspace::state::read_if_present(&args.state_dir, agentstate::MAGLEV_FILE)
            .ok()
            .flatten()
            .unwrap_or_default(),
        agent_state: agentstate::AgentState {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: source_name.clone(),
            started_unix: agentstate::now_unix(),
            ..Default::default()
        },
        state_dir: args.state_dir.clone(),
        reconciler,
        maps,
        announcer,
        ctx: BuildContext {
            node_ips,
            node_name: Some(node_name),
            lb_hints,
            node_port_range: args.node_port_range,
        },
        datapath,
        selector,
        attach_mode: args.attach,
        attached: Vec::new(),
        cgroup: cgroup.clone(),
        fixed_node_ips: !args.node_ips.is_empty(),
        uplinks: None,
        ct_timeouts: opts.ct_timeouts,
        limits: opts.limits()?,
        retry: None,
    };
    if let Err(e) = agent.agent_state.write(&args.state_dir) {
        warn!("{}: {e:#}", args.state_dir.display());
    }
    agent.reload();
    // Subscribed before the first attach: nothing that appears meanwhile is missed.
    let mut changes = Changes::watch()?;
    agent.sync_interfaces();
    agent.write_interfaces();
    let mut ready = false;
    if matches!(agent.source, Source::File(_)) || agent.synced {
        agent.log_ready(&opts.bpffs);
        ready = true;
    } else {
        info!(
            "{}: waiting for the initial lists; the pinned state keeps forwarding",
            agent.source.describe()
        );
    }

    let membership = agent.source.membership_notifier();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let garp_period = Duration::from_secs(if args.garp_interval == 0 {
        86_400 * 365
    } else {
        args.garp_interval
    });
    let mut garp = tokio::time::interval_at(tokio::time::Instant::now() + garp_period, garp_period);
    let gc_period = Duration::from_secs(args.ct_gc_interval.max(1));
    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + gc_period, gc_period);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = notified(membership.as_deref()) => agent.announce(),
            _ = agent.source.changed() => {
                agent.metrics.health.queue();
                agent.reload();
                if !ready && agent.synced {
                    agent.log_ready(&opts.bpffs);
                    ready = true;
                }
            }
            _ = tokio::time::sleep_until(agent.retry.as_ref().map_or_else(tokio::time::Instant::now, |r| r.at)), if agent.retry.is_some() => {
                agent.retry();
            }
            _ = garp.tick(), if args.garp_interval > 0 => agent.refresh_garp(),
            _ = gc.tick() => agent.sweep_conntrack(),
            event = changes.next() => match event {
                Some(()) => agent.sync_interfaces(),
                None => {
                    warn!("rtnetlink connection ended; interfaces are no longer followed");
                    changes = Changes::watch()?;
                }
            },
        }
    }
    // Stop answering ARP first, then give the Leases up: the next owner takes over at once and
    // no request is answered twice.
    if matches!(agent.source, Source::Kubernetes(_))
        && let Err(e) = agent.maps.set_announce_deadline(1)
    {
        warn!("LB_ANNOUNCE: {e:#}");
    }
    agent.source.stop().await;
    drop(agent);
    if args.cleanup {
        datapath::cleanup(&opts.bpffs)?;
        info!(
            "lb-agent stopped; program detached and maps removed from {}",
            opts.bpffs.display()
        );
    } else {
        info!(
            "lb-agent stopped; datapath keeps forwarding from the pinned state in {}",
            opts.bpffs.display()
        );
    }
    Ok(())
}

/// Gives the memory an apply freed back to the kernel. glibc otherwise keeps it for reuse, in the
/// main heap and in the arenas of the threads that built the Maglev tables, so the agent would
/// hold its peak (the whole desired state built twice, the parse, the table builds) while idle.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
