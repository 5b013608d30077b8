//! ARP requests for a set of addresses, sent round after round from a namespace the test made,
//! recording every reply: who answered, how many answered, and when.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use pnet::{
    datalink::{self, Channel},
    packet::{
        MutablePacket, Packet,
        arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket},
        ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket},
    },
    util::MacAddr,
};

/// One request and the replies it got.
#[derive(Debug, Clone)]
pub struct Round {
    pub at: Instant,
    pub addr: Ipv4Addr,
    /// MACs that replied (lower-case "aa:bb:…").
    pub macs: Vec<String>,
}

pub struct ArpProbe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Round>>,
}

impl ArpProbe {
    /// Asks for each of `addrs` in turn out of `iface` in `ns` (as `sender`), waiting `wait`
    /// for the replies of each request.
    pub fn start(
        ns: &str,
        iface: &str,
        sender: Ipv4Addr,
        addrs: Vec<Ipv4Addr>,
        wait: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, iface, stopped) = (ns.to_string(), iface.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            let path = format!("/var/run/netns/{ns}");
            let file = File::open(&path).expect("netns");
            // SAFETY: setns on this thread only.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let link = datalink::interfaces()
                .into_iter()
                .find(|i| i.name == iface)
                .expect("probe interface");
            let mac = link.mac.expect("probe interface MAC");
            let config = datalink::Config {
                read_timeout: Some(Duration::from_millis(2)),
                ..Default::default()
            };
            let Ok(Channel::Ethernet(mut tx, mut rx)) = datalink::channel(&link, config) else {
                panic!("no Ethernet channel on {iface}");
            };
            let mut rounds = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                for &addr in &addrs {
                    let frame = request(mac, sender, addr);
                    let at = Instant::now();
                    tx.send_to(&frame, None);
                    let mut macs = Vec::new();
                    while at.elapsed() < wait {
                        let Ok(data) = rx.next() else { continue };
                        if let Some(from) = reply_from(data, addr, sender) {
                            macs.push(from);
                        }
                    }
                    rounds.push(Round { at, addr, macs });
                }
            }
            rounds
        });
        ArpProbe { stop, handle }
    }

    pub fn finish(self) -> Vec<Round> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("ARP probe thread")
    }
}

fn request(mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    let mut eth = MutableEthernetPacket::new(&mut frame).expect("frame");
    eth.set_destination(MacAddr::broadcast());
    eth.set_source(mac);
    eth.set_ethertype(EtherTypes::Arp);
    let mut arp = MutableArpPacket::new(eth.payload_mut()).expect("frame");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(mac);
    arp.set_sender_proto_addr(sender);
    arp.set_target_hw_addr(MacAddr::zero());
    arp.set_target_proto_addr(target);
    frame
}

/// The replier's MAC if `data` is an ARP reply to `me` about `addr`.
fn reply_from(data: &[u8], addr: Ipv4Addr, me: Ipv4Addr) -> Option<String> {
    let eth = EthernetPacket::new(data)?;
    if eth.get_ethertype() != EtherTypes::Arp {
        return None;
    }
    let arp = ArpPacket::new(eth.payload())?;
    (arp.get_operation() == ArpOperations::Reply
        && arp.get_sender_proto_addr() == addr
        && arp.get_target_proto_addr() == me)
        .then(|| arp.get_sender_hw_addr().to_string().to_ascii_lowercase())
}
