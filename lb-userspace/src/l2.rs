//! L2 announcements: which (interface, address) pairs the ARP responder answers for, keeping
//! the LB_ARP map in line with them, and gratuitous ARP when an address starts being announced.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{model::DesiredState, status::Announced};
use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, MapData};
use lb_common::{ArpEntry, ArpKey, ipv4_from_wire, ipv4_to_wire};
use pnet::{
    datalink::NetworkInterface,
    packet::{
        MutablePacket,
        arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket},
        ethernet::{EtherTypes, MutableEthernetPacket},
    },
    util::MacAddr,
};

/// An interface the agent is attached to.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub ipv4: Vec<Ipv4Addr>,
    /// Administratively up with carrier (IFF_UP and IFF_RUNNING).
    pub up: bool,
}

impl Interface {
    /// An Ethernet-like link (one with a MAC) as the agent keeps it.
    pub fn from_link(link: &NetworkInterface) -> Result<Self> {
        let mac = link
            .mac
            .with_context(|| format!("interface {} has no MAC address", link.name))?;
        Ok(Self {
            name: link.name.clone(),
            index: link.index,
            mac: mac.octets(),
            up: link.is_up() && link.is_running(),
            ipv4: link
                .ips
                .iter()
                .filter_map(|n| match n.ip() {
                    std::net::IpAddr::V4(a) => Some(a),
                    _ => None,
                })
                .collect(),
        })
    }
}

pub fn mac_string(mac: [u8; 6]) -> String {
    MacAddr::from(mac).to_string()
}

/// Keeps LB_ARP equal to the announcements of `desired` on `interfaces`, sends a gratuitous ARP
/// for every pair that is new, and remembers when each was last announced.
pub struct Announcer {
    interfaces: Vec<Interface>,
    /// Current pairs → (service, last GARP time).
    current: BTreeMap<ArpKey, (String, Option<u64>)>,
    /// Entries LB_ARP holds (`--max-announcements`).
    capacity: usize,
    /// One send-only packet socket, kept: a take-over of 10k addresses sends 10k gratuitous
    /// ARPs in milliseconds, not one socket setup each.
    socket: Option<GarpSocket>,
}

impl Announcer {
    /// Starts from what the map holds (an earlier run's entries count as announced).
    pub fn new(
        interfaces: Vec<Interface>,
        map: &HashMap<MapData, ArpKey, ArpEntry>,
        capacity: u32,
    ) -> Result<Self> {
        let mut current = BTreeMap::new();
        for item in map.iter() {
            let (k, _) = item?;
            current.insert(k, (String::new(), None));
        }
        Ok(Self {
            interfaces,
            current,
            capacity: capacity as usize,
            socket: None,
        })
    }

    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// The interfaces changed (one came, one went): the next [`Announcer::apply`] announces on
    /// the new set.
    pub fn set_interfaces(&mut self, interfaces: Vec<Interface>) {
        self.interfaces = interfaces;
    }

    /// Would every announcement of `desired` fit, on every up interface it matches (all of
    /// them this node's, as after a failover)? The agent asks before it programs anything, so a
    /// state whose announcements cannot fit is refused whole.
    pub fn check_fits(&self, desired: &DesiredState) -> Result<()> {
        self.check_count(self.wanted(desired).len())
    }

    fn check_count(&self, n: usize) -> Result<()> {
        if n > self.capacity {
            bail!(
                "{n} (interface, address) pairs to announce exceed the capacity of {} (--max-announcements)",
                self.capacity
            );
        }
        Ok(())
    }

    fn wanted(&self, desired: &DesiredState) -> BTreeMap<ArpKey, (String, [u8; 6])> {
        let mut want = BTreeMap::new();
        for (addr, a) in &desired.announcements {
            for i in self.interfaces.iter().filter(|i| i.up && a.on(&i.name)) {
                want.insert(
                    ArpKey {
                        ifindex: i.index,
                        addr: ipv4_to_wire(addr.octets()),
                    },
                    (a.service.clone(), i.mac),
                );
            }
        }
        want
    }

