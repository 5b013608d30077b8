//! Loading the XDP program over pinned maps, attaching it with pinned links (so traffic keeps
//! flowing while the agent restarts), and removing it all on `--cleanup`.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{Config, MAGLEV_SPARE_BLOCKS, ServiceName, map_names};
use log::{info, warn};

use crate::{
    LB_EBPF,
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
    opts: Options,
}

impl Datapath {
    /// Loads the program; maps already pinned under `opts.bpffs` are reused (traffic state and
    /// conntrack survive an agent restart), after checking they have the sizes asked for.
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

        let program: &mut Xdp = ebpf.program_mut("lb").context("program lb")?.try_into()?;
        program
            .load()
            .context("loading XDP program lb (verifier)")?;
        Ok(Self {
            ebpf,
            opts: opts.clone(),
        })
    }

    /// Program `name` of the object, loaded on first use: the agent only runs `lb`; tests and
    /// benchmarks also run the empty `lb_pass` through BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading XDP program {name} (verifier)"))?;
        }
        Ok(program)
    }

    fn link_path(&self, interface: &str) -> PathBuf {
        self.opts.bpffs.join("links").join(interface)
    }

    /// Attaches to `interface` in native mode (generic if the driver has none), or atomically
    /// replaces the program of a link pinned by an earlier run.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        let path = self.link_path(interface);
        fs::create_dir_all(path.parent().expect("has parent"))?;
        let program: &mut Xdp = self
            .ebpf
            .program_mut("lb")
            .context("program lb")?
            .try_into()?;
        let id = if path.exists() {
            let fd_link = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?
                .unpin()?;
            program
                .attach_to_link(XdpLink::try_from(fd_link)?)
                .with_context(|| format!("replacing program on {interface}"))?
        } else {
            match program.attach(interface, XdpMode::Driver) {
                Ok(id) => id,
                Err(e) => {
                    warn!("{interface}: native XDP failed ({e}); using generic XDP");
                    program
                        .attach(interface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {interface}"))?
                }
            }
        };
        let link = program.take_link(id)?;
        FdLink::try_from(link)?
            .pin(&path)
            .with_context(|| format!("pinning link {}", path.display()))?;
        Ok(())
    }
}

/// Detaches every pinned link and removes every pinned map under `dir`.
pub fn cleanup(dir: &Path) -> Result<()> {
    let links = dir.join("links");
    if links.exists() {
        for entry in fs::read_dir(&links)? {
            let path = entry?.path();
            match PinnedLink::from_pin(&path) {
                // Dropping the unpinned link detaches the program.
                Ok(link) => drop(link.unpin()),
                Err(e) => warn!("{}: {e}", path.display()),
            }
            let _ = fs::remove_file(&path);
        }
        let _ = fs::remove_dir(&links);
    }
    for name in map_names::ALL {
        let path = dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
