//! Field values (protocols, addresses, CIDRs, ports) with errors naming object and field.

use super::*;

pub(super) fn parse_protocol(
    value: Option<&str>,
    object: &str,
    field: &str,
) -> Result<Protocol, ConfigError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(err(
            object,
            field,
            format!("protocol {other:?} not supported (TCP or UDP)"),
        )),
    }
}

pub(super) fn parse_ipv4(value: &str, object: &str, field: &str) -> Result<Ipv4Addr, ConfigError> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(err(
            object,
            field,
            format!("{value:?}: IPv6 is not supported yet"),
        )),
        Err(_) => Err(err(
            object,
            field,
            format!("{value:?} is not an IP address"),
        )),
    }
}

/// "10.0.0.0/8" → (10.0.0.0, 8), with the host bits cleared.
pub(super) fn parse_cidr(value: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = value.split_once('/').unwrap_or((value, "32"));
    let addr: Ipv4Addr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not an IPv4 CIDR"))?;
    let len: u8 = len
        .trim()
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{value:?}: prefix must be 0-32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

pub(super) fn parse_port(value: i32, object: &str, field: &str) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err(object, field, format!("{value} is not a port (1-65535)")))
}
