//! A two-node cluster in namespaces the test makes itself:
//!
//! ```text
//!            sw ns: br0 (management, 10.9.0.1 = the API server double)   br1 (service LAN)
//!                    │                                                      │        │
//!   node-a ns: eth0 10.9.0.11, eth1 10.1.0.11 ───────────────────────────────┘        │
//!   node-b ns: eth0 10.9.0.12, eth1 10.1.0.12 ────────────────────────────────────────┤
//!   client ns: eth0 10.1.0.1 ──────────────────────────────────────────────────────────┘
//!   node i: p0 10.2.i.1 ── pod i ns: eth0 10.2.i.2 (lb-test-server "pod-i")
//! ```
//! Each node routes the other's pod CIDR via the other's service-LAN address. The agents talk to
//! the API server over the management bridge, so a service link going down does not cut them
//! off (as on nodes with a separate management network). Every veth is left at kernel
//! defaults. Everything is removed on drop.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{BACKEND_TCP_PORT, BACKEND_UDP_PORT, COUNTER, in_netns, sh, sibling_binary};

pub struct ClusterNode {
    /// Kubernetes node name ("node-a").
    pub name: String,
    pub ns: String,
    pub pod_ns: String,
    pub lan_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    agent: Option<Child>,
}

pub struct Cluster {
    pub prefix: String,
    pub switch: String,
    pub client: String,
    pub nodes: Vec<ClusterNode>,
    pub dir: PathBuf,
    servers: Vec<Child>,
}

