//! The capabilities the agent needs, checked at start so a missing one is named instead of
//! surfacing as a bare EPERM from bpf() or netlink.

use anyhow::{Result, bail};

/// A capability the agent needs, and for what.
pub struct Need {
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

pub const BPF: Need = Need {
    bit: 39,
    name: "CAP_BPF",
    why: "load the programs and create, pin and update the maps",
};
pub const NET_ADMIN: Need = Need {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "attach XDP and tc programs, follow interfaces over rtnetlink",
};
pub const PERFMON: Need = Need {
    bit: 38,
    name: "CAP_PERFMON",
    why: "let the verifier check the programs in full (pointer arithmetic on packets and maps)",
};
pub const NET_RAW: Need = Need {
    bit: 13,
    name: "CAP_NET_RAW",
    why: "send gratuitous ARP for announced addresses",
};
pub const SYS_ADMIN: Need = Need {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    why: "socket balancing: attach to a cgroup and enter other network namespaces to destroy \
          UDP sockets of removed endpoints",
};

/// The effective capability set of this process (CapEff in /proc/self/status).
pub fn effective() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Result<u64> {
    let Some(hex) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
    else {
        bail!("no CapEff line in /proc/self/status");
    };
    Ok(u64::from_str_radix(hex, 16)?)
}

/// Fails naming every capability of `needs` missing from `effective`, and what it is for.
pub fn require(effective: u64, needs: &[&Need]) -> Result<()> {
    let missing: Vec<String> = needs
        .iter()
        .filter(|n| effective & (1 << n.bit) == 0)
        .map(|n| format!("{} (to {})", n.name, n.why))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; grant them (the DaemonSet's securityContext.capabilities.add \
             lists each with its reason)",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named_with_their_reason() {
        let status = "Name:\tlb-agent\nCapInh:\t0000000000000000\nCapEff:\t000000c000003000\n";
        let eff = parse_cap_eff(status).unwrap();
        assert!(require(eff, &[&BPF, &NET_ADMIN, &PERFMON, &NET_RAW]).is_ok());
        let e = require(eff, &[&BPF, &SYS_ADMIN]).unwrap_err().to_string();
        assert!(e.contains("CAP_SYS_ADMIN (to socket balancing"), "{e}");
        assert!(!e.contains("CAP_BPF"), "{e}");
        let e = require(eff & !(1 << 39), &[&BPF]).unwrap_err().to_string();
        assert!(e.contains("CAP_BPF (to load the programs"), "{e}");
    }
}
