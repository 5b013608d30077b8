//! EndpointSlices read per Service: ports, endpoints with their condition, and which nodes
//! have a ready endpoint.

use super::*;

/// One port of an EndpointSlice, normalised.
pub(super) struct SlicePort {
    pub name: String,
    pub port: Option<u16>,
    pub proto: Protocol,
}

/// Endpoint addresses of one slice with their condition.
pub(super) struct SliceEndpoints {
    pub ports: Vec<SlicePort>,
    /// (address, condition, on this node).
    pub endpoints: Vec<(Ipv4Addr, BackendCondition, bool)>,
}

/// The EndpointSlices grouped by "namespace/service", and the nodes with a ready endpoint of
/// each Service.
pub(super) type Slices<'a> = (
    HashMap<String, Vec<SliceEndpoints>>,
    HashMap<String, BTreeSet<&'a str>>,
);

pub(super) fn parse_slices<'a>(
    objects: &'a Objects,
    ctx: &BuildContext,
    errors: &mut Vec<ConfigError>,
) -> Slices<'a> {
    let mut slices: HashMap<String, Vec<SliceEndpoints>> = HashMap::new();
    let mut ready_nodes: HashMap<String, BTreeSet<&str>> = HashMap::new();
    for slice in &objects.endpoint_slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = slice.metadata.name.as_deref().unwrap_or("<unnamed>");
        let object = format!("EndpointSlice {namespace}/{name}");
        if slice.metadata.name.is_none() {
            errors.push(err(&object, "metadata.name", "missing"));
            continue;
        }
        let Some(service) = &slice.service_name else {
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
            let local = ctx.node_name.is_some()
                && endpoint.node_name.as_deref() == ctx.node_name.as_deref();
            if let (BackendCondition::Active, Some(node)) =
                (condition, endpoint.node_name.as_deref())
            {
                ready_nodes
                    .entry(format!("{namespace}/{service}"))
                    .or_default()
                    .insert(node);
            }
            for (j, address) in endpoint.addresses().enumerate() {
                // The field name is only formatted for an error (100k addresses in a big file).
                match address {
                    slice::Address::V4(a) => parsed.endpoints.push((*a, condition, local)),
                    slice::Address::Other(text) => {
                        match parse_ipv4(text, &object, &format!("endpoints[{i}].addresses[{j}]")) {
                            Ok(a) => parsed.endpoints.push((a, condition, local)),
                            Err(e) => errors.push(e),
                        }
                    }
                }
            }
        }
        slices
            .entry(format!("{namespace}/{service}"))
            .or_default()
            .push(parsed);
    }

    (slices, ready_nodes)
}
