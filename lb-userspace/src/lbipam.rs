//! LoadBalancer IP pools and L2 announcement policies, in the shape of Cilium's
//! `CiliumLoadBalancerIPPool` / `CiliumL2AnnouncementPolicy` (those kinds are accepted as they
//! are, so users keep their manifests) and our own `lb.xdp.rs/v1alpha1` `LoadBalancerIPPool` /
//! `L2AnnouncementPolicy`.
//!
//! Allocation is a pure function of the objects plus the previous allocation (hints): requested
//! addresses first (on a clash, the Service that already holds the address keeps it), then services keep the address they had, then the rest get the lowest free
//! address of the first matching pool, each group in name order. Same inputs, same addresses,
//! and adding a Service never moves another one's address.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const ANNOTATION_IPS: &str = "lb.xdp.rs/ips";
/// `spec.loadBalancerClass` of the Services we allocate for (also those without a class).
pub const LB_CLASS: &str = "lb.xdp.rs/lb";
pub const CILIUM_ANNOTATION_IPS: &str = "io.cilium/lb-ipam-ips";
/// Labels Cilium adds to every Service for selectors; we match them too.
pub const LABEL_SERVICE_NAMESPACE: &str = "io.kubernetes.service.namespace";
pub const LABEL_SERVICE_NAME: &str = "io.kubernetes.service.name";

#[derive(Debug, Clone, Deserialize)]
pub struct IpPool {
    pub metadata: ObjectMeta,
    pub spec: IpPoolSpec,
}

/// The spec of a pool; also the served `lb.xdp.rs/v1alpha1` `LoadBalancerIPPool` (see
/// [`crate::crd`]).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, CustomResource)]
#[kube(
    group = "lb.xdp.rs",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    shortname = "lbpool",
    status = "IpPoolStatus",
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Used","type":"integer","jsonPath":".status.used"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    doc = "Addresses lb-agent hands out to LoadBalancer Services (as Cilium's CiliumLoadBalancerIPPool)"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    pub blocks: Vec<PoolBlock>,
    #[serde(default)]
    pub service_selector: Option<LabelSelector>,
    #[serde(default)]
    pub disabled: bool,
    /// Cilium's "Yes"/"No": whether a CIDR's network and broadcast addresses may be handed out.
    #[serde(default, rename = "allowFirstLastIPs")]
    pub allow_first_last_ips: Option<String>,
}

/// A pool's counts, written by the agent that holds the IPAM Lease.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct IpPoolStatus {
    /// Addresses in the pool's blocks (int64, as Kubernetes schemas have no unsigned types).
    pub total: i64,
    /// Addresses allocated to Services.
    pub used: i64,
    pub available: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolBlock {
    pub cidr: Option<String>,
    pub start: Option<String>,
    pub stop: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct L2Policy {
    pub metadata: ObjectMeta,
    pub spec: L2PolicySpec,
}

/// The spec of an L2 announcement policy; also the served `lb.xdp.rs/v1alpha1`
/// `L2AnnouncementPolicy` (see [`crate::crd`]).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, CustomResource)]
#[kube(
    group = "lb.xdp.rs",
    version = "v1alpha1",
    kind = "L2AnnouncementPolicy",
    shortname = "l2policy",
    doc = "Which LoadBalancer and external IPs are answered for by ARP, on which interfaces (as Cilium's CiliumL2AnnouncementPolicy)"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L2PolicySpec {
    /// Regular expressions; an interface must match one (whole name). None: every interface.
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
    #[serde(default)]
    pub service_selector: Option<LabelSelector>,
    /// Nodes that announce (labels of this node's Node object, with `--kubernetes`; a file has
    /// no Node, so there every node announces).
    #[serde(default)]
    pub node_selector: Option<LabelSelector>,
    #[serde(default, rename = "loadBalancerIPs")]
    pub load_balancer_ips: bool,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: bool,
}

/// Is a Service with this `spec.loadBalancerClass` ours to allocate for?
pub fn our_class(class: Option<&str>) -> bool {
    class.is_none_or(|c| c == LB_CLASS)
}

/// Does `selector` select an object with `labels`? None selects everything.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Checks a selector's operators, so a typo is an error rather than a selector matching nothing.
pub fn check_selector(selector: Option<&LabelSelector>) -> Result<(), String> {
    for (i, e) in selector
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        match e.operator.as_str() {
            "In" | "NotIn" if e.values.as_ref().is_none_or(|v| v.is_empty()) => {
                return Err(format!(
                    "matchExpressions[{i}]: operator {} needs values",
                    e.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "matchExpressions[{i}].operator: {other:?} (In, NotIn, Exists, DoesNotExist)"
                ));
            }
        }
    }
    Ok(())
}

