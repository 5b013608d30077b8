//! Test topology in network namespaces the tests make themselves:
//!
//! ```text
//! client ns (10.0.0.1) ── veth ── lb ns (the node: lb-agent + XDP) ── veth ── backend ns i (10.0.i.2)
//! ```
//! The client routes the service range 10.96.0.0/12 via the lb ns; each backend routes everything
//! via the lb ns. Every veth is left as the kernel makes it (TX checksum offload on, GRO off,
//! nothing attached to peers), as a node's pod interfaces are. Each backend runs `lb-test-server`, which answers TCP and UDP with its name.
//! Everything is removed on drop, also when a test fails. No packet leaves these namespaces.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod apiserver;
pub mod arpprobe;
pub mod cluster;
pub mod deploy;
pub mod frames;
pub mod l2cluster;
pub mod lab;
pub mod testrun;

pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 8053;

pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A binary built next to the running test or tool (target/debug or target/release).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "{name} not found next to {}; build it first (cargo xtask test does)",
        exe.display()
    );
}

/// Runs `f` on a thread whose network namespace is `ns`; sockets it opens live in `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("netns thread panicked")
}

pub struct Topology {
    pub prefix: String,
    pub client: String,
    pub node: String,
    pub backends: Vec<String>,
    /// Node-side interface names (client side first).
    pub node_interfaces: Vec<String>,
    pub dir: PathBuf,
    servers: Vec<Child>,
    agent: Option<Child>,
    /// Run before lb-agent inside the node namespace (e.g. setpriv limiting its capabilities).
    pub agent_prefix: Vec<String>,
    /// The lb-agent binary to start (default: the one built next to the tests).
    pub agent_binary: Option<PathBuf>,
}

impl Topology {
    /// Builds client, node and `n` backend namespaces with their links and servers.
    pub fn new(n: usize) -> Result<Self> {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let prefix = format!("lbt{id}");
        let dir = std::env::temp_dir().join(format!("lb-test-{prefix}"));
        fs::create_dir_all(&dir)?;
        let mut topo = Topology {
            client: format!("{prefix}-c"),
            node: format!("{prefix}-n"),
            backends: (1..=n).map(|i| format!("{prefix}-b{i}")).collect(),
            node_interfaces: Vec::new(),
            prefix,
            dir,
            servers: Vec::new(),
            agent: None,
            agent_prefix: Vec::new(),
            agent_binary: None,
        };
        topo.build()?;
        Ok(topo)
    }

    fn build(&mut self) -> Result<()> {
        let (c, n) = (self.client.clone(), self.node.clone());
        for ns in [&c, &n].into_iter().chain(&self.backends) {
            sh(&format!("ip netns add {ns}"))?;
            sh(&format!("ip -n {ns} link set lo up"))?;
        }
        sh(&format!(
            "ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
        ))?;
        // Client link. veth names are per namespace, so short fixed names are fine.
        sh(&format!(
            "ip link add eth0 netns {c} type veth peer name c0 netns {n}"
        ))?;
        sh(&format!(
            "ip -n {c} addr add 10.0.0.1/24 dev eth0 && ip -n {c} link set eth0 up"
        ))?;
        sh(&format!(
            "ip -n {n} addr add 10.0.0.254/24 dev c0 && ip -n {n} link set c0 up"
        ))?;
        sh(&format!("ip -n {c} route add 10.96.0.0/12 via 10.0.0.254"))?;
        sh(&format!("ip -n {c} route add 10.0.0.0/8 via 10.0.0.254"))?;
        self.node_interfaces.push("c0".into());
        for (i, b) in self.backends.clone().iter().enumerate() {
            let i = i + 1;
            self.link_backend(i)?;
            self.node_interfaces.push(format!("b{i}"));
            let server = Command::new("ip")
                .args(["netns", "exec", b])
                .arg(sibling_binary("lb-test-server"))
                .args(["--name", &format!("backend-{i}")])
                .args(["--tcp", &format!("10.0.{i}.2:{BACKEND_TCP_PORT}")])
                .args(["--udp", &format!("10.0.{i}.2:{BACKEND_UDP_PORT}")])
                .stdin(Stdio::null())
                .spawn()?;
            self.servers.push(server);
        }
        // Wait until every server answers directly (without the load balancer).
        for i in 1..=self.backends.len() {
            let target: SocketAddr = format!("10.0.{i}.2:{BACKEND_TCP_PORT}").parse()?;
            self.wait_until(Duration::from_secs(5), &format!("server {i}"), move |t| {
                t.client(move || {
                    TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
                })
            })?;
        }
        Ok(())
    }

