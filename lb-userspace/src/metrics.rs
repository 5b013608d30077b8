//! `--metrics-addr`: Prometheus metrics (text format), `/healthz` and `/readyz`, served from a
//! thread of its own so a stuck agent loop still answers (and its health check fails).
//!
//! Datapath counters (per frontend and backend, conntrack, ARP replies) are read from the
//! pinned maps at each scrape; the agent's own (reconcile and programming latency, errors,
//! announcements, IPAM leadership) are kept here.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{inspect, l2, maps::PinnedMaps};

/// Default of `--health-timeout`: a change waiting longer than this makes `/healthz` answer
/// 503 (kube-proxy's rule: the proxy is unhealthy when it has not programmed a queued change
/// in time).
pub const HEALTH_BOUND: Duration = Duration::from_secs(60);

/// The agent's own metrics and health; cheap to clone (shared counters).
#[derive(Clone)]
pub struct Metrics {
    pub reconcile_seconds: Histogram,
    /// A change seen (watch event, file change) → maps written.
    pub programming_seconds: Histogram,
    pub map_write_errors: Counter,
    pub api_errors: Counter,
    /// Objects set aside (kept at their last good version or left out) or whole files rejected.
    pub rejected: Counter,
    pub announcements: Gauge,
    pub ipam_leader: Gauge,
    pub health: Arc<Health>,
}

pub struct Health {
    /// First sync applied and the datapath attached.
    pub ready: AtomicBool,
    /// How long a seen change may wait to be programmed before `/healthz` fails.
    pub bound: Duration,
    /// When the oldest change not yet programmed was seen.
    queued: Mutex<Option<Instant>>,
}

impl Default for Health {
    fn default() -> Self {
        Health::with_bound(HEALTH_BOUND)
    }
}

impl Health {
    pub fn with_bound(bound: Duration) -> Self {
        Health {
            ready: AtomicBool::new(false),
            bound,
            queued: Mutex::default(),
        }
    }

    /// A change was seen (keeps the oldest).
    pub fn queue(&self) {
        self.queued
            .lock()
            .expect("health lock")
            .get_or_insert_with(Instant::now);
    }

    /// The changes seen so far are programmed; returns since when the oldest waited.
    pub fn programmed(&self) -> Option<Instant> {
        self.queued.lock().expect("health lock").take()
    }

    /// How long the oldest queued change has waited.
    pub fn waiting(&self) -> Option<Duration> {
        self.queued
            .lock()
            .expect("health lock")
            .map(|t| t.elapsed())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            programming_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            map_write_errors: Counter::default(),
            api_errors: Counter::default(),
            rejected: Counter::default(),
            announcements: Gauge::default(),
            ipam_leader: Gauge::default(),
            health: Arc::new(Health::default()),
        }
    }
}

