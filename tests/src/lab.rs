//! The datapath without traffic generators: the real object loaded over its own pinned maps and
//! run with BPF_PROG_TEST_RUN inside a network namespace the lab makes itself.
//!
//! That namespace has two interfaces (veth, peers left dangling inside it) with permanent neighbour entries, so bpf_fib_lookup
//! resolves like on a node:
//! ```text
//! cl  10.0.0.254/24  (MAC 02:00:00:00:fe:01)  client 10.0.0.1 is 02:00:00:00:00:01
//! bk  10.255.255.254/8 (MAC 02:00:00:00:fe:02) each backend 10.x.y.z gets 02:00:0a:xx:yy:zz
//! ```
//! The calling thread enters the namespace for the lab's lifetime (test_run resolves the ingress
//! ifindex and the FIB in the caller's namespace) and returns to its own on drop, when the
//! namespace, maps and bpffs mount are removed.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    config,
    datapath::{self, Datapath, Options},
    maps::PinnedMaps,
    model::DesiredState,
    reconcile::Reconciler,
};
use pnet::util::MacAddr;

use crate::sh;

pub const CLIENT_IF: &str = "cl";
pub const BACKEND_IF: &str = "bk";
pub const CLIENT_IF_MAC: MacAddr = MacAddr(0x02, 0, 0, 0, 0xfe, 0x01);
pub const BACKEND_IF_MAC: MacAddr = MacAddr(0x02, 0, 0, 0, 0xfe, 0x02);
pub const CLIENT_MAC: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x01);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// The MAC the lab's neighbour table gives backend `addr`.
pub fn backend_mac(addr: Ipv4Addr) -> MacAddr {
    let o = addr.octets();
    MacAddr(0x02, 0, o[0], o[1], o[2], o[3])
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One BPF_PROG_TEST_RUN result.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub output: Vec<u8>,
}

pub struct XdpLab {
    pub ns: String,
    dir: PathBuf,
    home: fs::File,
    datapath: Option<Datapath>,
    pub maps: Option<PinnedMaps>,
    reconciler: Reconciler,
    pub client_ifindex: u32,
    pub backend_ifindex: u32,
}

impl XdpLab {
    /// Makes the namespace, enters it on this thread, and loads the datapath with `opts`
    /// (its bpffs field is replaced by the lab's own mount).
    pub fn new(mut opts: Options) -> Result<Self> {
        let ns = format!(
            "lbr{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("lb-lab-{ns}"));
        fs::create_dir_all(&dir)?;
        let home =
            fs::File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        // From here on Drop cleans up whatever was made.
        let mut lab = Self {
            ns,
            dir,
            home,
            datapath: None,
            maps: None,
            reconciler: Reconciler::new(opts.limits()?),
            client_ifindex: 0,
            backend_ifindex: 0,
        };
        let n = lab.ns.clone();
        sh(&format!("ip netns add {n}"))?;
        sh(&format!("ip -n {n} link set lo up"))?;
        sh(&format!(
            "ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1"
        ))?;
        // veth pairs whose peers stay in the namespace (this kernel has no dummy driver).
        for (name, mac) in [(CLIENT_IF, CLIENT_IF_MAC), (BACKEND_IF, BACKEND_IF_MAC)] {
            sh(&format!(
                "ip -n {n} link add {name} address {mac} type veth peer name {name}-peer"
            ))?;
            sh(&format!("ip -n {n} link set {name}-peer up"))?;
        }
        sh(&format!(
            "ip -n {n} addr add 10.0.0.254/24 dev {CLIENT_IF} && ip -n {n} link set {CLIENT_IF} up"
        ))?;
        sh(&format!(
            "ip -n {n} addr add 10.255.255.254/8 dev {BACKEND_IF} && ip -n {n} link set {BACKEND_IF} up"
        ))?;
        sh(&format!(
            "ip -n {n} neigh replace {CLIENT} lladdr {CLIENT_MAC} dev {CLIENT_IF} nud permanent"
        ))?;
        let file = fs::File::open(format!("/run/netns/{n}"))?;
        // SAFETY: setns on this thread only; Drop moves it back.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {n}: {}", std::io::Error::last_os_error());
        }
        lab.client_ifindex = ifindex(CLIENT_IF)?;
        lab.backend_ifindex = ifindex(BACKEND_IF)?;
        opts.bpffs = lab.dir.join("bpffs");
        lab.datapath = Some(Datapath::load(&opts)?);
        lab.maps = Some(PinnedMaps::open(&opts.bpffs, true)?);
        // Like `--attach xdp`: both lab interfaces take XDP frames.
        for ifindex in [lab.client_ifindex, lab.backend_ifindex] {
            lab.set_xdp_target(ifindex, true)?;
        }
        Ok(lab)
    }

