//! `lbctl trace`: one frame through this node's own attached programs with BPF_PROG_TEST_RUN,
//! against the live pinned maps, and why they decided what they did.
//!
//! The frame is marked with [`lb_common::TRACE_MAGIC`] (XDP: metadata before the frame; tc: the
//! skb's cb), which the programs honour by writing nothing: no conntrack, NAT, affinity,
//! fragment or next-hop entry, no counter. The verdict and the rewritten headers are the
//! programs'; the explanation (frontend, conntrack, source ranges, affinity, Maglev slot) is
//! read from the same maps, read-only, with the same flow hash, and checked against them.
//! As on the wire, XDP runs first and tc gets what XDP passes on untouched.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use lb_common::{
    AffinityKey, ArpKey, CtKey, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, TRACE_MAGIC, backend_state,
    frontend_flags, hash::flow_hash, ipv4_from_wire, ipv4_to_wire, port_to_wire,
};
use serde::Serialize;

use crate::{
    inspect,
    maps::{PinnedMaps, source_range_key},
};

/// What to send.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// A TCP segment (with `tcp_flags`) or a UDP datagram.
    Flow {
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        proto: u8,
        tcp_flags: u8,
    },
    /// "Who has `who_has`? Tell `from`", broadcast.
    Arp { who_has: Ipv4Addr, from: Ipv4Addr },
}

pub const TCP_SYN: u8 = 0x02;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The frame `probe` arrives as on an interface whose MAC is `mac`; every checksum full.
pub fn frame(probe: &Probe, mac: [u8; 6]) -> Vec<u8> {
    use pnet::{
        packet::{
            MutablePacket,
            ethernet::{EtherTypes, MutableEthernetPacket},
            ip::IpNextHeaderProtocol,
            ipv4::{self, Ipv4Flags, MutableIpv4Packet},
            tcp::{self, MutableTcpPacket},
            udp::{self, MutableUdpPacket},
        },
        util::MacAddr,
    };
    let (src, dst, proto, tcp_flags) = match *probe {
        Probe::Arp { who_has, from } => {
            return crate::l2::arp_request(CLIENT_MAC, from, who_has).to_vec();
        }
        Probe::Flow {
            src,
            dst,
            proto,
            tcp_flags,
        } => (src, dst, proto, tcp_flags),
    };
    let payload = b"lbctl trace";
    let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 } + payload.len();
    let mut f = vec![0u8; 14 + 20 + l4_len];
    let mut eth = MutableEthernetPacket::new(&mut f).expect("frame size");
    eth.set_destination(MacAddr::from(mac));
    eth.set_source(MacAddr::from(CLIENT_MAC));
    eth.set_ethertype(EtherTypes::Ipv4);
    let mut ip = MutableIpv4Packet::new(eth.payload_mut()).expect("frame size");
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length((20 + l4_len) as u16);
    ip.set_identification(0x7c3e);
    ip.set_flags(Ipv4Flags::DontFragment);
    ip.set_ttl(64);
    ip.set_next_level_protocol(IpNextHeaderProtocol(proto));
    ip.set_source(src.0);
    ip.set_destination(dst.0);
    if proto == IPPROTO_TCP {
        let mut t = MutableTcpPacket::new(ip.payload_mut()).expect("frame size");
        t.set_source(src.1);
        t.set_destination(dst.1);
        t.set_sequence(1);
        t.set_data_offset(5);
        t.set_flags(tcp_flags);
        t.set_window(0xfaf0);
        t.set_payload(payload);
        let c = tcp::ipv4_checksum(&t.to_immutable(), &src.0, &dst.0);
        t.set_checksum(c);
    } else {
        let mut u = MutableUdpPacket::new(ip.payload_mut()).expect("frame size");
        u.set_source(src.1);
        u.set_destination(dst.1);
        u.set_length(l4_len as u16);
        u.set_payload(payload);
        let c = udp::ipv4_checksum(&u.to_immutable(), &src.0, &dst.0);
        u.set_checksum(c);
    }
    let c = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(c);
    f
}

