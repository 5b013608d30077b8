//! lb-bench: the benchmarks of the XDP load balancer, each printing a table and writing CSV and a
//! PNG under bench/results/, plus summary.csv with one row per target. Needs root (it loads XDP
//! programs and makes network namespaces); `cargo xtask bench [--quick]` runs it.

mod agent_memory;
mod arp;
mod control;
mod forward;
mod kube;
mod maglev;
mod memory;
mod report;
mod services;
mod snat;
mod tcp;
mod xdp;

use std::{fs, path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;

type Benchmark = fn(bool, &std::path::Path) -> Result<(report::Table, Vec<report::Target>)>;

/// Every benchmark in run order: name (for --only) and how to run it (quick or full).
const BENCHMARKS: [(&str, Benchmark); 10] = [
    ("xdp", |quick, out| {
        xdp::run(&xdp::Settings::new(quick), out)
    }),
    ("forward", |quick, out| {
        forward::run(&forward::Settings::new(quick), out)
    }),
    ("snat", |quick, out| {
        snat::run(&snat::Settings::new(quick), out)
    }),
    ("tcp", |quick, out| {
        tcp::run(&tcp::Settings::new(quick), out)
    }),
    ("maglev", |quick, out| {
        maglev::run(&maglev::Settings::new(quick), out)
    }),
    ("control", |quick, out| {
        control::run(&control::Settings::new(quick), out)
    }),
    ("kubernetes", |quick, out| {
        kube::run(&kube::Settings::new(quick), out)
    }),
    ("arp", |quick, out| {
        arp::run(&arp::Settings::new(quick), out)
    }),
    ("memory", |quick, out| {
        memory::run(&memory::Settings::new(quick), out)
    }),
    ("agent-memory", |quick, out| {
        agent_memory::run(&agent_memory::Settings::new(quick), out)
    }),
];

#[derive(Parser, Debug)]
#[command(about = "XDP load balancer benchmarks")]
struct Args {
    /// Short smoke run (fewer sizes and repetitions): proves the benchmarks work, numbers are rough.
    #[arg(long)]
    quick: bool,
    /// Benchmarks to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(BENCHMARKS.map(|(name, _)| name)))]
    only: Vec<String>,
    /// Where CSV, PNG and summary.csv go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

fn machine() -> String {
    let uname = std::process::Command::new("uname").arg("-r").output().ok();
    let kernel = uname
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, kernel {kernel}")
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "lb-bench loads XDP programs and makes network namespaces: run it as root"
    );
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let started = Instant::now();
    let machine = machine();
    let mut markdown = format!(
        "Machine: {machine}. Mode: {}. Date: {}.\n\n",
        if args.quick {
            "quick (smoke, not for comparison)"
        } else {
            "full"
        },
        chrono_free_date()
    );
    let mut targets = Vec::new();

    for (name, run) in BENCHMARKS {
        if wanted(name) {
            let (table, t) = run(args.quick, &args.out)?;
            finish(&table, &args.out, &mut markdown)?;
            targets.extend(t);
        }
    }

    let summary = report::write_summary(&args.out, &targets, !args.only.is_empty())?;
    markdown += "### Targets\n\n| metric | value | baseline | ratio | target | met |\n|---|---|---|---|---|---|\n";
    for t in &targets {
        markdown += &format!(
            "| {} | {} | {} | {:.2} | {} | {} |\n",
            t.metric,
            report::num(t.value),
            report::num(t.baseline),
            t.ratio,
            t.target,
            if t.met { "yes" } else { "**no**" }
        );
    }
    // A partial run keeps the full run's tables: its own go beside them.
    let tables = if args.only.is_empty() {
        "results.md".to_string()
    } else {
        format!("results.{}.md", args.only.join("+"))
    };
    fs::write(args.out.join(&tables), &markdown)?;
    println!("\n### Targets ({})\n", summary.display());
    for t in &targets {
        println!(
            "{:<80} {:>10} vs {:>10} = {:>6.2}  [{}] {}",
            t.metric,
            report::num(t.value),
            report::num(t.baseline),
            t.ratio,
            t.target,
            if t.met { "met" } else { "NOT met" }
        );
    }
    println!(
        "\nall benchmarks took {:.0} s; tables in {}",
        started.elapsed().as_secs_f64(),
        args.out.join(&tables).display()
    );
    Ok(())
}

fn finish(table: &report::Table, out: &std::path::Path, markdown: &mut String) -> Result<()> {
    let rendered = table.render();
    println!("\n{rendered}");
    let csv = table.write(out)?;
    println!(
        "→ {} and {}.png",
        csv.display(),
        out.join(table.name).display()
    );
    *markdown += &rendered;
    *markdown += &format!("\n![{}]({}.png)\n\n", table.title, table.name);
    Ok(())
}

/// Today's date (UTC) without a date crate: days since the epoch to a civil date.
fn chrono_free_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
