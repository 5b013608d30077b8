//! lbctl: inspect the load balancer's pinned maps (works while the agent is down).

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{CT_DIR_FORWARD, backend_state, frontend_type};
use lb_userspace::{
    agentstate, attach,
    inspect::{
        self, addr, backend_name, backends_in_use, frontend_name, frontends, hostport,
        parse_frontend, proto_name, service_names, table_shares,
    },
    l2,
    maps::PinnedMaps,
    model::service_of,
    status::Status,
};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(version, about = "Inspect the load balancer's pinned maps and state")]
struct Args {
    /// bpffs directory holding the pinned maps.
    #[arg(long, default_value = "/sys/fs/bpf/lb", global = true)]
    bpffs: PathBuf,
    /// lb-agent's --state-dir (status.json: allocations, pools, announcements).
    #[arg(long, default_value = "/var/lib/lb-agent", global = true)]
    state_dir: PathBuf,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    /// The table with more columns (ids, table sizes, policies, counters).
    Wide,
    Json,
    /// The JSON document as YAML.
    Yaml,
}

/// `-o`, for [`emit`].
static FORMAT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// `-o json` or `-o yaml`: a document, not a table.
fn is_structured(o: Output) -> bool {
    matches!(o, Output::Json | Output::Yaml)
}

/// `-o wide`.
fn wide() -> bool {
    FORMAT.get() == Some(&Output::Wide)
}

/// Terminal colours, only when stdout is a terminal and NO_COLOR is not set.
#[derive(Clone, Copy)]
enum Colour {
    Green = 32,
    Yellow = 33,
    Red = 31,
}

fn paint(text: &str, colour: Colour) -> String {
    use std::io::IsTerminal;
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    });
    if on {
        format!("\x1b[{}m{text}\x1b[0m", colour as u8)
    } else {
        text.to_string()
    }
}

/// Width on screen: colour escapes take none.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut escape = false;
    for c in s.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// Prints a structured result in the `-o` format asked for (json, or yaml).
