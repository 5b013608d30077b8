//! Kubernetes objects from a multi-document YAML file → validated [`DesiredState`].
//!
//! Objects are parsed into the real Kubernetes types (k8s-openapi), so a manifest that works
//! against an API server works here. Every error names the object and the field. Validation is
//! all-or-nothing: one bad object rejects the whole file and the last good state stays in force.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    lbipam::{self, IpPool, L2Policy, LbRequest, Pool},
    model::{
        Announcement, BackendCondition, BackendSpec, DesiredState, Endpoint, FrontendKind,
        FrontendSpec, Protocol, ServicePort,
    },
    nodeports::{self, NodePortRange},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One problem with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// "Service default/web", "EndpointSlice default/web-abc" or "document 3".
    pub object: String,
    /// "spec.ports[0].port"; empty when the problem is the object as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The objects we understand, as parsed.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// LoadBalancer IP pools: (kind as written, object).
    pub pools: Vec<(String, Arc<IpPool>)>,
    pub l2_policies: Vec<(String, Arc<L2Policy>)>,
    /// Kinds we do not handle (Deployments next to the Services, say): reported, not fatal.
    pub ignored: Vec<String>,
}

/// What building the desired state needs besides the objects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildContext {
    /// Addresses NodePort frontends listen on.
    pub node_ips: Vec<Ipv4Addr>,
    /// This node's name, matched against EndpointSlice `nodeName` for externalTrafficPolicy Local.
    pub node_name: Option<String>,
    /// LoadBalancer addresses each Service ("namespace/name") had before: kept when still valid.
    pub lb_hints: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Where NodePorts a manifest leaves out are allocated (`--node-port-range`).
    pub node_port_range: NodePortRange,
}

fn err(
    object: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError {
        object: object.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn object_name(value: &serde_yaml::Value) -> String {
    let meta = &value["metadata"];
    let name = meta["name"].as_str().unwrap_or("<unnamed>");
    let namespace = meta["namespace"].as_str().unwrap_or("default");
    format!("{namespace}/{name}")
}

/// Pools and policies are cluster-scoped: "Kind default/name" → "name".
fn cluster_name(object: &str) -> &str {
    let name = object.split_once(' ').map_or(object, |(_, n)| n);
    name.split_once('/').map_or(name, |(_, n)| n)
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    object: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        err(object, field, e.into_inner().to_string())
    })
}

/// One parsed document, kept by [`ConfigCache`] while its text stays the same.
#[derive(Clone)]
enum Parsed {
    Null,
    Service(Arc<Service>),
    Slice(Arc<EndpointSlice>),
    Pool(String, Arc<IpPool>),
    Policy(String, Arc<L2Policy>),
    /// "Kind ns/name (apiVersion)" of a kind we do not handle.
    Ignored(String),
}

/// Splits a multi-document YAML stream at its `---` lines (document ends `...` dropped), so each
/// document can be parsed, and cached, on its own.
fn split_documents(text: &str) -> Vec<&str> {
    // Marker lines start with "---" or "...": find those line starts with a SIMD substring
    // search instead of walking 200k lines of a big file.
    let bytes = text.as_bytes();
    let mut starts: Vec<usize> = memchr::memmem::find_iter(bytes, b"\n---")
        .chain(memchr::memmem::find_iter(bytes, b"\n..."))
        .map(|i| i + 1)
        .collect();
    if text.starts_with("---") || text.starts_with("...") {
        starts.push(0);
    }
    starts.sort_unstable();
    let mut docs = Vec::new();
    let mut start = 0;
    for offset in starts {
        let end = memchr::memchr(b'\n', &bytes[offset..]).map_or(text.len(), |i| offset + i + 1);
        let trimmed = text[offset..end].trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push(&text[start..offset]);
            // Content after "--- " on the marker line belongs to the next document.
            start = if trimmed.starts_with("--- ") {
                offset + 4
            } else {
                end
            };
        }
    }
    docs.push(&text[start..]);
    docs
}

fn parse_document(text: &str, doc: &str) -> Result<Parsed, ConfigError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| err(doc, "", format!("invalid YAML: {e}")))?;
    if value.is_null() {
        return Ok(Parsed::Null);
    }
    let api_version = value["apiVersion"].as_str().unwrap_or("").to_string();
    let Some(kind) = value["kind"].as_str().map(str::to_string) else {
        return Err(err(doc, "kind", "missing"));
    };
    let object = format!("{kind} {}", object_name(&value));
    Ok(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Parsed::Service(Arc::new(typed(value, &object)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Parsed::Slice(Arc::new(typed(value, &object)?)),
        // lb.xdp.rs/v1alpha1 is the served version; v1, which earlier releases read, still works.
        ("lb.xdp.rs/v1alpha1" | "lb.xdp.rs/v1", "LoadBalancerIPPool")
        | ("cilium.io/v2alpha1" | "cilium.io/v2", "CiliumLoadBalancerIPPool") => {
            let object = format!("{kind} {}", cluster_name(&object));
            Parsed::Pool(kind, Arc::new(typed(value, &object)?))
        }
        ("lb.xdp.rs/v1alpha1" | "lb.xdp.rs/v1", "L2AnnouncementPolicy")
        | ("cilium.io/v2alpha1" | "cilium.io/v2", "CiliumL2AnnouncementPolicy") => {
            let object = format!("{kind} {}", cluster_name(&object));
            Parsed::Policy(kind, Arc::new(typed(value, &object)?))
        }
        (_, "LoadBalancerIPPool" | "L2AnnouncementPolicy") => {
            return Err(err(
                object,
                "apiVersion",
                format!("{api_version:?} not supported (lb.xdp.rs/v1alpha1)"),
            ));
        }
        (_, "Service" | "EndpointSlice") => {
            return Err(err(
                object,
                "apiVersion",
                format!(
                    "{api_version:?} not supported (Service is v1, EndpointSlice is discovery.k8s.io/v1)"
                ),
            ));
        }
        _ => Parsed::Ignored(format!("{object} ({api_version})")),
    })
}

/// Parsed documents by the hash of their text: on a reload only the documents that changed are
/// parsed again (a 10k-Service file reparses one Service, not all of them).
#[derive(Default)]
pub struct ConfigCache {
    docs: HashMap<u64, Parsed, foldhash::fast::FixedState>,
    /// Objects, context and desired state of the last successful build: a reload that only
    /// changed EndpointSlices rebuilds just their Services on top of it.
    last: Option<(Arc<Objects>, BuildContext, Arc<DesiredState>)>,
    /// Reloads that took that shortcut.
    pub incremental_builds: u64,
}