    /// The veth pair between the node (`b<i>`, 10.0.i.1) and backend i (`eth0`, 10.0.i.2).
    fn link_backend(&self, i: usize) -> Result<()> {
        let (b, n) = (&self.backends[i - 1], &self.node);
        let nif = format!("b{i}");
        sh(&format!(
            "ip link add eth0 netns {b} type veth peer name {nif} netns {n}"
        ))?;
        sh(&format!(
            "ip -n {b} addr add 10.0.{i}.2/24 dev eth0 && ip -n {b} link set eth0 up"
        ))?;
        sh(&format!("ip -n {b} route add default via 10.0.{i}.1"))?;
        sh(&format!(
            "ip -n {n} addr add 10.0.{i}.1/24 dev {nif} && ip -n {n} link set {nif} up"
        ))
    }

    /// Deletes the node's link to backend i and makes it again (same names and addresses, a new
    /// ifindex), as when a pod's veth is recreated.
    pub fn recreate_backend_link(&self, i: usize) -> Result<()> {
        sh(&format!("ip -n {} link del b{i}", self.node))?;
        self.link_backend(i)
    }

    /// Index of `iface` in namespace `ns`.
    pub fn ifindex_of(ns: &str, iface: &str) -> Result<u32> {
        let out = Command::new("ip")
            .args(["-n", ns, "-j", "link", "show", iface])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .with_context(|| format!("no interface {iface} in {ns}"))
    }