fn emit(value: &impl serde::Serialize) -> Result<()> {
    match FORMAT.get() {
        Some(Output::Yaml) => print!("{}", serde_yaml_ng::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Frontends with their service and backends.
    #[command(
        after_help = "Examples:\n  lbctl services\n  lbctl services -o wide     # service ids, table sizes, policies, packets\n  lbctl services -o json | jq '.[] | select(.type == \"LoadBalancer\")'"
    )]
    Services,
    /// Backends with state and counters.
    #[command(after_help = "Examples:\n  lbctl backends\n  lbctl backends -o yaml")]
    Backends,
    /// Conntrack entries (and SNAT entries): direction, tuple, translation, flags, idle time.
    #[command(
        after_help = "Examples:\n  lbctl conntrack\n  lbctl conntrack -o wide    # with the table each entry is in (conntrack or nat)\n  lbctl conntrack -o json | jq '[.[] | select(.closing)] | length'"
    )]
    Conntrack,
    /// Per-frontend and per-backend packet/byte counters, conntrack and SNAT fill and
    /// counters, refused map writes.
    #[command(
        after_help = "Examples:\n  lbctl stats\n  lbctl stats -o json | jq .conntrack.evicted"
    )]
    Stats,
    /// Slot shares of one frontend's Maglev table, e.g. `lbctl maglev 10.96.0.10:80/TCP`.
    #[command(
        after_help = "Examples:\n  lbctl maglev 10.96.0.10:80/TCP\n  lbctl maglev 192.168.30.60:443/TCP -o json"
    )]
    Maglev { frontend: String },
    /// Addresses the ARP responder answers for: interface, MAC, replies sent, last gratuitous ARP.
    #[command(
        after_help = "Examples:\n  lbctl arp\n  lbctl trace arp --who-has 192.168.30.60 --iface eth0   # would this node answer?"
    )]
    Arp,
    /// LoadBalancer IP pools (size, used) and each LoadBalancer Service's address or problem.
    #[command(
        after_help = "Examples:\n  lbctl pools\n  lbctl --state-dir /var/lib/lb-agent pools -o json"
    )]
    Pools,
    /// Interfaces the agent attached to: hooks (xdp+tc or tc), why, and whether the pinned links
    /// are still there.
    #[command(after_help = "Examples:\n  lbctl interfaces")]
    Interfaces,
    /// Is the agent up, what does it read, how did its last reload end; the programs on this
    /// node's maps, how the interfaces are hooked, and how full every map is.
    #[command(
        after_help = "Examples:\n  lbctl status\n  lbctl status -o json | jq '.maps[] | select(.entries > .capacity * 0.8)'"
    )]
    Status,
    /// What applying FILE would change on this node (frontends, their backends, ARP
    /// announcements) and how many Maglev slots each changed table moves, touching nothing:
    /// exit 0 when nothing, 1 when something, 2 on error.
    #[command(
        after_help = "Examples:\n  lbctl diff --config new-services.yaml\n  lbctl diff --config new.yaml -o json || echo \"would change something (or be rejected: exit 2)\""
    )]
    Diff {
        #[arg(long)]
        config: PathBuf,
    },
    /// Shell completions: `lbctl completions bash > /etc/bash_completion.d/lbctl`.
    Completions { shell: clap_complete::Shell },
    /// Sends one frame through this node's attached programs (BPF_PROG_TEST_RUN against the
    /// live maps; the programs write nothing for it) and shows the verdict, the frontend, what
    /// decided (conntrack, source ranges, affinity, Maglev slot), the backend and the rewritten
    /// headers. Run it as root in the node's network namespace.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:\n  lbctl trace --src 10.0.0.1:40000 --dst 10.96.0.10:80\n  \
                      lbctl trace --src 10.0.0.1 --dst 10.96.0.10:53 --proto udp --iface eth0\n  \
                      lbctl trace --src 10.0.0.1:40000 --dst 10.96.0.10:80 --flags ack   # a packet of an open connection\n  \
                      lbctl trace arp --who-has 192.168.30.60 --iface eth0"
    )]
    Trace {
        #[command(subcommand)]
        arp: Option<TraceArp>,
        /// Client address, with a port (default 40000).
        #[arg(long, required = true)]
        src: Option<String>,
        /// Destination address and port.
        #[arg(long, required = true)]
        dst: Option<String>,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        /// TCP flags: syn (a new connection) or ack (a packet of an open one).
        #[arg(long, value_enum, default_value_t = Flags::Syn)]
        flags: Flags,
        /// Interface the frame arrives on (default: the first the agent attached to).
        #[arg(long)]
        iface: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TraceArp {
    /// An ARP request: would this node answer it, with which MAC?
    Arp {
        #[arg(long)]
        who_has: Ipv4Addr,
        /// Interface the request arrives on (default: the first the agent attached to).
        #[arg(long)]
        iface: Option<String>,
        /// The asking host's address.
        #[arg(long, default_value = "192.0.2.1")]
        from: Ipv4Addr,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Flags {
    Syn,
    Ack,
}

/// Prints rows as aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(visible_len(cell));
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - visible_len(c))))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = FORMAT.set(args.output);
    match &args.command {
        Command::Pools => return pools(&args),
        Command::Interfaces => return interfaces(&args),
        Command::Status => return status(&args),
        Command::Diff { config } => match diff(&args, config) {
            Ok(changed) => std::process::exit(i32::from(changed)),
            Err(e) => {
                eprintln!("lbctl diff: {e:#}");
                std::process::exit(2);
            }
        },
        Command::Trace { .. } => return trace(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "lbctl", &mut script);
            return match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            };
        }
        _ => {}
    }
    let maps = PinnedMaps::open(&args.bpffs, false)?;
    let structured = is_structured(args.output);
    match &args.command {
        Command::Services => services(&maps, structured),
        Command::Backends => backends(&maps, structured),
        Command::Conntrack => conntrack(&maps, structured),
        Command::Stats => stats(&maps, &args.state_dir, structured),
        Command::Maglev { frontend } => maglev(&maps, &args, structured, frontend),
        Command::Arp => arp(&maps, &args, structured),
        Command::Pools
        | Command::Interfaces
        | Command::Status
        | Command::Diff { .. }
        | Command::Trace { .. }
        | Command::Completions { .. } => {
            unreachable!("handled before the maps are opened")
        }
    }
}

/// Frontends with their service and backends.
fn services(maps: &PinnedMaps, structured: bool) -> Result<()> {
    let names = service_names(maps)?;
    let mut out = Vec::new();
    // -o wide: service id, table size, policies, packets.
    let mut extra = Vec::new();
    for (key, fe) in frontends(maps)? {
        let mut policies = Vec::new();
        if fe.flags & lb_common::frontend_flags::AFFINITY != 0 {
            policies.push(format!("affinity {}s", fe.affinity_timeout_s));
        }
        if fe.flags & lb_common::frontend_flags::SOURCE_RANGES != 0 {
            policies.push("source ranges".to_string());
        }
        let packets = PinnedMaps::sum(&maps.frontend_stats.get(&fe.frontend_id, 0)?).packets;
        extra.push(vec![
            fe.service_id.to_string(),
            fe.maglev_size.to_string(),
            if policies.is_empty() {
                "-".into()
            } else {
                policies.join(",")
            },
            packets.to_string(),
        ]);
        let mut backends: Vec<String> = Vec::new();
        for id in table_shares(maps, &fe)?.keys() {
            backends.push(backend_name(maps, *id)?);
        }
        backends.sort();
        let service_port = names.get(&fe.service_id).cloned().unwrap_or_default();
        out.push(json!({
            "frontend": frontend_name(&key),
            "type": frontend_type::name(fe.flags),
            "service": service_of(&service_port),
            "service_port": service_port,
            "backends": backends,
        }));
    }
    if structured {
        emit(&out)?;
    } else {
        let rows: Vec<Vec<String>> = out
            .iter()
            .map(|o| {
                let backends: Vec<&str> = o["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                vec![
                    o["frontend"].as_str().unwrap().to_string(),
                    o["type"].as_str().unwrap().to_string(),
                    o["service_port"].as_str().unwrap().to_string(),
                    backends.join(","),
                ]
            })
            .collect();
        if wide() {
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .zip(extra)
                .map(|(r, e)| [r, e].concat())
                .collect();
            print_table(
                &[
                    "FRONTEND",
                    "TYPE",
                    "SERVICE",
                    "BACKENDS",
                    "SERVICE_ID",
                    "TABLE",
                    "POLICY",
                    "PACKETS",
                ],
                &rows,
            );
        } else {
            print_table(&["FRONTEND", "TYPE", "SERVICE", "BACKENDS"], &rows);
        }
    }
    Ok(())
}