/// One program's run.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub hook: &'static str,
    pub program_id: u32,
    pub verdict: &'static str,
    /// The frame as the program left it (None: unchanged).
    pub output: Option<Headers>,
}

/// The headers of a frame, as lbctl shows them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Headers {
    pub src_mac: String,
    pub dst_mac: String,
    pub kind: String,
    pub src: String,
    pub dst: String,
    pub ttl: Option<u8>,
}

fn mac(b: &[u8]) -> String {
    crate::l2::mac_string([b[0], b[1], b[2], b[3], b[4], b[5]])
}

pub fn headers(f: &[u8]) -> Headers {
    let (src_mac, dst_mac) = (mac(&f[6..12]), mac(&f[0..6]));
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
        let op = if f[21] == 2 { "ARP reply" } else { "ARP" };
        return Headers {
            src_mac,
            dst_mac,
            kind: op.into(),
            src: format!("{} is at {}", addr(28), mac(&f[22..28])),
            dst: addr(38).to_string(),
            ttl: None,
        };
    }
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return Headers {
            src_mac,
            dst_mac,
            kind: "other".into(),
            src: String::new(),
            dst: String::new(),
            ttl: None,
        };
    }
    let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
    let port = |at: usize| {
        f.get(at..at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    let (kind, sport, dport) = match f[23] {
        IPPROTO_TCP => ("TCP", port(l4), port(l4 + 2)),
        IPPROTO_UDP => ("UDP", port(l4), port(l4 + 2)),
        1 => ("ICMP", 0, 0),
        _ => ("IPv4", 0, 0),
    };
    let with_port = |a: Ipv4Addr, p: u16| {
        if kind == "TCP" || kind == "UDP" {
            format!("{a}:{p}")
        } else {
            a.to_string()
        }
    };
    Headers {
        src_mac,
        dst_mac,
        kind: kind.into(),
        src: with_port(addr(26), sport),
        dst: with_port(addr(30), dport),
        ttl: Some(f[22]),
    }
}

/// Runs `frame` through the programs attached to `iface` (links pinned under `bpffs`), as it
/// would arrive there: XDP first, then tc when XDP passes it on untouched.
pub fn run(bpffs: &Path, iface: &str, frame: &[u8]) -> Result<Vec<Step>> {
    let ifindex = ifindex(iface)?;
    let mut steps = Vec::new();
    for hook in ["xdp", "tc"] {
        let link = bpffs.join("links").join(format!("{hook}-{iface}"));
        if !link.exists() {
            continue;
        }
        let program_id = sys::link_program(&link)?;
        let program = sys::program_fd(program_id)
            .with_context(|| format!("opening program {program_id} (lbctl trace needs root)"))?;
        let (verdict, output) = sys::test_run(&program, hook, frame, ifindex)
            .with_context(|| format!("BPF_PROG_TEST_RUN of the {hook} program {program_id}"))?;
        let name = verdict_name(hook, verdict);
        let changed = output != frame;
        steps.push(Step {
            hook,
            program_id,
            verdict: name,
            output: changed.then(|| headers(&output)),
        });
        // Only a frame XDP passes on unchanged reaches tc as it was.
        if !(hook == "xdp" && name == "pass" && !changed) {
            break;
        }
    }
    if steps.is_empty() {
        bail!("no program of ours is attached to {iface} (see lbctl interfaces)");
    }
    Ok(steps)
}

fn verdict_name(hook: &str, v: u32) -> &'static str {
    match (hook, v) {
        ("xdp", 0) => "aborted",
        ("xdp", 1) | ("tc", 2) => "drop",
        ("xdp", 2) | ("tc", 0) => "pass",
        ("xdp", 3) => "tx (back out of the arrival interface)",
        ("xdp", 4) | ("tc", 7) => "redirect",
        _ => "unknown",
    }
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!(
            "no interface {name} here (run lbctl trace in the node's network namespace): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(i)
}

pub fn interface_mac(name: &str) -> Result<[u8; 6]> {
    let path = format!("/sys/class/net/{name}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let b: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{path}: {text:?}"))?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("{path}: not a MAC: {text:?}"))
}