impl Cluster {
    pub fn new() -> Result<Self> {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let prefix = format!("lbk{id}");
        let dir = std::env::temp_dir().join(format!("lb-test-{prefix}"));
        fs::create_dir_all(&dir)?;
        let nodes = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, n)| ClusterNode {
                name: format!("node-{n}"),
                ns: format!("{prefix}-{n}"),
                pod_ns: format!("{prefix}-p{n}"),
                lan_ip: Ipv4Addr::new(10, 1, 0, 11 + i as u8),
                pod_ip: Ipv4Addr::new(10, 2, 1 + i as u8, 2),
                agent: None,
            })
            .collect();
        let mut cluster = Cluster {
            switch: format!("{prefix}-sw"),
            client: format!("{prefix}-c"),
            prefix,
            nodes,
            dir,
            servers: Vec::new(),
        };
        cluster.build()?;
        Ok(cluster)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.switch.clone();
        let c = self.client.clone();
        for ns in [&sw, &c]
            .into_iter()
            .chain(self.nodes.iter().flat_map(|n| [&n.ns, &n.pod_ns]))
        {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"))?;
        }
        sh(&format!(
            "ip -n {sw} link add br0 type bridge && ip -n {sw} link add br1 type bridge && \
             ip -n {sw} addr add 10.9.0.1/24 dev br0 && ip -n {sw} link set br0 up && ip -n {sw} link set br1 up"
        ))?;
        sh(&format!(
            "ip link add eth0 netns {c} type veth peer name cl netns {sw} && ip -n {sw} link set cl master br1 up && \
             ip -n {c} addr add 10.1.0.1/24 dev eth0 && ip -n {c} link set eth0 up"
        ))?;
        for (i, n) in self.nodes.iter().enumerate() {
            let (ns, pod) = (&n.ns, &n.pod_ns);
            let k = i + 1;
            sh(&format!(
                "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
            ))?;
            sh(&format!(
                "ip link add eth0 netns {ns} type veth peer name m{k} netns {sw} && ip -n {sw} link set m{k} master br0 up && \
                 ip -n {ns} addr add 10.9.0.{}/24 dev eth0 && ip -n {ns} link set eth0 up",
                10 + k
            ))?;
            sh(&format!(
                "ip link add eth1 netns {ns} type veth peer name s{k} netns {sw} && ip -n {sw} link set s{k} master br1 up && \
                 ip -n {ns} addr add {}/24 dev eth1 && ip -n {ns} link set eth1 up",
                n.lan_ip
            ))?;
            sh(&format!(
                "ip link add eth0 netns {pod} type veth peer name p0 netns {ns} && \
                 ip -n {pod} addr add {}/24 dev eth0 && ip -n {pod} link set eth0 up && \
                 ip -n {ns} addr add 10.2.{k}.1/24 dev p0 && ip -n {ns} link set p0 up && \
                 ip -n {pod} route add default via 10.2.{k}.1",
                n.pod_ip
            ))?;
            let server = Command::new("ip")
                .args(["netns", "exec", pod])
                .arg(sibling_binary("lb-test-server"))
                .args(["--name", &format!("pod-{k}")])
                .args(["--tcp", &format!("{}:{BACKEND_TCP_PORT}", n.pod_ip)])
                .args(["--udp", &format!("{}:{BACKEND_UDP_PORT}", n.pod_ip)])
                .stdin(Stdio::null())
                .spawn()?;
            self.servers.push(server);
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (j, other) in self.nodes.iter().enumerate() {
                if i != j {
                    sh(&format!(
                        "ip -n {} route add 10.2.{}.0/24 via {}",
                        n.ns,
                        j + 1,
                        other.lan_ip
                    ))?;
                }
            }
        }
        Ok(())
    }

    /// A listener on the management bridge (10.9.0.1) for the API server double.
    pub fn api_listener(&self) -> TcpListener {
        in_netns(&self.switch, || TcpListener::bind("10.9.0.1:0").unwrap())
    }

    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("agent-{i}.log"))).unwrap_or_default()
    }

    /// Starts node i's agent against `kubeconfig` on eth1 and the pod link, and waits for its
    /// ready line.
    pub fn start_agent(&mut self, i: usize, kubeconfig: &str) -> Result<()> {
        self.start_agent_with(i, &["--kubernetes", "--kubeconfig", kubeconfig])
    }

    /// Starts node i's agent reading the YAML file `config` (both nodes may share it: endpoints
    /// carry their `nodeName`) with `extra` flags, and waits for its ready line.
    pub fn start_agent_on_file(
        &mut self,
        i: usize,
        config: &std::path::Path,
        extra: &[&str],
    ) -> Result<()> {
        let config = config.display().to_string();
        let mut args = vec!["--config", &config, "--reload-interval-ms", "100"];
        args.extend_from_slice(extra);
        self.start_agent_with(i, &args)
    }

    /// The bpffs directory of node i's agent.
    pub fn bpffs(&self, i: usize) -> PathBuf {
        self.dir.join(format!("bpffs-{i}"))
    }

    /// `lbctl ARGS` against node i's maps.
    pub fn lbctl(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new(sibling_binary("lbctl"))
            .arg("--bpffs")
            .arg(self.bpffs(i))
            .arg("--state-dir")
            .arg(self.dir.join(format!("state-{i}")))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn start_agent_with(&mut self, i: usize, source: &[&str]) -> Result<()> {
        let bpffs = self.bpffs(i);
        lb_userspace::datapath::ensure_bpffs(&bpffs)?;
        let log = fs::File::create(self.dir.join(format!("agent-{i}.log")))?;
        let n = &mut self.nodes[i];
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(sibling_binary("lb-agent"))
            .args(source)
            .args(["--node-name", &n.name, "--node-ip", &n.lan_ip.to_string()])
            .args([
                "--interface",
                "eth1",
                "--interface",
                "p0",
                "--cgroup",
                "none",
            ])
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(self.dir.join(format!("state-{i}")))
            .args(["--max-services", "64", "--conntrack-size", "65536"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        n.agent = Some(child);
        let start = Instant::now();
        while !self.agent_log(i).contains("lb-agent ready") {
            if let Some(status) = self.nodes[i].agent.as_mut().unwrap().try_wait()? {
                bail!("lb-agent {i} exited ({status}):\n{}", self.agent_log(i));
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("lb-agent {i} not ready after 20 s:\n{}", self.agent_log(i));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Sends `signal` to node i's agent and waits for it to exit.
    pub fn signal_agent(&mut self, i: usize, signal: i32) -> Result<()> {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(agent.id() as i32, signal) };
            agent.wait()?;
        }
        Ok(())
    }

    /// Node i's address on the service LAN, as a socket address.
    pub fn node_addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::from((self.nodes[i].lan_ip, port))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.signal_agent(i, libc::SIGTERM);
        }
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for i in 0..self.nodes.len() {
            let bpffs = self.dir.join(format!("bpffs-{i}"));
            if bpffs.exists() {
                let _ = lb_userspace::datapath::cleanup(&bpffs);
                let _ = Command::new("umount").arg(&bpffs).status();
            }
        }
        let namespaces: Vec<String> = [self.switch.clone(), self.client.clone()]
            .into_iter()
            .chain(
                self.nodes
                    .iter()
                    .flat_map(|n| [n.ns.clone(), n.pod_ns.clone()]),
            )
            .collect();
        for ns in namespaces {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
