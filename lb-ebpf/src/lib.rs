//! The load balancer's packet paths, shared by the node's object (`lb`: XDP and tc entry points)
//! and the benchmark object (`lb-bench`). One file per job:
//!
//! - [`lb`]: the path of a packet through a node interface, top to bottom;
//! - [`parse`]: Ethernet → IPv4 → TCP/UDP;
//! - [`conntrack`]: flows in both directions;
//! - [`service`]: frontend, policies, Maglev → backend;
//! - [`nat`]: DNAT / rev-NAT, next hop, send;
//! - [`snat`]: source NAT of external flows to backends elsewhere, and hairpin;
//! - [`dsr`]: direct server return, the other way for external flows to backends elsewhere;
//! - [`arp`]: the ARP responder;
//! - [`reject`]: answers for services without endpoints;
//! - [`icmp`]: ICMP errors sent (fragmentation needed, port unreachable) and translated back;
//! - [`sock`]: socket-level balancing for the node's own clients (cgroup hooks);
//! - [`packet`]: what XDP frames and tc skbs each do differently (checksums, sending);
//! - [`maps`]: every pinned map.
#![no_std]

pub mod arp;
pub mod conntrack;
pub mod dsr;
pub mod icmp;
pub mod lb;
pub mod maps;
pub mod nat;
pub mod packet;
pub mod parse;
pub mod reject;
pub mod service;
pub mod snat;
pub mod sock;