/// Why the datapath decides what it does for `probe`, read from the maps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Explanation {
    /// "conntrack" (an existing flow), "source ranges", "no endpoints", "affinity", "maglev",
    /// "announced" / "not announced" (ARP), or "not ours".
    pub decided_by: String,
    pub frontend: Option<String>,
    pub service: Option<String>,
    pub conntrack: Option<String>,
    pub source_ranges: Option<String>,
    pub affinity: Option<String>,
    pub maglev: Option<MaglevPick>,
    /// The backend a new flow goes to (or the flow's, on a conntrack hit).
    pub backend: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaglevPick {
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
    pub backend_id: u32,
}

pub fn explain(maps: &PinnedMaps, probe: &Probe, ifindex: u32) -> Result<Explanation> {
    let mut e = Explanation::default();
    let (src, dst, proto, tcp_flags) = match *probe {
        Probe::Arp { who_has, .. } => {
            let key = ArpKey {
                ifindex,
                addr: ipv4_to_wire(who_has.octets()),
            };
            e.decided_by = match maps.arp.get(&key, 0) {
                Ok(a) => format!("announced here as {}", crate::l2::mac_string(a.mac)),
                Err(_) => "not announced on this interface".into(),
            };
            return Ok(e);
        }
        Probe::Flow {
            src,
            dst,
            proto,
            tcp_flags,
        } => (src, dst, proto, tcp_flags),
    };
    let wire = |a: Ipv4Addr| ipv4_to_wire(a.octets());
    let ct_key = CtKey {
        src_addr: wire(src.0),
        dst_addr: wire(dst.0),
        src_port: port_to_wire(src.1),
        dst_port: port_to_wire(dst.1),
        proto,
        _pad: [0; 3],
    };
    if let Ok(c) = maps.conntrack.get(&ct_key, 0) {
        let backend = format!(
            "{}:{}",
            Ipv4Addr::from(ipv4_from_wire(c.nat_addr)),
            u16::from_be(c.nat_port)
        );
        e.conntrack = Some(if c.dir == lb_common::CT_DIR_FORWARD {
            format!("existing flow to {backend} (backend id {})", c.backend_id)
        } else {
            format!("reply of a flow to frontend {backend}")
        });
        let fresh_syn = tcp_flags & 0x12 == TCP_SYN;
        if !fresh_syn {
            e.decided_by = "conntrack".into();
            e.backend = Some(backend);
            return Ok(e);
        }
    }
    let key = FrontendKey::new(dst.0.octets(), dst.1, proto);
    let Ok(fe) = maps.frontends.get(&key, 0) else {
        e.decided_by = "not ours (no frontend, no flow): the kernel's".into();
        return Ok(e);
    };
    e.frontend = Some(inspect::frontend_name(&key));
    e.service = maps
        .service_names
        .get(&fe.service_id, 0)
        .ok()
        .map(|n| n.as_str().to_string());
    if fe.flags & frontend_flags::SOURCE_RANGES != 0 {
        let allowed = maps
            .source_ranges
            .get(&source_range_key(fe.service_id, (src.0, 32)), 0)
            .is_ok();
        e.source_ranges = Some(if allowed {
            format!("{} is in loadBalancerSourceRanges", src.0)
        } else {
            format!("{} is in none of loadBalancerSourceRanges: dropped", src.0)
        });
        if !allowed {
            e.decided_by = "source ranges".into();
            return Ok(e);
        }
    }
    if fe.backend_count == 0 {
        e.decided_by = "no endpoints (TCP: RST, UDP: port unreachable)".into();
        return Ok(e);
    }
    let now = monotonic_coarse_ns();
    if fe.flags & frontend_flags::AFFINITY != 0 {
        let k = AffinityKey {
            service_id: fe.service_id,
            client: wire(src.0),
        };
        match maps.affinity.get(&k, 0) {
            Ok(a)
                if now.saturating_sub(a.last_seen_ns)
                    < u64::from(fe.affinity_timeout_s) * 1_000_000_000
                    && maps
                        .backends
                        .get(&a.backend_id, 0)
                        .is_ok_and(|b| b.state == backend_state::ACTIVE) =>
            {
                e.affinity = Some(format!(
                    "client {} sticks to backend id {}",
                    src.0, a.backend_id
                ));
                e.decided_by = "affinity".into();
                e.backend = Some(inspect::backend_name(maps, a.backend_id)?);
                return Ok(e);
            }
            _ => e.affinity = Some(format!("no live affinity entry for {}", src.0)),
        }
    }
    let hash = flow_hash(
        wire(src.0),
        wire(dst.0),
        port_to_wire(src.1),
        port_to_wire(dst.1),
        proto,
    );
    let slot = hash % fe.maglev_size.max(1);
    let id = maps
        .maglev
        .read((fe.maglev_offset + slot) as usize, 1)?
        .first()
        .copied()
        .unwrap_or(0);
    e.maglev = Some(MaglevPick {
        hash,
        slot,
        table_size: fe.maglev_size,
        backend_id: id,
    });
    e.decided_by = "maglev".into();
    e.backend = Some(inspect::backend_name(maps, id)?);
    Ok(e)
}

