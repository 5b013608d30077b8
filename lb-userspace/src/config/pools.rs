//! LoadBalancer IP pools, L2 announcement policies and the addresses Services ask for.

use super::*;

pub(super) fn validate_pools(objects: &Objects, errors: &mut Vec<ConfigError>) -> Vec<Pool> {
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

pub(super) fn validate_policies(
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
        if let Err(e) = lbipam::check_selector(p.spec.node_selector.as_ref()) {
            errors.push(err(&object, "spec.nodeSelector", e));
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
pub(super) fn lb_requests(objects: &Objects, errors: &mut Vec<ConfigError>) -> Vec<LbRequest> {
    let mut requests = Vec::new();
    for service in &objects.services {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() != Some("LoadBalancer")
            || service.metadata.name.is_none()
            || !lbipam::our_class(spec.load_balancer_class.as_deref())
        {
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