impl ConfigCache {
    /// Parses every YAML document of `text`; documents not seen before are parsed on all cores.
    pub fn parse(&mut self, text: &str) -> Result<Objects, ConfigErrors> {
        use std::hash::BuildHasher;
        // foldhash: several times faster than SipHash over a 6 MB file, and the key is ours.
        let hasher = foldhash::quality::FixedState::with_seed(0x6c62_2d63_6163_6865);
        let docs: Vec<(u64, &str)> = split_documents(text)
            .into_iter()
            .map(|t| (hasher.hash_one(t), t))
            .collect();
        let fresh: Vec<usize> = (0..docs.len())
            .filter(|&i| !self.docs.contains_key(&docs[i].0))
            .collect();
        let parse = |i: &usize| {
            (
                *i,
                parse_document(docs[*i].1, &format!("document {}", i + 1)),
            )
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut parsed_fresh: HashMap<usize, Result<Parsed, ConfigError>> =
            if fresh.len() < 64 || threads == 1 {
                fresh.iter().map(parse).collect()
            } else {
                std::thread::scope(|scope| {
                    let workers: Vec<_> = fresh
                        .chunks(fresh.len().div_ceil(threads))
                        .map(|part| scope.spawn(move || part.iter().map(parse).collect::<Vec<_>>()))
                        .collect();
                    workers
                        .into_iter()
                        .flat_map(|w| w.join().expect("parser thread panicked"))
                        .collect()
                })
            };
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for (index, (key, _)) in docs.iter().enumerate() {
            // Cached documents stay where they are: no reference count is touched twice (on a
            // 20k-document file those cold cache lines are most of a reload).
            let parsed = match parsed_fresh.remove(&index) {
                Some(Ok(p)) => self.docs.entry(*key).or_insert(p),
                Some(Err(e)) => {
                    errors.push(e);
                    continue;
                }
                None => &self.docs[key],
            };
            match parsed {
                Parsed::Null => {}
                Parsed::Service(s) => objects.services.push(s.clone()),
                Parsed::Slice(s) => objects.endpoint_slices.push(s.clone()),
                Parsed::Pool(kind, p) => objects.pools.push((kind.clone(), p.clone())),
                Parsed::Policy(kind, p) => objects.l2_policies.push((kind.clone(), p.clone())),
                Parsed::Ignored(what) => objects
                    .ignored
                    .push(format!("document {}: {what}", index + 1)),
            }
        }
        if self.docs.len() > docs.len() {
            let keys: HashSet<u64> = docs.iter().map(|(k, _)| *k).collect();
            self.docs.retain(|k, _| keys.contains(k));
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Parses every YAML document of `text` (no cache).
pub fn parse_objects(text: &str) -> Result<Objects, ConfigErrors> {
    ConfigCache::default().parse(text)
}

fn parse_protocol(value: Option<&str>, object: &str, field: &str) -> Result<Protocol, ConfigError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(err(
            object,
            field,
            format!("protocol {other:?} not supported (TCP or UDP)"),
        )),
    }
}

fn parse_ipv4(value: &str, object: &str, field: &str) -> Result<Ipv4Addr, ConfigError> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(err(
            object,
            field,
            format!("{value:?}: IPv6 is not supported yet"),
        )),
        Err(_) => Err(err(
            object,
            field,
            format!("{value:?} is not an IP address"),
        )),
    }
}

/// "10.0.0.0/8" → (10.0.0.0, 8), with the host bits cleared.
fn parse_cidr(value: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = value.split_once('/').unwrap_or((value, "32"));
    let addr: Ipv4Addr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not an IPv4 CIDR"))?;
    let len: u8 = len
        .trim()
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{value:?}: prefix must be 0-32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

fn parse_port(value: i32, object: &str, field: &str) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err(object, field, format!("{value} is not a port (1-65535)")))
}

/// One port of an EndpointSlice, normalised.
struct SlicePort {
    name: String,
    port: Option<u16>,
    proto: Protocol,
}

/// Endpoint addresses of one slice with their condition.
struct SliceEndpoints {
    ports: Vec<SlicePort>,
    /// (address, condition, on this node).
    endpoints: Vec<(Ipv4Addr, BackendCondition, bool)>,
}

/// Validates the objects and joins Services with their EndpointSlices.
/// Does this Service get NodePorts (type NodePort, or LoadBalancer unless
/// allocateLoadBalancerNodePorts is false)?
fn needs_node_port(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn node_port_id(
    service: &str,
    port: &k8s_openapi::api::core::v1::ServicePort,
    proto: Protocol,
) -> nodeports::PortId {
    nodeports::PortId {
        service: service.to_string(),
        port: port
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| port.port.to_string()),
        proto,
    }
}

/// NodePorts for the ports that need one and name none, over all Services (so a subset build
/// would differ: [`rebuild_services`] falls back to a full build for such Services).
fn plan_node_ports(objects: &Objects, ctx: &BuildContext) -> BTreeMap<nodeports::PortId, u16> {
    let mut taken = HashSet::new();
    let mut wanted = Vec::new();
    for service in &objects.services {
        let Some(spec) = service.spec.as_ref().filter(|s| needs_node_port(s)) else {
            continue;
        };
        let (namespace, name) = service_identity(service);
        let service_name = format!("{namespace}/{name}");
        for port in spec.ports.iter().flatten() {
            let Ok(proto) = parse_protocol(port.protocol.as_deref(), "", "") else {
                continue;
            };
            match port.node_port {
                Some(n) => {
                    if let Ok(n) = u16::try_from(n) {
                        taken.insert((n, proto));
                    }
                }
                None => wanted.push(node_port_id(&service_name, port, proto)),
            }
        }
    }
    nodeports::allocate(&wanted, &taken, ctx.node_port_range)
}