    /// Makes the ARP responder answer for `addr` on `cl`, with `cl`'s MAC.
    pub fn announce(&mut self, addr: Ipv4Addr) -> Result<()> {
        let key = lb_common::ArpKey {
            ifindex: self.client_ifindex,
            addr: lb_common::ipv4_to_wire(addr.octets()),
        };
        let entry = lb_common::ArpEntry {
            mac: CLIENT_IF_MAC.octets(),
            _pad: [0; 2],
            replies: 0,
        };
        self.maps
            .as_mut()
            .expect("maps")
            .arp
            .insert(key, entry, 0)
            .context("LB_ARP")?;
        Ok(())
    }

    /// Applies a YAML config (Services + EndpointSlices) to the maps, as the agent would, and
    /// gives every backend address a neighbour entry on `bk`.
    pub fn apply_yaml(&mut self, yaml: &str) -> Result<()> {
        let (desired, _) = config::load_str(yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.apply(&desired)
    }

    /// Applies a desired state to the maps and gives every backend a neighbour entry on `bk`.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<()> {
        let mut addrs: Vec<Ipv4Addr> = desired
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.endpoint.addr))
            .collect();
        addrs.sort();
        addrs.dedup();
        for a in addrs {
            self.add_backend_neighbour(a)?;
        }
        self.apply_maps_only(desired)
    }

    /// Applies a desired state to the maps only (no neighbour entries): for benchmarks that
    /// program many backends and send no packets to them.
    pub fn apply_maps_only(&mut self, desired: &DesiredState) -> Result<()> {
        let maps = self.maps.as_mut().expect("maps");
        self.reconciler.apply(desired, maps)?;
        // As the agent does after an apply.
        let reconciler = &self.reconciler;
        maps.prune_affinity(|ids| reconciler.table_backends(ids))?;
        Ok(())
    }

    /// Lists `ifindex` in LB_XDP_TARGETS (or removes it): whether XDP may send frames there.
    pub fn set_xdp_target(&mut self, ifindex: u32, on: bool) -> Result<()> {
        let map =
            aya::maps::MapData::from_pin(self.bpffs().join(lb_common::map_names::XDP_TARGETS))?;
        let mut targets = aya::maps::DevMapHash::try_from(aya::maps::Map::from_map_data(map)?)?;
        if on {
            targets.insert(ifindex, ifindex, None, 0)?;
        } else {
            targets.remove(ifindex)?;
        }
        Ok(())
    }

    pub fn add_backend_neighbour(&self, addr: Ipv4Addr) -> Result<()> {
        sh(&format!(
            "ip -n {} neigh replace {addr} lladdr {} dev {BACKEND_IF} nud permanent",
            self.ns,
            backend_mac(addr)
        ))
    }

    /// Runs program `name` `repeat` times on `frame` as if it arrived on `ingress_ifindex`.
    fn test_run(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(Run, f64)> {
        let ctx = xdp_md(frame.len(), ingress_ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.datapath.as_mut().expect("datapath").program(name)?;
        let r = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        // The kernel reports the mean per repetition in whole nanoseconds.
        Ok((
            Run {
                verdict: r.return_value,
                output: out,
            },
            r.duration.as_nanos() as f64,
        ))
    }

    /// Runs the tc program `lb_tc` once on `frame` as if it arrived on `ingress_ifindex` (an skb
    /// whose checksum state is CHECKSUM_NONE: BPF_PROG_TEST_RUN cannot make a partial one).
    pub fn run_tc(&mut self, frame: &[u8], ingress_ifindex: u32) -> Result<Run> {
        let ctx = sk_buff(ingress_ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.datapath.as_mut().expect("datapath").classifier()?;
        let r = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Run {
            verdict: r.return_value,
            output: out,
        })
    }

    /// Runs program `name` once on `frame` as if it arrived on `ingress_ifindex`.
    pub fn run(&mut self, name: &str, frame: &[u8], ingress_ifindex: u32) -> Result<Run> {
        Ok(self.test_run(name, frame, ingress_ifindex, 1)?.0)
    }

    /// Attaches program `name` natively to `iface` in the lab namespace; returns a handle for
    /// [`XdpLab::detach`].
    pub fn attach(&mut self, name: &str, iface: &str) -> Result<aya::programs::xdp::XdpLinkId> {
        let program = self.datapath.as_mut().expect("datapath").program(name)?;
        Ok(program.attach(iface, aya::programs::XdpMode::Driver)?)
    }

    /// Attaches the tc program `lb_tc` (tcx ingress) to `iface` in the lab namespace.
    pub fn attach_tc(&mut self, iface: &str) -> Result<aya::programs::tc::SchedClassifierLinkId> {
        let program = self.datapath.as_mut().expect("datapath").classifier()?;
        Ok(program.attach(iface, aya::programs::TcAttachType::Ingress)?)
    }

    pub fn detach_tc(&mut self, link: aya::programs::tc::SchedClassifierLinkId) -> Result<()> {
        let program = self.datapath.as_mut().expect("datapath").classifier()?;
        Ok(program.detach(link)?)
    }

    pub fn detach(&mut self, name: &str, link: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let program = self.datapath.as_mut().expect("datapath").program(name)?;
        Ok(program.detach(link)?)
    }

    /// Sends `frame` `repeat` times through program `name` in BPF_PROG_TEST_RUN live-frames
    /// mode, as if received on `ingress_ifindex`: the program's verdicts really happen (XDP_TX
    /// transmits). Returns the wall time of the run.
    pub fn run_live(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<std::time::Duration> {
        let ctx = xdp_md(frame.len(), ingress_ifindex);
        let program = self.datapath.as_mut().expect("datapath").program(name)?;
        let start = std::time::Instant::now();
        program.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            attrs: aya::programs::TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })?;
        Ok(start.elapsed())
    }

    /// The lab's bpffs directory (pinned maps).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// Mean nanoseconds per run of program `name` on `frame`, over `repeat` runs in the kernel.
    pub fn time(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<f64> {
        Ok(self.test_run(name, frame, ingress_ifindex, repeat)?.1)
    }

    /// Like [`XdpLab::time`], but every repetition starts from `frame` again: `name` is
    /// `lb_replay` (the datapath) or `lb_replay_pass` (its floor), which first write the frame
    /// stored in LB_REPLAY back over the packet. Plain repetitions would run on the previous
    /// repetition's output (BPF_PROG_TEST_RUN reuses the buffer), so after one DNAT every later
    /// run would time a miss.
    /// With `new_flow`, every repetition also gets a new source address and port (a frame with a
    /// 20-byte IP header), so each one is a new flow; with `spread` above 1, its destination also
    /// moves over that many consecutive addresses from the frame's
    /// (see [`lb_common::ReplayFrame::spread`]).
    pub fn time_replayed(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
        new_flow: bool,
        spread: u32,
    ) -> Result<f64> {
        use lb_common::{REPLAY_MAX, ReplayFrame, map_names};
        anyhow::ensure!(
            frame.len() <= REPLAY_MAX,
            "replayed frame of {} bytes is longer than {REPLAY_MAX}",
            frame.len()
        );
        let mut data = [0u8; REPLAY_MAX];
        data[..frame.len()].copy_from_slice(frame);
        let map = aya::maps::MapData::from_pin(self.bpffs().join(map_names::REPLAY))?;
        let mut replay: aya::maps::Array<_, ReplayFrame> =
            aya::maps::Array::try_from(aya::maps::Map::from_map_data(map)?)?;
        // The flow counter goes on from the last run: new flows stay new across calls (and
        // trials), never meeting an earlier run's conntrack entry.
        let counter = replay.get(&0, 0).map_or(0, |r| r.counter);
        replay.set(
            0,
            ReplayFrame {
                len: frame.len() as u32,
                new_flow: new_flow as u32,
                counter,
                spread,
                data,
            },
            0,
        )?;
        let run = self.test_run(name, frame, ingress_ifindex, 1)?.0;
        anyhow::ensure!(
            run.verdict != 0,
            "{name} aborted: the replay frame did not fit the packet"
        );
        self.time(name, frame, ingress_ifindex, repeat)
    }

    pub fn maps(&self) -> &PinnedMaps {
        self.maps.as_ref().expect("maps")
    }

    /// Deletes every conntrack entry: benchmarks that time new flows start each trial from the
    /// same (empty) table. Returns how many there were.
    pub fn clear_conntrack(&mut self) -> Result<usize> {
        let conntrack = &mut self.maps.as_mut().expect("maps").conntrack;
        let keys: Vec<_> = conntrack.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            // An entry the LRU evicted meanwhile is gone already.
            let _ = conntrack.remove(k);
        }
        Ok(keys.len())
    }
}

/// struct xdp_md as BPF_PROG_TEST_RUN takes it: data 0, data_end = len, ingress ifindex.
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ingress_ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (i, f) in fields.iter().enumerate() {
        ctx[i * 4..i * 4 + 4].copy_from_slice(&f.to_ne_bytes());
    }
    ctx
}

/// struct __sk_buff as BPF_PROG_TEST_RUN takes it: only ingress_ifindex (offset 36) and
/// ifindex (40, the device the skb is on) set; the kernel rejects other non-zero fields.
fn sk_buff(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Index of interface `name` in this thread's namespace (the lab's, while a lab is alive).
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

impl Drop for XdpLab {
    fn drop(&mut self) {
        self.maps = None;
        self.datapath = None;
        // SAFETY: back to the namespace this thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let bpffs = self.dir.join("bpffs");
        if bpffs.exists() {
            let _ = datapath::cleanup(&bpffs);
            let _ = Command::new("umount").arg(&bpffs).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
