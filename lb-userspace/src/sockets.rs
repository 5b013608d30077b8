//! Sockets balanced at connect() to a backend that has since left. A connected UDP socket never
//! asks again (sendmsg on it runs no hook), so it would keep sending into the void (Cilium's most
//! reported socket-LB bug: cilium#12859, #27300, #48244). The agent destroys such sockets, as
//! `ss -K` does, with sock_diag SOCK_DESTROY: the application gets ECONNABORTED and reconnects,
//! which picks a live backend. Only sockets the hooks balanced (their cookie is in
//! LB_SOCK_REVNAT for that backend) are touched, in every network namespace of the node.
//! TCP is left alone: a connection to a gone backend ends by itself (RST or timeout).

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
};

use anyhow::{Context, Result, bail};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: DiagReq,
}

/// A UDP socket to destroy: its cookie and the backend it is connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub cookie: u64,
    pub backend: (Ipv4Addr, u16),
}

/// Destroys the connected UDP sockets in `targets` in every network namespace of the node
/// (found through /proc/*/ns/net). Returns how many were destroyed.
pub fn destroy_udp(targets: &BTreeSet<Target>) -> Result<usize> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut destroyed = 0;
    let mut errors = Vec::new();
    for path in network_namespaces()? {
        let targets = targets.clone();
        let result = std::thread::spawn(move || -> Result<usize> {
            let ns = fs::File::open(&path).with_context(|| path.clone())?;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            destroy_here(&targets)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sock_diag thread panicked"))?;
        match result {
            Ok(n) => destroyed += n,
            // A process (and its namespace) may be gone by now.
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if destroyed == 0 && !errors.is_empty() {
        bail!("destroying sockets: {}", errors.join("; "));
    }
    Ok(destroyed)
}

/// One /proc/PID/ns/net path per distinct network namespace.
fn network_namespaces() -> Result<Vec<String>> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let path = format!("/proc/{pid}/ns/net");
        if let Ok(meta) = fs::metadata(&path) {
            if seen.insert((meta.dev(), meta.ino())) {
                paths.push(path);
            }
        }
    }
    Ok(paths)
}

/// Dumps the UDP sockets of this thread's namespace and destroys the targets among them.
fn destroy_here(targets: &BTreeSet<Target>) -> Result<usize> {
    let wanted: HashSet<(u64, u32, [u8; 2])> = targets
        .iter()
        .map(|t| {
            (
                t.cookie,
                u32::from_ne_bytes(t.backend.0.octets()),
                t.backend.1.to_be_bytes(),
            )
        })
        .collect();
    let socket = Netlink::open()?;
    socket.send(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        DiagReq {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            ..Default::default()
        },
    )?;
    let mut matches = Vec::new();
    socket.receive(|kind, payload| {
        if kind != SOCK_DIAG_BY_FAMILY || payload.len() < size_of::<DiagMsg>() {
            return;
        }
        // SAFETY: length checked; DiagMsg is plain old data.
        let msg: DiagMsg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
        let cookie = u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32);
        if wanted.contains(&(cookie, msg.id.dst[0], msg.id.dport)) {
            matches.push(msg.id);
        }
    })?;
    let mut destroyed = 0;
    for id in matches {
        socket.send(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            DiagReq {
                family: libc::AF_INET as u8,
                protocol: libc::IPPROTO_UDP as u8,
                states: u32::MAX,
                id,
                ..Default::default()
            },
        )?;
        let mut result = Ok(());
        socket.receive(|kind, payload| {
            if kind == NLMSG_ERROR && payload.len() >= 4 {
                let code = i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                if code != 0 {
                    result = Err(std::io::Error::from_raw_os_error(-code));
                }
            }
        })?;
        match result {
            Ok(()) => destroyed += 1,
            // Closed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("SOCK_DESTROY"),
        }
    }
    Ok(destroyed)
}

struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            bail!("sock_diag socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is ours.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn send(&self, kind: u16, flags: u16, body: DiagReq) -> Result<()> {
        let request = Request {
            header: NlMsgHdr {
                len: size_of::<Request>() as u32,
                kind,
                flags,
                seq: 1,
                pid: 0,
            },
            body,
        };
        // SAFETY: sending the bytes of a repr(C) struct we own.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                (&request as *const Request).cast(),
                size_of::<Request>(),
                0,
            )
        };
        if n < 0 {
            bail!("sock_diag send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until NLMSG_DONE or an ack/error, calling `each(type, payload)`.
    fn receive(&self, mut each: impl FnMut(u16, &[u8])) -> Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into our buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                bail!("sock_diag recv: {}", std::io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= size_of::<NlMsgHdr>() {
                // SAFETY: length checked; NlMsgHdr is plain old data.
                let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
                let len = header.len as usize;
                if len < size_of::<NlMsgHdr>() || len > rest.len() {
                    bail!("sock_diag: malformed reply");
                }
                let payload = &rest[size_of::<NlMsgHdr>()..len];
                match header.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        each(header.kind, payload);
                        return Ok(());
                    }
                    kind => each(kind, payload),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}
