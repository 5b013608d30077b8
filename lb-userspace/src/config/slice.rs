//! An EndpointSlice as the agent keeps it between builds: only the fields the build reads.
//!
//! A k8s-openapi `Endpoint` is 352 bytes before any of its strings (targetRef, hints,
//! deprecatedTopology, hostname, zone, all inline `Option`s); at 10k Services × 10 endpoints the
//! parsed slices held by the file cache and the Kubernetes stores were 35 MB of the agent's
//! 87 MB heap. Objects are still parsed as the real type (so a manifest that works against an
//! API server works here, with the same errors), then reduced to this.

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};

#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub metadata: SliceMeta,
    /// The `kubernetes.io/service-name` label: its Service. (A label map costs a 544-byte
    /// B-tree node even for this one entry.)
    pub service_name: Option<String>,
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// The slice's name and namespace: the rest of its ObjectMeta (350 bytes inline, plus
/// managedFields, annotations, ownerReferences on a real cluster) is never read.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    /// The first address inline (nearly every endpoint has one), the rest after it: a
    /// `Vec<String>` of one costs two heap blocks an endpoint.
    pub first_address: Option<Address>,
    pub more_addresses: Box<[Address]>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<Box<str>>,
}

/// An endpoint address: IPv4, or the text as written (for the build to report).
#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    V4(std::net::Ipv4Addr),
    Other(Box<str>),
}

impl From<String> for Address {
    fn from(text: String) -> Self {
        match text.parse() {
            Ok(a) => Address::V4(a),
            Err(_) => Address::Other(text.into()),
        }
    }
}

impl SliceEndpoint {
    /// Every address, in the order written.
    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        self.first_address.iter().chain(self.more_addresses.iter())
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        let metadata = slice.metadata;
        let service_name = metadata
            .labels
            .and_then(|mut labels| labels.remove(super::SERVICE_NAME_LABEL));
        let mut endpoints: Vec<SliceEndpoint> = slice
            .endpoints
            .into_iter()
            .map(|e| {
                let mut addresses = e.addresses.into_iter().map(Address::from);
                SliceEndpoint {
                    first_address: addresses.next(),
                    more_addresses: addresses.collect(),
                    conditions: e.conditions,
                    node_name: e.node_name.map(String::into_boxed_str),
                }
            })
            .collect();
        // The collect reuses the k8s Vec's buffer (352 bytes an element): give the rest back.
        endpoints.shrink_to_fit();
        Slice {
            metadata: SliceMeta {
                name: metadata.name,
                namespace: metadata.namespace,
            },
            service_name,
            address_type: slice.address_type,
            ports: slice.ports,
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_build_reads() {
        let full: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {"a": "b"},
                "managedFields": [{"manager": "kube-controller-manager"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.1.2", "10.0.1.300", "10.0.1.3"], "conditions": {"ready": false, "serving": true, "terminating": true},
                "nodeName": "node-a", "zone": "z1", "hostname": "h",
                "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default"}}]
        }))
        .unwrap();
        let slice = Slice::from(full.clone());
        assert_eq!(slice.metadata.name, full.metadata.name);
        assert_eq!(slice.metadata.namespace, full.metadata.namespace);
        assert_eq!(slice.service_name.as_deref(), Some("web"));
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.ports, full.ports);
        let (e, f) = (&slice.endpoints[0], &full.endpoints[0]);
        let written: Vec<Address> = f.addresses.iter().cloned().map(Address::from).collect();
        assert_eq!(e.addresses().cloned().collect::<Vec<_>>(), written);
        assert_eq!(written[1], Address::Other("10.0.1.300".into()));
        assert_eq!(
            written[2],
            Address::V4(std::net::Ipv4Addr::new(10, 0, 1, 3))
        );
        assert_eq!(e.conditions, f.conditions);
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert!(
            std::mem::size_of::<SliceEndpoint>() * 4
                <= std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>()
        );
    }
}
