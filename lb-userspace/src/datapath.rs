//! Loading the node's programs over pinned maps, attaching them with pinned links (so traffic
//! keeps flowing while the agent restarts), and removing it all on `--cleanup`.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{Config, CtTimeouts, MAGLEV_SPARE_BLOCKS, NatConfig, ServiceName, map_names};
use log::{info, warn};

use crate::{
    LB_BENCH_EBPF, LB_EBPF,
    attach::{self, AttachMode, Attached, Hooks},
    l2::Interface,
    reconcile::{self, Limits},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Clone)]
pub struct Options {
    pub bpffs: PathBuf,
    /// Every service's Maglev table size, or 0 ("auto"): sized per service by its backends.
    pub maglev_size: u32,
    /// Slots of the flat Maglev array, or 0: [`Options::maglev_capacity`] derives it.
    pub maglev_capacity: u32,
    pub max_services: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
    /// Sockets whose reverse translation (getpeername, datagram sources) is remembered.
    pub sock_revnat_size: u32,
    /// (interface, address) pairs the ARP responder can answer for.
    pub max_announcements: u32,
    /// Conntrack lifetimes by state (a read-only global of the programs, set at load).
    pub ct_timeouts: CtTimeouts,
    /// SNAT ports and the hairpin address (a read-only global of the programs, set at load).
    pub nat: NatConfig,
    /// Flows SNATed at once (LB_NAT entries).
    pub nat_size: u32,
}

impl Options {
    /// Slots of the flat Maglev array: as given, else room for every service plus spares to
    /// write changed tables into — at a fixed M, one block each; with automatic sizes, 1024
    /// slots each (10 backends) plus four tables of the largest size.
    pub fn maglev_capacity(&self) -> Result<u32> {
        let block = 1u64 << reconcile::max_order(&self.limits_with(0));
        let wanted = match (self.maglev_capacity, self.maglev_size) {
            (0, 0) => (self.max_services as u64 + MAGLEV_SPARE_BLOCKS as u64) * 1024 + 4 * block,
            (0, m) => {
                (self.max_services as u64 + MAGLEV_SPARE_BLOCKS as u64)
                    * (m as u64).next_power_of_two()
            }
            (c, _) => c as u64,
        };
        // Whole blocks of the largest order.
        let slots = wanted.div_ceil(block) * block;
        u32::try_from(slots).ok().filter(|&s| s <= 1 << 28).with_context(|| {
            format!(
                "a Maglev array of {slots} slots is too large; lower --max-services or --maglev-capacity"
            )
        })
    }

    fn limits_with(&self, maglev_capacity: u32) -> Limits {
        Limits {
            maglev_size: self.maglev_size,
            maglev_capacity,
            max_services: self.max_services,
            max_frontends: self.max_frontends,
            max_backends: self.max_backends,
        }
    }

    pub fn limits(&self) -> Result<Limits> {
        Ok(self.limits_with(self.maglev_capacity()?))
    }

    /// Expected max_entries of every map we size at load time.
    fn sizes(&self) -> Result<Vec<(&'static str, u32)>> {
        let maglev = self.maglev_capacity()?;
        Ok(vec![
            (map_names::FRONTENDS, self.max_frontends),
            (map_names::BACKENDS, self.max_backends),
            (map_names::MAGLEV, maglev),
            (map_names::CONNTRACK, self.conntrack_size),
            (map_names::FRONTEND_STATS, self.max_frontends),
            (map_names::BACKEND_STATS, self.max_backends),
            (map_names::NEXTHOPS, self.max_backends),
            (map_names::SOCK_REVNAT, self.sock_revnat_size),
            (map_names::ARP, self.max_announcements),
            (map_names::NAT, self.nat_size),
            (map_names::SERVICE_NAMES, self.max_services),
        ])
    }
}

/// Makes sure `dir` is on a bpffs, mounting one there if needed (as Cilium does), so the agent
/// also works inside `ip netns exec`, which hides /sys/fs/bpf.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        bail!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    if st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf")?;
    // SAFETY: plain mount(2) with NUL-terminated strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        bail!(
            "{} is not on a bpffs and mounting one failed: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs at {}", dir.display());
    Ok(())
}

pub struct Datapath {
    ebpf: Ebpf,
    /// The benchmark object (`lb-bench`) over the same pinned maps, loaded on first use.
    bench: Option<Ebpf>,
    opts: Options,
}

