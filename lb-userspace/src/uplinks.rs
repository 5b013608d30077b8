//! Uplinks and SNAT settings: which attached interfaces lead to the rest of the cluster (traffic
//! arriving there is external; a backend reached through one is elsewhere, so its flows are
//! SNATed to the uplink's address), and the checks of `--snat-port-range`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Result, bail};

use crate::{l2::Interface, nodeports::NodePortRange};

/// Attached interfaces that are uplinks, by ifindex, with the address flows leaving by them are
/// SNATed to. With `--node-ip` (`node_ips`): the interfaces holding one (that address). Without:
/// the interfaces the default route leaves by (their first address), as Cilium picks its native
/// devices. An interface without an IPv4 address cannot SNAT and is left out.
pub fn uplinks(
    interfaces: &[Interface],
    node_ips: Option<&[Ipv4Addr]>,
    default_route: &[String],
) -> BTreeMap<u32, Ipv4Addr> {
    interfaces
        .iter()
        .filter_map(|i| {
            let addr = match node_ips {
                Some(ips) => i.ipv4.iter().find(|a| ips.contains(a)).copied(),
                None if default_route.contains(&i.name) => i.ipv4.first().copied(),
                None => None,
            }?;
            Some((i.index, addr))
        })
        .collect()
}

/// Interfaces holding a default route in this network namespace (from /proc/net/route).
pub fn default_route_interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_default_routes(&t))
        .unwrap_or_default()
}

fn parse_default_routes(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask …
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect()
}

/// `--snat-port-range` must stay clear of the ports the node's own sockets pick
/// (net.ipv4.ip_local_port_range, less net.ipv4.ip_local_reserved_ports): a local socket and a
/// SNATed flow holding the same tuple would take each other's replies.
pub fn check_port_range(range: NodePortRange, local: (u16, u16), reserved: &str) -> Result<()> {
    let reserved = parse_port_list(reserved);
    let clash = (range.first.max(local.0)..=range.last.min(local.1))
        .find(|p| !reserved.iter().any(|(a, b)| (a..=b).contains(&p)));
    if let Some(port) = clash {
        bail!(
            "--snat-port-range {}-{} overlaps the node's ephemeral ports \
             (net.ipv4.ip_local_port_range {} {}; port {port} is not in ip_local_reserved_ports): \
             choose a range outside it, or narrow ip_local_port_range or reserve the range",
            range.first,
            range.last,
            local.0,
            local.1
        );
    }
    Ok(())
}

/// The node's ip_local_port_range and ip_local_reserved_ports (this network namespace).
pub fn local_ports() -> Result<((u16, u16), String)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        bail!("cannot read net.ipv4.ip_local_port_range: {range:?}");
    };
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    Ok(((lo, hi), reserved))
}

/// "1000,2000-2010" → [(1000, 1000), (2000, 2010)].
fn parse_port_list(list: &str) -> Vec<(u16, u16)> {
    list.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, ipv4: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            index,
            mac: [2, 0, 0, 0, 0, index as u8],
            ipv4: ipv4.iter().map(|a| a.parse().unwrap()).collect(),
            up: true,
        }
    }

    #[test]
    fn uplinks_are_the_node_ip_interfaces_or_the_default_route() {
        let list = [
            iface("eth0", 2, &["10.9.0.11"]),
            iface("eth1", 3, &["10.1.0.11", "10.1.0.99"]),
            iface("p0", 4, &["10.2.1.1"]),
            iface("lxc1", 5, &[]),
        ];
        let ips = ["10.1.0.99".parse().unwrap()];
        assert_eq!(
            uplinks(&list, Some(&ips), &[]),
            BTreeMap::from([(3, "10.1.0.99".parse().unwrap())])
        );
        assert_eq!(
            uplinks(&list, None, &["eth0".to_string(), "lxc1".to_string()]),
            BTreeMap::from([(2, "10.9.0.11".parse().unwrap())])
        );
        assert!(uplinks(&list, None, &[]).is_empty());
    }

    #[test]
    fn default_routes_come_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100090A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth1\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_default_routes(table), ["eth0"]);
    }

    #[test]
    fn the_port_range_must_miss_the_ephemeral_ports() {
        let range = |a, b| NodePortRange { first: a, last: b };
        assert!(check_port_range(range(61000, 65535), (32768, 60999), "").is_ok());
        let e = check_port_range(range(60000, 65535), (32768, 60999), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port 60000") && e.contains("32768 60999"), "{e}");
        // Reserved ports are never picked by local sockets.
        assert!(check_port_range(range(50000, 65535), (32768, 60999), "50000-60999\n").is_ok());
        assert!(
            check_port_range(range(50000, 65535), (32768, 60999), "50000-59999,60999").is_err()
        );
    }
}
