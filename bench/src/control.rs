//! Benchmark 4: control plane. Time to program S services × E endpoints from YAML into the maps
//! (parse, validate, Maglev tables, map writes) versus `iptables-restore` and `nft -f` of the
//! equivalent kube-proxy rulesets (each into a fresh network namespace of its own), and the time
//! from one endpoint change in the file to the maps being updated (p50/p99 over 100 changes).

use std::{fmt::Write as _, net::Ipv4Addr, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use lb_tests::{lab::XdpLab, sh};
use lb_userspace::config;

use crate::{
    report::{Plot, Table, Target, num},
    services::lab_options,
    services::{endpoint, vip},
};

pub struct Settings {
    pub services: u32,
    pub endpoints: u32,
    /// 0: automatic per-service sizes, as the agent does by default.
    pub maglev_size: u32,
    pub changes: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: 500,
                endpoints: 10,
                maglev_size: 0,
                changes: 10,
            }
        } else {
            Self {
                services: 10_000,
                endpoints: 10,
                maglev_size: 0,
                changes: 100,
            }
        }
    }
}

/// Services and EndpointSlices as a user would write them. `moved` shifts the first endpoint of
/// service `moved.0` by `moved.1` (an endpoint change).
pub fn yaml(services: u32, per: u32, moved: Option<(u32, u32)>) -> String {
    let mut out = String::with_capacity(services as usize * 600);
    for i in 0..services {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\n\
             addressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n",
            vip(i)
        );
        for k in 0..per {
            let mut a = endpoint(i, k, per);
            if k == 0 && moved.is_some_and(|(s, _)| s == i) {
                a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + moved.unwrap().1);
            }
            let _ = writeln!(out, "- addresses: [\"{a}\"]\n  conditions: {{ready: true}}");
        }
        out.push_str("---\n");
    }
    out
}

fn svc_hash(i: u32) -> String {
    format!("{:016X}", lb_common::hash::fmix64(u64::from(i) + 1))
}

/// The kube-proxy iptables-mode ruleset (nat table) for the same services.
pub fn iptables_rules(services: u32, per: u32, proto: &str) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    );
    for i in 0..services {
        let svc = format!("KUBE-SVC-{}", svc_hash(i));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"bench/svc-{i}:http cluster IP\" -m {proto} --dport 80 -j {svc}",
            vip(i)
        );
        for k in 0..per {
            let sep = format!("KUBE-SEP-{}", svc_hash(i * per + k + 1_000_000));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = per - k;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http\" -j {sep}"
                );
            }
            let ep = endpoint(i, k, per);
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"bench/svc-{i}:http\" -m {proto} -j DNAT --to-destination {ep}:8080"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

/// The kube-proxy nftables-mode ruleset for the same services: a verdict map from
/// (address, protocol, port) to a per-service chain that picks an endpoint with numgen.
pub fn nft_rules(services: u32, per: u32, proto: &str) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    let mut elements = Vec::with_capacity(services as usize);
    let mut chains = String::new();
    for i in 0..services {
        let svc = format!("service-{}-bench/svc-{i}/{proto}/http", svc_hash(i));
        elements.push(format!("{} . {proto} . 80 : goto {svc}", vip(i)));
        let mut vmap = Vec::new();
        for k in 0..per {
            let ep = format!(
                "endpoint-{}-bench/svc-{i}/{proto}/http__{}/8080",
                svc_hash(i * per + k + 1_000_000),
                endpoint(i, k, per)
            );
            vmap.push(format!("{k} : goto {ep}"));
            let _ = writeln!(
                chains,
                "  chain {ep} {{\n    ip saddr {} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {}:8080\n  }}",
                endpoint(i, k, per),
                endpoint(i, k, per)
            );
        }
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    numgen random mod {per} vmap {{ {} }}\n  }}",
            vmap.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "  chain mark-for-masquerade {{\n    mark set mark or 0x4000\n  }}\n\
         {chains}  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}\n\
         chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n}}",
        elements.join(",\n      ")
    );
    out
}