/// An inclusive address range of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub first: u32,
    pub last: u32,
}

impl Range {
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(a))
    }

    pub fn overlaps(&self, o: &Range) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{}",
            Ipv4Addr::from(self.first),
            Ipv4Addr::from(self.last)
        )
    }
}

/// A pool after validation.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<Range>,
    pub selector: Option<LabelSelector>,
}

impl Pool {
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(Range::len).sum()
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        self.ranges.iter().any(|r| r.contains(a))
    }
}

/// Parses one block: `cidr`, or `start` + `stop`. Ok(None): an IPv6 block, skipped.
pub fn parse_block(b: &PoolBlock, allow_first_last: bool) -> Result<Option<Range>, String> {
    match (&b.cidr, &b.start, &b.stop) {
        (Some(cidr), None, None) => {
            let (addr, len) = cidr
                .split_once('/')
                .ok_or_else(|| format!("cidr {cidr:?}: expected address/prefix"))?;
            if addr.contains(':') {
                return Ok(None);
            }
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| format!("cidr {cidr:?}: {addr:?} is not an IPv4 address"))?;
            let len: u32 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| format!("cidr {cidr:?}: prefix must be 0-32"))?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let first = u32::from(addr) & mask;
            if first != u32::from(addr) {
                return Err(format!(
                    "cidr {cidr:?}: host bits set (did you mean {}/{len}?)",
                    Ipv4Addr::from(first)
                ));
            }
            let mut r = Range {
                first,
                last: first | !mask,
            };
            if len <= 30 && !allow_first_last {
                r.first += 1;
                r.last -= 1;
            }
            Ok(Some(r))
        }
        (None, Some(start), Some(stop)) => {
            if start.contains(':') || stop.contains(':') {
                return Ok(None);
            }
            let s: Ipv4Addr = start
                .parse()
                .map_err(|_| format!("start {start:?} is not an IPv4 address"))?;
            let e: Ipv4Addr = stop
                .parse()
                .map_err(|_| format!("stop {stop:?} is not an IPv4 address"))?;
            if s > e {
                return Err(format!("start {s} is after stop {e}"));
            }
            Ok(Some(Range {
                first: s.into(),
                last: e.into(),
            }))
        }
        (None, Some(_), None) | (None, None, Some(_)) => Err("start and stop go together".into()),
        _ => Err("give either cidr, or start and stop".into()),
    }
}

/// A LoadBalancer Service as the allocator sees it.
#[derive(Debug, Clone)]
pub struct LbRequest {
    /// "namespace/name".
    pub service: String,
    /// Service labels plus the namespace/name labels.
    pub labels: BTreeMap<String, String>,
    /// Addresses asked for by spec.loadBalancerIP or an annotation; empty: any.
    pub requested: Vec<Ipv4Addr>,
}

/// Outcome for one Service: its addresses, or why it has none (reported, never silent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbStatus {
    pub service: String,
    pub addresses: Vec<Ipv4Addr>,
    pub pool: Option<String>,
    pub error: Option<String>,
    /// Why there is no address, as a condition reason: "RequestedNotInPool",
    /// "RequestedAddressTaken", "NoPool" or "PoolExhausted".
    #[serde(default)]
    pub reason: Option<String>,
}

