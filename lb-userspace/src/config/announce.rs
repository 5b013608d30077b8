//! Which addresses the L2 announcement policies select, and on which interfaces.

use super::*;

/// Every address to answer ARP for: LoadBalancer IPs and externalIPs of the Services each
/// policy selects (for externalTrafficPolicy Local, only while a ready endpoint runs here, as
/// MetalLB does).
pub(super) fn announcements(
    objects: &Objects,
    policies: &[(String, lbipam::L2PolicySpec)],
    lb_addrs: &HashMap<&str, &[Ipv4Addr]>,
    external_by_service: &BTreeMap<String, Vec<Ipv4Addr>>,
    local_policy: &BTreeSet<String>,
    local_ready: &BTreeSet<String>,
) -> BTreeMap<Ipv4Addr, Announcement> {
    let mut announcements: BTreeMap<Ipv4Addr, Announcement> = BTreeMap::new();
    for (policy, spec) in policies {
        for service in &objects.services {
            let (namespace, name) = service_identity(service);
            let service_name = format!("{namespace}/{name}");
            if !lbipam::selects(spec.service_selector.as_ref(), &service_labels(service)) {
                continue;
            }
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
                let a = announcements.entry(addr).or_insert_with(|| Announcement {
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
    announcements
}