pub fn build_desired(objects: &Objects, ctx: &BuildContext) -> Result<DesiredState, ConfigErrors> {
    let mut errors = Vec::new();
    let node_ports = plan_node_ports(objects, ctx);
    let pools = validate_pools(objects, &mut errors);
    let policies = validate_policies(objects, &mut errors);
    let lb_requests = lb_requests(objects, &mut errors);
    let (lb_status, pool_usage) = lbipam::allocate(&pools, &lb_requests, &ctx.lb_hints);
    let lb_addrs: HashMap<&str, &[Ipv4Addr]> = lb_status
        .iter()
        .map(|s| (s.service.as_str(), s.addresses.as_slice()))
        .collect();
    let mut external_by_service: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    // externalTrafficPolicy: Local Services, and those of them with a ready local endpoint.
    let mut local_policy = std::collections::BTreeSet::new();
    let mut local_ready = std::collections::BTreeSet::new();

    // EndpointSlices grouped by "namespace/service".
    let mut slices: HashMap<String, Vec<SliceEndpoints>> = HashMap::new();
    for slice in &objects.endpoint_slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = slice.metadata.name.as_deref().unwrap_or("<unnamed>");
        let object = format!("EndpointSlice {namespace}/{name}");
        if slice.metadata.name.is_none() {
            errors.push(err(&object, "metadata.name", "missing"));
            continue;
        }
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            errors.push(err(
                &object,
                "metadata.labels",
                format!("label {SERVICE_NAME_LABEL} missing"),
            ));
            continue;
        };
        match slice.address_type.as_str() {
            "IPv4" => {}
            // Dual-stack clusters publish an IPv6 slice next to the IPv4 one; skip it quietly.
            "IPv6" | "FQDN" => continue,
            other => {
                errors.push(err(
                    &object,
                    "addressType",
                    format!("{other:?} not supported (IPv4)"),
                ));
                continue;
            }
        }
        let mut parsed = SliceEndpoints {
            ports: Vec::new(),
            endpoints: Vec::new(),
        };
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}]");
            let proto = match parse_protocol(
                port.protocol.as_deref(),
                &object,
                &format!("{field}.protocol"),
            ) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let number = match port
                .port
                .map(|p| parse_port(p, &object, &format!("{field}.port")))
                .transpose()
            {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            parsed.ports.push(SlicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                proto,
            });
        }
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            let conditions = endpoint.conditions.as_ref();
            // Kubernetes: a nil condition means "unknown" and ready is to be read as true.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let condition = if ready && !terminating {
                BackendCondition::Active
            } else if serving && terminating {
                BackendCondition::Terminating
            } else {
                continue;
            };
            let local = ctx.node_name.is_some() && endpoint.node_name == ctx.node_name;
            for (j, address) in endpoint.addresses.iter().enumerate() {
                // The field name is only formatted for an error (100k addresses in a big file).
                match address.parse::<Ipv4Addr>() {
                    Ok(a) => parsed.endpoints.push((a, condition, local)),
                    Err(_) => match parse_ipv4(
                        address,
                        &object,
                        &format!("endpoints[{i}].addresses[{j}]"),
                    ) {
                        Ok(a) => parsed.endpoints.push((a, condition, local)),
                        Err(e) => errors.push(e),
                    },
                }
            }
        }
        slices
            .entry(format!("{namespace}/{service}"))
            .or_default()
            .push(parsed);
    }

    let mut desired = DesiredState::default();
    let mut claimed: BTreeMap<Endpoint, String> = BTreeMap::new();
    for service in &objects.services {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = service.metadata.name.as_deref() else {
            errors.push(err(
                format!("Service {namespace}/<unnamed>"),
                "metadata.name",
                "missing",
            ));
            continue;
        };
        let service_name = format!("{namespace}/{name}");
        let object = format!("Service {service_name}");
        let Some(spec) = service.spec.as_ref() else {
            errors.push(err(&object, "spec", "missing"));
            continue;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        match service_type {
            "ClusterIP" | "NodePort" | "LoadBalancer" => {}
            // No proxying for ExternalName services; kube-proxy ignores them too.
            "ExternalName" => continue,
            other => {
                errors.push(err(
                    &object,
                    "spec.type",
                    format!("{other:?} is not a Service type"),
                ));
                continue;
            }
        }
        let cluster_ip = match spec.cluster_ip.as_deref() {
            // Headless: DNS only, nothing to balance.
            Some("None") => continue,
            // A user's own manifest (an API server would allocate one): no ClusterIP frontend;
            // NodePorts, externalIPs and LoadBalancer IPs still work.
            None | Some("") => None,
            Some(ip) => match parse_ipv4(ip, &object, "spec.clusterIP") {
                Ok(a) => Some(a),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            },
        };
        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            match parse_ipv4(ip, &object, &format!("spec.externalIPs[{i}]")) {
                Ok(a) => external_ips.push(a),
                Err(e) => errors.push(e),
            }
        }
        external_by_service.insert(service_name.clone(), external_ips.clone());
        let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
            "None" => 0,
            "ClientIP" => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(10_800);
                if !(1..=86_400).contains(&timeout) {
                    errors.push(err(
                        &object,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{timeout} is out of range (1-86400)"),
                    ));
                }
                timeout.clamp(1, 86_400) as u32
            }
            other => {
                errors.push(err(
                    &object,
                    "spec.sessionAffinity",
                    format!("{other:?} (None or ClientIP)"),
                ));
                0
            }
        };
        let mut source_ranges = Vec::new();
        for (i, cidr) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            let field = format!("spec.loadBalancerSourceRanges[{i}]");
            if cidr.contains(':') {
                continue; // IPv6 range of a dual-stack Service
            }
            match parse_cidr(cidr) {
                Ok(r) => source_ranges.push(r),
                Err(e) => errors.push(err(&object, field, e)),
            }
        }
        source_ranges.sort();
        source_ranges.dedup();
        let etp_local = match spec.external_traffic_policy.as_deref().unwrap_or("Cluster") {
            "Cluster" => false,
            "Local" => service_type != "ClusterIP",
            other => {
                errors.push(err(
                    &object,
                    "spec.externalTrafficPolicy",
                    format!("{other:?} (Cluster or Local)"),
                ));
                false
            }
        };
        if etp_local && ctx.node_name.is_none() {
            errors.push(err(
                &object,
                "spec.externalTrafficPolicy",
                "Local needs the agent's --node-name",
            ));
        }
        if etp_local {
            local_policy.insert(service_name.clone());
        }
        let lb_ips: &[Ipv4Addr] = if service_type == "LoadBalancer" {
            lb_addrs
                .get(service_name.as_str())
                .copied()
                .unwrap_or_default()
        } else {
            &[]
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() {
            errors.push(err(&object, "spec.ports", "at least one port is required"));
            continue;
        }
        let service_slices = slices
            .get(&service_name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut seen_ports: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
        for (i, port) in ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let port_name = port.name.clone().unwrap_or_default();
            if port_name.is_empty() && ports.len() > 1 {
                errors.push(err(
                    &object,
                    format!("{field}.name"),
                    "required when a Service has several ports",
                ));
                continue;
            }
            let proto = match parse_protocol(
                port.protocol.as_deref(),
                &object,
                &format!("{field}.protocol"),
            ) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let number = match parse_port(port.port, &object, &format!("{field}.port")) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if let Some(first) = seen_ports.insert((number, proto), i) {
                errors.push(err(
                    &object,
                    format!("{field}.port"),
                    format!("{number}/{proto} already used by spec.ports[{first}]"),
                ));
                continue;
            }
            // Numeric targetPort: used when an EndpointSlice port leaves its number out.
            let target_port = match &port.target_port {
                None => Some(number),
                Some(IntOrString::Int(p)) => {
                    match parse_port(*p, &object, &format!("{field}.targetPort")) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    }
                }
                Some(IntOrString::String(_)) => None,
            };

            let mut backends: BTreeMap<Endpoint, BackendCondition> = BTreeMap::new();
            let mut local_backends: BTreeMap<Endpoint, BackendCondition> = BTreeMap::new();
            for slice in service_slices {
                for slice_port in slice
                    .ports
                    .iter()
                    .filter(|p| p.name == port_name && p.proto == proto)
                {
                    let Some(backend_port) = slice_port.port.or(target_port) else {
                        let target = match &port.target_port {
                            Some(IntOrString::String(s)) => s.clone(),
                            _ => String::new(),
                        };
                        errors.push(err(
                            &object,
                            format!("{field}.targetPort"),
                            format!("named port {target:?} has no number in the EndpointSlice"),
                        ));
                        continue;
                    };
                    for &(addr, condition, local) in &slice.endpoints {
                        let endpoint = Endpoint {
                            addr,
                            port: backend_port,
                            proto,
                        };
                        // The same address in two slices: the more usable condition wins.
                        let entry = backends.entry(endpoint).or_insert(condition);
                        *entry = (*entry).min(condition);
                        if local {
                            let entry = local_backends.entry(endpoint).or_insert(condition);
                            *entry = (*entry).min(condition);
                        }
                    }
                }
            }

            let service_port_name = if port_name.is_empty() {
                format!("{service_name}:{number}")
            } else {
                format!("{service_name}:{port_name}")
            };
            let mut frontends: Vec<FrontendSpec> = cluster_ip
                .map(|addr| FrontendSpec {
                    endpoint: Endpoint {
                        addr,
                        port: number,
                        proto,
                    },
                    kind: FrontendKind::ClusterIp,
                })
                .into_iter()
                .collect();
            for &addr in &external_ips {
                frontends.push(FrontendSpec {
                    endpoint: Endpoint {
                        addr,
                        port: number,
                        proto,
                    },
                    kind: FrontendKind::ExternalIp,
                });
            }
            for &addr in lb_ips {
                frontends.push(FrontendSpec {
                    endpoint: Endpoint {
                        addr,
                        port: number,
                        proto,
                    },
                    kind: FrontendKind::LoadBalancer,
                });
            }
            if service_type != "ClusterIP" {
                let allocated = node_ports
                    .get(&node_port_id(&service_name, port, proto))
                    .map(|&p| i32::from(p));
                match port.node_port.or(allocated) {
                    Some(node_port) => {
                        match parse_port(node_port, &object, &format!("{field}.nodePort")) {
                            Ok(node_port) => {
                                for &addr in &ctx.node_ips {
                                    frontends.push(FrontendSpec {
                                        endpoint: Endpoint {
                                            addr,
                                            port: node_port,
                                            proto,
                                        },
                                        kind: FrontendKind::NodePort,
                                    });
                                }
                            }
                            Err(e) => errors.push(e),
                        }
                    }
                    None if needs_node_port(spec) => errors.push(err(
                        &object,
                        format!("{field}.nodePort"),
                        format!(
                            "none given and --node-port-range {}-{} is full",
                            ctx.node_port_range.first, ctx.node_port_range.last
                        ),
                    )),
                    // LoadBalancer without node ports (allocateLoadBalancerNodePorts: false).
                    None => {}
                }
            }
            for frontend in &frontends {
                if let Some(other) = claimed.insert(frontend.endpoint, service_port_name.clone()) {
                    errors.push(err(
                        &object,
                        format!("{field}.port"),
                        format!("frontend {} is already used by {other}", frontend.endpoint),
                    ));
                }
            }
            frontends.sort();
            frontends.dedup();
            let specs = |b: BTreeMap<Endpoint, BackendCondition>| -> Vec<BackendSpec> {
                b.into_iter()
                    .map(|(endpoint, condition)| BackendSpec {
                        endpoint,
                        condition,
                        weight: 1,
                    })
                    .collect()
            };
            if etp_local {
                // Traffic from outside (NodePort, LoadBalancer, externalIPs) only goes to this
                // node's endpoints, through a table of its own; the ClusterIP keeps them all.
                // The client's address is kept either way: the datapath never SNATs.
                if local_backends
                    .values()
                    .any(|c| *c == BackendCondition::Active)
                {
                    local_ready.insert(service_name.clone());
                }
                let (cluster, external): (Vec<FrontendSpec>, Vec<FrontendSpec>) = frontends
                    .into_iter()
                    .partition(|f| f.kind == FrontendKind::ClusterIp);
                let local_name = format!("{service_port_name}@local");
                desired.services.insert(
                    local_name.clone(),
                    ServicePort {
                        name: local_name,
                        frontends: external,
                        backends: specs(local_backends),
                        affinity_timeout_s,
                        source_ranges: source_ranges.clone(),
                    },
                );
                frontends = cluster;
            }
            desired.services.insert(
                service_port_name.clone(),
                ServicePort {
                    name: service_port_name,
                    frontends,
                    backends: specs(backends),
                    affinity_timeout_s,
                    source_ranges: source_ranges.clone(),
                },
            );
        }
    }
    for (policy, spec) in &policies {
        for service in &objects.services {
            let (namespace, name) = service_identity(service);
            let service_name = format!("{namespace}/{name}");
            if !lbipam::selects(spec.service_selector.as_ref(), &service_labels(service)) {
                continue;
            }
            // Local traffic policy: announce only where a ready endpoint runs, as MetalLB does.
            if local_policy.contains(&service_name) && !local_ready.contains(&service_name) {
                continue;
            }
            let mut addrs: Vec<Ipv4Addr> = Vec::new();
            if spec.load_balancer_ips {
                addrs.extend(
                    lb_addrs
                        .get(service_name.as_str())
                        .copied()
                        .unwrap_or_default(),
                );
            }
            if spec.external_ips {
                addrs.extend(external_by_service.get(&service_name).into_iter().flatten());
            }
            for addr in addrs {
                let a = desired
                    .announcements
                    .entry(addr)
                    .or_insert_with(|| Announcement {
                        service: service_name.clone(),
                        policies: Vec::new(),
                        interfaces: Vec::new(),
                    });
                a.policies.push(policy.clone());
                match &spec.interfaces {
                    Some(list) if !list.is_empty() => a.interfaces.extend(list.iter().cloned()),
                    _ => a.interfaces.push(".*".into()),
                }
                a.interfaces.sort();
                a.interfaces.dedup();
            }
        }
    }
    desired.lb_status = lb_status;
    desired.pool_usage = pool_usage;
    if errors.is_empty() {
        Ok(desired)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn service_identity(service: &Service) -> (&str, &str) {
    (
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or("<unnamed>"),
    )
}

/// A Service's labels plus the namespace/name labels Cilium selectors may use.
fn service_labels(service: &Service) -> BTreeMap<String, String> {
    let (namespace, name) = service_identity(service);
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(lbipam::LABEL_SERVICE_NAMESPACE.into(), namespace.into());
    labels.insert(lbipam::LABEL_SERVICE_NAME.into(), name.into());
    labels
}

fn validate_pools(objects: &Objects, errors: &mut Vec<ConfigError>) -> Vec<Pool> {
    let mut pools = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (kind, p) in &objects.pools {
        let Some(name) = p.metadata.name.clone() else {
            errors.push(err(format!("{kind} <unnamed>"), "metadata.name", "missing"));
            continue;
        };
        let object = format!("{kind} {name}");
        if !names.insert(name.clone()) {
            errors.push(err(&object, "metadata.name", "another pool has this name"));
            continue;
        }
        if let Err(e) = lbipam::check_selector(p.spec.service_selector.as_ref()) {
            errors.push(err(&object, "spec.serviceSelector", e));
        }
        if p.spec.blocks.is_empty() {
            errors.push(err(
                &object,
                "spec.blocks",
                "at least one block is required",
            ));
            continue;
        }
        let allow_first_last = match p.spec.allow_first_last_ips.as_deref() {
            None | Some("No") => false,
            Some("Yes") => true,
            Some(other) => {
                errors.push(err(
                    &object,
                    "spec.allowFirstLastIPs",
                    format!("{other:?} (Yes or No)"),
                ));
                false
            }
        };
        let mut ranges = Vec::new();
        for (i, block) in p.spec.blocks.iter().enumerate() {
            match lbipam::parse_block(block, allow_first_last) {
                Ok(Some(r)) => ranges.push(r),
                Ok(None) => {} // IPv6 block of a dual-stack pool
                Err(e) => errors.push(err(&object, format!("spec.blocks[{i}]"), e)),
            }
        }
        if !p.spec.disabled {
            pools.push(Pool {
                name,
                ranges,
                selector: p.spec.service_selector.clone(),
            });
        }
    }
    for (pool, problem) in lbipam::check_overlaps(&pools) {
        errors.push(err(
            format!("LoadBalancerIPPool {pool}"),
            "spec.blocks",
            problem,
        ));
    }
    pools
}

fn validate_policies(
    objects: &Objects,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, lbipam::L2PolicySpec)> {
    let mut policies = Vec::new();
    for (kind, p) in &objects.l2_policies {
        let Some(name) = p.metadata.name.clone() else {
            errors.push(err(format!("{kind} <unnamed>"), "metadata.name", "missing"));
            continue;
        };
        let object = format!("{kind} {name}");
        let mut ok = true;
        if let Err(e) = lbipam::check_selector(p.spec.service_selector.as_ref()) {
            errors.push(err(&object, "spec.serviceSelector", e));
            ok = false;
        }
        for (i, pattern) in p.spec.interfaces.iter().flatten().enumerate() {
            if let Err(e) = regex::Regex::new(&format!("^(?:{pattern})$")) {
                errors.push(err(
                    &object,
                    format!("spec.interfaces[{i}]"),
                    format!("{pattern:?} is not a regular expression: {e}"),
                ));
                ok = false;
            }
        }
        if !p.spec.load_balancer_ips && !p.spec.external_ips {
            errors.push(err(
                &object,
                "spec",
                "neither loadBalancerIPs nor externalIPs is true: the policy announces nothing",
            ));
            ok = false;
        }
        if ok {
            policies.push((name, p.spec.clone()));
        }
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    policies
}

/// The LoadBalancer Services with the addresses they ask for.
fn lb_requests(objects: &Objects, errors: &mut Vec<ConfigError>) -> Vec<LbRequest> {
    let mut requests = Vec::new();
    for service in &objects.services {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() != Some("LoadBalancer") || service.metadata.name.is_none() {
            continue;
        }
        let (namespace, name) = service_identity(service);
        let object = format!("Service {namespace}/{name}");
        let mut requested = Vec::new();
        let mut sources: Vec<(String, String)> = Vec::new();
        if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
            sources.push(("spec.loadBalancerIP".into(), ip.into()));
        }
        for key in [lbipam::ANNOTATION_IPS, lbipam::CILIUM_ANNOTATION_IPS] {
            if let Some(list) = service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
            {
                for ip in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    sources.push((format!("metadata.annotations[{key}]"), ip.into()));
                }
            }
        }
        for (field, ip) in sources {
            if ip.contains(':') {
                continue; // IPv6 half of a dual-stack request
            }
            match parse_ipv4(&ip, &object, &field) {
                Ok(a) if !requested.contains(&a) => requested.push(a),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        requests.push(LbRequest {
            service: format!("{namespace}/{name}"),
            labels: service_labels(service),
            requested,
        });
    }
    requests
}

/// Parse and validate a whole file (no node addresses, no earlier allocation).
pub fn load_str(text: &str) -> Result<(DesiredState, Objects), ConfigErrors> {
    load_str_with(text, &BuildContext::default())
}

pub fn load_str_with(
    text: &str,
    ctx: &BuildContext,
) -> Result<(DesiredState, Objects), ConfigErrors> {
    let objects = parse_objects(text)?;
    Ok((build_desired(&objects, ctx)?, objects))
}

/// As [`load_str_with`], reusing the documents `cache` parsed before, and the desired state it
/// built last when only EndpointSlices changed. The cache keeps the returned state: drop it
/// before the next call and that call updates it without copying.
pub fn load_cached(
    cache: &mut ConfigCache,
    text: &str,
    ctx: &BuildContext,
) -> Result<(Arc<DesiredState>, Arc<Objects>), ConfigErrors> {
    let objects = Arc::new(cache.parse(text)?);
    let desired = match cache.last.take() {
        Some((old, old_ctx, mut previous)) if old_ctx == *ctx => {
            match endpoint_slice_change(&old, &objects, &previous, ctx) {
                Some(affected) => {
                    match rebuild_services(Arc::make_mut(&mut previous), &objects, &affected, ctx) {
                        Some(Ok(())) => {
                            cache.incremental_builds += 1;
                            previous
                        }
                        Some(Err(e)) => {
                            cache.last = Some((old, old_ctx, previous));
                            return Err(e);
                        }
                        None => Arc::new(build_desired(&objects, ctx)?),
                    }
                }
                None => Arc::new(build_desired(&objects, ctx)?),
            }
        }
        _ => Arc::new(build_desired(&objects, ctx)?),
    };
    cache.last = Some((objects.clone(), ctx.clone(), desired.clone()));
    Ok((desired, objects))
}

/// The Services ("namespace/name") whose EndpointSlices differ between `old` and `new`, when
/// nothing else does (documents the cache did not reparse are the same `Arc`s) and each of them
/// with a LoadBalancer allocation holds it as a hint (so it gets the same address alone);
/// None otherwise.
fn endpoint_slice_change(
    old: &Objects,
    new: &Objects,
    previous: &DesiredState,
    ctx: &BuildContext,
) -> Option<BTreeSet<String>> {
    fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
    }
    fn same_named<T>(a: &[(String, Arc<T>)], b: &[(String, Arc<T>)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && Arc::ptr_eq(&x.1, &y.1))
    }
    if !same(&old.services, &new.services)
        || !same_named(&old.pools, &new.pools)
        || !same_named(&old.l2_policies, &new.l2_policies)
        || old.ignored != new.ignored
    {
        return None;
    }
    let ptrs = |list: &[Arc<EndpointSlice>]| -> HashSet<*const EndpointSlice> {
        list.iter().map(Arc::as_ptr).collect()
    };
    let (old_ptrs, new_ptrs) = (ptrs(&old.endpoint_slices), ptrs(&new.endpoint_slices));
    let mut affected = BTreeSet::new();
    let changed = old
        .endpoint_slices
        .iter()
        .filter(|s| !new_ptrs.contains(&Arc::as_ptr(s)))
        .chain(
            new.endpoint_slices
                .iter()
                .filter(|s| !old_ptrs.contains(&Arc::as_ptr(s))),
        );
    for slice in changed {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        // A slice without its Service label is an error the full build reports.
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        affected.insert(format!("{namespace}/{service}"));
    }
    if previous.lb_status.iter().any(|s| {
        affected.contains(&s.service)
            && (s.error.is_some() || ctx.lb_hints.get(&s.service) != Some(&s.addresses))
    }) {
        return None;
    }
    Some(affected)
}

/// Rebuilds the service ports of the `affected` Services in `desired` from their Service and
/// EndpointSlices alone. LoadBalancer allocation does not depend on endpoints, so each keeps
/// its address (the hints hold it) and the allocation status stays as it was. None when the
/// result cannot be merged safely (an address announced for another Service too).
fn rebuild_services(
    desired: &mut DesiredState,
    objects: &Objects,
    affected: &BTreeSet<String>,
    ctx: &BuildContext,
) -> Option<Result<(), ConfigErrors>> {
    // Names first (no string is built for the 10k Services that do not match).
    let names: HashSet<&str> = affected
        .iter()
        .filter_map(|s| s.split_once('/').map(|(_, n)| n))
        .collect();
    let key = |namespace: Option<&String>, name: &str| {
        names.contains(name)
            && affected.contains(&format!(
                "{}/{name}",
                namespace.map_or("default", String::as_str)
            ))
    };
    let subset = Objects {
        services: objects
            .services
            .iter()
            .filter(|s| {
                s.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| key(s.metadata.namespace.as_ref(), n))
            })
            .cloned()
            .collect(),
        endpoint_slices: objects
            .endpoint_slices
            .iter()
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|n| key(s.metadata.namespace.as_ref(), n))
            })
            .cloned()
            .collect(),
        pools: objects.pools.clone(),
        l2_policies: objects.l2_policies.clone(),
        ignored: Vec::new(),
    };
    // Allocated NodePorts depend on every Service: those need the full build.
    let allocates = subset.services.iter().any(|s| {
        s.spec.as_ref().is_some_and(|spec| {
            needs_node_port(spec) && spec.ports.iter().flatten().any(|p| p.node_port.is_none())
        })
    });
    if allocates {
        return None;
    }
    let rebuilt = match build_desired(&subset, ctx) {
        Ok(d) => d,
        Err(e) => return Some(Err(e)),
    };
    let mut announcements = desired.announcements.clone();
    announcements.retain(|_, a| !affected.contains(&a.service));
    for (addr, a) in rebuilt.announcements {
        if announcements.insert(addr, a).is_some() {
            return None;
        }
    }
    desired.announcements = announcements;
    for service in affected {
        // Service ports are "namespace/name:port" (and "…@local"): ':' + 1 is ';'.
        let ports: Vec<String> = desired
            .services
            .range(format!("{service}:")..format!("{service};"))
            .map(|(k, _)| k.clone())
            .collect();
        for port in ports {
            desired.services.remove(&port);
        }
    }
    desired.services.extend(rebuilt.services);
    Some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.0.1.2"]
  conditions: {ready: true}
