//! Ethernet → IPv4 → TCP/UDP: what the packet is, read once, and where its fields are.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::packet::{Packet, ptr_at};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP or UDP packet over IPv4: its 5-tuple (addresses and ports as on the wire) and offsets.
pub struct Flow {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub proto: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    pub ttl: u8,
}

/// What a frame is, as far as the load balancer cares.
pub enum Parsed {
    Arp,
    Flow(Flow),
    /// Anything else (other ethertypes, fragments, other protocols, IP options we do not
    /// translate): the kernel's.
    Other,
}

/// Reads the Ethernet type, then the IPv4 and L4 headers. Err when a header is cut short.
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Result<Parsed, ()> {
    // Headers an skb may hold outside its linear part: Ethernet, IPv4 with options, TCP.
    ctx.pull(EthHdr::LEN + 60 + TcpHdr::LEN);
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type } as u16);
    if ether_type == ETH_P_ARP {
        return Ok(Parsed::Arp);
    }
    if ether_type != ETH_P_IP {
        return Ok(Parsed::Other);
    }
    let l3 = EthHdr::LEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    let vihl = unsafe { (*ip).vihl };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Ok(Parsed::Other);
    }
    // Fragments carry no (or only the first) L4 header; leave them to the kernel.
    if u16::from_be_bytes(unsafe { (*ip).frags }) & 0x3fff != 0 {
        return Ok(Parsed::Other);
    }
    let l4 = l3 + ihl;
    let proto = unsafe { (*ip).proto };
    let (src_port, dst_port, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
            // Flags live in the 14th byte of the TCP header (inside the bounds-checked header).
            let flags = unsafe { *(tcp as *const u8).add(13) };
            unsafe { ((*tcp).source, (*tcp).dest, flags) }
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4)?;
            unsafe { ((*udp).src, (*udp).dst, 0) }
        }
        _ => return Ok(Parsed::Other),
    };
    Ok(Parsed::Flow(Flow {
        l3,
        l4,
        proto,
        src_addr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        dst_addr: u32::from_ne_bytes(unsafe { (*ip).dst_addr }),
        src_port: u16::from_ne_bytes(src_port),
        dst_port: u16::from_ne_bytes(dst_port),
        tcp_flags,
        ttl: unsafe { (*ip).ttl },
    }))
}