/// Programs of the node's object.
pub const XDP_PROGRAM: &str = "lb";
pub const TC_PROGRAM: &str = "lb_tc";
/// Socket-level balancing (cgroup v2 sock_addr hooks).
pub const SOCK_PROGRAMS: [&str; 4] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
];

impl Datapath {
    /// Loads the node's programs; maps already pinned under `opts.bpffs` are reused (traffic
    /// state and conntrack survive an agent restart), after checking they have the sizes asked
    /// for.
    pub fn load(opts: &Options) -> Result<Self> {
        if opts.maglev_size != 0 {
            lb_common::maglev::validate_table_size(opts.maglev_size)
                .map_err(|e| anyhow::anyhow!("--maglev-table-size: {e}"))?;
        }
        ensure_bpffs(&opts.bpffs)?;
        let config_path = opts.bpffs.join(map_names::CONFIG);
        if config_path.exists() {
            let pinned: Array<_, Config> = Array::try_from(aya::maps::Map::from_map_data(
                MapData::from_pin(&config_path)?,
            )?)?;
            let was = pinned.get(&0, 0)?.maglev_size;
            if was != opts.maglev_size {
                let name = |m: u32| {
                    if m == 0 {
                        "auto".to_string()
                    } else {
                        m.to_string()
                    }
                };
                bail!(
                    "pinned maps were made with --maglev-table-size {} but this run asks for {}; \
                     start with the same size, or remove the old state with `lb-agent --cleanup`",
                    name(was),
                    name(opts.maglev_size)
                );
            }
        }
        for (name, expected) in opts.sizes()? {
            let path = opts.bpffs.join(name);
            if !path.exists() {
                continue;
            }
            let pinned = MapData::from_pin(&path)?.info()?.max_entries();
            if pinned != expected {
                bail!(
                    "pinned map {} has {pinned} entries but these options need {expected}; \
                     start with the options it was created with, or remove the old state with `lb-agent --cleanup`",
                    path.display()
                );
            }
        }
        let sizes = opts.sizes()?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&opts.bpffs);
        loader.override_global("CT_TIMEOUTS", &opts.ct_timeouts, true);
        loader.override_global("NAT_CONFIG", &opts.nat, true);
        for (name, size) in &sizes {
            if *name != map_names::SERVICE_NAMES {
                loader.map_max_entries(name, *size);
            }
        }
        let mut ebpf = loader.load(LB_EBPF).context("loading the eBPF object")?;

