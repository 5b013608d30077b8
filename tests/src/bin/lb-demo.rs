//! `cargo xtask demo`: a veth topology (client, node, 3 backends) with every veth as the kernel
//! makes it, lb-agent from the shipped example config, traffic to the ClusterIP through the
//! packet path (tc on the node's veths) and through the socket hooks (a client process in the
//! agent's --cgroup), then `lbctl interfaces`, `services`, `stats` and `status`. Cleans up on
//! exit.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_tests::{CLUSTER_IP, Conversation, TCP_PORT, Topology, UDP_PORT, udp_ask};

fn main() -> anyhow::Result<()> {
    let config = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/demo.yaml".into());
    let text = std::fs::read_to_string(&config)?;
    let mut topo = Topology::new(3)?;
    topo.write_config(&text)?;
    let cgroup = topo.test_cgroup()?;
    topo.start_agent(&["--cgroup", cgroup.to_str().expect("utf-8 path")])?;
    println!(
        "lb-agent running in namespace {} on {}",
        topo.node,
        topo.node_interfaces.join(",")
    );
    let (tcp, udp) = topo.client(|| -> anyhow::Result<_> {
        let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
        let mut udp: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..60 {
            let mut c = Conversation::open(SocketAddr::from((CLUSTER_IP, TCP_PORT)))?;
            *tcp.entry(c.ask()?).or_default() += 1;
            let (_, name) = udp_ask(SocketAddr::from((CLUSTER_IP, UDP_PORT)))?;
            *udp.entry(name).or_default() += 1;
        }
        Ok((tcp, udp))
    })?;
    let mut socket: BTreeMap<String, usize> = BTreeMap::new();
    let to = format!("{CLUSTER_IP}:{TCP_PORT}");
    for line in Topology::client_in_cgroup(&topo.client, &cgroup, &["tcp", &to, "60"])? {
        *socket.entry(line).or_default() += 1;
    }
    println!("\nPacket path (client outside the socket cgroup):");
    println!("60 TCP connections to {CLUSTER_IP}:{TCP_PORT} answered by:");
    for (name, n) in &tcp {
        println!("  {name}: {n}");
    }
    println!("60 UDP requests to {CLUSTER_IP}:{UDP_PORT} answered by:");
    for (name, n) in &udp {
        println!("  {name}: {n}");
    }
    println!(
        "\nSocket hooks (a client process in {}): connect() went straight to a backend;\n\
         getpeername() still shows the ClusterIP:",
        cgroup.display()
    );
    for (line, n) in &socket {
        println!("  {line}: {n}");
    }
    println!("\n$ lbctl interfaces\n{}", topo.lbctl(&["interfaces"])?);
    println!("$ lbctl services\n{}", topo.lbctl(&["services"])?);
    println!("$ lbctl stats\n{}", topo.lbctl(&["stats"])?);
    println!("$ lbctl status\n{}", topo.lbctl(&["status"])?);
    Ok(())
}
