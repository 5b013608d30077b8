//! Validated objects → desired state: Services joined with their EndpointSlices, frontends of
//! every kind, policies, NodePorts allocated where a manifest leaves them out.

use super::*;

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
    // EndpointSlices by "namespace/service"; nodes with a ready endpoint (kept for Local).
    let (slices, mut ready_nodes) = parse_slices(objects, ctx, &mut errors);
    let mut desired = DesiredState::default();
    let mut claimed: BTreeMap<Endpoint, String> = BTreeMap::new();
    for service in &objects.services {
        let Some(settings) = service_settings(service, ctx, &mut errors) else {
            continue;
        };
        let ServiceSettings {
            service_name,
            object,
            spec,
            service_type,
            cluster_ip,
            external_ips,
            affinity_timeout_s,
            source_ranges,
            etp_local,
            health_check_port,
        } = settings;
        external_by_service.insert(service_name.clone(), external_ips.clone());
        if etp_local {
            local_policy.insert(service_name.clone());
        }
        if let Some(p) = health_check_port {
            health_check_ports.push((p, service_name.clone()));
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

            let (backends, local_backends) = port_backends(
                service_slices,
                port,
                &port_name,
                proto,
                target_port,
                &object,
                &field,
                &mut errors,
            );

            let service_port_name = if port_name.is_empty() {
                format!("{service_name}:{number}")
            } else {
                format!("{service_name}:{port_name}")
            };
            let mut frontends = port_frontends(
                &PortAddresses {
                    cluster_ip,
                    external_ips: &external_ips,
                    lb_ips,
                },
                &service_name,
                spec,
                port,
                (number, proto),
                &node_ports,
                ctx,
                &object,
                &field,
                &mut errors,
            );
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
    desired.announcements = announcements(
        objects,
        &policies,
        &lb_addrs,
        &external_by_service,
        &local_policy,
        &local_ready,
    );
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
