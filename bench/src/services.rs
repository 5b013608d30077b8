//! The synthetic services the benchmarks program: one address plan shared by every benchmark
//! (and by the kube-proxy rulesets built for the same services), so all compare like with like.

use std::net::Ipv4Addr;

use lb_common::DEFAULT_CONNTRACK_SIZE;
use lb_userspace::{
    datapath::Options,
    model::{
        BackendCondition, BackendSpec, DesiredState, Endpoint, FrontendKind, FrontendSpec,
        Protocol, ServicePort,
    },
};

/// Lab options with these capacities (Maglev size 0: automatic), the default conntrack size,
/// and a bpffs the lab makes.
pub fn lab_options(maglev_size: u32, services: u32, frontends: u32, backends: u32) -> Options {
    Options {
        bpffs: Default::default(),
        maglev_size,
        maglev_capacity: 0,
        max_services: services,
        max_frontends: frontends,
        max_backends: backends,
        conntrack_size: DEFAULT_CONNTRACK_SIZE,
        sock_revnat_size: lb_common::DEFAULT_SOCK_REVNAT_SIZE,
        max_announcements: lb_common::DEFAULT_MAX_ANNOUNCEMENTS,
        ct_timeouts: lb_common::CtTimeouts::DEFAULT,
        nat: lb_common::NatConfig::DEFAULT,
        nat_size: lb_common::DEFAULT_NAT_SIZE,
    }
}

/// ClusterIP of service `i`: 10.96.0.1 + i.
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)
}

/// Endpoint `k` of service `i` when every service has `per` of its own: 10.128.0.1 + i·per + k.
pub fn endpoint(i: u32, k: u32, per: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + i * per + k)
}

/// A ready backend.
pub fn active(addr: Ipv4Addr, port: u16, proto: Protocol) -> BackendSpec {
    BackendSpec {
        endpoint: Endpoint { addr, port, proto },
        condition: BackendCondition::Active,
        weight: 1,
    }
}

/// A service port with one ClusterIP frontend and no policies.
pub fn clusterip(
    name: String,
    vip: Ipv4Addr,
    port: u16,
    proto: Protocol,
    mut backends: Vec<BackendSpec>,
) -> ServicePort {
    backends.sort();
    backends.dedup();
    ServicePort {
        name,
        frontends: vec![FrontendSpec {
            endpoint: Endpoint {
                addr: vip,
                port,
                proto,
            },
            kind: FrontendKind::ClusterIp,
        }],
        backends,
        affinity_timeout_s: 0,
        source_ranges: Vec::new(),
    }
}

/// `services` ClusterIP services (TCP 80), each with its own `per` backends.
pub fn state(services: u32, per: u32) -> DesiredState {
    state_proto(services, per, Protocol::Tcp)
}

/// As [`state`], for `proto` services.
pub fn state_proto(services: u32, per: u32, proto: Protocol) -> DesiredState {
    let mut desired = DesiredState::default();
    for i in 0..services {
        let backends = (0..per)
            .map(|k| active(endpoint(i, k, per), 8080, proto))
            .collect();
        let name = format!("bench/svc-{i}:http");
        desired
            .services
            .insert(name.clone(), clusterip(name, vip(i), 80, proto, backends));
    }
    desired
}
