//! Test frames built with pnet, with every checksum computed from scratch (never incrementally),
//! so comparing the datapath's output with a frame built here re-verifies its checksums.

use std::net::Ipv4Addr;

use pnet::{
    packet::{
        MutablePacket, Packet,
        ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket},
        ip::IpNextHeaderProtocols,
        ipv4::{self, Ipv4Packet, MutableIpv4Packet},
        tcp::{self, MutableTcpPacket, TcpPacket},
        udp::{self, MutableUdpPacket, UdpPacket},
    },
    util::MacAddr,
};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// One IPv4 TCP or UDP frame, described field by field.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    /// TCP sequence, acknowledgement (written only with ACK set) and window.
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// `zero_checksum`: send with UDP checksum 0 ("none"), as IPv4 allows.
    Udp {
        zero_checksum: bool,
    },
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { flags })
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp {
                zero_checksum: false,
            },
        )
    }

    fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4) -> Self {
        Self {
            src_mac: MacAddr::new(0x02, 0, 0, 0, 0, 0x01),
            dst_mac: MacAddr::new(0x02, 0, 0, 0, 0xfe, 0x01),
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            ttl: 64,
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            window: 64240,
            l4,
            payload: b"hello, service".to_vec(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4_len = match self.l4 {
            L4::Tcp { .. } => 20,
            L4::Udp { .. } => 8,
        } + self.payload.len();
        let ip_len = 20 + l4_len;
        let mut buf = vec![0u8; 14 + ip_len];
        {
            let mut eth = MutableEthernetPacket::new(&mut buf).expect("eth");
            eth.set_source(self.src_mac);
            eth.set_destination(self.dst_mac);
            eth.set_ethertype(EtherTypes::Ipv4);
        }
        let mut ip = MutableIpv4Packet::new(&mut buf[14..]).expect("ipv4");
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length(ip_len as u16);
        ip.set_identification(0x1234);
        ip.set_flags(ipv4::Ipv4Flags::DontFragment);
        ip.set_ttl(self.ttl);
        ip.set_source(self.src);
        ip.set_destination(self.dst);
        match self.l4 {
            L4::Tcp { flags } => {
                ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
                let mut t = MutableTcpPacket::new(ip.payload_mut()).expect("tcp");
                t.set_source(self.sport);
                t.set_destination(self.dport);
                t.set_sequence(self.seq);
                t.set_acknowledgement(if flags & TCP_ACK != 0 { self.ack } else { 0 });
                t.set_data_offset(5);
                t.set_flags(flags);
                t.set_window(self.window);
                t.set_payload(&self.payload);
                let c = tcp::ipv4_checksum(&t.to_immutable(), &self.src, &self.dst);
                t.set_checksum(c);
            }
            L4::Udp { zero_checksum } => {
                ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
                let mut u = MutableUdpPacket::new(ip.payload_mut()).expect("udp");
                u.set_source(self.sport);
                u.set_destination(self.dport);
                u.set_length(l4_len as u16);
                u.set_payload(&self.payload);
                let c = if zero_checksum {
                    0
                } else {
                    udp::ipv4_checksum(&u.to_immutable(), &self.src, &self.dst)
                };
                u.set_checksum(c);
            }
        }
        let c = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(c);
        buf
    }
}

/// Recomputes every checksum of an Ethernet/IPv4/TCP-or-UDP frame; an error names the first
/// wrong one. A UDP checksum of 0 means "none" and is accepted.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let eth = EthernetPacket::new(frame).ok_or("short Ethernet header")?;
    if eth.get_ethertype() != EtherTypes::Ipv4 {
        return Err("not IPv4".into());
    }
    let ip = Ipv4Packet::new(eth.payload()).ok_or("short IPv4 header")?;
    let want = ipv4::checksum(&ip);
    if ip.get_checksum() != want {
        return Err(format!(
            "IPv4 header checksum {:#06x}, should be {want:#06x}",
            ip.get_checksum()
        ));
    }
    let (src, dst) = (ip.get_source(), ip.get_destination());
    match ip.get_next_level_protocol() {
        IpNextHeaderProtocols::Tcp => {
            let t = TcpPacket::new(ip.payload()).ok_or("short TCP header")?;
            let want = tcp::ipv4_checksum(&t, &src, &dst);
            if t.get_checksum() != want {
                return Err(format!(
                    "TCP checksum {:#06x}, should be {want:#06x}",
                    t.get_checksum()
                ));
            }
        }
        IpNextHeaderProtocols::Udp => {
            let u = UdpPacket::new(ip.payload()).ok_or("short UDP header")?;
            let want = udp::ipv4_checksum(&u, &src, &dst);
            if u.get_checksum() != 0 && u.get_checksum() != want {
                return Err(format!(
                    "UDP checksum {:#06x}, should be {want:#06x}",
                    u.get_checksum()
                ));
            }
        }
        IpNextHeaderProtocols::Icmp => {
            let body = ip.payload();
            if body.len() < 8
                || pnet::packet::util::checksum(body, 1) != u16::from_be_bytes([body[2], body[3]])
            {
                return Err("ICMP checksum wrong".into());
            }
        }
        other => return Err(format!("unexpected protocol {other}")),
    }
    Ok(())
}

/// An ARP request ("who has `target`? tell `sender`") as a broadcast frame.
pub fn arp_request(sender_mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp(
        1,
        sender_mac,
        MacAddr::broadcast(),
        (sender_mac, sender),
        (MacAddr::zero(), target),
    )
}

/// The ARP reply "`ip` is at `mac`" to `requester`.
pub fn arp_reply(mac: MacAddr, ip: Ipv4Addr, requester: (MacAddr, Ipv4Addr)) -> Vec<u8> {
    arp(2, mac, requester.0, (mac, ip), requester)
}

/// Any Ethernet/IPv4 ARP frame: operation, Ethernet source and destination, sender and target.
pub fn arp(
    operation: u16,
    eth_src: MacAddr,
    eth_dst: MacAddr,
    sender: (MacAddr, Ipv4Addr),
    target: (MacAddr, Ipv4Addr),
) -> Vec<u8> {
    use pnet::packet::arp::{ArpHardwareTypes, ArpOperation, MutableArpPacket};
    let mut buf = vec![0u8; 14 + 28];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("eth");
        eth.set_source(eth_src);
        eth.set_destination(eth_dst);
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut buf[14..]).expect("arp");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperation::new(operation));
    arp.set_sender_hw_addr(sender.0);
    arp.set_sender_proto_addr(sender.1);
    arp.set_target_hw_addr(target.0);
    arp.set_target_proto_addr(target.1);
    buf
}

/// `frame` with the DSR option carrying `frontend` inserted after its 20-byte IPv4 header, as the
/// frontend node sends it (header length, total length and header checksum set).
pub fn with_dsr_option(frame: &[u8], (addr, port): (Ipv4Addr, u16)) -> Vec<u8> {
    let mut out = frame[..34].to_vec();
    out.extend_from_slice(&[lb_common::DSR_OPTION_TYPE, lb_common::DSR_OPTION_LEN as u8]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&addr.octets());
    out.extend_from_slice(&frame[34..]);
    let mut ip = MutableIpv4Packet::new(&mut out[14..]).expect("ipv4");
    ip.set_header_length(7);
    let total = ip.get_total_length() + lb_common::DSR_OPTION_LEN as u16;
    ip.set_total_length(total);
    ip.set_checksum(0);
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    out
}