    /// Applies the announcements of `desired`; returns how many pairs were added and removed.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        map: &mut HashMap<MapData, ArpKey, ArpEntry>,
    ) -> Result<(usize, usize)> {
        let want = self.wanted(desired);
        // Checked before the first write: a set that does not fit changes nothing.
        self.check_count(want.len())?;
        let stale: Vec<ArpKey> = self
            .current
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in &stale {
            let _ = map.remove(k);
            self.current.remove(k);
        }
        let mut added = 0;
        for (k, (service, mac)) in want {
            let existing = map.get(&k, 0).ok();
            if existing.is_none_or(|e| e.mac != mac) {
                map.insert(
                    k,
                    ArpEntry {
                        mac,
                        _pad: [0; 2],
                        replies: 0,
                    },
                    0,
                )?;
            }
            let entry = self.current.entry(k).or_insert((String::new(), None));
            entry.0 = service;
            if entry.1.is_none() {
                added += 1;
                self.garp(&k);
            }
        }
        Ok((added, stale.len()))
    }

    /// Sends a gratuitous ARP for every announced pair (periodic refresh for switches).
    pub fn refresh(&mut self) {
        let keys: Vec<ArpKey> = self.current.keys().copied().collect();
        for k in keys {
            self.garp(&k);
        }
    }

    fn garp(&mut self, k: &ArpKey) {
        let Some(i) = self.interfaces.iter().find(|i| i.index == k.ifindex) else {
            return;
        };
        let addr = Ipv4Addr::from(ipv4_from_wire(k.addr));
        let socket = match self.socket.take() {
            Some(s) => Ok(s),
            None => GarpSocket::open(),
        };
        let sent = socket.and_then(|s| {
            let sent = s.send(i.index, i.mac, addr);
            self.socket = Some(s);
            sent
        });
        match sent {
            Ok(()) => {
                if let Some(e) = self.current.get_mut(k) {
                    e.1 = Some(now_unix());
                }
                log::info!(
                    "gratuitous ARP: {addr} is at {} on {}",
                    mac_string(i.mac),
                    i.name
                );
            }
            Err(e) => log::warn!("gratuitous ARP for {addr} on {}: {e:#}", i.name),
        }
    }

    pub fn announced(&self) -> Vec<Announced> {
        self.current
            .iter()
            .filter_map(|(k, (service, last))| {
                let i = self.interfaces.iter().find(|i| i.index == k.ifindex)?;
                Some(Announced {
                    address: Ipv4Addr::from(ipv4_from_wire(k.addr)),
                    interface: i.name.clone(),
                    mac: mac_string(i.mac),
                    service: service.clone(),
                    last_garp: *last,
                })
            })
            .collect()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A send-only packet socket (protocol 0: it receives nothing, so the datapath's packets are
/// never copied to it) for gratuitous ARP out of any interface.
pub struct GarpSocket(std::os::fd::OwnedFd);

impl GarpSocket {
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("packet socket for gratuitous ARP");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// A gratuitous ARP (a broadcast request with sender = target = `addr`) out of `ifindex`.
    pub fn send(&self, ifindex: u32, mac: [u8; 6], addr: Ipv4Addr) -> Result<()> {
        let frame = arp_request(mac, addr, addr);
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: frame and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("gratuitous ARP for {addr} out of ifindex {ifindex}"));
        }
        Ok(())
    }
}

/// The broadcast Ethernet frame of an ARP request from `mac` (`sender`) for `target`; with
/// sender = target, a gratuitous ARP.
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    {
        let mut eth = MutableEthernetPacket::new(&mut frame).expect("frame size");
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Arp);
        let mut arp = MutableArpPacket::new(eth.payload_mut()).expect("frame size");
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(ArpOperations::Request);
        arp.set_sender_hw_addr(MacAddr::from(mac));
        arp.set_sender_proto_addr(sender);
        arp.set_target_hw_addr(MacAddr::zero());
        arp.set_target_proto_addr(target);
    }
    frame
}
