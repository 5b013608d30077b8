//! Benchmark: the agent's own memory. The real lb-agent runs in a node namespace on a file of
//! S Services × 10 endpoints, every run with the same map capacities (sized for 10k), and its
//! /proc/PID/smaps is read once it is ready and idle:
//! - heap: anonymous private memory that is not a map (malloc arenas, [heap], thread stacks);
//! - map pages: the Maglev array, mmapped from the kernel (shared with the datapath, counted in
//!   RSS but not allocated by the agent);
//! - file-backed: the binary and libraries;
//!
//! and beside them the kernel memory of every pinned map (memlock), which is not in RSS.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use lb_tests::Topology;

use crate::{
    control,
    memory::memlock,
    report::{Plot, Table, Target, median, num, spread},
};

pub struct Settings {
    pub service_counts: Vec<u32>,
    pub endpoints: u32,
    pub runs: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                service_counts: vec![2, 1000],
                endpoints: 10,
                runs: 1,
            }
        } else {
            Self {
                service_counts: vec![2, 1000, 10_000],
                endpoints: 10,
                runs: 3,
            }
        }
    }
}

/// The agent's resident memory by kind, in bytes.
#[derive(Default, Clone, Copy)]
struct Resident {
    total: u64,
    heap: u64,
    map_pages: u64,
    file: u64,
}

/// Reads /proc/`pid`/smaps: every mapping's Rss goes to one kind (see the module doc).
fn resident(pid: u32) -> Result<Resident> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut r = Resident::default();
    let mut kind = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            let path = fields.nth(4).unwrap_or("");
            kind = if path.contains("bpf") {
                1
            } else if path.starts_with('/') {
                2
            } else {
                0
            };
        } else if first == "Rss:" {
            let kib: u64 = fields.next().unwrap_or("0").parse().unwrap_or(0);
            let bytes = kib * 1024;
            r.total += bytes;
            match kind {
                1 => r.map_pages += bytes,
                2 => r.file += bytes,
                _ => r.heap += bytes,
            }
        }
    }
    Ok(r)
}

/// Kernel memory of every map pinned in `bpffs`.
fn map_memlock(bpffs: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(bpffs)? {
        let path = entry?.path();
        // Pinned programs and links sit beside the maps.
        if let Ok(bytes) = memlock(&path) {
            total += bytes;
        }
    }
    Ok(total)
}

/// One run: the agent on `services` Services, ready and idle; its memory.
fn measure(services: u32, per: u32) -> Result<(Resident, u64, f64)> {
    let mut topo = Topology::new(1)?;
    topo.write_config(&control::yaml(services, per, None))?;
    // Capacities of the largest state in every run, so only the configuration differs.
    let (max_services, max_backends) = ("10064".to_string(), (10_064 * per).to_string());
    let start = std::time::Instant::now();
    topo.spawn_agent(&[
        "--max-services",
        &max_services,
        "--max-frontends",
        &max_services,
        "--max-backends",
        &max_backends,
        "--reload-interval-ms",
        "1000",
    ])?;
    topo.wait_agent_log("lb-agent ready", Duration::from_secs(300))?;
    let ready_ms = start.elapsed().as_secs_f64() * 1e3;
    // Idle: what it holds between changes, not the peak of the apply.
    std::thread::sleep(Duration::from_secs(2));
    let pid = topo.agent_pid().context("agent pid")?;
    let r = resident(pid)?;
    let kernel = map_memlock(&topo.bpffs())?;
    topo.stop_agent()?;
    Ok((r, kernel, ready_ms))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

pub fn run(s: &Settings, out: &Path) -> Result<(Table, Vec<Target>)> {
    let mut table = Table::new(
        "agent_memory",
        format!(
            "lb-agent memory, ready and idle, file source, S Services × {} endpoints, map capacities for 10k (MiB, median of {} runs, min–max of the heap)",
            s.endpoints, s.runs
        ),
        &[
            "Services",
            "RSS",
            "heap (anonymous)",
            "heap min–max",
            "map pages (mmapped Maglev array)",
            "binary and libraries",
            "kernel map memory (memlock, not in RSS)",
            "ready after ms",
        ],
    );
    let mut points = Vec::new();
    let mut heap_at_largest = 0.0;
    for &n in &s.service_counts {
        let mut runs = Vec::new();
        for run in 0..s.runs {
            eprintln!("agent memory: {n} Services, run {} …", run + 1);
            runs.push(measure(n, s.endpoints)?);
        }
        let col = |f: &dyn Fn(&(Resident, u64, f64)) -> f64| -> f64 {
            median(&runs.iter().map(f).collect::<Vec<_>>())
        };
        let heaps: Vec<f64> = runs.iter().map(|r| mib(r.0.heap)).collect();
        let heap = median(&heaps);
        table.row(vec![
            n.to_string(),
            num(col(&|r| mib(r.0.total))),
            num(heap),
            spread(&heaps),
            num(col(&|r| mib(r.0.map_pages))),
            num(col(&|r| mib(r.0.file))),
            num(col(&|r| mib(r.1))),
            num(col(&|r| r.2)),
        ]);
        points.push((n as f64, heap));
        heap_at_largest = heap;
    }
    Plot {
        title: "lb-agent heap, ready and idle (file source)",
        x_label: "Services (10 endpoints each)",
        y_label: "MiB",
        log_x: true,
        log_y: false,
        series: vec![("heap (anonymous resident)".to_string(), points)],
    }
    .write(&out.join("agent_memory.png"))?;
    let largest = *s.service_counts.last().context("no service counts")?;
    let targets = vec![Target::at_most(
        &format!(
            "agent heap MiB at {largest} Services × {} endpoints (vs 50 MiB)",
            s.endpoints
        ),
        heap_at_largest,
        50.0,
        1.0,
        "<= 50 MB",
    )];
    Ok((table, targets))
}
