//! One Service port: its backends (joined with the EndpointSlices by port name and protocol)
//! and its frontends of every kind.

use k8s_openapi::api::core::v1::{ServicePort as Port, ServiceSpec};

use super::*;

pub(super) type Backends = BTreeMap<Endpoint, BackendCondition>;

/// The port's endpoints (all, and those on this node), the more usable condition winning when
/// an address is in two slices.
#[allow(clippy::too_many_arguments)]
pub(super) fn port_backends(
    service_slices: &[SliceEndpoints],
    port: &Port,
    port_name: &str,
    proto: Protocol,
    target_port: Option<u16>,
    object: &str,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> (Backends, Backends) {
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
                    object,
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

    (backends, local_backends)
}

/// The addresses a port is served on besides NodePorts.
pub(super) struct PortAddresses<'a> {
    pub cluster_ip: Option<Ipv4Addr>,
    pub external_ips: &'a [Ipv4Addr],
    pub lb_ips: &'a [Ipv4Addr],
}

/// ClusterIP, externalIPs, LoadBalancer IPs and NodePorts (on every `--node-ip`) of a port.
#[allow(clippy::too_many_arguments)]
pub(super) fn port_frontends(
    addresses: &PortAddresses,
    service_name: &str,
    spec: &ServiceSpec,
    port: &Port,
    (number, proto): (u16, Protocol),
    node_ports: &BTreeMap<nodeports::PortId, u16>,
    ctx: &BuildContext,
    object: &str,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<FrontendSpec> {
    let mut frontends: Vec<FrontendSpec> = addresses
        .cluster_ip
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
    for &addr in addresses.external_ips {
        frontends.push(FrontendSpec {
            endpoint: Endpoint {
                addr,
                port: number,
                proto,
            },
            kind: FrontendKind::ExternalIp,
        });
    }
    for &addr in addresses.lb_ips {
        frontends.push(FrontendSpec {
            endpoint: Endpoint {
                addr,
                port: number,
                proto,
            },
            kind: FrontendKind::LoadBalancer,
        });
    }
    if spec.type_.as_deref().unwrap_or("ClusterIP") != "ClusterIP" {
        let allocated = node_ports
            .get(&node_port_id(service_name, port, proto))
            .map(|&p| i32::from(p));
        match port.node_port.or(allocated) {
            Some(node_port) => match parse_port(node_port, object, &format!("{field}.nodePort")) {
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
            },
            None if needs_node_port(spec) => errors.push(err(
                object,
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
    frontends
}
