//! Reading the pinned maps back as names and counters, for `lbctl` and the agent's metrics.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail};
use lb_common::{
    Backend, Counters, Frontend, FrontendKey, backend_state, ipv4_from_wire, map_names,
    port_from_wire,
};

use crate::{
    maps::{CtCounters, PinnedMaps},
    model::{Endpoint, Protocol},
    reconcile::frontend_key,
};

pub fn addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(ipv4_from_wire(wire))
}

pub fn hostport(a: u32, p: u16) -> String {
    format!("{}:{}", addr(a), port_from_wire(p))
}

pub fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

/// "10.96.0.10:80/TCP".
pub fn frontend_name(key: &FrontendKey) -> String {
    format!("{}/{}", hostport(key.addr, key.port), proto_name(key.proto))
}

/// "IP:PORT[/PROTO]" → the frontend's map key.
pub fn parse_frontend(s: &str) -> Result<FrontendKey> {
    let (hostport, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => bail!("frontend {s:?}: protocol {other:?} is not TCP or UDP"),
    };
    let (ip, port) = hostport
        .rsplit_once(':')
        .with_context(|| format!("frontend {s:?}: expected IP:PORT[/PROTO]"))?;
    let addr: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("frontend {s:?}: {ip:?} is not an IPv4 address"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("frontend {s:?}: {port:?} is not a port"))?;
    Ok(frontend_key(&Endpoint { addr, port, proto }))
}

/// Service id → "namespace/name:port".
pub fn service_names(maps: &PinnedMaps) -> Result<BTreeMap<u32, String>> {
    let mut names = BTreeMap::new();
    for item in maps.service_names.iter() {
        let (id, name) = item?;
        names.insert(id, name.as_str().to_string());
    }
    Ok(names)
}

/// Every frontend, sorted by name.
pub fn frontends(maps: &PinnedMaps) -> Result<Vec<(FrontendKey, Frontend)>> {
    let mut all = Vec::new();
    for item in maps.frontends.iter() {
        all.push(item?);
    }
    all.sort_by_key(|(k, _)| frontend_name(k));
    Ok(all)
}

/// Backend ids in a frontend's Maglev table with their slot counts.
pub fn table_shares(maps: &PinnedMaps, frontend: &Frontend) -> Result<BTreeMap<u32, usize>> {
    let mut shares = BTreeMap::new();
    if frontend.backend_count == 0 {
        return Ok(shares);
    }
    for id in maps.maglev.read(
        frontend.maglev_offset as usize,
        frontend.maglev_size as usize,
    )? {
        if id != 0 {
            *shares.entry(id).or_insert(0) += 1;
        }
    }
    Ok(shares)
}

pub fn backend_name(maps: &PinnedMaps, id: u32) -> Result<String> {
    let b = maps.backends.get(&id, 0)?;
    Ok(hostport(b.addr, b.port))
}

/// Backends in use with their counters.
pub fn backends_in_use(maps: &PinnedMaps) -> Result<Vec<(u32, Backend, Counters)>> {
    let mut out = Vec::new();
    for (id, b) in maps.backends.iter().enumerate() {
        let b = b?;
        if b.state == backend_state::UNUSED {
            continue;
        }
        let id = id as u32;
        out.push((id, b, PinnedMaps::sum(&maps.backend_stats.get(&id, 0)?)));
    }
    Ok(out)
}

/// Packets and bytes of one frontend or backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    /// "10.96.0.10:80/TCP" or "10.0.1.2:8080".
    pub name: String,
    /// "namespace/name:port" (frontends only).
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters `lbctl stats` and the metrics show.
#[derive(Debug, Clone)]
pub struct Stats {
    pub frontends: Vec<Traffic>,
    pub backends: Vec<Traffic>,
    pub conntrack_entries: u64,
    pub conntrack_capacity: u32,
    pub ct: CtCounters,
    /// Entries the LRU evicted: inserted, and neither live, expired nor removed.
    pub conntrack_evicted: u64,
    /// SNATed flows (LB_NAT entries) and the table's size.
    pub nat_entries: u64,
    pub nat_capacity: u32,
    pub sock_revnat_entries: u64,
    pub sock_revnat_capacity: u32,
}