/// Backends with state and counters.
fn backends(maps: &PinnedMaps, structured: bool) -> Result<()> {
    let mut out = Vec::new();
    for (id, b, c) in backends_in_use(maps)? {
        let state = if b.state == backend_state::ACTIVE {
            "active"
        } else {
            "terminating"
        };
        out.push(
            json!({"id": id, "backend": hostport(b.addr, b.port), "protocol": proto_name(b.proto),
            "state": state, "packets": c.packets, "bytes": c.bytes}),
        );
    }
    if structured {
        emit(&out)?;
    } else {
        let rows: Vec<Vec<String>> = out
            .iter()
            .map(|o| {
                ["id", "backend", "protocol", "state", "packets", "bytes"]
                    .iter()
                    .map(|k| {
                        let v = o[*k].to_string().trim_matches('"').to_string();
                        match (*k, v.as_str()) {
                            ("state", "active") => paint(&v, Colour::Green),
                            ("state", _) => paint(&v, Colour::Yellow),
                            _ => v,
                        }
                    })
                    .collect()
            })
            .collect();
        print_table(
            &["ID", "BACKEND", "PROTO", "STATE", "PACKETS", "BYTES"],
            &rows,
        );
    }
    Ok(())
}

/// Conntrack entries.
fn conntrack(maps: &PinnedMaps, structured: bool) -> Result<()> {
    use lb_common::ct_flags;
    let now = monotonic_ns();
    let mut out = Vec::new();
    // LB_NAT holds the reply entries of SNATed flows.
    for (table, map) in [("conntrack", &maps.conntrack), ("nat", &maps.nat)] {
        for item in map.iter() {
            let (k, e) = item?;
            let flags: Vec<&str> = [
                (ct_flags::REPLIED, "replied"),
                (ct_flags::CLOSING, "closing"),
                (ct_flags::DSR, "dsr"),
            ]
            .iter()
            .filter(|(bit, _)| e.flags & bit != 0)
            .map(|(_, name)| *name)
            .collect();
            // Forward: the source the flow leaves with toward the backend (SNAT, or a clash-free
            // port); reply: the client's address and port restored.
            let client_rewrite = match (e.client_addr, e.client_port) {
                (0, 0) => Value::Null,
                (0, port) if e.dir == CT_DIR_FORWARD => json!(hostport(k.src_addr, port)),
                (0, port) => json!(hostport(k.dst_addr, port)),
                (addr, port) => json!(hostport(addr, port)),
            };
            out.push(json!({
                "table": table,
                "direction": if e.dir == CT_DIR_FORWARD { "forward" } else { "reply" },
                "protocol": proto_name(k.proto),
                "source": hostport(k.src_addr, k.src_port),
                "destination": hostport(k.dst_addr, k.dst_port),
                "nat": hostport(e.nat_addr, e.nat_port),
                "client_rewrite": client_rewrite,
                "backend_id": e.backend_id,
                "closing": e.flags & ct_flags::CLOSING != 0,
                "flags": flags,
                "idle_seconds": now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
            }));
        }
    }
    if structured {
        emit(&out)?;
    } else {
        let rows: Vec<Vec<String>> = out
            .iter()
            .map(|o| {
                let cell = |k: &str| match &o[k] {
                    Value::Null => "-".to_string(),
                    Value::Array(a) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                    v => v.to_string().trim_matches('"').to_string(),
                };
                let mut keys = vec![
                    "direction",
                    "protocol",
                    "source",
                    "destination",
                    "nat",
                    "client_rewrite",
                    "backend_id",
                    "flags",
                    "idle_seconds",
                ];
                if wide() {
                    keys.insert(0, "table");
                }
                keys.iter().map(|k| cell(k)).collect()
            })
            .collect();
        let mut header = vec![
            "DIR",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "NAT",
            "CLIENT_SIDE",
            "BACKEND",
            "FLAGS",
            "IDLE_S",
        ];
        if wide() {
            header.insert(0, "TABLE");
        }
        print_table(&header, &rows);
    }
    Ok(())
}