        let names_path = opts.bpffs.join(map_names::SERVICE_NAMES);
        if !names_path.exists() {
            HashMap::<MapData, u32, ServiceName>::create(opts.max_services, 0)?
                .pin(&names_path)
                .with_context(|| format!("pinning {}", names_path.display()))?;
        }
        let mut config: Array<_, Config> =
            Array::try_from(ebpf.map_mut(map_names::CONFIG).context("config map")?)?;
        config.set(
            0,
            Config {
                maglev_size: opts.maglev_size,
                maglev_capacity: opts.maglev_capacity()?,
            },
            0,
        )?;

        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("program lb")?
            .try_into()?;
        xdp.load().context("loading XDP program lb (verifier)")?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .context("program lb_tc")?
            .try_into()?;
        tc.load().context("loading tc program lb_tc (verifier)")?;
        for name in SOCK_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Self {
            ebpf,
            bench: None,
            opts: opts.clone(),
        })
    }

    /// XDP program `name`: `lb` from the node's object, or one of the benchmark object's
    /// (`lb_pass`, `lb_replay`, `lb_replay_pass`, `lb_gen`, `lb_sink`), which is loaded over
    /// the same pinned maps on first use. Tests and benchmarks run these with BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        let ebpf = if self.ebpf.program(name).is_some() {
            &mut self.ebpf
        } else {
            if self.bench.is_none() {
                let mut loader = EbpfLoader::new();
                loader.default_map_pin_directory(&self.opts.bpffs);
                loader.override_global("CT_TIMEOUTS", &self.opts.ct_timeouts, true);
                loader.override_global("NAT_CONFIG", &self.opts.nat, false);
                self.bench = Some(
                    loader
                        .load(LB_BENCH_EBPF)
                        .context("loading the benchmark object")?,
                );
            }
            self.bench.as_mut().expect("just loaded")
        };
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in either object"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading XDP program {name} (verifier)"))?;
        }
        Ok(program)
    }

    /// The tc program `lb_tc`, for BPF_PROG_TEST_RUN.
    pub fn classifier(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(TC_PROGRAM)
            .context("program lb_tc")?
            .try_into()?)
    }

    fn link_path(&self, hook: &str, interface: &str) -> PathBuf {
        self.opts
            .bpffs
            .join("links")
            .join(format!("{hook}-{interface}"))
    }

    /// Attaches to `interface` what `mode` gives it (see [`attach::choose`]), replacing the
    /// programs of links pinned by an earlier run atomically, and records whether XDP may send
    /// frames to it.
    pub fn attach(&mut self, interface: &Interface, mode: AttachMode) -> Result<Attached> {
        let name = interface.name.as_str();
        let (driver, bus_info) = attach::driver_info(name)?;
        let (mut hooks, mut reason) = attach::choose(mode, &driver, &bus_info);
        fs::create_dir_all(self.opts.bpffs.join("links"))?;
        // tc first: once XDP runs, tc must already be there to finish what XDP leaves.
        self.attach_tc(name)?;
        if hooks == Hooks::XdpTc {
            if let Err(e) = self.attach_xdp(name) {
                if mode == AttachMode::Xdp {
                    return Err(e.context(format!("--attach xdp: native XDP on {name}")));
                }
                hooks = Hooks::Tc;
                reason = format!("{reason}; but native XDP failed ({e:#}): tc only");
            }
        }
        let mut targets = self.xdp_targets()?;
        if hooks == Hooks::XdpTc {
            targets
                .insert(interface.index, interface.index, None, 0)
                .with_context(|| format!("{name}: adding to {}", map_names::XDP_TARGETS))?;
        } else {
            let _ = targets.remove(interface.index);
            // XDP left by an earlier run with another mode.
            detach_pinned(&self.link_path("xdp", name));
        }
        info!("{name}: {hooks} ({reason})");
        Ok(Attached {
            interface: name.to_string(),
            ifindex: interface.index,
            driver,
            hooks,
            reason,
        })
    }

    /// Forgets an interface that went away (or left the selection): its links are detached and
    /// unpinned, and XDP no longer sends frames to it.
    pub fn forget(&mut self, name: &str, ifindex: u32) -> Result<()> {
        for hook in ["xdp", "tc"] {
            detach_pinned(&self.link_path(hook, name));
        }
        let _ = self.xdp_targets()?.remove(ifindex);
        Ok(())
    }

    /// Detaches the pinned interface links of an earlier run for interfaces not in `keep`.
    pub fn forget_others(&mut self, keep: &[String]) -> Result<()> {
        let links = self.opts.bpffs.join("links");
        let Ok(entries) = fs::read_dir(&links) else {
            return Ok(());
        };
        for entry in entries {
            let path = entry?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(name) = file
                .strip_prefix("xdp-")
                .or_else(|| file.strip_prefix("tc-"))
            else {
                continue;
            };
            if !keep.iter().any(|k| k == name) {
                info!("{name}: no longer selected; detaching the link of an earlier run");
                detach_pinned(&path);
            }
        }
        Ok(())
    }

    /// Attaches the socket hooks to cgroup `dir` (every process in it and below is balanced at
    /// connect()/sendmsg()), or with None detaches those of an earlier run. A restart attaches
    /// the new programs first and only then drops the old links, so no connect() is missed.
    pub fn attach_cgroup(&mut self, dir: Option<&Path>) -> Result<()> {
        let links = self.opts.bpffs.join("links");
        fs::create_dir_all(&links)?;
        let cgroup = match dir {
            Some(dir) => {
                Some(fs::File::open(dir).with_context(|| format!("--cgroup {}", dir.display()))?)
            }
            None => None,
        };
        for name in SOCK_PROGRAMS {
            let path = links.join(format!("cgroup-{name}"));
            let old = PinnedLink::from_pin(&path).ok();
            let _ = fs::remove_file(&path);
            if let Some(cgroup) = &cgroup {
                let program: &mut CgroupSockAddr = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name}"))?
                    .try_into()?;
                let id = program
                    // A link attach takes no flags (BPF_F_ALLOW_MULTI is EINVAL there); links always stack.
                    .attach(cgroup, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to the cgroup"))?;
                FdLink::try_from(program.take_link(id)?)?
                    .pin(&path)
                    .with_context(|| format!("pinning link {}", path.display()))?;
            }
            if let Some(old) = old {
                // Dropping the unpinned link detaches the old program.
                drop(old.unpin());
            }
        }
        Ok(())
    }

    fn xdp_targets(&mut self) -> Result<DevMapHash<&mut MapData>> {
        Ok(DevMapHash::try_from(
            self.ebpf
                .map_mut(map_names::XDP_TARGETS)
                .context("map LB_XDP_TARGETS")?,
        )?)
    }

    fn attach_tc(&mut self, interface: &str) -> Result<()> {
        let path = self.link_path("tc", interface);
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_PROGRAM)
            .context("program lb_tc")?
            .try_into()?;
        attach_pinned(program, &path, interface)
    }

    fn attach_xdp(&mut self, interface: &str) -> Result<()> {
        let path = self.link_path("xdp", interface);
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("program lb")?
            .try_into()?;
        attach_pinned(program, &path, interface)
    }
}