/// Runs `cmd` with `input` in a fresh namespace; returns milliseconds.
pub fn timed_load(what: &str, cmd: &str, input: &str) -> Result<f64> {
    let ns = format!("lbc{}{}", std::process::id() % 100_000, what);
    sh(&format!("ip netns add {ns}"))?;
    let path = std::env::temp_dir().join(format!("{ns}.rules"));
    std::fs::write(&path, input)?;
    let start = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {ns} {cmd} < {}", path.display()))
        .output();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_file(&path);
    let out = out.with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(500)
                .collect::<String>()
        );
    }
    Ok(ms)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(s: &Settings, out: &std::path::Path) -> Result<(Table, Vec<Target>)> {
    let (n, per) = (s.services, s.endpoints);
    eprintln!("control: {n} services × {per} endpoints …");
    let text = yaml(n, per, None);
    let dir = std::env::temp_dir().join(format!("lb-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("services.yaml");
    std::fs::write(&file, &text)?;

    let mut lab = XdpLab::new(lab_options(s.maglev_size, n + 16, n + 16, n * per + 64))?;
    // Full programming: read, parse, validate, build every table, write every map.
    let start = Instant::now();
    let read = std::fs::read_to_string(&file)?;
    let parsed_at = Instant::now();
    let (desired, _) = config::load_str(&read).map_err(|e| anyhow::anyhow!("{e}"))?;
    let parse_ms = parsed_at.elapsed().as_secs_f64() * 1e3;
    lab.apply_maps_only(&desired)?;
    let ours_ms = start.elapsed().as_secs_f64() * 1e3;

    // One endpoint change at a time: the agent's reload path, file to maps, with the agent's
    // document cache (warmed by one reload of the unchanged file), which rebuilds only the
    // Service whose EndpointSlice changed.
    let mut cache = config::ConfigCache::default();
    let ctx = config::BuildContext::default();
    config::load_cached(&mut cache, &read, &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut latencies = Vec::new();
    let (mut parse_t, mut build_t, mut apply_t) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..s.changes {
        let changed = yaml(n, per, Some(((c as u32 * 7919) % n, c as u32 + 1)));
        std::fs::write(&file, &changed)?;
        let start = Instant::now();
        let read = std::fs::read_to_string(&file)?;
        let parsed = Instant::now();
        let (desired, _) =
            config::load_cached(&mut cache, &read, &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
        let built = Instant::now();
        lab.apply_maps_only(&desired)?;
        let done = Instant::now();
        latencies.push((done - start).as_secs_f64() * 1e3);
        parse_t.push((parsed - start).as_secs_f64() * 1e3);
        build_t.push((built - parsed).as_secs_f64() * 1e3);
        apply_t.push((done - built).as_secs_f64() * 1e3);
    }
    anyhow::ensure!(
        cache.built.incremental_builds == s.changes as u64,
        "only {} of {} endpoint changes took the incremental rebuild",
        cache.built.incremental_builds,
        s.changes
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);

    eprintln!("control: iptables-restore …");
    let iptables_ms = timed_load("ipt", "iptables-restore", &iptables_rules(n, per, "tcp"))?;
    eprintln!("control: nft -f …");
    let nft_ms = timed_load("nft", "nft -f -", &nft_rules(n, per, "tcp"))?;
    let iptables_version = Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let mut table = Table::new(
        "control_plane",
        format!(
            "Control plane: {n} services × {per} endpoints (Maglev M = {}; {iptables_version})",
            match s.maglev_size {
                0 => "auto, the agent's default: 1024 for 10 endpoints".to_string(),
                m => m.to_string(),
            }
        ),
        &["what", "ms", "vs ours"],
    );
    table.row(vec![
        "ours: YAML → maps (total)".into(),
        num(ours_ms),
        "1.00×".into(),
    ]);
    table.row(vec![
        "  of which parse + validate".into(),
        num(parse_ms),
        String::new(),
    ]);
    table.row(vec![
        "iptables-restore (kube-proxy iptables ruleset)".into(),
        num(iptables_ms),
        format!("{:.2}×", iptables_ms / ours_ms),
    ]);
    table.row(vec![
        "nft -f (kube-proxy nftables ruleset)".into(),
        num(nft_ms),
        format!("{:.2}×", nft_ms / ours_ms),
    ]);
    table.row(vec![
        format!(
            "ours: one endpoint change, file → maps, p50 of {}",
            s.changes
        ),
        num(p50),
        String::new(),
    ]);
    table.row(vec![
        format!(
            "ours: one endpoint change, file → maps, p99 of {}",
            s.changes
        ),
        num(p99),
        String::new(),
    ]);
    table.row(vec![
        "  p50 split: read / parse (cached) + desired state / map diff + writes".into(),
        format!(
            "{} / {} / {}",
            num(percentile(&parse_t, 0.5)),
            num(percentile(&build_t, 0.5)),
            num(percentile(&apply_t, 0.5))
        ),
        String::new(),
    ]);
    Plot::sorted_samples(
        "Endpoint change: file to maps (sorted samples)",
        "file → maps",
        &latencies,
    )
    .write(&out.join("control_plane.png"))?;
    let targets = vec![
        Target::at_least(
            "control plane: iptables-restore ms / ours ms",
            iptables_ms,
            ours_ms,
            10.0,
            ">= 10x faster than iptables-restore",
        ),
        Target::at_most(
            "control plane: endpoint change p99 ms (vs 50 ms)",
            p99,
            50.0,
            1.0,
            "p99 <= 50 ms",
        ),
    ];
    Ok((table, targets))
}