/// Counters, conntrack fill and counters, socket reverse translations.
fn stats(maps: &PinnedMaps, state_dir: &std::path::Path, structured: bool) -> Result<()> {
    let s = inspect::stats(maps)?;
    // The agent's own record (absent when it never ran with this --state-dir).
    let agent = lb_userspace::agentstate::AgentState::read(state_dir).ok();
    let agent_out = agent.as_ref().map(|a| {
        json!({"map_write_errors": a.map_write_errors,
            "retry": a.retry.as_ref().map(|r| json!({"attempt": r.attempt,
                "at_unix_ms": r.at_unix_ms, "error": r.error}))})
    });
    let fe_out: Vec<Value> = s
        .frontends
        .iter()
        .map(|t| json!({"frontend": t.name, "service": t.service, "packets": t.packets, "bytes": t.bytes}))
        .collect();
    let be_out: Vec<Value> = s
        .backends
        .iter()
        .map(|t| json!({"backend": t.name, "packets": t.packets, "bytes": t.bytes}))
        .collect();
    let (entries, capacity, ct, evicted) = (
        s.conntrack_entries,
        s.conntrack_capacity,
        s.ct,
        s.conntrack_evicted,
    );
    let (sockets, sockets_capacity) = (s.sock_revnat_entries, s.sock_revnat_capacity);
    let (nat_entries, nat_capacity) = (s.nat_entries, s.nat_capacity);
    let out = json!({"frontends": fe_out, "backends": be_out,
        "conntrack": {"entries": entries, "capacity": capacity, "inserted": ct.inserted,
            "expired": ct.expired, "removed_by_agent": ct.agent_removed,
            "evicted": evicted, "clash_ports": ct.clash_ports,
            "reply_restored": ct.reply_restored},
        "nat": {"entries": nat_entries, "capacity": nat_capacity,
            "allocated": ct.nat_allocated, "refused_no_port": ct.nat_exhausted,
            "refused_table_full": ct.nat_full},
        "socket_revnat": {"entries": sockets, "capacity": sockets_capacity},
        "agent": agent_out});
    if structured {
        emit(&out)?;
    } else {
        let rows: Vec<Vec<String>> = fe_out
            .iter()
            .map(|o| {
                vec![
                    o["frontend"].as_str().unwrap().into(),
                    o["service"].as_str().unwrap().into(),
                    o["packets"].to_string(),
                    o["bytes"].to_string(),
                ]
            })
            .collect();
        print_table(&["FRONTEND", "SERVICE", "PACKETS", "BYTES"], &rows);
        println!();
        let rows: Vec<Vec<String>> = be_out
            .iter()
            .map(|o| {
                vec![
                    o["backend"].as_str().unwrap().into(),
                    o["packets"].to_string(),
                    o["bytes"].to_string(),
                ]
            })
            .collect();
        print_table(&["BACKEND", "PACKETS", "BYTES"], &rows);
        println!(
            "\nconntrack: {entries}/{capacity} entries ({:.1}%); inserted {}, expired {}, removed by the agent {}, evicted {evicted}; flows moved off a clashing port {}, reply entries restored {}",
            100.0 * entries as f64 / capacity.max(1) as f64,
            ct.inserted,
            ct.expired,
            ct.agent_removed,
            ct.clash_ports,
            ct.reply_restored
        );
        println!(
            "SNAT: {nat_entries}/{nat_capacity} flows ({:.1}%); ports allocated {}, new flows refused: no free port {}, table full {}",
            100.0 * nat_entries as f64 / nat_capacity.max(1) as f64,
            ct.nat_allocated,
            ct.nat_exhausted,
            ct.nat_full
        );
        println!(
            "socket reverse translations: {sockets}/{sockets_capacity} entries ({:.1}%)",
            100.0 * sockets as f64 / sockets_capacity.max(1) as f64
        );
        if let Some(a) = &agent {
            print!("agent: map writes refused {} times", a.map_write_errors);
            match &a.retry {
                Some(r) => println!("; retrying (attempt {} failed: {})", r.attempt, r.error),
                None => println!("; no retry pending"),
            }
        }
    }
    Ok(())
}

