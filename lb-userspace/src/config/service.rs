//! One Service's own fields, validated: type, ClusterIP (IPv4 side of dual-stack), externalIPs,
//! session affinity, source ranges, traffic policy, healthCheckNodePort.

use k8s_openapi::api::core::v1::ServiceSpec;

use super::*;

pub(super) struct ServiceSettings<'a> {
    /// "namespace/name".
    pub service_name: String,
    /// "Service namespace/name", for errors.
    pub object: String,
    pub spec: &'a ServiceSpec,
    pub service_type: &'a str,
    pub cluster_ip: Option<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub affinity_timeout_s: u32,
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// externalTrafficPolicy: Local (and not a plain ClusterIP Service).
    pub etp_local: bool,
    pub health_check_port: Option<u16>,
}

/// The Service's settings; None when it is not balanced (ExternalName, headless, IPv6-only)
/// or has an error that leaves nothing to build (reported in `errors`).
pub(super) fn service_settings<'a>(
    service: &'a Service,
    ctx: &BuildContext,
    errors: &mut Vec<ConfigError>,
) -> Option<ServiceSettings<'a>> {
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let Some(name) = service.metadata.name.as_deref() else {
        errors.push(err(
            format!("Service {namespace}/<unnamed>"),
            "metadata.name",
            "missing",
        ));
        return None;
    };
    let service_name = format!("{namespace}/{name}");
    let object = format!("Service {service_name}");
    let Some(spec) = service.spec.as_ref() else {
        errors.push(err(&object, "spec", "missing"));
        return None;
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match service_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        // No proxying for ExternalName services; kube-proxy ignores them too.
        "ExternalName" => return None,
        other => {
            errors.push(err(
                &object,
                "spec.type",
                format!("{other:?} is not a Service type"),
            ));
            return None;
        }
    }
    // Dual-stack: the Service's IPv4 side is ours; an IPv6-only Service is not.
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if !families.is_empty() && !families.iter().any(|f| f == "IPv4") {
        return None;
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
        Some("None") => return None,
        // A user's own manifest (an API server would allocate one): no ClusterIP frontend;
        // NodePorts, externalIPs and LoadBalancer IPs still work.
        None | Some("") => None,
        Some(ip) => match parse_ipv4(ip, &object, "spec.clusterIP") {
            Ok(a) => Some(a),
            Err(e) => {
                errors.push(e);
                return None;
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
    let health_check_port = match spec.health_check_node_port {
        Some(p) if etp_local => match parse_port(p, &object, "spec.healthCheckNodePort") {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        _ => None,
    };
    Some(ServiceSettings {
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
    })
}
