//! vmc's command line: parse, dispatch, print any error once, exit with the
//! right code (the workload's own, or 125 when vmc itself failed).

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmc::cli::{Cli, Command, RunArgs, SystemCommand};
use vmc::runtime::{self, ContainerConfig, ProcessSpec, Resources};
use vmc::{assets, bench, vmm};

/// Docker's exit code for "the runtime itself failed".
const EXIT_VMC_ERROR: i32 = 125;

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("vmc [{}] {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("VMC_LOG").as_deref() {
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn main() {
    vmc::runtime::elapsed_ms();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, like every other vmc error: clap's first line is the problem.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "vmc: {} (see vmc --help)",
                first.trim_start_matches("error: ")
            );
            std::process::exit(EXIT_VMC_ERROR);
        }
    };
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vmc: {}", chain.join(": "));
            EXIT_VMC_ERROR
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Info => info(),
        Command::Bench(args) => bench::run(args).map(|_| 0).map_err(Into::into),
        Command::System(SystemCommand::Prune) => prune(),
    }
}

fn run(args: RunArgs) -> Result<i32> {
    // Fail before anything else when KVM cannot be used at all.
    vmm::open_kvm()?;
    if args.memory < vmm::MIN_MEMORY {
        bail!(
            "--memory {}: a microVM needs at least {} MiB",
            args.memory,
            vmm::MIN_MEMORY >> 20
        );
    }
    if !args.rootfs.is_dir() {
        bail!(
            "--rootfs {}: no such directory (give the root filesystem of the container)",
            args.rootfs.display()
        );
    }
    let kernel = assets::kernel(args.kernel.as_deref())?;
    let id = runtime::new_id();
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    let mut env = vec![format!("HOSTNAME={hostname}")];
    for e in &args.env {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    let cfg = ContainerConfig {
        id: id.clone(),
        rootfs: args.rootfs.clone(),
        process: ProcessSpec {
            args: args.command.clone(),
            env,
            cwd: args.workdir.clone().unwrap_or_else(|| "/".into()),
            user: args.user.clone().unwrap_or_default(),
            ..Default::default()
        },
        hostname,
        resources: Resources {
            cpus: args.cpus,
            memory: args.memory,
        },
        kernel,
        debug: args.debug,
        snapshots: runtime::snapshots_dir(),
    };
    let forward_stdin = args.interactive || !std::io::stdin().is_terminal();
    let dir = runtime::vmc_home().join("containers").join(&id);
    let how = if args.cold {
        runtime::microvm::Start::Cold
    } else {
        runtime::microvm::Start::Warm
    };
    let result = runtime::microvm::run_attached(&cfg, &dir, forward_stdin, how);
    // A run that failed in vmc itself leaves nothing behind.
    if args.rm || result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.context("run")
}

fn prune() -> Result<i32> {
    let dir = runtime::snapshots_dir();
    let (n, bytes) =
        runtime::snapshot::prune(&dir).with_context(|| format!("pruning {}", dir.display()))?;
    let cache = runtime::vmc_home().join("cache");
    let mut disks = 0;
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("agent-")
                && std::fs::remove_file(e.path()).is_ok()
            {
                disks += 1;
            }
        }
    }
    println!(
        "removed {n} snapshot(s) ({:.1} MiB) and {disks} cached agent disk(s)",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(0)
}

fn info() -> Result<i32> {
    println!("vmc {}", env!("CARGO_PKG_VERSION"));
    println!("backend: {}", vmm::Backend::detect());
    match vmm::open_kvm() {
        Ok(kvm) => println!(
            "kvm: API {}, up to {} vCPUs",
            kvm.get_api_version(),
            kvm.get_max_vcpus()
        ),
        Err(e) => println!("kvm: unavailable ({e})"),
    }
    let extra = vmm::Backend::detect().guest_cmdline();
    if !extra.is_empty() {
        println!("guest workarounds: {extra}");
    }
    match assets::kernel(None) {
        Ok(p) => println!("kernel: {}", p.display()),
        Err(e) => println!("kernel: missing ({e})"),
    }
    match assets::guest_binary() {
        Ok(p) => println!("guest agent: {}", p.display()),
        Err(e) => println!("guest agent: missing ({e})"),
    }
    println!("state: {}", runtime::vmc_home().display());
    println!("snapshots: {}", runtime::snapshots_dir().display());
    Ok(0)
}
