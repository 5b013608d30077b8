//! A service without ready endpoints: TCP gets a RST back out of the interface it came in on
//! and UDP an ICMP port unreachable (the client fails at once, as with kube-proxy's REJECT,
//! instead of retrying into a void); anything odd is dropped.

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    icmp,
    packet::{Packet, ptr_at},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn no_endpoint<P: Packet>(ctx: &P, flow: &Flow) -> Result<u32, ()> {
    if flow.proto == IPPROTO_UDP && !flow.later_fragment {
        return icmp::reply_error(ctx, flow, icmp::DEST_UNREACH, icmp::PORT_UNREACH, 0);
    }
    if flow.proto != IPPROTO_TCP
        || flow.later_fragment
        || flow.tcp_flags & TCP_RST != 0
        || flow.l4 != flow.l3 + 20
    {
        return Ok(P::DROP);
    }
    const IP: usize = EthHdr::LEN;
    const TCP: usize = EthHdr::LEN + Ipv4Hdr::LEN;
    const LEN: usize = TCP + 20;
    let old: *const [u8; LEN] = ptr_at(ctx, 0)?;
    let old = unsafe { &*old };
    let tot_len = u16::from_be_bytes([old[IP + 2], old[IP + 3]]) as u32;
    let doff = ((old[TCP + 12] >> 4) as u32) * 4;
    if doff < 20 || tot_len < 20 + doff {
        return Ok(P::DROP);
    }
    let tcp_flags = flow.tcp_flags;
    let seq = u32::from_be_bytes([old[TCP + 4], old[TCP + 5], old[TCP + 6], old[TCP + 7]]);
    let ack = u32::from_be_bytes([old[TCP + 8], old[TCP + 9], old[TCP + 10], old[TCP + 11]]);
    // RFC 793: answer an ACK with <SEQ=SEG.ACK><RST>, anything else with
    // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK> (SYN and FIN count one each).
    let (new_seq, new_ack, new_flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = tot_len - 20 - doff
            + (tcp_flags & TCP_SYN != 0) as u32
            + (tcp_flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&old[..12]);
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&old[IP + 12..IP + 20]);
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&old[TCP..TCP + 4]);

    if ctx.resize(LEN).is_err() {
        return Ok(P::DROP);
    }
    let p: *mut [u8; LEN] = ptr_at(ctx, 0)?;
    let p = unsafe { &mut *p };
    let (to, from) = (&addrs[..4], &addrs[4..8]);
    reply_headers(
        &mut p[..TCP],
        &macs,
        (from, to),
        (0, 0x4000),
        IPPROTO_TCP,
        40,
    );
    p[TCP..TCP + 2].copy_from_slice(&ports[2..4]);
    p[TCP + 2..TCP + 4].copy_from_slice(&ports[..2]);
    p[TCP + 4..TCP + 8].copy_from_slice(&new_seq.to_be_bytes());
    p[TCP + 8..TCP + 12].copy_from_slice(&new_ack.to_be_bytes());
    p[TCP + 12] = 5 << 4;
    p[TCP + 13] = new_flags;
    for b in &mut p[TCP + 14..TCP + 20] {
        *b = 0; // window, checksum, urgent pointer
    }
    // Pseudo-header: addresses, protocol, TCP length 20.
    let pseudo = sum_words(&p[IP + 12..IP + 20], IPPROTO_TCP as u32 + 20);
    let tcp_sum = sum_words(&p[TCP..TCP + 20], pseudo);
    p[TCP + 16..TCP + 18].copy_from_slice(&fold(tcp_sum).to_be_bytes());
    ctx.checksum_complete();
    Ok(ctx.send(ctx.ifindex()))
}

/// Writes the Ethernet and IPv4 headers (`p`: 34 bytes) of a packet the node sends back to
/// whoever sent the frame whose MACs were `macs` (destination, source): MACs swapped, `from` →
/// `to`, TOS and flags/fragment word as given, TTL 64, header checksum computed. The IP id is
/// left as the frame had it.
#[inline(always)]
pub fn reply_headers(
    p: &mut [u8],
    macs: &[u8; 12],
    (from, to): (&[u8], &[u8]),
    (tos, frags): (u8, u16),
    proto: u8,
    total_len: u16,
) {
    const IP: usize = EthHdr::LEN;
    p[..6].copy_from_slice(&macs[6..12]);
    p[6..12].copy_from_slice(&macs[..6]);
    p[12] = 0x08;
    p[13] = 0x00;
    p[IP] = 0x45;
    p[IP + 1] = tos;
    p[IP + 2..IP + 4].copy_from_slice(&total_len.to_be_bytes());
    p[IP + 6..IP + 8].copy_from_slice(&frags.to_be_bytes());
    p[IP + 8] = 64;
    p[IP + 9] = proto;
    p[IP + 10] = 0;
    p[IP + 11] = 0;
    p[IP + 12..IP + 16].copy_from_slice(from);
    p[IP + 16..IP + 20].copy_from_slice(to);
    let sum = sum_words(&p[IP..IP + 20], 0);
    p[IP + 10..IP + 12].copy_from_slice(&fold(sum).to_be_bytes());
}

/// Adds big-endian 16-bit words of `bytes` (even length) to `sum`.
#[inline(always)]
pub fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// One's-complement fold of a 32-bit sum into the 16-bit checksum.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
