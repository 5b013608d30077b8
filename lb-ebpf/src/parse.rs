//! Ethernet → IPv4 → TCP/UDP: what the packet is, read once, and where its fields are.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use lb_common::{FragmentKey, FragmentPorts, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    icmp::IPPROTO_ICMP,
    maps::LB_FRAGMENTS,
    packet::{Packet, ptr_at},
    reject::{fold, sum_words},
};

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
    /// TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
    pub ttl: u8,
    /// A later fragment of a datagram: no L4 header, ports from its first fragment. Only the
    /// addresses are translated.
    pub later_fragment: bool,
    /// DF: a packet too big for the way out is answered with "fragmentation needed".
    pub dont_fragment: bool,
    /// `lbctl trace`'s frame: decide as for any packet, write nothing.
    pub trace: bool,
}

/// What a frame is, as far as the load balancer cares.
pub enum Parsed {
    Arp,
    Flow(Flow),
    /// ICMP with its (outer) IPv4 header at this offset: maybe an error about a flow of ours.
    Icmp(usize),
    /// Anything else (other ethertypes, other protocols, later fragments whose first fragment
    /// was not seen): the kernel's.
    Other,
}

/// Does the IPv4 header of `ihl` bytes at `l3` sum to 0xffff?
#[inline(always)]
fn header_checksum_ok<P: Packet>(ctx: &P, l3: usize, ihl: usize) -> Result<bool, ()> {
    let fixed: *const [u8; Ipv4Hdr::LEN] = ptr_at(ctx, l3)?;
    let mut sum = sum_words(unsafe { &*fixed }, 0);
    if ihl > Ipv4Hdr::LEN {
        // Options: copied (a direct read of a variable length would fork the verifier's
        // states for the rest of the program); the bytes not copied stay 0 and add nothing.
        let mut options = [0u8; 40];
        ctx.load_bytes(l3 + Ipv4Hdr::LEN, &mut options, ihl - Ipv4Hdr::LEN)?;
        sum = sum_words(&options, sum);
    }
    Ok(fold(sum) == 0)
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
    // A packet cut short of its total length (or claiming less than its header) is the
    // kernel's to count and drop; it is never translated. Trailing padding is fine. A total
    // length of 0 is IPv4 BIG TCP's mark on a GSO packet over 64 KiB.
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as u64;
    let big_tcp = tot_len == 0 && ctx.len() > (l3 + 65_535) as u64;
    if !big_tcp && (tot_len < ihl as u64 || l3 as u64 + tot_len > ctx.len()) {
        return Ok(Parsed::Other);
    }
    let l4 = l3 + ihl;
    let proto = unsafe { (*ip).proto };
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    // The L4 header a first fragment must hold, inside the total length (not in a trailer).
    let l4_header = match proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        IPPROTO_ICMP => 8,
        _ => return Ok(Parsed::Other),
    };
    if !big_tcp && frags & 0x1fff == 0 && tot_len < (ihl + l4_header) as u64 {
        return Ok(Parsed::Other);
    }
    // A header whose checksum is wrong cannot be trusted, so it is not forwarded (RFC 1812
    // 5.2.2): the kernel drops and counts it (InCsumErrors).
    if !header_checksum_ok(ctx, l3, ihl)? {
        return Ok(Parsed::Other);
    }
    if proto == IPPROTO_ICMP && frags & 0x3fff == 0 {
        return Ok(Parsed::Icmp(l3));
    }
    if proto == IPPROTO_ICMP {
        return Ok(Parsed::Other);
    }
    let (src_addr, dst_addr) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    // Fragments: the first one carries the L4 header and records its ports for the later ones,
    // so every fragment of a datagram finds the same conntrack entry, hence the same backend.
    let fragment = FragmentKey {
        src_addr,
        dst_addr,
        id: u16::from_ne_bytes(unsafe { (*ip).id }),
        proto,
        _pad: 0,
    };
    if frags & 0x1fff != 0 {
        let Some(ports) = (unsafe { LB_FRAGMENTS.get(&fragment) }) else {
            return Ok(Parsed::Other);
        };
        return Ok(Parsed::Flow(Flow {
            l3,
            l4,
            proto,
            src_addr,
            dst_addr,
            src_port: ports.src_port,
            dst_port: ports.dst_port,
            tcp_flags: 0,
            ttl: unsafe { (*ip).ttl },
            later_fragment: true,
            dont_fragment: false,
            trace: ctx.tracing(),
        }));
    }
    let (src_port, dst_port, tcp_flags) = if proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
        // Flags live in the 14th byte of the TCP header (inside the bounds-checked header).
        let flags = unsafe { *(tcp as *const u8).add(13) };
        unsafe { ((*tcp).source, (*tcp).dest, flags) }
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, l4)?;
        unsafe { ((*udp).src, (*udp).dst, 0) }
    };
    let (src_port, dst_port) = (u16::from_ne_bytes(src_port), u16::from_ne_bytes(dst_port));
    let trace = ctx.tracing();
    if frags & 0x2000 != 0 && !trace {
        let ports = FragmentPorts { src_port, dst_port };
        let _ = LB_FRAGMENTS.insert(&fragment, &ports, 0);
    }
    Ok(Parsed::Flow(Flow {
        l3,
        l4,
        proto,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        tcp_flags,
        ttl: unsafe { (*ip).ttl },
        later_fragment: false,
        dont_fragment: frags & 0x4000 != 0,
        trace,
    }))
}