    /// Runs `f` in the client namespace.
    pub fn client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.client, f)
    }

    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out waiting for {what}")
    }

    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("services.yaml")
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Writes the config atomically (as a ConfigMap update would) and returns its path.
    pub fn write_config(&self, text: &str) -> Result<PathBuf> {
        let tmp = self.dir.join("services.yaml.tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(self.config_path())
    }

    /// Starts lb-agent in the node namespace on all node interfaces and waits for its ready line.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        self.spawn_agent(extra)?;
        self.wait_agent_log("lb-agent ready", Duration::from_secs(20))
    }

    /// The address the agent serves `--metrics-addr` on (read from its log, so port 0 works).
    pub fn metrics_addr(&self) -> Result<SocketAddr> {
        let log = self.agent_log();
        log.split("metrics, /healthz and /readyz on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no metrics address in the agent log:\n{log}"))
    }

    /// Waits until the agent's log holds `text`; fails if the agent exits first.
    pub fn wait_agent_log(&mut self, text: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.agent_log().contains(text) {
            if let Some(status) = self.agent.as_mut().context("no agent")?.try_wait()? {
                bail!("lb-agent exited ({status}):\n{}", self.agent_log());
            }
            if start.elapsed() > timeout {
                bail!(
                    "lb-agent logged no {text:?} in {timeout:?}:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts lb-agent in the node namespace (reading [`Topology::config_path`] unless `extra`
    /// says `--kubernetes`) without waiting for it.
    pub fn spawn_agent(&mut self, extra: &[&str]) -> Result<()> {
        let log = fs::File::create(self.dir.join("agent.log"))?;
        // Mounted here, in the test's mount namespace: a bpffs the agent mounted inside
        // `ip netns exec` would be invisible to lbctl outside it.
        lb_userspace::datapath::ensure_bpffs(&self.bpffs())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node])
            .args(&self.agent_prefix)
            .arg(
                self.agent_binary
                    .clone()
                    .unwrap_or_else(|| sibling_binary("lb-agent")),
            );
        if !extra.contains(&"--kubernetes") {
            cmd.arg("--config").arg(self.config_path());
        }
        cmd.arg("--bpffs")
            .arg(self.bpffs())
            .arg("--state-dir")
            .arg(self.state_dir());
        // Small maps unless the caller sizes them.
        for (flag, value) in [
            ("--max-services", "64"),
            ("--conntrack-size", "65536"),
            ("--reload-interval-ms", "100"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        // With --interface-regex the test selects the backend links itself.
        let named = if extra.contains(&"--interface-regex") {
            &self.node_interfaces[..1]
        } else {
            &self.node_interfaces[..]
        };
        for i in named {
            cmd.args(["--interface", i]);
        }
        // The packet path is tested with socket balancing off; tests of it pass --cgroup.
        if !extra.contains(&"--cgroup") {
            cmd.args(["--cgroup", "none"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.agent = Some(cmd.spawn()?);
        Ok(())
    }

    /// A cgroup v2 directory of this topology's own (cgroup2 mounted under its temp dir, since
    /// `ip netns exec` hides /sys), for `lb-agent --cgroup` and [`Topology::client_in_cgroup`].
    pub fn test_cgroup(&self) -> Result<PathBuf> {
        let mount = self.dir.join("cgroup2");
        let cgroup = mount.join(&self.prefix);
        if !cgroup.exists() {
            fs::create_dir_all(&mount)?;
            sh(&format!("mount -t cgroup2 none {}", mount.display()))?;
            fs::create_dir(&cgroup)?;
        }
        Ok(cgroup)
    }

    /// `lb-test-client ARGS` in namespace `ns`, moved into cgroup `cgroup` (when given) before
    /// it execs, so the cgroup applies to it alone.
    fn client_command(ns: &str, cgroup: Option<&std::path::Path>, args: &[&str]) -> Command {
        let enter = cgroup.map_or(String::new(), |cg| {
            format!("echo $$ > {}/cgroup.procs && ", cg.display())
        });
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{enter}exec ip netns exec {ns} \"$0\" \"$@\""))
            .arg(sibling_binary("lb-test-client"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn client_lines(
        ns: &str,
        cgroup: Option<&std::path::Path>,
        args: &[&str],
    ) -> Result<Vec<String>> {
        let out = Self::client_command(ns, cgroup, args).output()?;
        if !out.status.success() {
            bail!(
                "lb-test-client {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Runs `lb-test-client ARGS` in namespace `ns` as a process of cgroup `cgroup`; returns its
    /// output lines.
    pub fn client_in_cgroup(
        ns: &str,
        cgroup: &std::path::Path,
        args: &[&str],
    ) -> Result<Vec<String>> {
        Self::client_lines(ns, Some(cgroup), args)
    }

    /// Runs `lb-test-client ARGS` in namespace `ns` (in the caller's cgroup).
    pub fn client_process(ns: &str, args: &[&str]) -> Result<Vec<String>> {
        Self::client_lines(ns, None, args)
    }

    /// Starts `lb-test-client ARGS` like [`Topology::client_in_cgroup`] without waiting: its
    /// output can be read line by line while it runs.
    pub fn spawn_client_in_cgroup(
        ns: &str,
        cgroup: &std::path::Path,
        args: &[&str],
    ) -> Result<Child> {
        Ok(Self::client_command(ns, Some(cgroup), args)
            .stdout(Stdio::piped())
            .spawn()?)
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) -> Result<()> {
        self.end_agent(libc::SIGTERM)
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill_agent(&mut self) -> Result<()> {
        self.end_agent(libc::SIGKILL)
    }

    fn end_agent(&mut self, signal: i32) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(agent.id() as i32, signal) };
            agent.wait()?;
        }
        Ok(())
    }

    /// Runs lbctl against this topology's pinned maps.
    pub fn lbctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(sibling_binary("lbctl"))
            .arg("--bpffs")
            .arg(self.bpffs())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `arping` for `target` out of `eth0` in namespace `ns` for 2 s; returns the number of
    /// requests sent and the MAC of every reply.
    pub fn arping(ns: &str, target: &str) -> Result<(usize, Vec<String>)> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, "arping", "-c", "2", "-w", "2", "-I", "eth0", target,
            ])
            .output()
            .context("running arping (iputils-arping)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let sent = text
            .lines()
            .find_map(|l| l.strip_prefix("Sent ")?.split(' ').next()?.parse().ok())
            .with_context(|| format!("arping printed no probe count: {text}"))?;
        let macs = text
            .lines()
            .filter(|l| l.contains("reply from"))
            .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_ascii_lowercase()))
            .collect();
        Ok((sent, macs))
    }

    /// MAC of `iface` in namespace `ns`.
    pub fn mac_of(ns: &str, iface: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["-n", ns, "-j", "link", "show", iface])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
        Ok(v[0]["address"]
            .as_str()
            .context("no address")?
            .to_ascii_lowercase())
    }

    /// The demo/test config: one Service (TCP 80 + UDP 53) over the given backend numbers.
    pub fn service_yaml(backends: &[usize]) -> String {
        let endpoints: String = backends
            .iter()
            .map(|i| format!("- addresses: [\"10.0.{i}.2\"]\n  conditions: {{ready: true}}\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  clusterIP: {CLUSTER_IP}\n  ports:\n  \
             - {{name: tcp, port: {TCP_PORT}, targetPort: {BACKEND_TCP_PORT}, protocol: TCP}}\n  \
             - {{name: udp, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}, protocol: UDP}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\n\
             addressType: IPv4\nports:\n- {{name: tcp, port: {BACKEND_TCP_PORT}, protocol: TCP}}\n- {{name: udp, port: {BACKEND_UDP_PORT}, protocol: UDP}}\n\
             endpoints:\n{endpoints}"
        )
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.stop_agent();
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let bpffs = self.bpffs();
        if bpffs.exists() {
            let _ = lb_userspace::datapath::cleanup(&bpffs);
            let _ = Command::new("umount").arg(&bpffs).status();
        }
        for ns in [&self.client, &self.node].into_iter().chain(&self.backends) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let cgroup_mount = self.dir.join("cgroup2");
        if cgroup_mount.exists() {
            let _ = fs::remove_dir(cgroup_mount.join(&self.prefix));
            let _ = Command::new("umount").arg(&cgroup_mount).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` over HTTP/1.1 to `to`: (status code, body).
pub fn http_get(to: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// A TCP connection to a service that asks "who are you" and reads the backend's name.
pub struct Conversation {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conversation {
    pub fn open(to: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .with_context(|| format!("connect {to}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    pub fn ask(&mut self) -> Result<String> {
        self.request("who")
    }

    /// The backend's name and the address it sees this connection come from.
    pub fn ask_peer(&mut self) -> Result<(String, SocketAddr)> {
        let line = self.request("peer")?;
        let (name, peer) = line
            .split_once(' ')
            .with_context(|| format!("no peer in {line:?}"))?;
        Ok((name.to_string(), peer.parse()?))
    }

    /// Sends `what` as one line and reads the backend's one-line answer.
    pub fn request(&mut self, what: &str) -> Result<String> {
        self.stream.write_all(format!("{what}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }
}

/// One UDP exchange asking for the backend's name and what it sees as the source: returns
/// (reply source, backend name, source the backend saw).
pub fn udp_ask_peer(to: SocketAddr) -> Result<(SocketAddr, String, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"peer", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).context("no UDP reply")?;
    let text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let (name, peer) = text
        .split_once(' ')
        .with_context(|| format!("no peer in {text:?}"))?;
    Ok((from, name.to_string(), peer.parse()?))
}

/// One UDP exchange from an unconnected socket: returns (reply source, backend name).
pub fn udp_ask(to: SocketAddr) -> Result<(SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"who", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).context("no UDP reply")?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}

/// IPv4 TCP/UDP packets seen on one interface: (source, destination) as `ip:port`.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<(SocketAddr, SocketAddr)>>>>,
}

impl Capture {
    /// Starts a packet socket on `iface` in namespace `ns` (returns once it is open).
    pub fn start(ns: &str, iface: &str) -> Result<Self> {
        use pnet::datalink::{self, Channel, Config};
        use pnet::packet::{
            Packet, ethernet::EthernetPacket, ip::IpNextHeaderProtocols, ipv4::Ipv4Packet,
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let (flag, iface) = (stop.clone(), iface.to_string());
        let thread = std::thread::spawn(move || -> Result<Vec<(SocketAddr, SocketAddr)>> {
            let file = fs::File::open(&path)?;
            // SAFETY: setns on this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            let interface = datalink::interfaces()
                .into_iter()
                .find(|i| i.name == iface)
                .with_context(|| format!("no interface {iface}"))?;
            let config = Config {
                read_timeout: Some(Duration::from_millis(50)),
                ..Default::default()
            };
            let Channel::Ethernet(_, mut rx) = datalink::channel(&interface, config)? else {
                bail!("unexpected channel type");
            };
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let Ok(frame) = rx.next() else { continue };
                let Some(eth) = EthernetPacket::new(frame) else {
                    continue;
                };
                let Some(ip) = Ipv4Packet::new(eth.payload()) else {
                    continue;
                };
                if eth.get_ethertype().0 != 0x0800 {
                    continue;
                }
                let l4 = ip.payload();
                let proto = ip.get_next_level_protocol();
                if (proto != IpNextHeaderProtocols::Tcp && proto != IpNextHeaderProtocols::Udp)
                    || l4.len() < 4
                {
                    continue;
                }
                let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
                seen.push((
                    SocketAddr::from((ip.get_source(), port(0))),
                    SocketAddr::from((ip.get_destination(), port(2))),
                ));
            }
            Ok(seen)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("packet capture did not start")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> Result<Vec<(SocketAddr, SocketAddr)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every map the agent writes, as text (typed entries, sorted), for byte-for-byte comparison.
pub fn dump_maps(bpffs: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let maps = lb_userspace::maps::PinnedMaps::open(bpffs, false).expect("maps");
    let mut out = String::new();
    let mut frontends: Vec<_> = maps.frontends.iter().map(|e| e.unwrap()).collect();
    frontends.sort_by_key(|(k, _)| *k);
    let _ = writeln!(out, "frontends {frontends:?}");
    let backends: Vec<_> = maps.backends.iter().map(|b| b.unwrap()).collect();
    let _ = writeln!(out, "backends {backends:?}");
    let maglev = maps.maglev.read(0, maps.maglev.len()).unwrap();
    let _ = writeln!(out, "maglev {maglev:?}");
    let mut arp: Vec<_> = maps.arp.iter().map(|e| e.unwrap()).collect();
    arp.sort_by_key(|(k, _)| *k);
    // Reply counters move with traffic, not with config.
    let arp: Vec<_> = arp.iter().map(|(k, e)| (k, e.mac)).collect();
    let _ = writeln!(out, "arp {arp:?}");
    let mut names: Vec<_> = maps
        .service_names
        .iter()
        .map(|e| e.unwrap())
        .map(|(id, n)| (id, n.as_str().to_string()))
        .collect();
    names.sort();
    let _ = writeln!(out, "names {names:?}");
    let mut ranges: Vec<_> = maps
        .source_ranges
        .keys()
        .map(|k| {
            let k = k.unwrap();
            (k.prefix_len(), k.data().service_id_be, k.data().addr)
        })
        .collect();
    ranges.sort();
    let _ = writeln!(out, "source ranges {ranges:?}");
    let mut uplinks: Vec<_> = maps.uplinks.iter().map(|e| e.unwrap()).collect();
    uplinks.sort();
    let _ = writeln!(out, "uplinks {uplinks:?}");
    let _ = writeln!(out, "announce {:?}", maps.announce.get(&0, 0).unwrap());
    out
}

/// Every pinned map under `bpffs` (LB_*), every entry as raw key and value bytes (per-CPU
/// values for every possible CPU), read with BPF_MAP_GET_NEXT_KEY / BPF_MAP_LOOKUP_ELEM, which
/// leave an LRU's order alone: two equal dumps, two identical sets of maps.
pub fn dump_raw(bpffs: &std::path::Path) -> BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>> {
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> i64 {
        // SAFETY: `attr` is the union member of `cmd`, sized as passed.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as u32,
            )
        }
    }
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value_or_next: u64,
        flags: u64,
    }
    let cpus = fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit('-').next()?.parse::<usize>().ok())
        .map_or(1, |last| last + 1);
    let mut out = BTreeMap::new();
    let mut names: Vec<_> = fs::read_dir(bpffs)
        .expect("bpffs")
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("LB_"))
        .collect();
    names.sort();
    for name in names {
        let map = lb_userspace::maps::open_pinned(&bpffs.join(&name), false).expect("map");
        let info = map.info().expect("info");
        let kind = format!("{:?}", info.map_type().expect("type")).to_ascii_uppercase();
        let per_cpu = kind.contains("PERCPU") || kind.contains("PER_CPU");
        let value_len = if per_cpu {
            (info.value_size() as usize).div_ceil(8) * 8 * cpus
        } else {
            info.value_size() as usize
        };
        let fd = std::os::fd::AsFd::as_fd(map.fd()).as_raw_fd() as u32;
        let mut entries = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; info.key_size() as usize];
            let mut attr = Elem {
                map_fd: fd,
                _pad: 0,
                key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value_or_next: next.as_mut_ptr() as u64,
                flags: 0,
            };
            if bpf(4, &mut attr) < 0 {
                break;
            }
            let mut value = vec![0u8; value_len];
            let mut attr = Elem {
                map_fd: fd,
                _pad: 0,
                key: next.as_ptr() as u64,
                value_or_next: value.as_mut_ptr() as u64,
                flags: 0,
            };
            if bpf(1, &mut attr) == 0 {
                entries.push((next.clone(), value));
            }
            key = Some(next);
        }
        out.insert(name, entries);
    }
    out
}