/// CLOCK_MONOTONIC_COARSE, the datapath's clock (bpf_ktime_get_coarse_ns).
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The bpf(2) commands trace needs that aya keeps to its own program objects.
mod sys {
    use super::*;

    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
        // SAFETY: `attr` is the union member `cmd` reads and writes, sized as passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as u32,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// The program a pinned link runs.
    pub fn link_program(path: &Path) -> Result<u32> {
        let link = crate::maps::open_pinned_object(path)?;
        #[repr(C)]
        struct Info {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        // struct bpf_link_info: type, id, prog_id, then per-type data.
        let mut buf = [0u32; 32];
        let mut attr = Info {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&buf) as u32,
            info: buf.as_mut_ptr() as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .with_context(|| format!("link info of {}", path.display()))?;
        Ok(buf[2])
    }

    pub fn program_fd(id: u32) -> Result<OwnedFd> {
        #[repr(C)]
        struct GetId {
            id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let mut attr = GetId {
            id,
            next_id: 0,
            open_flags: 0,
        };
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
        // SAFETY: a new descriptor the kernel just returned.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// One run of `frame` as if received on `ifindex`, marked as a trace; the verdict and the
    /// frame as the program left it.
    pub fn test_run(
        program: &OwnedFd,
        hook: &str,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<(u32, Vec<u8>)> {
        #[repr(C)]
        #[derive(Default)]
        struct Test {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        let magic: Vec<u8> = TRACE_MAGIC.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let (data, ctx, meta) = if hook == "xdp" {
            // struct xdp_md: data (= the metadata's length), data_end, data_meta (0),
            // ingress_ifindex, rx_queue_index, egress_ifindex.
            let mut data = magic.clone();
            data.extend_from_slice(frame);
            let mut ctx = vec![0u8; 24];
            ctx[0..4].copy_from_slice(&(magic.len() as u32).to_ne_bytes());
            ctx[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            (data, ctx, magic.len())
        } else {
            // struct __sk_buff: cb[5] at 48, ingress_ifindex at 36, ifindex at 40.
            let mut ctx = vec![0u8; 192];
            ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
            ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            ctx[48..64].copy_from_slice(&magic);
            (frame.to_vec(), ctx, 0)
        };
        let mut out = vec![0u8; data.len() + 512];
        let mut attr = Test {
            prog_fd: program.as_raw_fd() as u32,
            data_size_in: data.len() as u32,
            data_size_out: out.len() as u32,
            data_in: data.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        out.truncate(attr.data_size_out as usize);
        // XDP hands the metadata back in front of the frame.
        let out = if meta > 0 && out.len() >= meta && out[..meta] == magic[..] {
            out[meta..].to_vec()
        } else {
            out
        };
        Ok((attr.retval, out))
    }
}