pub fn stats(maps: &PinnedMaps) -> Result<Stats> {
    let names = service_names(maps)?;
    let mut frontends_out = Vec::new();
    for (key, fe) in frontends(maps)? {
        let c = PinnedMaps::sum(&maps.frontend_stats.get(&fe.frontend_id, 0)?);
        frontends_out.push(Traffic {
            name: frontend_name(&key),
            service: names.get(&fe.service_id).cloned().unwrap_or_default(),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    let backends = backends_in_use(maps)?
        .into_iter()
        .map(|(_, b, c)| Traffic {
            name: hostport(b.addr, b.port),
            service: String::new(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let entries = maps.conntrack.keys().count() as u64;
    let nat_entries = maps.nat.keys().count() as u64;
    let ct = maps.ct_counters()?;
    Ok(Stats {
        frontends: frontends_out,
        backends,
        conntrack_entries: entries,
        conntrack_capacity: maps.capacity(map_names::CONNTRACK)?,
        conntrack_evicted: ct
            .inserted
            .saturating_sub(entries + nat_entries + ct.expired + ct.agent_removed),
        nat_entries,
        nat_capacity: maps.capacity(map_names::NAT)?,
        ct,
        sock_revnat_entries: maps.sock_revnat.keys().count() as u64,
        sock_revnat_capacity: maps.capacity(map_names::SOCK_REVNAT)?,
    })
}

/// One pinned map: kind, capacity and (where the entries can be counted) how full it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub kind: String,
    pub capacity: u32,
    /// Entries in use (None for arrays of fixed slots, where every slot exists).
    pub entries: Option<u64>,
    /// The kernel's id of the map.
    pub id: u32,
}

/// Every pinned map of the node with its fill level.
pub fn fill(maps: &PinnedMaps) -> Result<Vec<MapFill>> {
    let count = |name: &str| -> Option<u64> {
        Some(match name {
            map_names::FRONTENDS => maps.frontends.keys().count() as u64,
            map_names::BACKENDS => backends_in_use(maps).ok()?.len() as u64,
            map_names::CONNTRACK => maps.conntrack.keys().count() as u64,
            map_names::NAT => maps.nat.keys().count() as u64,
            map_names::UPLINKS => maps.uplinks.keys().count() as u64,
            map_names::ARP => maps.arp.keys().count() as u64,
            map_names::AFFINITY => maps.affinity.keys().count() as u64,
            map_names::SOURCE_RANGES => maps.source_ranges.keys().count() as u64,
            map_names::SOCK_REVNAT => maps.sock_revnat.keys().count() as u64,
            map_names::SERVICE_NAMES => maps.service_names.keys().count() as u64,
            _ => return None,
        })
    };
    let mut out = Vec::new();
    for name in map_names::ALL {
        let data = crate::maps::open_pinned(&maps.dir.join(name), false)?;
        let info = data.info()?;
        out.push(MapFill {
            name,
            kind: format!("{:?}", info.map_type()?)
                .trim_start_matches("BPF_MAP_TYPE_")
                .to_ascii_lowercase(),
            capacity: info.max_entries(),
            entries: count(name),
            id: info.id(),
        });
    }
    Ok(out)
}

/// Ids of the loaded programs that use this node's pinned maps (lb, lb_tc and the socket
/// hooks), told apart from other agents' (another bpffs) by the ids of the maps in `fill`.
pub fn programs(fill: &[MapFill]) -> Vec<(String, u32)> {
    let ours: std::collections::BTreeSet<u32> = fill.iter().map(|m| m.id).collect();
    let mut out = Vec::new();
    for p in aya::programs::loaded_programs().flatten() {
        if p.map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.iter().any(|id| ours.contains(id)))
        {
            out.push((p.name_as_str().unwrap_or("?").to_string(), p.id()));
        }
    }
    out.sort();
    out
}

/// The Maglev table size every Service gets (`--maglev-table-size`), or 0: sized per Service.
pub fn fixed_table_size(maps: &PinnedMaps) -> Result<u32> {
    let config: aya::maps::Array<_, lb_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(crate::maps::open_pinned(
            &maps.dir.join(lb_common::map_names::CONFIG),
            false,
        )?)?)?;
    Ok(config.get(&0, 0)?.maglev_size)
}

/// Slots of `frontend`'s live Maglev table that would change backend if its Service had
/// `backends` (the table input: active endpoints with their weights), built as the agent builds
/// it (from the live table, so only the slots the change forces move); and the table size.
/// `fixed`: [`fixed_table_size`].
pub fn slots_moved(
    maps: &PinnedMaps,
    fixed: u32,
    frontend: &lb_common::Frontend,
    backends: &[(crate::model::Endpoint, u32)],
) -> Result<(usize, u32)> {
    use lb_common::maglev;
    let old_size = frontend.maglev_size;
    let size = if fixed != 0 {
        fixed
    } else {
        maglev::auto_table_size(Some(old_size), backends.len())
    };
    let names: Vec<String> = backends.iter().map(|(e, _)| e.to_string()).collect();
    let index: std::collections::HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32 + 1))
        .collect();
    let mut name_of = BTreeMap::new();
    let previous: Vec<u32> = maps
        .maglev
        .read(frontend.maglev_offset as usize, old_size as usize)?
        .into_iter()
        .map(|id| {
            let name = name_of.entry(id).or_insert_with(|| {
                maps.backends.get(&id, 0).ok().and_then(|b| {
                    Some(
                        crate::model::Endpoint {
                            addr: Ipv4Addr::from(ipv4_from_wire(b.addr)),
                            port: port_from_wire(b.port),
                            proto: Protocol::from_number(b.proto)?,
                        }
                        .to_string(),
                    )
                })
            });
            name.as_deref()
                .and_then(|n| index.get(n).copied())
                .unwrap_or(0)
        })
        .collect();
    let previous = maglev::resize(&previous, size);
    let input: Vec<maglev::MaglevBackend<'_>> = names
        .iter()
        .zip(backends)
        .map(|(n, (_, weight))| maglev::MaglevBackend {
            name: n.as_bytes(),
            weight: *weight,
        })
        .collect();
    let table =
        maglev::update_table(&input, &previous, size).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((maglev::slots_moved(&previous, &table), size))
}