impl LbStatus {
    fn fail(&mut self, reason: &str, message: String) {
        self.error = Some(message);
        self.reason = Some(reason.to_string());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub pool: String,
    pub blocks: Vec<String>,
    pub size: u64,
    pub used: u64,
}

/// Allocates addresses; `hints` are the addresses each Service had before.
pub fn allocate(
    pools: &[Pool],
    requests: &[LbRequest],
    hints: &BTreeMap<String, Vec<Ipv4Addr>>,
) -> (Vec<LbStatus>, Vec<PoolUsage>) {
    let mut used: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut out: BTreeMap<String, LbStatus> = BTreeMap::new();
    let matching = |r: &LbRequest| -> Vec<&Pool> {
        pools
            .iter()
            .filter(|p| selects(p.selector.as_ref(), &r.labels))
            .collect()
    };
    let pool_of = |r: &LbRequest, a: Ipv4Addr| {
        matching(r)
            .into_iter()
            .find(|p| p.contains(a))
            .map(|p| p.name.clone())
    };

    let mut sorted: Vec<&LbRequest> = requests.iter().collect();
    sorted.sort_by(|a, b| a.service.cmp(&b.service));
    let (mut with_request, rest): (Vec<&LbRequest>, Vec<&LbRequest>) =
        sorted.into_iter().partition(|r| !r.requested.is_empty());
    // Two Services asking for one address: the one that already has it keeps it, else name order.
    let holds = |r: &LbRequest| {
        hints
            .get(&r.service)
            .is_some_and(|h| r.requested.iter().any(|a| h.contains(a)))
    };
    with_request.sort_by_key(|r| !holds(r));
    let (with_hint, fresh): (Vec<&LbRequest>, Vec<&LbRequest>) = rest.into_iter().partition(|r| {
        hints
            .get(&r.service)
            .and_then(|h| h.first())
            .is_some_and(|&a| pool_of(r, a).is_some())
    });

    // Addresses Services already hold (and still may hold) are not up for grabs by a request.
    let mut held: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for r in requests {
        for &a in hints.get(&r.service).into_iter().flatten() {
            if (r.requested.is_empty() || r.requested.contains(&a)) && pool_of(r, a).is_some() {
                held.entry(a).or_insert(&r.service);
            }
        }
    }
    for r in with_request {
        let mut status = LbStatus {
            service: r.service.clone(),
            addresses: Vec::new(),
            pool: None,
            error: None,
            reason: None,
        };
        for &a in &r.requested {
            let Some(pool) = pool_of(r, a) else {
                status.fail(
                    "RequestedNotInPool",
                    format!("requested {a} is in no pool that selects this Service"),
                );
                break;
            };
            let holder = held
                .get(&a)
                .filter(|o| **o != r.service)
                .map(|o| o.to_string());
            if let Some(owner) = used.get(&a).cloned().or(holder) {
                status.fail(
                    "RequestedAddressTaken",
                    format!("requested {a} conflicts: already allocated to {owner}"),
                );
                break;
            }
            status.pool = Some(pool);
        }
        if status.error.is_none() {
            for &a in &r.requested {
                used.insert(a, r.service.clone());
            }
            status.addresses = r.requested.clone();
        } else {
            status.pool = None;
        }
        out.insert(r.service.clone(), status);
    }
    let mut pending = Vec::new();
    for r in with_hint {
        let a = hints[&r.service][0];
        if used.contains_key(&a) {
            pending.push(r);
            continue;
        }
        used.insert(a, r.service.clone());
        out.insert(
            r.service.clone(),
            LbStatus {
                service: r.service.clone(),
                addresses: vec![a],
                pool: pool_of(r, a),
                error: None,
                reason: None,
            },
        );
    }
    pending.extend(fresh);
    for r in pending {
        let candidates = matching(r);
        let mut status = LbStatus {
            service: r.service.clone(),
            addresses: Vec::new(),
            pool: None,
            error: None,
            reason: None,
        };
        if candidates.is_empty() {
            status.fail(
                "NoPool",
                "no LoadBalancerIPPool selects this Service".into(),
            );
        } else {
            'pools: for p in &candidates {
                for range in &p.ranges {
                    // Skip over used addresses range by range, not address by address.
                    let mut a = range.first;
                    loop {
                        let ip = Ipv4Addr::from(a);
                        if !used.contains_key(&ip) {
                            used.insert(ip, r.service.clone());
                            status.addresses = vec![ip];
                            status.pool = Some(p.name.clone());
                            break 'pools;
                        }
                        if a == range.last {
                            break;
                        }
                        a += 1;
                    }
                }
            }
            if status.addresses.is_empty() {
                let names: Vec<&str> = candidates.iter().map(|p| p.name.as_str()).collect();
                status.fail(
                    "PoolExhausted",
                    format!("no free address: pool {} exhausted", names.join(", ")),
                );
            }
        }
        out.insert(r.service.clone(), status);
    }
    let usage = pools
        .iter()
        .map(|p| PoolUsage {
            pool: p.name.clone(),
            blocks: p.ranges.iter().map(Range::to_string).collect(),
            size: p.size(),
            used: used.keys().filter(|a| p.contains(**a)).count() as u64,
        })
        .collect();
    (out.into_values().collect(), usage)
}

