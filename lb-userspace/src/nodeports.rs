//! NodePorts for Service ports that need one (type NodePort or LoadBalancer) but name none, as
//! in a user's own manifests where an API server would allocate them. Deterministic and stable:
//! each port starts at a hash of its identity ("namespace/name", port name or number, protocol)
//! in `--node-port-range` and probes upward past what is taken, explicit nodePorts first, then
//! earlier allocations in Service-name order; adding a Service moves no other port unless the
//! two hash to the same place.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher, Hash},
};

use crate::model::Protocol;

/// `--node-port-range`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for NodePortRange {
    /// Kubernetes' default service-node-port-range.
    fn default() -> Self {
        Self {
            first: 30_000,
            last: 32_767,
        }
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (first, last) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 30000-32767"))?;
        let port = |v: &str| {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: {v:?} is not a port (1-65535)"))
        };
        let (first, last) = (port(first)?, port(last)?);
        if first > last {
            return Err(format!("{s:?}: {first} is above {last}"));
        }
        Ok(Self { first, last })
    }
}

/// One Service port as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    /// "namespace/name".
    pub service: String,
    /// The port's name, or its number when unnamed.
    pub port: String,
    pub proto: Protocol,
}

/// Allocates a port in `range` for every id in `wanted`, avoiding `taken` (explicit nodePorts,
/// with their protocol). Ids that find no free port are left out (the range is full).
pub fn allocate(
    wanted: &[PortId],
    taken: &HashSet<(u16, Protocol)>,
    range: NodePortRange,
) -> BTreeMap<PortId, u16> {
    let mut taken = taken.clone();
    let mut wanted = wanted.to_vec();
    wanted.sort();
    let size = (range.last - range.first) as u32 + 1;
    // Fixed seed: every node, and every run, computes the same ports.
    let hasher = foldhash::quality::FixedState::with_seed(0x6e6f_6465_706f_7274);
    let mut out = BTreeMap::new();
    for id in wanted {
        let start = (hasher.hash_one(&id) % size as u64) as u32;
        let free = (0..size)
            .map(|i| range.first + ((start + i) % size) as u16)
            .find(|p| !taken.contains(&(*p, id.proto)));
        if let Some(port) = free {
            taken.insert((port, id.proto));
            out.insert(id, port);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str, port: &str) -> PortId {
        PortId {
            service: service.into(),
            port: port.into(),
            proto: Protocol::Tcp,
        }
    }

    #[test]
    fn allocations_are_deterministic_stable_and_avoid_explicit_ports() {
        let range = NodePortRange::default();
        let a = allocate(&[id("default/web", "http")], &HashSet::new(), range);
        let again = allocate(&[id("default/web", "http")], &HashSet::new(), range);
        assert_eq!(a, again);
        let port = a[&id("default/web", "http")];
        assert!((30_000..=32_767).contains(&port));
        // Another Service does not move it.
        let both = allocate(
            &[id("default/api", "http"), id("default/web", "http")],
            &HashSet::new(),
            range,
        );
        assert_eq!(both[&id("default/web", "http")], port);
        // An explicit nodePort on that number pushes it to the next free one.
        let taken = HashSet::from([(port, Protocol::Tcp)]);
        let moved = allocate(&[id("default/web", "http")], &taken, range);
        assert_ne!(moved[&id("default/web", "http")], port);
        // Every port of a full range is used once, then nothing is left.
        let tiny = NodePortRange {
            first: 30_000,
            last: 30_002,
        };
        let ids: Vec<PortId> = (0..4).map(|i| id("default/s", &i.to_string())).collect();
        let got = allocate(&ids, &HashSet::new(), tiny);
        assert_eq!(got.len(), 3);
        let ports: HashSet<u16> = got.values().copied().collect();
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn ranges_parse_with_clear_errors() {
        assert_eq!(
            "30000-32767".parse::<NodePortRange>().unwrap(),
            NodePortRange::default()
        );
        assert!(
            "32767-30000"
                .parse::<NodePortRange>()
                .unwrap_err()
                .contains("above")
        );
        assert!(
            "30000"
                .parse::<NodePortRange>()
                .unwrap_err()
                .contains("FIRST-LAST")
        );
        assert!(
            "0-5"
                .parse::<NodePortRange>()
                .unwrap_err()
                .contains("not a port")
        );
    }
}
