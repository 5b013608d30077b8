//! Which interfaces the agent balances on (`--interface NAME`, `--interface-regex RE`), and word
//! from the kernel (rtnetlink link and address events, no polling) whenever that may have
//! changed: pods' veths come and go, an uplink is recreated.

use anyhow::{Context, Result};
use futures_util::StreamExt;
use regex::Regex;
use rtnetlink::{MulticastGroup, new_multicast_connection};

use crate::l2::Interface;

/// `--interface` names and `--interface-regex`.
#[derive(Debug, Clone)]
pub struct Selector {
    names: Vec<String>,
    regex: Option<Regex>,
}

impl Selector {
    pub fn new(names: Vec<String>, regex: Option<&str>) -> Result<Self> {
        let regex = regex
            .map(|r| Regex::new(r).with_context(|| format!("--interface-regex {r:?}")))
            .transpose()?;
        anyhow::ensure!(
            !names.is_empty() || regex.is_some(),
            "give --interface NAME (repeatable) or --interface-regex RE"
        );
        Ok(Self { names, regex })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
            || self.regex.as_ref().is_some_and(|r| r.is_match(name))
    }

    /// Named interfaces that do not exist (yet).
    pub fn missing(&self, present: &[Interface]) -> Vec<String> {
        self.names
            .iter()
            .filter(|n| !present.iter().any(|i| &i.name == *n))
            .cloned()
            .collect()
    }

    /// The matching interfaces that exist now (with a MAC: Ethernet-like), by name, from one
    /// dump of the links.
    pub fn present(&self) -> Vec<Interface> {
        let mut found: Vec<Interface> = pnet::datalink::interfaces()
            .iter()
            .filter(|i| self.matches(&i.name))
            .filter_map(|i| Interface::from_link(i).ok())
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found
    }
}

/// Link and IPv4 address events of this network namespace.
pub struct Changes {
    messages: futures_util::stream::BoxStream<'static, ()>,
}

impl Changes {
    /// Subscribes; must be called inside the tokio runtime (it spawns the netlink connection).
    pub fn watch() -> Result<Self> {
        let (connection, _handle, messages) =
            new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
                .context("subscribing to rtnetlink link and address events")?;
        tokio::spawn(connection);
        Ok(Self {
            messages: messages.map(|_| ()).boxed(),
        })
    }

    /// Waits for the next event, then takes whatever else is already queued (one burst, one
    /// resync). None when the netlink connection ended.
    pub async fn next(&mut self) -> Option<()> {
        self.messages.next().await?;
        while let Some(Some(())) = futures_util::FutureExt::now_or_never(self.messages.next()) {}
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_regex_select_interfaces() {
        let s = Selector::new(vec!["eth0".into()], Some("^(veth|lxc)")).unwrap();
        assert!(s.matches("eth0"));
        assert!(s.matches("veth12ab"));
        assert!(s.matches("lxc0"));
        assert!(!s.matches("eth1"));
        assert!(!s.matches("myveth"));
        assert!(Selector::new(vec![], None).is_err());
        let e = Selector::new(vec![], Some("(")).unwrap_err();
        assert!(format!("{e:#}").contains("--interface-regex"), "{e:#}");
    }
}
