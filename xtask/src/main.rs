//! Orchestration: `cargo xtask setup | test | demo | bench | fmt-check`. Building the eBPF object is
//! aya-build's job (lb-userspace/build.rs), not this one's.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks")]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): Debian packages, nightly rust-src,
    /// bpf-linker built against nightly's libLLVM, bpffs.
    Setup,
    /// Setup, unit tests, then the root tests that send real packets in network namespaces.
    Test,
    /// Setup, build, and run the veth demo from examples/demo.yaml.
    Demo,
    /// Setup, then every benchmark under bench/ (tables, CSV and PNG in bench/results/).
    Bench {
        /// Short smoke run into target/bench-quick (what CI runs): proves the benchmarks work.
        #[arg(long)]
        quick: bool,
        /// Only these benchmarks (comma-separated), as `lb-bench --only`.
        #[arg(long)]
        only: Option<String>,
    },
    /// The long runs of the reliability tests: fuzzed frames with a fresh random seed per round
    /// (`cargo xtask test` uses a fixed one) and `frames` per program, then the restart and
    /// churn tests, `rounds` times.
    Soak {
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// cargo fmt --check.
    FmtCheck,
}

/// Debian packages the tests, demo and benchmarks use, by the command (or, starting with `/`,
/// the file) that proves each is installed. The benchmarks' plots need fontconfig, freetype and
/// a font.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("arping", "iputils-arping"),
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("pkg-config", "pkg-config"),
    ("/usr/include/fontconfig/fontconfig.h", "libfontconfig-dev"),
    ("/usr/include/freetype2/ft2build.h", "libfreetype-dev"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .context("rustc +nightly")?
            .stdout,
    )?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        // bpf-linker must link against the very libLLVM the nightly compiler uses.
        let lib = std::fs::read_dir(sysroot.join("lib"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .context("nightly toolchain has no libLLVM.so.*")?;
        let name = lib.file_name().unwrap().to_str().unwrap().to_string();
        let major: String = name
            .trim_start_matches("libLLVM.so.")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let prefix = PathBuf::from("/opt/rust-llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        for link in [
            prefix.join("lib/libLLVM.so"),
            prefix.join("lib").join(&name),
        ] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&lib, &link)?;
        }
        run(Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix))?;
    }

    if !is_bpffs("/sys/fs/bpf") {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn is_bpffs(path: &str) -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs")
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Task::Setup => setup(),
        Task::Test => {
            if !is_root() {
                bail!(
                    "cargo xtask test sends packets through network namespaces and loads XDP programs: run it as root"
                );
            }
            setup()?;
            run(cargo().args(["test", "-p", "lb-common", "--features", "user"]))?;
            run(cargo().args(["test", "-p", "lb-userspace"]))?;
            // The netns tests start the agent and the test servers from target/debug.
            run(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))?;
            run(cargo().args(["test", "-p", "lb-tests", "--", "--test-threads=1"]))
        }
        Task::Demo => {
            if !is_root() {
                bail!("cargo xtask demo makes network namespaces: run it as root");
            }
            setup()?;
            run(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))?;
            run(cargo()
                .args(["run", "-q", "-p", "lb-tests", "--bin", "lb-demo", "--"])
                .arg(root().join("examples/demo.yaml")))
        }
        Task::Bench { quick, only } => {
            if !is_root() {
                bail!(
                    "cargo xtask bench loads XDP programs and makes network namespaces: run it as root"
                );
            }
            setup()?;
            // The TCP benchmark starts lb-agent and the test servers from target/release.
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "-p",
                "lb-tests",
                "--bins",
            ]))?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "-q", "-p", "lb-bench", "--"]);
            if quick {
                cmd.arg("--quick")
                    .arg("--out")
                    .arg(root().join("target/bench-quick"));
            }
            if let Some(only) = only {
                cmd.args(["--only", &only]);
            }
            run(&mut cmd)
        }
        Task::Soak { frames, rounds } => {
            if !is_root() {
                bail!(
                    "cargo xtask soak loads XDP programs and makes network namespaces: run it as root"
                );
            }
            setup()?;
            run(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]))?;
            for round in 1..=rounds {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos() as u64
                    | 1;
                println!("soak round {round}/{rounds}: LB_FUZZ_SEED={seed}");
                run(cargo()
                    .args([
                        "test",
                        "-p",
                        "lb-tests",
                        "--test",
                        "fuzz",
                        "--test",
                        "under_load",
                    ])
                    .args(["--", "--test-threads=1", "--nocapture"])
                    .env("LB_FUZZ_FRAMES", frames.to_string())
                    .env("LB_FUZZ_SEED", seed.to_string()))?;
            }
            Ok(())
        }
        Task::FmtCheck => run(cargo().args(["fmt", "--all", "--check"])),
    }
}