- addresses: ["10.0.1.1"]
- addresses: ["10.0.1.3"]
  conditions: {ready: false}
- addresses: ["10.0.1.4"]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;

    #[test]
    fn joins_services_with_slices() {
        let (desired, objects) = load_str(GOOD).unwrap();
        assert_eq!(objects.ignored.len(), 1);
        let http = &desired.services["default/web:http"];
        assert_eq!(http.frontends.len(), 1);
        assert_eq!(http.frontends[0].endpoint.to_string(), "10.96.0.10:80/TCP");
        let backends: Vec<String> = http
            .backends
            .iter()
            .map(|b| format!("{} {:?}", b.endpoint, b.condition))
            .collect();
        assert_eq!(
            backends,
            [
                "10.0.1.1:8080/TCP Active",
                "10.0.1.2:8080/TCP Active",
                "10.0.1.4:8080/TCP Terminating"
            ]
        );
        let dns = &desired.services["default/web:dns"];
        assert_eq!(dns.backends[0].endpoint.to_string(), "10.0.1.1:5353/UDP");
    }

    fn error_of(text: &str) -> String {
        load_str(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_object_and_field() {
        let bad_port = GOOD.replace("port: 80,", "port: 70000,");
        assert_eq!(
            error_of(&bad_port),
            "Service default/web: spec.ports[0].port: 70000 is not a port (1-65535)"
        );
        let wrong_type = GOOD.replace("port: 80,", "port: eighty,");
        let e = error_of(&wrong_type);
        assert!(
            e.starts_with("Service default/web: spec.ports[0].port: "),
            "{e}"
        );
        let bad_ip = GOOD.replace("10.0.1.2", "10.0.1.300");
        assert_eq!(
            error_of(&bad_ip),
            "EndpointSlice default/web-abc: endpoints[0].addresses[0]: \"10.0.1.300\" is not an IP address"
        );
        // A user's own manifest without clusterIP: no ClusterIP frontend, nothing rejected.
        let no_cluster_ip = GOOD.replace("  clusterIP: 10.96.0.10\n", "");
        let (desired, _) = load_str(&no_cluster_ip).expect("accepted without clusterIP");
        assert!(desired.services["default/web:http"].frontends.is_empty());
        let sctp = GOOD.replace("protocol: UDP}\n---", "protocol: SCTP}\n---");
        assert_eq!(
            error_of(&sctp),
            "Service default/web: spec.ports[1].protocol: protocol \"SCTP\" not supported (TCP or UDP)"
        );
        let no_label = GOOD.replace("  labels: {kubernetes.io/service-name: web}\n", "");
        assert_eq!(
            error_of(&no_label),
            "EndpointSlice default/web-abc: metadata.labels: label kubernetes.io/service-name missing"
        );
        let broken = format!("{GOOD}\n---\nkind: [oops");
        assert!(
            error_of(&broken).starts_with("document 4: invalid YAML"),
            "{}",
            error_of(&broken)
        );
    }

    #[test]
    fn duplicate_frontends_are_rejected() {
        let twice = format!(
            "{GOOD}\n---\n{}",
            GOOD.split("---")
                .next()
                .unwrap()
                .replace("name: web", "name: web2")
        );
        let e = error_of(&twice);
        assert!(e.contains("Service default/web2: spec.ports[0].port: frontend 10.96.0.10:80/TCP is already used by default/web:http"), "{e}");
    }

    #[test]
    fn headless_and_external_name_are_skipped() {
        let headless = GOOD.replace("clusterIP: 10.96.0.10", "clusterIP: None");
        assert!(load_str(&headless).unwrap().0.services.is_empty());
    }

    const LB: &str = r#"
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: home}
spec:
  blocks:
  - {start: 192.168.30.60, stop: 192.168.30.80}
  - {cidr: "fd00::/120"}
---
apiVersion: lb.xdp.rs/v1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec:
  interfaces: ["^eth[0-9]+"]
  loadBalancerIPs: true
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: pinned, namespace: default, annotations: {io.cilium/lb-ipam-ips: "192.168.30.70"}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  ports: [{port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: clash, namespace: default}
spec:
  type: LoadBalancer
  loadBalancerIP: 192.168.30.70
  clusterIP: 10.96.0.22
  ports: [{port: 443}]
"#;

    #[test]
    fn load_balancer_and_node_port_frontends_and_announcements() {
        let ctx = BuildContext {
            node_ips: vec!["10.0.0.254".parse().unwrap()],
            ..Default::default()
        };
        let (desired, _) = load_str_with(LB, &ctx).unwrap();
        let web: Vec<String> = desired.services["default/web:http"]
            .frontends
            .iter()
            .map(|f| format!("{:?} {}", f.kind, f.endpoint))
            .collect();
        assert_eq!(
            web,
            [
                "NodePort 10.0.0.254:30080/TCP",
                "ClusterIp 10.96.0.20:80/TCP",
                "LoadBalancer 192.168.30.60:80/TCP"
            ]
        );
        let status: BTreeMap<&str, &lbipam::LbStatus> = desired
            .lb_status
            .iter()
            .map(|s| (s.service.as_str(), s))
            .collect();
        // Without history the clash goes by name order …
        assert_eq!(
            status["default/clash"].addresses,
            ["192.168.30.70".parse::<Ipv4Addr>().unwrap()]
        );
        let clash = status["default/pinned"].error.as_deref().unwrap();
        assert!(
            clash.contains("192.168.30.70 conflicts: already allocated to default/clash"),
            "{clash}"
        );
        // … but the Service that already holds the address keeps it.
        let mut with_history = ctx.clone();
        with_history.lb_hints.insert(
            "default/pinned".into(),
            vec!["192.168.30.70".parse().unwrap()],
        );
        let (again, _) = load_str_with(LB, &with_history).unwrap();
        let pinned = again
            .lb_status
            .iter()
            .find(|s| s.service == "default/pinned")
            .unwrap();
        assert_eq!(
            pinned.addresses,
            ["192.168.30.70".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(desired.pool_usage[0].used, 2);
        assert_eq!(desired.pool_usage[0].size, 21);
        let announced: Vec<String> = desired
            .announcements
            .keys()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(announced, ["192.168.30.60", "192.168.30.70"]);
        let a = &desired.announcements[&"192.168.30.60".parse().unwrap()];
        assert!(a.on("eth0") && a.on("eth12") && !a.on("veth0") && !a.on("wlan0"));
    }

    #[test]
    fn bad_pools_and_policies_are_named() {
        let bad = r#"
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: a}
spec: {blocks: [{cidr: 192.168.30.0/24}]}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: b}
spec: {blocks: [{start: 192.168.30.200, stop: 192.168.31.10}, {cidr: 10.0.0.1/24}]}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: c}
spec: {blocks: [{cidr: 10.9.0.0/24}], serviceSelector: {matchExpressions: [{key: x, operator: Has}]}}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: p}
spec: {interfaces: ["eth[0-9"], loadBalancerIPs: true}
---
apiVersion: lb.xdp.rs/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: q}
spec: {interfaces: ["eth0"]}
"#;
        let e = load_str(bad).unwrap_err().to_string();
        for want in [
            "LoadBalancerIPPool c: spec.serviceSelector: matchExpressions[0].operator: \"Has\"",
            "LoadBalancerIPPool b: spec.blocks[1]: cidr \"10.0.0.1/24\": host bits set",
            "LoadBalancerIPPool a: spec.blocks: 192.168.30.1-192.168.30.254 overlaps 192.168.30.200-192.168.31.10 of pool b",
            "L2AnnouncementPolicy p: spec.interfaces[0]: \"eth[0-9\" is not a regular expression",
            "L2AnnouncementPolicy q: spec: neither loadBalancerIPs nor externalIPs is true",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let typo = "apiVersion: lb.xdp.rs/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: c}\nspec: {blocks: [{cidr: 10.9.0.0/24}], colour: red}\n";
        assert!(
            load_str(typo)
                .unwrap_err()
                .to_string()
                .starts_with("LoadBalancerIPPool c: spec.colour: unknown field `colour`")
        );
    }

    /// kubectl-apply manifests: no clusterIP, no nodePort. NodePorts are allocated from the
    /// range, the same on every build, past explicit ones; a full range is an error naming it.
    #[test]
    fn own_manifests_get_node_ports_from_the_range() {
        let ctx = BuildContext {
            node_ips: vec![Ipv4Addr::new(10, 0, 0, 254)],
            ..Default::default()
        };
        let service = |name: &str, node_port: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, ports: [{{name: http, port: 80{node_port}}}]}}\n---\n"
            )
        };
        let node_port_of = |desired: &DesiredState, name: &str| {
            let fronts = &desired.services[&format!("default/{name}:http")].frontends;
            assert_eq!(fronts.len(), 1, "{fronts:?}");
            assert_eq!(fronts[0].kind, FrontendKind::NodePort);
            fronts[0].endpoint.port
        };
        let one = service("web", "");
        let (desired, _) = load_str_with(&one, &ctx).expect("accepted");
        let port = node_port_of(&desired, "web");
        assert!((30_000..=32_767).contains(&port), "{port}");
        // Same on every build; another Service taking that port explicitly moves it.
        let (again, _) = load_str_with(&one, &ctx).unwrap();
        assert_eq!(node_port_of(&again, "web"), port);
        let both = format!("{one}{}", service("api", &format!(", nodePort: {port}")));
        let (desired, _) = load_str_with(&both, &ctx).unwrap();
        assert_eq!(node_port_of(&desired, "api"), port);
        assert_ne!(node_port_of(&desired, "web"), port);
        let full = BuildContext {
            node_port_range: NodePortRange {
                first: port,
                last: port,
            },
            ..ctx.clone()
        };
        assert_eq!(
            load_str_with(&both, &full).unwrap_err().to_string(),
            format!(
                "Service default/web: spec.ports[0].nodePort: none given and --node-port-range {port}-{port} is full"
            )
        );
    }

    /// An EndpointSlice-only change rebuilds just its Service, with the same result as a full
    /// build; a Service with an allocation problem takes the full build.
    #[test]
    fn endpoint_change_rebuilds_only_its_service_and_equals_a_full_build() {
        let slice = |service: &str, addr: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- addresses: [\"{addr}\"]\n"
            )
        };
        let text = |web: &str, pinned: &str| {
            format!(
                "{GOOD}---{LB}{}{}",
                slice("web", web),
                slice("pinned", pinned)
            )
        };
        let mut cache = ConfigCache::default();
        let mut ctx = BuildContext {
            node_ips: vec![Ipv4Addr::new(10, 0, 0, 254)],
            ..Default::default()
        };
        let (first, _) = load_cached(&mut cache, &text("10.0.5.1", "10.0.6.1"), &ctx).unwrap();
        // The agent hands the allocations back as hints.
        ctx.lb_hints = first
            .lb_status
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| (s.service.clone(), s.addresses.clone()))
            .collect();
        load_cached(&mut cache, &text("10.0.5.1", "10.0.6.1"), &ctx).unwrap();
        assert_eq!(cache.incremental_builds, 0, "the hints changed: full build");
        // "pinned" lost its requested address to "clash" (which sorts first): no shortcut.
        for (web, pinned, incremental) in [
            ("10.0.5.2", "10.0.6.1", 1),
            ("10.0.5.3", "10.0.6.1", 2),
            ("10.0.5.3", "10.0.6.2", 2),
        ] {
            let t = text(web, pinned);
            let (desired, _) = load_cached(&mut cache, &t, &ctx).unwrap();
            let full = build_desired(&parse_objects(&t).unwrap(), &ctx).unwrap();
            assert_eq!(*desired, full, "web {web}, pinned {pinned}");
            assert_eq!(
                cache.incremental_builds, incremental,
                "web {web}, pinned {pinned}"
            );
        }
        // A bad address in the changed slice is still an error, and the cache recovers.
        let e = load_cached(&mut cache, &text("10.0.5.x", "10.0.6.2"), &ctx).unwrap_err();
        assert!(e.to_string().contains("EndpointSlice default/web-1"), "{e}");
        let t = text("10.0.5.4", "10.0.6.2");
        let (desired, _) = load_cached(&mut cache, &t, &ctx).unwrap();
        assert_eq!(
            *desired,
            build_desired(&parse_objects(&t).unwrap(), &ctx).unwrap()
        );
    }

    #[test]
    fn cached_reload_equals_a_fresh_parse() {
        let mut cache = ConfigCache::default();
        let ctx = BuildContext::default();
        let (first, _) = load_cached(&mut cache, GOOD, &ctx).unwrap();
        assert_eq!(*first, load_str(GOOD).unwrap().0);
        let changed = GOOD.replace("10.0.1.2", "10.0.1.9");
        let (second, _) = load_cached(&mut cache, &changed, &ctx).unwrap();
        assert_eq!(*second, load_str(&changed).unwrap().0);
        assert_ne!(first, second);
        // A broken document is reported with its number even when the others come from the cache.
        let broken = changed.replacen("kind: EndpointSlice", "kind: [", 1);
        let e = load_cached(&mut cache, &broken, &ctx)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("document 2: invalid YAML"), "{e}");
        assert_eq!(
            split_documents("a: 1\n---\nb: 2\n...\n--- c: 3\n"),
            ["a: 1\n", "b: 2\n", "", "c: 3\n"]
        );
    }
}