/// Slot shares of one frontend's Maglev table.
fn maglev(maps: &PinnedMaps, args: &Args, structured: bool, frontend: &str) -> Result<()> {
    let key = parse_frontend(frontend)?;
    let fe = maps
        .frontends
        .get(&key, 0)
        .with_context(|| format!("frontend {} not found", frontend_name(&key)))?;
    let m = fe.maglev_size;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (id, slots) in table_shares(maps, &fe)? {
        let name = backend_name(maps, id)?;
        let share = slots as f64 / m as f64;
        rows.push(vec![
            name.clone(),
            id.to_string(),
            slots.to_string(),
            format!("{:.2}%", 100.0 * share),
        ]);
        out.push(json!({"backend": name, "id": id, "slots": slots, "share": share}));
    }
    // The table's last rewrites, as the agent recorded them (maglev.json).
    let service = service_names(maps)?
        .get(&fe.service_id)
        .cloned()
        .unwrap_or_default();
    let rewrites: Vec<agentstate::TableRewrite> = lb_userspace::state::read_if_present::<
        agentstate::TableRewrites,
    >(&args.state_dir, agentstate::MAGLEV_FILE)?
    .and_then(|mut all| all.remove(&service))
    .unwrap_or_default();
    if structured {
        emit(&json!({"frontend": frontend_name(&key),
                "service": service, "table_size": m, "backends": out, "rewrites": rewrites}))?;
    } else {
        println!("frontend {} (M = {m})", frontend_name(&key));
        print_table(&["BACKEND", "ID", "SLOTS", "SHARE"], &rows);
        if !rewrites.is_empty() {
            println!(
                "\nlast table rewrites of {service} (slots moved vs the ideal of each change):"
            );
            let now = agentstate::now_unix();
            let rows: Vec<Vec<String>> = rewrites
                .iter()
                .rev()
                .map(|r| {
                    let moved = r.slots_moved as f64 / f64::from(r.slots.max(1));
                    vec![
                        format!("{} s ago", now.saturating_sub(r.at_unix)),
                        format!("{}/{}", r.slots_moved, r.slots),
                        format!("{:.2}%", 100.0 * moved),
                        format!("{:.2}%", 100.0 * r.ideal_fraction),
                        if r.ideal_fraction > 0.0 {
                            format!("{:.2}×", moved / r.ideal_fraction)
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect();
            print_table(&["WHEN", "SLOTS MOVED", "MOVED", "IDEAL", "× IDEAL"], &rows);
        }
    }
    Ok(())
}

/// Announced addresses, from LB_ARP and the status file.
fn arp(maps: &PinnedMaps, args: &Args, structured: bool) -> Result<()> {
    // Interface names, services and GARP times come from the agent's status file; the
    // map alone still answers (by ifindex) when it is missing.
    let status = Status::read(&args.state_dir).unwrap_or_default();
    let mut out = Vec::new();
    for item in maps.arp.iter() {
        let (k, e) = item?;
        let address = addr(k.addr);
        let mac = l2::mac_string(e.mac);
        let known = status
            .announced
            .iter()
            .find(|a| a.address == address && a.mac == mac);
        out.push(json!({
            "address": address.to_string(),
            "interface": known.map_or_else(|| format!("ifindex {}", k.ifindex), |a| a.interface.clone()),
            "mac": mac,
            "service": known.map(|a| a.service.clone()).unwrap_or_default(),
            "replies": e.replies,
            "last_garp": known.and_then(|a| a.last_garp),
        }));
    }
    out.sort_by_key(|o| {
        (
            o["address"].as_str().unwrap_or("").to_string(),
            o["interface"].to_string(),
        )
    });
    if structured {
        emit(&out)?;
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let rows: Vec<Vec<String>> = out
            .iter()
            .map(|o| {
                let garp = o["last_garp"].as_u64().map_or("never".into(), |t| {
                    format!("{}s ago", now.saturating_sub(t))
                });
                let mut row: Vec<String> = ["address", "interface", "mac", "service", "replies"]
                    .iter()
                    .map(|k| o[*k].to_string().trim_matches('"').to_string())
                    .collect();
                row.push(garp);
                row
            })
            .collect();
        print_table(
            &[
                "ADDRESS",
                "INTERFACE",
                "MAC",
                "SERVICE",
                "REPLIES",
                "LAST_GARP",
            ],
            &rows,
        );
    }
    Ok(())
}

fn interfaces(args: &Args) -> Result<()> {
    let hooked = attach::read_interfaces(&args.state_dir)?;
    let links = args.bpffs.join("links");
    let pinned = |hook: &str, name: &str| links.join(format!("{hook}-{name}")).exists();
    let sockets = lb_userspace::datapath::SOCK_PROGRAMS
        .iter()
        .filter(|p| pinned("cgroup", p))
        .count();
    let out: Vec<Value> = hooked
        .interfaces
        .iter()
        .map(|a| {
            let mut hooks = vec![];
            if pinned("xdp", &a.interface) {
                hooks.push("xdp");
            }
            if pinned("tc", &a.interface) {
                hooks.push("tc");
            }
            json!({
                "interface": a.interface,
                "ifindex": a.ifindex,
                "driver": a.driver,
                "mode": a.hooks,
                "pinned": hooks.join("+"),
                "reason": a.reason,
            })
        })
        .collect();
    let cgroup = json!({
        "path": hooked.cgroup,
        "hooks_pinned": sockets,
    });
    if is_structured(args.output) {
        emit(&json!({"interfaces": out, "cgroup": cgroup}))?;
        return Ok(());
    }
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows: Vec<Vec<String>> = out
        .iter()
        .map(|o| {
            ["interface", "ifindex", "driver", "mode", "pinned", "reason"]
                .iter()
                .map(|k| cell(&o[*k]))
                .collect()
        })
        .collect();
    print_table(
        &["INTERFACE", "IFINDEX", "DRIVER", "MODE", "PINNED", "WHY"],
        &rows,
    );
    match &hooked.cgroup {
        Some(path) => println!(
            "\nsocket balancing: cgroup {} ({sockets}/4 hooks pinned)",
            path.display()
        ),
        None => println!("\nsocket balancing: off (--cgroup none)"),
    }
    Ok(())
}

fn pools(args: &Args) -> Result<()> {
    let status = Status::read(&args.state_dir)?;
    if is_structured(args.output) {
        emit(&json!({"pools": status.pools, "services": status.load_balancers}))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = status
        .pools
        .iter()
        .map(|p| {
            vec![
                p.pool.clone(),
                p.blocks.join(","),
                p.size.to_string(),
                p.used.to_string(),
                (p.size - p.used.min(p.size)).to_string(),
            ]
        })
        .collect();
    print_table(&["POOL", "BLOCKS", "SIZE", "USED", "FREE"], &rows);
    println!();
    let rows: Vec<Vec<String>> = status
        .load_balancers
        .iter()
        .map(|s| {
            let addrs: Vec<String> = s.addresses.iter().map(Ipv4Addr::to_string).collect();
            vec![
                s.service.clone(),
                if addrs.is_empty() {
                    "<pending>".into()
                } else {
                    addrs.join(",")
                },
                s.pool.clone().unwrap_or_default(),
                s.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["SERVICE", "LOADBALANCER IP", "POOL", "PROBLEM"], &rows);
    Ok(())
}

/// CLOCK_MONOTONIC, the base of bpf_ktime_get_coarse_ns.
fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The agent (agent.json and whether its process lives), the programs, hooks and map fill.
fn status(args: &Args) -> Result<()> {
    let agent = agentstate::AgentState::read(&args.state_dir).ok();
    let running = agent.as_ref().is_some_and(|a| a.running());
    let hooked = attach::read_interfaces(&args.state_dir).ok();
    let maps = PinnedMaps::open(&args.bpffs, false);
    let (programs, fill) = match &maps {
        Ok(m) => {
            let fill = inspect::fill(m)?;
            (inspect::programs(&fill), fill)
        }
        Err(_) => (Vec::new(), Vec::new()),
    };
    if is_structured(args.output) {
        let out = json!({
            "agent": agent.as_ref().map(|a| json!({"running": running, "state": a})),
            "programs": programs.iter().map(|(n, id)| json!({"name": n, "id": id})).collect::<Vec<_>>(),
            "interfaces": hooked.as_ref().map(|h| h.interfaces.iter()
                .map(|a| json!({"interface": a.interface, "hooks": a.hooks, "driver": a.driver}))
                .collect::<Vec<_>>()),
            "cgroup": hooked.as_ref().map(|h| &h.cgroup),
            "maps": fill,
            "maps_error": maps.as_ref().err().map(|e| format!("{e:#}")),
        });
        emit(&out)?;
        return Ok(());
    }
    match &agent {
        Some(a) => {
            println!(
                "agent: {} (pid {}, version {}), {}; {}{}",
                if running {
                    paint("running", Colour::Green)
                } else {
                    paint("NOT running", Colour::Red)
                },
                a.pid,
                a.version,
                a.source,
                if a.synced {
                    "synced"
                } else {
                    "waiting for its first complete view"
                },
                match a.ipam_leader {
                    Some(true) => "; IPAM leader (writes Service status)",
                    Some(false) => "; not the IPAM leader",
                    None => "",
                }
            );
            match &a.last_reload {
                Some(r) => println!(
                    "last reload: {} {} s ago in {:.1} ms: {} services, {} frontends, {} backends{}",
                    r.result,
                    agentstate::now_unix().saturating_sub(r.at_unix),
                    r.duration_ms,
                    r.services,
                    r.frontends,
                    r.backends,
                    if r.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", r.detail)
                    }
                ),
                None => println!("last reload: none yet"),
            }
        }
        None => println!(
            "agent: no {}/{} (has lb-agent run with this --state-dir?)",
            args.state_dir.display(),
            agentstate::AGENT_FILE
        ),
    }
    if let Some(h) = &hooked {
        let hooks: Vec<String> = h
            .interfaces
            .iter()
            .map(|a| format!("{} {}", a.interface, a.hooks))
            .collect();
        println!(
            "interfaces: {}; sockets: {}",
            if hooks.is_empty() {
                "none".to_string()
            } else {
                hooks.join(", ")
            },
            h.cgroup
                .as_ref()
                .map_or("off".to_string(), |c| format!("cgroup {}", c.display()))
        );
    }
    match maps {
        Err(e) => println!("maps: {e:#}"),
        Ok(_) => {
            let names: Vec<String> = programs
                .iter()
                .map(|(n, id)| format!("{n} #{id}"))
                .collect();
            println!(
                "programs: {}",
                if names.is_empty() {
                    "none loaded".into()
                } else {
                    names.join(", ")
                }
            );
            println!();
            let rows: Vec<Vec<String>> = fill
                .iter()
                .map(|m| {
                    vec![
                        m.name.to_string(),
                        m.kind.clone(),
                        m.entries.map_or("-".into(), |e| e.to_string()),
                        m.capacity.to_string(),
                        m.entries.map_or(String::new(), |e| {
                            format!("{:.1}%", 100.0 * e as f64 / f64::from(m.capacity.max(1)))
                        }),
                    ]
                })
                .collect();
            print_table(&["MAP", "KIND", "ENTRIES", "CAPACITY", "FILL"], &rows);
        }
    }
    Ok(())
}

/// Frontend → (service port, active backends), as the maps hold it now or as `desired` wants it.
type View = std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)>;

fn live_view(maps: &PinnedMaps) -> Result<View> {
    let names = service_names(maps)?;
    let mut view = View::new();
    for (key, fe) in frontends(maps)? {
        let mut backends = std::collections::BTreeSet::new();
        for id in table_shares(maps, &fe)?.keys() {
            backends.insert(backend_name(maps, *id)?);
        }
        let service = names.get(&fe.service_id).cloned().unwrap_or_default();
        view.insert(frontend_name(&key), (service, backends));
    }
    Ok(view)
}

fn desired_view(desired: &lb_userspace::model::DesiredState) -> View {
    let mut view = View::new();
    for (name, service) in &desired.services {
        let backends: std::collections::BTreeSet<String> = service
            .backends
            .iter()
            .filter(|b| b.condition == lb_userspace::model::BackendCondition::Active)
            .map(|b| format!("{}:{}", b.endpoint.addr, b.endpoint.port))
            .collect();
        for f in &service.frontends {
            let key = lb_userspace::reconcile::frontend_key(&f.endpoint);
            view.insert(frontend_name(&key), (name.clone(), backends.clone()));
        }
    }
    view
}

/// Prints what applying `file` would change; Ok(true) when something would.
fn diff(args: &Args, file: &std::path::Path) -> Result<bool> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("--config {}", file.display()))?;
    // Build as the agent does: its node addresses, node name, NodePort range and allocations.
    let agent = agentstate::AgentState::read(&args.state_dir).ok();
    let inputs = agent.and_then(|a| a.context).unwrap_or_default();
    let ctx = lb_userspace::config::BuildContext {
        node_ips: inputs.node_ips,
        node_name: inputs.node_name,
        lb_hints: Status::read(&args.state_dir)
            .map(|s| lb_userspace::status::hints(&s))
            .unwrap_or_default(),
        node_port_range: inputs.node_port_range.parse().unwrap_or_default(),
    };
    let (desired, _) = lb_userspace::config::load_str_with(&text, &ctx)
        .map_err(|e| anyhow::anyhow!("{} would be rejected: {e}", file.display()))?;
    let maps = PinnedMaps::open(&args.bpffs, false)?;
    let (live, want) = (live_view(&maps)?, desired_view(&desired));
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    let fixed_size = inspect::fixed_table_size(&maps)?;
    for (fe, (service, backends)) in &want {
        match live.get(fe) {
            None => added.push(json!({"frontend": fe, "service": service, "backends": backends})),
            Some((old_service, old)) if old_service != service || old != backends => {
                // The Maglev slots this change moves, built as the agent would.
                let input: Vec<_> = desired.services[service]
                    .backends
                    .iter()
                    .filter(|b| {
                        b.condition == lb_userspace::model::BackendCondition::Active && b.weight > 0
                    })
                    .map(|b| (b.endpoint, b.weight))
                    .collect();
                let live_fe = maps.frontends.get(&parse_frontend(fe)?, 0)?;
                let (moved, slots) = if input.is_empty() {
                    (live_fe.maglev_size as usize, live_fe.maglev_size)
                } else {
                    inspect::slots_moved(&maps, fixed_size, &live_fe, &input)?
                };
                changed.push(json!({"frontend": fe, "service": service,
                    "service_before": old_service,
                    "backends_added": backends.difference(old).collect::<Vec<_>>(),
                    "backends_removed": old.difference(backends).collect::<Vec<_>>(),
                    "maglev": {"slots": slots, "slots_moved": moved}}));
            }
            Some(_) => {}
        }
    }
    for (fe, (service, _)) in &live {
        if !want.contains_key(fe) {
            removed.push(json!({"frontend": fe, "service": service}));
        }
    }
    let live_arp: std::collections::BTreeSet<String> = maps
        .arp
        .keys()
        .flatten()
        .map(|k| addr(k.addr).to_string())
        .collect();
    let want_arp: std::collections::BTreeSet<String> = desired
        .announcements
        .keys()
        .map(|a| a.to_string())
        .collect();
    let arp_added: Vec<&String> = want_arp.difference(&live_arp).collect();
    let arp_removed: Vec<&String> = live_arp.difference(&want_arp).collect();
    let any = !(added.is_empty()
        && removed.is_empty()
        && changed.is_empty()
        && arp_added.is_empty()
        && arp_removed.is_empty());
    if is_structured(args.output) {
        emit(&json!({
            "changes": any,
            "frontends": {"added": added, "removed": removed, "changed": changed},
            "announcements": {"added": arp_added, "removed": arp_removed},
        }))?;
        return Ok(any);
    }
    let list = |v: &Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    for a in &added {
        println!(
            "{} frontend {} ({}) → {}",
            paint("+", Colour::Green),
            a["frontend"].as_str().unwrap_or(""),
            a["service"].as_str().unwrap_or(""),
            list(&a["backends"])
        );
    }
    for r in &removed {
        println!(
            "{} frontend {} ({})",
            paint("-", Colour::Red),
            r["frontend"].as_str().unwrap_or(""),
            r["service"].as_str().unwrap_or("")
        );
    }
    for c in &changed {
        let (moved, slots) = (
            c["maglev"]["slots_moved"].as_u64().unwrap_or(0),
            c["maglev"]["slots"].as_u64().unwrap_or(0).max(1),
        );
        println!(
            "{} frontend {} ({}): backends +[{}] -[{}]; Maglev slots moved {moved} of {slots} ({:.1}%)",
            paint("~", Colour::Yellow),
            c["frontend"].as_str().unwrap_or(""),
            c["service"].as_str().unwrap_or(""),
            list(&c["backends_added"]),
            list(&c["backends_removed"]),
            100.0 * moved as f64 / slots as f64
        );
    }
    for a in &arp_added {
        println!("{} ARP {a}", paint("+", Colour::Green));
    }
    for a in &arp_removed {
        println!("{} ARP {a}", paint("-", Colour::Red));
    }
    if !any {
        println!("no changes");
    }
    Ok(any)
}

/// `lbctl trace`: see [`lb_userspace::trace`].
fn trace(args: &Args) -> Result<()> {
    use lb_userspace::trace::{self, Probe};
    let Command::Trace {
        arp,
        src,
        dst,
        proto,
        flags,
        iface,
    } = &args.command
    else {
        unreachable!()
    };
    let (probe, iface) = match arp {
        Some(TraceArp::Arp {
            who_has,
            iface,
            from,
        }) => (
            Probe::Arp {
                who_has: *who_has,
                from: *from,
            },
            iface.clone(),
        ),
        None => {
            let endpoint = |s: &str, what: &str, default: Option<u16>| -> Result<(Ipv4Addr, u16)> {
                match s.split_once(':') {
                    Some((a, p)) => Ok((
                        a.parse()
                            .with_context(|| format!("--{what} {s:?}: not an IPv4 address"))?,
                        p.parse()
                            .with_context(|| format!("--{what} {s:?}: not a port"))?,
                    )),
                    None => Ok((
                        s.parse()
                            .with_context(|| format!("--{what} {s:?}: not an IPv4 address"))?,
                        default.with_context(|| format!("--{what} {s:?}: give IP:PORT"))?,
                    )),
                }
            };
            let probe = Probe::Flow {
                src: endpoint(src.as_deref().unwrap_or_default(), "src", Some(40000))?,
                dst: endpoint(dst.as_deref().unwrap_or_default(), "dst", None)?,
                proto: match proto {
                    Proto::Tcp => lb_common::IPPROTO_TCP,
                    Proto::Udp => lb_common::IPPROTO_UDP,
                },
                tcp_flags: match flags {
                    Flags::Syn => trace::TCP_SYN,
                    Flags::Ack => 0x10,
                },
            };
            (probe, iface.clone())
        }
    };
    let iface = match iface {
        Some(i) => i,
        None => attach::read_interfaces(&args.state_dir)?
            .interfaces
            .first()
            .map(|a| a.interface.clone())
            .context("the agent attached to no interface; give --iface")?,
    };
    let maps = PinnedMaps::open(&args.bpffs, false)?;
    let frame = trace::frame(&probe, trace::interface_mac(&iface)?);
    let steps = trace::run(&args.bpffs, &iface, &frame)?;
    let why = trace::explain(&maps, &probe, trace::ifindex(&iface)?)?;
    // The programs' rewrite must be the backend the maps say.
    let last = steps.last().expect("at least one step");
    let agrees = match (&why.backend, &last.output) {
        (Some(b), Some(out)) => out.dst == *b || out.src == *b,
        _ => true,
    };
    let input = trace::headers(&frame);
    if is_structured(args.output) {
        return emit(&json!({"interface": iface, "input": input, "steps": steps,
            "verdict": last.verdict, "explanation": why, "consistent": agrees}));
    }
    println!(
        "{} {} → {} arriving on {iface}",
        input.kind, input.src, input.dst
    );
    for s in &steps {
        let verdict = match s.verdict {
            "drop" | "aborted" => paint(s.verdict, Colour::Red),
            "pass" => s.verdict.to_string(),
            v => paint(v, Colour::Green),
        };
        println!("  {} (program {}): {verdict}", s.hook, s.program_id);
        if let Some(o) = &s.output {
            let ttl = o.ttl.map(|t| format!(", ttl {t}")).unwrap_or_default();
            println!(
                "    out: {} {} → {}, {} → {}{ttl}",
                o.kind, o.src, o.dst, o.src_mac, o.dst_mac
            );
        }
    }
    println!("decided by: {}", why.decided_by);
    for (label, value) in [
        ("frontend", why.frontend.clone()),
        ("service", why.service.clone()),
        ("conntrack", why.conntrack.clone()),
        ("source ranges", why.source_ranges.clone()),
        ("affinity", why.affinity.clone()),
        (
            "maglev",
            why.maglev.as_ref().map(|m| {
                format!(
                    "hash {:#010x} → slot {} of {} → backend id {}",
                    m.hash, m.slot, m.table_size, m.backend_id
                )
            }),
        ),
        ("backend", why.backend.clone()),
    ] {
        if let Some(v) = value {
            println!("  {label}: {v}");
        }
    }
    if !agrees {
        println!(
            "warning: the programs' rewrite differs from what the maps explain (they changed meanwhile?)"
        );
    }
    Ok(())
}
