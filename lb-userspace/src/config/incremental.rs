//! An EndpointSlice-only change rebuilds just its Services on top of the last desired state.

use super::*;

/// The Services ("namespace/name") whose EndpointSlices differ between `old` and `new`, when
/// nothing else does (documents the cache did not reparse are the same `Arc`s) and each of them
/// with a LoadBalancer allocation holds it as a hint (so it gets the same address alone);
/// None otherwise.
pub(super) fn endpoint_slice_change(
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
    let ptrs = |list: &[Arc<slice::Slice>]| -> HashSet<*const slice::Slice> {
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
        let service = slice.service_name.as_ref()?;
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
pub(super) fn rebuild_services(
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
                s.service_name
                    .as_deref()
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
    desired
        .health_checks
        .retain(|_, h| !affected.contains(&h.service));
    desired.health_checks.extend(rebuilt.health_checks);
    desired.local_nodes.retain(|s, _| !affected.contains(s));
    desired.local_nodes.extend(rebuilt.local_nodes);
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