/// Checks that no two ranges overlap, within a pool or across pools.
pub fn check_overlaps(pools: &[Pool]) -> Vec<(String, String)> {
    let mut all: Vec<(Range, &str)> = pools
        .iter()
        .flat_map(|p| p.ranges.iter().map(move |r| (*r, p.name.as_str())))
        .collect();
    all.sort();
    let mut problems = BTreeSet::new();
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            if all[j].0.first > all[i].0.last {
                break;
            }
            let ((ri, pi), (rj, pj)) = (all[i], all[j]);
            problems.insert((pi.to_string(), format!("{ri} overlaps {rj} of pool {pj}")));
            problems.insert((pj.to_string(), format!("{rj} overlaps {ri} of pool {pi}")));
        }
    }
    problems.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, first: &str, last: &str) -> Pool {
        Pool {
            name: name.into(),
            ranges: vec![Range {
                first: first.parse::<Ipv4Addr>().unwrap().into(),
                last: last.parse::<Ipv4Addr>().unwrap().into(),
            }],
            selector: None,
        }
    }

    fn req(service: &str, requested: &[&str]) -> LbRequest {
        LbRequest {
            service: service.into(),
            labels: BTreeMap::new(),
            requested: requested.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn lowest_free_requested_conflict_and_exhaustion() {
        let pools = vec![pool("home", "192.168.30.60", "192.168.30.62")];
        let requests = vec![
            req("a/x", &[]),
            req("a/y", &["192.168.30.60"]),
            req("a/z", &["192.168.30.60"]),
            req("b/w", &[]),
            req("c/v", &[]),
        ];
        let (status, usage) = allocate(&pools, &requests, &BTreeMap::new());
        let by: BTreeMap<&str, &LbStatus> =
            status.iter().map(|s| (s.service.as_str(), s)).collect();
        assert_eq!(
            by["a/y"].addresses,
            vec!["192.168.30.60".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(
            by["a/z"]
                .error
                .as_ref()
                .unwrap()
                .contains("conflicts: already allocated to a/y"),
            "{:?}",
            by["a/z"]
        );
        assert_eq!(
            by["a/x"].addresses,
            vec!["192.168.30.61".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            by["b/w"].addresses,
            vec!["192.168.30.62".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(
            by["c/v"].error.as_ref().unwrap().contains("exhausted"),
            "{:?}",
            by["c/v"]
        );
        assert_eq!(usage[0].used, 3);
        assert_eq!(usage[0].size, 3);
    }

    #[test]
    fn a_new_service_never_moves_an_existing_address() {
        let pools = vec![pool("home", "192.168.30.60", "192.168.30.80")];
        let (first, _) = allocate(&pools, &[req("m/b", &[])], &BTreeMap::new());
        let hints: BTreeMap<String, Vec<Ipv4Addr>> = first
            .iter()
            .map(|s| (s.service.clone(), s.addresses.clone()))
            .collect();
        // "m/a" sorts first and would take .60 without hints.
        let (second, _) = allocate(&pools, &[req("m/a", &[]), req("m/b", &[])], &hints);
        let by: BTreeMap<&str, &LbStatus> =
            second.iter().map(|s| (s.service.as_str(), s)).collect();
        assert_eq!(by["m/b"].addresses, first[0].addresses);
        assert_eq!(
            by["m/a"].addresses,
            vec!["192.168.30.61".parse::<Ipv4Addr>().unwrap()]
        );
        // Same inputs, same result.
        assert_eq!(
            allocate(&pools, &[req("m/a", &[]), req("m/b", &[])], &hints).0,
            second
        );
        // A Service that asks for an address someone holds gets a conflict, not the address.
        let (third, _) = allocate(
            &pools,
            &[req("m/b", &[]), req("m/c", &["192.168.30.60"])],
            &hints,
        );
        let by: BTreeMap<&str, &LbStatus> = third.iter().map(|s| (s.service.as_str(), s)).collect();
        assert_eq!(by["m/b"].addresses, first[0].addresses);
        assert!(
            by["m/c"]
                .error
                .as_ref()
                .unwrap()
                .contains("already allocated to m/b"),
            "{:?}",
            by["m/c"]
        );
    }

    #[test]
    fn blocks_and_overlaps() {
        let b = |cidr: &str| PoolBlock {
            cidr: Some(cidr.into()),
            start: None,
            stop: None,
        };
        assert_eq!(
            parse_block(&b("10.0.0.0/30"), false)
                .unwrap()
                .unwrap()
                .to_string(),
            "10.0.0.1-10.0.0.2"
        );
        assert_eq!(
            parse_block(&b("10.0.0.0/30"), true)
                .unwrap()
                .unwrap()
                .to_string(),
            "10.0.0.0-10.0.0.3"
        );
        assert_eq!(
            parse_block(&b("10.0.0.7/32"), false)
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        assert!(
            parse_block(&b("10.0.0.1/24"), false)
                .unwrap_err()
                .contains("host bits")
        );
        assert!(parse_block(&b("fd00::/64"), false).unwrap().is_none());
        let range = PoolBlock {
            cidr: None,
            start: Some("10.0.0.9".into()),
            stop: Some("10.0.0.1".into()),
        };
        assert!(
            parse_block(&range, false)
                .unwrap_err()
                .contains("after stop")
        );
        let overlaps = check_overlaps(&[
            pool("a", "10.0.0.1", "10.0.0.10"),
            pool("b", "10.0.0.10", "10.0.0.20"),
            pool("c", "10.0.1.0", "10.0.1.5"),
        ]);
        assert_eq!(overlaps.len(), 2, "{overlaps:?}");
        assert!(overlaps.iter().all(|(p, _)| p == "a" || p == "b"));
    }
}
