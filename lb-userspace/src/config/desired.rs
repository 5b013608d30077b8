//! Validated objects → desired state: Services joined with their EndpointSlices, frontends of
//! every kind, policies, NodePorts allocated where a manifest leaves them out.

use super::*;

/// One port of an EndpointSlice, normalised.
pub(super) struct SlicePort {
    name: String,
    port: Option<u16>,
    proto: Protocol,
}

/// Endpoint addresses of one slice with their condition.
pub(super) struct SliceEndpoints {
    ports: Vec<SlicePort>,
    /// (address, condition, on this node).
    endpoints: Vec<(Ipv4Addr, BackendCondition, bool)>,
}

/// Does this Service get NodePorts (type NodePort, or LoadBalancer unless
/// allocateLoadBalancerNodePorts is false)?
pub(super) fn needs_node_port(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

pub(super) fn node_port_id(
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
pub(super) fn plan_node_ports(
    objects: &Objects,
    ctx: &BuildContext,
) -> BTreeMap<nodeports::PortId, u16> {
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

/// Validates the objects and joins Services with their EndpointSlices.
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
    // Ready local endpoint addresses per Local Service, and its healthCheckNodePort.
    let mut local_addrs: HashMap<String, BTreeSet<Ipv4Addr>> = HashMap::new();
    let mut health_check_ports: Vec<(u16, String)> = Vec::new();
    // Nodes with a ready endpoint, per "namespace/service" (kept for Local Services).
    let mut ready_nodes: HashMap<String, BTreeSet<&str>> = HashMap::new();

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
            if let (BackendCondition::Active, Some(node)) = (condition, &endpoint.node_name) {
                ready_nodes
                    .entry(format!("{namespace}/{service}"))
                    .or_default()
                    .insert(node);
            }
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
        // Dual-stack: the Service's IPv4 side is ours; an IPv6-only Service is not.
        let families = spec.ip_families.as_deref().unwrap_or_default();
        if !families.is_empty() && !families.iter().any(|f| f == "IPv4") {
            continue;
        }
        let dual_stack = families.iter().any(|f| f == "IPv6");
        let ipv4_cluster_ip = spec
            .cluster_ips
            .iter()
            .flatten()
            .find(|ip| ip.parse::<Ipv4Addr>().is_ok());
        let cluster_ip = match ipv4_cluster_ip
            .or(spec.cluster_ip.as_ref())
            .map(String::as_str)
        {
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
            if dual_stack && ip.parse::<std::net::Ipv6Addr>().is_ok() {
                continue;
            }
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
            if let Some(p) = spec.health_check_node_port {
                match parse_port(p, &object, "spec.healthCheckNodePort") {
                    Ok(p) => health_check_ports.push((p, service_name.clone())),
                    Err(e) => errors.push(e),
                }
            }
        }
        // Another controller's class (MetalLB, a cloud): the addresses it wrote to the status
        // are served, as kube-proxy does, but neither allocated nor announced here.
        let foreign_ips: Vec<Ipv4Addr> = if service_type == "LoadBalancer"
            && !lbipam::our_class(spec.load_balancer_class.as_deref())
        {
            status_ingress_ips(service)
        } else {
            Vec::new()
        };
        let lb_ips: &[Ipv4Addr] = if !foreign_ips.is_empty() {
            &foreign_ips
        } else if service_type == "LoadBalancer" {
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
                local_addrs.entry(service_name.clone()).or_default().extend(
                    local_backends
                        .iter()
                        .filter(|(_, c)| **c == BackendCondition::Active)
                        .map(|(e, _)| e.addr),
                );
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
    for (port, service) in health_check_ports {
        let local_endpoints = local_addrs.get(&service).map_or(0, |a| a.len() as u32);
        if let Some(other) = desired.health_checks.insert(
            port,
            HealthCheck {
                service: service.clone(),
                local_endpoints,
            },
        ) {
            errors.push(err(
                format!("Service {service}"),
                "spec.healthCheckNodePort",
                format!(
                    "{port} is already the health check port of {}",
                    other.service
                ),
            ));
        }
    }
    for service in &local_policy {
        let nodes = ready_nodes.remove(service).unwrap_or_default();
        desired.local_nodes.insert(
            service.clone(),
            nodes.into_iter().map(str::to_string).collect(),
        );
    }
    desired.l2_policies = policies
        .iter()
        .map(|(name, spec)| {
            (
                name.clone(),
                L2Scope {
                    interfaces: spec.interfaces.clone().unwrap_or_default(),
                    node_selector: spec.node_selector.clone(),
                },
            )
        })
        .collect();
    desired.lb_status = lb_status;
    desired.pool_usage = pool_usage;
    if errors.is_empty() {
        Ok(desired)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The IPv4 addresses of `status.loadBalancer.ingress`.
pub fn status_ingress_ips(service: &Service) -> Vec<Ipv4Addr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

pub(super) fn service_identity(service: &Service) -> (&str, &str) {
    (
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or("<unnamed>"),
    )
}

/// A Service's labels plus the namespace/name labels Cilium selectors may use.
pub(super) fn service_labels(service: &Service) -> BTreeMap<String, String> {
    let (namespace, name) = service_identity(service);
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(lbipam::LABEL_SERVICE_NAMESPACE.into(), namespace.into());
    labels.insert(lbipam::LABEL_SERVICE_NAME.into(), name.into());
    labels
}
