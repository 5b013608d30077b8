//! Which hooks each interface gets (`--attach auto|xdp|tc`) and why, and the record of it that
//! `lbctl interfaces` shows.
//!
//! XDP is only correct where the driver runs it natively, hands it complete checksums, and its
//! XDP_TX/REDIRECT frames are delivered. A veth fails all three with kernel defaults: its peer's
//! TX checksum offload leaves partial checksums that an XDP rewrite corrupts, and XDP frames sent
//! into it are dropped unless its peer has NAPI (an XDP program or GRO). So `auto` gives XDP
//! (with tc behind it for what XDP leaves untouched) to physical NICs, and tc alone to virtual
//! interfaces (veth, bridge, bond, VLAN, tunnels).

use std::{ffi::CString, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `--attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachMode {
    /// Per interface: XDP + tc on physical NICs whose driver runs XDP natively, tc elsewhere.
    Auto,
    /// XDP + tc on every interface, which must all run native XDP and take XDP frames (a lab
    /// whose veths were tuned for it: full checksums from senders, NAPI on every peer).
    Xdp,
    /// tc only.
    Tc,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            other => Err(format!("{other:?} is not one of auto, xdp, tc")),
        }
    }
}

/// The hooks an interface runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hooks {
    /// XDP first (the fast path), tc for what XDP leaves untouched.
    #[serde(rename = "xdp+tc")]
    XdpTc,
    Tc,
}

impl std::fmt::Display for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hooks::XdpTc => "xdp+tc",
            Hooks::Tc => "tc",
        })
    }
}

/// One attached interface, as `lbctl interfaces` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub interface: String,
    pub ifindex: u32,
    pub driver: String,
    pub hooks: Hooks,
    pub reason: String,
}

/// Where the agent hooked in, written to `--state-dir`/interfaces.json.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooked {
    /// The cgroup the socket hooks are attached to (None: socket balancing off).
    pub cgroup: Option<std::path::PathBuf>,
    pub interfaces: Vec<Attached>,
}

pub const INTERFACES_FILE: &str = "interfaces.json";

pub fn write_interfaces(dir: &Path, hooked: &Hooked) -> Result<()> {
    crate::state::write(dir, INTERFACES_FILE, hooked)
}

pub fn read_interfaces(dir: &Path) -> Result<Hooked> {
    crate::state::read(dir, INTERFACES_FILE)
}

/// Driver name and bus address of an interface (ethtool's GDRVINFO). Virtual interfaces have no
/// bus address.
pub fn driver_info(interface: &str) -> Result<(String, String)> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    let name = CString::new(interface)?;
    let bytes = name.as_bytes();
    anyhow::ensure!(bytes.len() < 16, "interface name {interface:?} is too long");
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed below; req points at live memory.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(rc == 0, "{interface}: ethtool driver info: {err}");
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok((text(&info.driver), text(&info.bus_info)))
}

/// What `mode` gives an interface with this driver, and why. `Auto` asks for XDP on physical
/// NICs; the caller falls back to tc when the driver refuses native XDP.
pub fn choose(mode: AttachMode, driver: &str, bus_info: &str) -> (Hooks, String) {
    match mode {
        AttachMode::Tc => (Hooks::Tc, "--attach tc".into()),
        AttachMode::Xdp => (
            Hooks::XdpTc,
            "--attach xdp: every interface is trusted to deliver full checksums and take XDP frames".into(),
        ),
        AttachMode::Auto if driver == "veth" => (
            Hooks::Tc,
            "veth: its peer's TX checksum offload leaves partial checksums, and XDP frames sent into it are dropped without NAPI on the peer".into(),
        ),
        AttachMode::Auto if bus_info.is_empty() || bus_info == "N/A" || bus_info == "tun" => (
            Hooks::Tc,
            format!("virtual interface ({driver}): no native XDP with full checksums"),
        ),
        AttachMode::Auto => (
            Hooks::XdpTc,
            format!("physical NIC ({driver}, {bus_info}): native XDP, tc behind it"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_tc_to_virtual_interfaces_and_xdp_to_nics() {
        assert_eq!(choose(AttachMode::Auto, "veth", "").0, Hooks::Tc);
        assert_eq!(choose(AttachMode::Auto, "bridge", "N/A").0, Hooks::Tc);
        assert_eq!(choose(AttachMode::Auto, "tun", "tun").0, Hooks::Tc);
        assert_eq!(
            choose(AttachMode::Auto, "mlx5_core", "0000:3b:00.0").0,
            Hooks::XdpTc
        );
        assert_eq!(
            choose(AttachMode::Tc, "mlx5_core", "0000:3b:00.0").0,
            Hooks::Tc
        );
        assert_eq!(choose(AttachMode::Xdp, "veth", "").0, Hooks::XdpTc);
        assert!(
            "sometimes"
                .parse::<AttachMode>()
                .unwrap_err()
                .contains("auto, xdp, tc")
        );
    }
}
