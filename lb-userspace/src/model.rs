//! The validated desired state: what the datapath should do, whatever source it came from.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, frontend_type};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn flags(self) -> u16 {
        match self {
            FrontendKind::ClusterIp => frontend_type::CLUSTER_IP,
            FrontendKind::NodePort => frontend_type::NODE_PORT,
            FrontendKind::LoadBalancer => frontend_type::LOAD_BALANCER,
            FrontendKind::ExternalIp => frontend_type::EXTERNAL_IP,
        }
    }
}

/// A service address: `addr:port/proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendSpec {
    pub endpoint: Endpoint,
    pub kind: FrontendKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendCondition {
    /// Ready: takes new flows.
    Active,
    /// Serving but terminating: keeps its open flows, gets no new ones.
    Terminating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub endpoint: Endpoint,
    pub condition: BackendCondition,
    pub weight: u32,
}

/// One Kubernetes Service port: the unit that has one backend set and one Maglev table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// "namespace/name:port" where port is the port's name, or its number when unnamed.
    pub name: String,
    pub frontends: Vec<FrontendSpec>,
    /// Sorted by endpoint, no duplicates.
    pub backends: Vec<BackendSpec>,
    /// sessionAffinity: ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (address, prefix length), enforced on LoadBalancer frontends.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<String, ServicePort>,
    /// LoadBalancer Services: their addresses, or why they have none.
    pub lb_status: Vec<crate::lbipam::LbStatus>,
    pub pool_usage: Vec<crate::lbipam::PoolUsage>,
    /// Addresses to answer ARP for, by address.
    pub announcements: BTreeMap<Ipv4Addr, Announcement>,
    /// healthCheckNodePort of each externalTrafficPolicy: Local LoadBalancer Service.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// externalTrafficPolicy: Local Services ("namespace/name") → the nodes with a ready
    /// endpoint (only those may announce their addresses).
    pub local_nodes: BTreeMap<String, BTreeSet<String>>,
    /// The valid L2 announcement policies by name: where a node may announce.
    pub l2_policies: BTreeMap<String, L2Scope>,
}

/// Where an L2 announcement policy lets a node announce.
#[derive(Clone, Debug, PartialEq)]
pub struct L2Scope {
    /// Whole-name regular expressions; empty: every interface.
    pub interfaces: Vec<String>,
    pub node_selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

impl Eq for L2Scope {}

/// What a healthCheckNodePort answers: 200 while this node has a ready endpoint of the Service,
/// 503 otherwise (so an external load balancer sends only to nodes that can serve).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// "namespace/name".
    pub service: String,
    /// Ready endpoints (addresses) of the Service on this node.
    pub local_endpoints: u32,
}

/// An address the ARP responder answers for, on the interfaces matching `interfaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// "namespace/name" of the Service it belongs to.
    pub service: String,
    /// Names of the L2 announcement policies that select it.
    pub policies: Vec<String>,
    /// Whole-name regular expressions (already validated); `.*` for a policy without a list.
    pub interfaces: Vec<String>,
}

impl Announcement {
    /// Does this announcement cover interface `name`?
    pub fn on(&self, name: &str) -> bool {
        self.interfaces
            .iter()
            .any(|p| regex::Regex::new(&format!("^(?:{p})$")).is_ok_and(|r| r.is_match(name)))
    }
}

impl DesiredState {
    pub fn frontend_count(&self) -> usize {
        self.services.values().map(|s| s.frontends.len()).sum()
    }

    pub fn backend_count(&self) -> usize {
        let mut all: Vec<Endpoint> = self
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.endpoint))
            .collect();
        all.sort();
        all.dedup();
        all.len()
    }
}

/// "ns/name:port" → "ns/name".
pub fn service_of(service_port: &str) -> &str {
    service_port
        .rsplit_once(':')
        .map_or(service_port, |(svc, _)| svc)
}