/// A program attached to interfaces through pinned links.
trait InterfaceProgram {
    type Id;
    const HOOK: &'static str;
    /// Puts this program on a link pinned by an earlier run (atomically).
    fn replace(&mut self, link: FdLink) -> Result<Self::Id>;
    fn attach_new(&mut self, interface: &str) -> Result<Self::Id>;
    fn take(&mut self, id: Self::Id) -> Result<FdLink>;
}

impl InterfaceProgram for SchedClassifier {
    type Id = aya::programs::tc::SchedClassifierLinkId;
    const HOOK: &'static str = "tc (tcx ingress)";
    fn replace(&mut self, link: FdLink) -> Result<Self::Id> {
        Ok(self.attach_to_link(SchedClassifierLink::try_from(link)?)?)
    }
    fn attach_new(&mut self, interface: &str) -> Result<Self::Id> {
        Ok(self.attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?)
    }
    fn take(&mut self, id: Self::Id) -> Result<FdLink> {
        Ok(FdLink::try_from(self.take_link(id)?)?)
    }
}

impl InterfaceProgram for Xdp {
    type Id = aya::programs::xdp::XdpLinkId;
    const HOOK: &'static str = "native XDP";
    fn replace(&mut self, link: FdLink) -> Result<Self::Id> {
        Ok(self.attach_to_link(XdpLink::try_from(link)?)?)
    }
    fn attach_new(&mut self, interface: &str) -> Result<Self::Id> {
        Ok(self.attach(interface, XdpMode::Driver)?)
    }
    fn take(&mut self, id: Self::Id) -> Result<FdLink> {
        Ok(FdLink::try_from(self.take_link(id)?)?)
    }
}

/// Attaches `program` to `interface` through the link pinned at `path`: an earlier run's link
/// gets the new program atomically; a stale one (its interface was recreated under the same
/// name) is dropped and the program attached anew. The link is pinned again either way.
fn attach_pinned<P: InterfaceProgram>(program: &mut P, path: &Path, interface: &str) -> Result<()> {
    let replaced = match PinnedLink::from_pin(path) {
        Ok(pinned) => match program.replace(pinned.unpin()?) {
            Ok(id) => Some(id),
            Err(e) => {
                warn!(
                    "{interface}: pinned {} link is stale ({e:#}); attaching anew",
                    P::HOOK
                );
                None
            }
        },
        Err(_) => None,
    };
    let id = match replaced {
        Some(id) => id,
        None => {
            let _ = fs::remove_file(path);
            program
                .attach_new(interface)
                .with_context(|| format!("attaching {} to {interface}", P::HOOK))?
        }
    };
    program
        .take(id)?
        .pin(path)
        .with_context(|| format!("pinning link {}", path.display()))?;
    Ok(())
}

/// Detaches and forgets the link pinned at `path`, if any.
fn detach_pinned(path: &Path) {
    if let Ok(link) = PinnedLink::from_pin(path) {
        // Dropping the unpinned link detaches the program.
        drop(link.unpin());
    }
    let _ = fs::remove_file(path);
}

/// Detaches every pinned link and removes every pinned map under `dir`.
pub fn cleanup(dir: &Path) -> Result<()> {
    let links = dir.join("links");
    if links.exists() {
        for entry in fs::read_dir(&links)? {
            detach_pinned(&entry?.path());
        }
        let _ = fs::remove_dir(&links);
    }
    for name in map_names::ALL.iter().chain(&map_names::BENCH) {
        let path = dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The cgroup v2 mount of this mount namespace (the default `--cgroup`: every process on the node).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context(
            "no cgroup v2 mount found; give --cgroup DIR, or --cgroup none for no socket balancing",
        )
}
