//! Benchmark 6: kernel memory of the datapath's maps (memlock from /proc/self/fdinfo) for 10k
//! services × 10 backends, and how it grows with the Maglev table size M. Also times
//! programming that state (Maglev builds + map writes) at each M.

use std::{
    os::fd::{AsFd, AsRawFd},
    time::Instant,
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use lb_common::map_names;
use lb_tests::lab::XdpLab;
use lb_userspace::datapath::Options;

use crate::{
    report::{Plot, Table, Target},
    services::lab_options,
    services::state,
};

pub struct Settings {
    pub services: u32,
    pub backends_per_service: u32,
    /// Fixed table sizes, and 0: the agent's default automatic sizes (1024 for 10 backends).
    pub sizes: Vec<u32>,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: 1000,
                backends_per_service: 10,
                sizes: vec![251, 1021, 0],
            }
        } else {
            Self {
                services: 10_000,
                backends_per_service: 10,
                sizes: vec![251, 1021, 4093, 16381, 0],
            }
        }
    }
}

pub fn options(services: u32, backends: u32, m: u32) -> Options {
    lab_options(m, services, services, backends + 1)
}

/// memlock bytes of the map pinned at `path`, as the kernel accounts it.
pub fn memlock(path: &std::path::Path) -> Result<u64> {
    let map = MapData::from_pin(path).with_context(|| format!("{}", path.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:").map(|v| v.trim().parse::<u64>()))
        .context("no memlock in fdinfo")?
        .context("memlock value")
}

/// The maps that scale with the configuration (the generator's two are left out).
const MAPS: [&str; 11] = [
    map_names::FRONTENDS,
    map_names::BACKENDS,
    map_names::MAGLEV,
    map_names::CONNTRACK,
    map_names::FRONTEND_STATS,
    map_names::BACKEND_STATS,
    map_names::SERVICE_NAMES,
    map_names::ARP,
    map_names::AFFINITY,
    map_names::SOURCE_RANGES,
    map_names::NEXTHOPS,
];

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let mut headers = vec![
        "M".to_string(),
        "program ms".to_string(),
        "total MiB".to_string(),
    ];
    headers.extend(MAPS.iter().map(|m| format!("{m} MiB")));
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(
        "memory",
        format!(
            "Map memory (memlock) for {} services × {} backends, by Maglev table size M",
            s.services, s.backends_per_service
        ),
        &header_refs,
    );
    let desired = state(s.services, s.backends_per_service);
    let mut points = Vec::new();
    let mut auto = None;
    for &m in &s.sizes {
        eprintln!("memory: M = {m} …");
        let mut lab = XdpLab::new(options(s.services, s.services * s.backends_per_service, m))?;
        let start = Instant::now();
        lab.apply_maps_only(&desired)?;
        let program_ms = start.elapsed().as_secs_f64() * 1e3;
        let dir = lab.maps().dir.clone();
        let label = match m {
            0 => "auto (1024 each)".to_string(),
            m => m.to_string(),
        };
        let mut row = vec![label, format!("{program_ms:.0}")];
        let mut total = 0u64;
        let mut cells = Vec::new();
        for name in MAPS {
            let bytes = memlock(&dir.join(name))?;
            total += bytes;
            cells.push(format!("{:.1}", bytes as f64 / 1048576.0));
        }
        row.push(format!("{:.1}", total as f64 / 1048576.0));
        row.extend(cells);
        table.row(row);
        let mib = total as f64 / 1048576.0;
        match m {
            0 => auto = Some(mib),
            m => points.push((m as f64, mib)),
        }
    }
    Plot {
        title: "Datapath map memory vs Maglev table size",
        x_label: "Maglev table size M",
        y_label: "MiB (memlock)",
        log_x: true,
        log_y: true,
        series: vec![
            (
                format!(
                    "{} services × {} backends, fixed M",
                    s.services, s.backends_per_service
                ),
                points,
            ),
            (
                "automatic sizes (1024 slots each)".to_string(),
                auto.map(|mib| vec![(1024.0, mib)]).unwrap_or_default(),
            ),
        ],
    }
    .write(&out.join("memory.png"))?;
    Ok((table, Vec::new()))
}