impl Metrics {
    fn registry(&self, bpffs: PathBuf) -> Registry {
        let mut r = Registry::with_prefix("lb");
        r.register(
            "reconcile_duration_seconds",
            "Time to bring the maps in line with one desired state",
            self.reconcile_seconds.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "From a change seen (watch event, file change) to the maps written, as kube-proxy's network_programming_duration_seconds",
            self.programming_seconds.clone(),
        );
        r.register(
            "map_write_errors",
            "Desired states the maps could not take (the last good state stays)",
            self.map_write_errors.clone(),
        );
        r.register(
            "api_errors",
            "Errors talking to the Kubernetes API server (watches, status, Leases)",
            self.api_errors.clone(),
        );
        r.register(
            "objects_rejected",
            "Objects set aside or config files rejected for errors",
            self.rejected.clone(),
        );
        r.register(
            "announcements_owned",
            "Addresses this node answers ARP for",
            self.announcements.clone(),
        );
        r.register(
            "ipam_leader",
            "1 while this agent holds the IPAM Lease and writes status",
            self.ipam_leader.clone(),
        );
        r.register_collector(Box::new(Datapath { bpffs }));
        r
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` from a thread until the process
    /// ends.
    pub fn serve(&self, addr: SocketAddr, bpffs: PathBuf) -> Result<SocketAddr> {
        let listener = TcpListener::bind(addr).with_context(|| format!("--metrics-addr {addr}"))?;
        let bound = listener.local_addr()?;
        let registry = self.registry(bpffs);
        let health = self.health.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    if let Err(e) = answer(conn, &registry, &health) {
                        warn!("metrics: {e:#}");
                    }
                }
            })?;
        Ok(bound)
    }
}

fn answer(conn: TcpStream, registry: &Registry, health: &Health) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Headers are read and ignored.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, content_type, body) = match path.split('?').next().unwrap_or(path) {
        "/metrics" => {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry)?;
            (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/healthz" => match health.waiting() {
            Some(w) if w > health.bound => (
                503,
                "text/plain",
                format!(
                    "a change has waited {w:?} to be programmed (bound {:?})\n",
                    health.bound
                ),
            ),
            _ => (200, "text/plain", "ok\n".to_string()),
        },
        "/readyz" if health.ready.load(Ordering::Relaxed) => (200, "text/plain", "ok\n".into()),
        "/readyz" => (
            503,
            "text/plain",
            "not ready: initial sync not applied or datapath not attached\n".into(),
        ),
        _ => (404, "text/plain", "not found\n".into()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if code == 200 {
            "OK"
        } else if code == 404 {
            "Not Found"
        } else {
            "Service Unavailable"
        },
        body.len()
    )?;
    Ok(())
}

/// The datapath's counters, read from the pinned maps at each scrape.
#[derive(Debug)]
struct Datapath {
    bpffs: PathBuf,
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = match PinnedMaps::open(&self.bpffs, false) {
            Ok(m) => m,
            Err(e) => {
                warn!("metrics: {e:#}");
                return Ok(());
            }
        };
        let stats = match inspect::stats(&maps) {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics: {e:#}");
                return Ok(());
            }
        };
        let traffic = |encoder: &mut DescriptorEncoder,
                       name: &str,
                       help: &str,
                       label: &str,
                       rows: &[inspect::Traffic],
                       value: fn(&inspect::Traffic) -> u64|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for row in rows {
                let mut labels = vec![(label.to_string(), row.name.clone())];
                if !row.service.is_empty() {
                    labels.push(("service".into(), row.service.clone()));
                }
                ConstCounter::new(value(row)).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        traffic(
            &mut encoder,
            "frontend_packets",
            "Packets to each frontend (all hooks)",
            "frontend",
            &stats.frontends,
            |t| t.packets,
        )?;
        traffic(
            &mut encoder,
            "frontend_bytes",
            "Bytes to each frontend",
            "frontend",
            &stats.frontends,
            |t| t.bytes,
        )?;
        traffic(
            &mut encoder,
            "backend_packets",
            "Packets sent to each backend",
            "backend",
            &stats.backends,
            |t| t.packets,
        )?;
        traffic(
            &mut encoder,
            "backend_bytes",
            "Bytes sent to each backend",
            "backend",
            &stats.backends,
            |t| t.bytes,
        )?;
        let gauges = [
            (
                "conntrack_entries",
                "Conntrack entries in use (two per flow)",
                stats.conntrack_entries as i64,
            ),
            (
                "conntrack_capacity",
                "Conntrack entries the map holds",
                i64::from(stats.conntrack_capacity),
            ),
            (
                "socket_revnat_entries",
                "Sockets with a reverse translation",
                stats.sock_revnat_entries as i64,
            ),
            (
                "nat_entries",
                "Flows SNATed now (LB_NAT entries)",
                stats.nat_entries as i64,
            ),
            (
                "nat_capacity",
                "Flows the NAT table can hold",
                i64::from(stats.nat_capacity),
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "conntrack_inserted",
                "Conntrack entries created",
                stats.ct.inserted,
            ),
            (
                "conntrack_expired",
                "Conntrack entries that expired",
                stats.ct.expired,
            ),
            (
                "conntrack_evicted",
                "Conntrack entries the LRU evicted while live (the table is too small)",
                stats.conntrack_evicted,
            ),
            (
                "conntrack_clash_ports",
                "New flows moved to another source port to avoid a clash",
                stats.ct.clash_ports,
            ),
            (
                "nat_allocated",
                "SNAT ports handed to new flows",
                stats.ct.nat_allocated,
            ),
            (
                "nat_refused_no_port",
                "New flows refused: no free SNAT port among those tried",
                stats.ct.nat_exhausted,
            ),
            (
                "nat_refused_table_full",
                "New flows refused: the NAT table was full",
                stats.ct.nat_full,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut arp = encoder.encode_descriptor(
            "arp_replies",
            "ARP replies sent per announced address",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for item in maps.arp.iter().flatten() {
            let (k, e) = item;
            let labels = vec![
                ("address".to_string(), inspect::addr(k.addr).to_string()),
                ("mac".to_string(), l2::mac_string(e.mac)),
            ];
            ConstCounter::new(e.replies).encode(arp.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
