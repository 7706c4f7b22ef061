//! vmc's command line: parse, dispatch, print any error once, exit with the
//! right code (the workload's own, or 125 when vmc itself failed).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmc::cli::{
    BuildArgs, Cli, Command, ImagesArgs, ImportArgs, InspectArgs, LoadArgs, PullArgs, RmiArgs,
    RunArgs, SaveArgs, SystemCommand, TagArgs,
};
use vmc::image::{self, Reference, Store};
use vmc::runtime::spec::{self, RunOverrides};
use vmc::runtime::{self, ContainerConfig, Resources, Rootfs};
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
            // Causes already spelled out by their parent's message are not repeated.
            let mut line = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("vmc: {line}");
            EXIT_VMC_ERROR
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Build(a) => build(a),
        Command::Info => info(),
        Command::Images(a) => images(a),
        Command::Inspect(a) => inspect(a),
        Command::Tag(a) => tag(a),
        Command::Rmi(a) => rmi(a),
        Command::Import(a) => import(a),
        Command::Pull(a) => pull(a),
        Command::Load(a) => load(a),
        Command::Save(a) => save(a),
        Command::Bench(args) => bench::run(args).map(|_| 0).map_err(Into::into),
        Command::System(SystemCommand::Prune) => prune(),
    }
}

/// The image store at $VMC_HOME.
fn store() -> Result<Store> {
    Ok(Store::open(&runtime::vmc_home())?)
}

fn run(args: RunArgs) -> Result<i32> {
    let ns = args.mode == "ns";
    // Fail before anything else when KVM cannot be used at all.
    if !ns {
        vmm::open_kvm()?;
    }
    if args.memory < vmm::MIN_MEMORY {
        bail!(
            "--memory {}: a microVM needs at least {} MiB",
            args.memory,
            vmm::MIN_MEMORY >> 20
        );
    }
    let kernel = if ns {
        PathBuf::new()
    } else {
        assets::kernel(args.kernel.as_deref())?
    };
    let mut env = Vec::new();
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
    let (rootfs, image_config, command, image_id) = match &args.rootfs {
        Some(dir) => {
            if !dir.is_dir() {
                bail!(
                    "--rootfs {}: no such directory (give the root filesystem of the container)",
                    dir.display()
                );
            }
            if args.args.is_empty() {
                bail!("no command given: vmc run --rootfs DIR -- CMD [ARG...]");
            }
            (Rootfs::Dir(dir.clone()), None, args.args.clone(), None)
        }
        None => {
            let Some((name, command)) = args.args.split_first() else {
                bail!("no image given: vmc run [OPTIONS] IMAGE [CMD...] (or --rootfs DIR -- CMD)");
            };
            let store = store()?;
            let img = store.resolve(name)?;
            let cache = runtime::vmc_home().join("cache");
            let root = if ns {
                let lowers = image::disk::layer_dirs(&store, &img, &cache)
                    .with_context(|| format!("unpacking the layers of {name}"))?;
                Rootfs::Layers(lowers)
            } else {
                Rootfs::Disk(
                    image::disk::root_disk(&store, &img, &cache)
                        .with_context(|| format!("building the root disk of {name}"))?,
                )
            };
            (
                root,
                img.config.config().clone(),
                command.to_vec(),
                Some(img.id()),
            )
        }
    };
    let process = spec::process(
        image_config.as_ref(),
        &RunOverrides {
            command,
            entrypoint: args.entrypoint.clone(),
            env,
            workdir: args.workdir.clone(),
            user: args.user.clone(),
        },
    )?;
    let id = runtime::new_id();
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    let mut process = process;
    spec::merge_env(&mut process.env, &[format!("HOSTNAME={hostname}")]);
    let cfg = ContainerConfig {
        id: id.clone(),
        rootfs,
        image_id,
        process,
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
    if ns {
        let lowers = match &cfg.rootfs {
            Rootfs::Layers(l) => l.clone(),
            Rootfs::Dir(d) => vec![d.clone()],
            Rootfs::Disk(_) => unreachable!("namespace mode never builds a disk"),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(img) = &cfg.image_id {
            let _ = std::fs::write(dir.join("image-id"), img);
        }
        let result = runtime::ns::run_attached(&cfg, &lowers, &dir);
        if args.rm || result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return result.context("run");
    }
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

fn images(a: ImagesArgs) -> Result<i32> {
    let store = store()?;
    let list = store.images()?;
    if a.quiet {
        for img in &list {
            println!("{}", img.short_id());
        }
        return Ok(0);
    }
    println!(
        "{:<40} {:<20} {:<14} {:<22} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"
    );
    for img in &list {
        let created = img.config.created().clone().unwrap_or_default();
        let size = format!("{:.1}MB", img.size() as f64 / 1e6);
        let names: Vec<(String, String)> = if img.names.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            img.names
                .iter()
                .map(|n| match n.rsplit_once(':') {
                    Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
                    _ => (n.clone(), "<none>".into()),
                })
                .collect()
        };
        for (repo, tag) in names {
            println!(
                "{repo:<40} {tag:<20} {:<14} {created:<22} {size:>10}",
                img.short_id()
            );
        }
    }
    Ok(0)
}

fn inspect(a: InspectArgs) -> Result<i32> {
    let store = store()?;
    let mut out = Vec::new();
    for name in &a.images {
        let img = store.resolve(name)?;
        out.push(serde_json::json!({
            "Id": img.id(),
            "RepoTags": img.names,
            "ManifestDigest": img.manifest_digest.to_string(),
            "Created": img.config.created(),
            "Architecture": img.config.architecture().to_string(),
            "Os": img.config.os().to_string(),
            "Size": img.size(),
            "Config": img.config.config(),
            "RootFS": img.config.rootfs(),
            "History": img.config.history(),
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

fn tag(a: TagArgs) -> Result<i32> {
    let store = store()?;
    let img = store.resolve(&a.source)?;
    let target = Reference::parse(&a.target)?;
    let desc = oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::ImageManifest,
        img.manifest_size,
        img.manifest_digest.clone(),
    );
    store.tag(&target.store_name(), &desc)?;
    Ok(0)
}

/// Image ids used by containers whose state is still on disk.
fn images_in_use() -> Vec<String> {
    let dir = runtime::vmc_home().join("containers");
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(id) = std::fs::read_to_string(e.path().join("image-id")) {
                ids.push(id.trim().to_string());
            }
        }
    }
    ids
}

fn rmi(a: RmiArgs) -> Result<i32> {
    let store = store()?;
    let in_use = images_in_use();
    for name in &a.images {
        let img = store.resolve(name)?;
        // A name removes that name only, like docker rmi, unless it is the last.
        let by_name = Reference::parse(name)
            .ok()
            .map(|r| r.store_name())
            .filter(|n| img.names.contains(n));
        let last = img.names.len() <= 1 || by_name.is_none();
        if last && !a.force && in_use.contains(&img.id()) {
            bail!(
                "image {name} is used by a container; remove the container first or use vmc rmi -f"
            );
        }
        match by_name {
            Some(n) if img.names.len() > 1 => {
                store.untag(&n)?;
                println!("Untagged: {n}");
            }
            _ => {
                for n in &img.names {
                    println!("Untagged: {n}");
                }
                store.remove_manifest(&img.manifest_digest)?;
                println!("Deleted: {}", img.id());
            }
        }
    }
    store.gc()?;
    Ok(0)
}

fn import(a: ImportArgs) -> Result<i32> {
    let store = store()?;
    let name = match &a.name {
        Some(n) => Some(Reference::parse(n)?.store_name()),
        None => None,
    };
    let img = image::import::import_rootfs(&store, &a.file, name.as_deref())?;
    println!("{}", img.id());
    Ok(0)
}

fn build(a: BuildArgs) -> Result<i32> {
    if a.memory < vmm::MIN_MEMORY {
        bail!(
            "--memory {}: a microVM needs at least {} MiB",
            a.memory,
            vmm::MIN_MEMORY >> 20
        );
    }
    if !a.context.is_dir() {
        bail!(
            "build context {}: no such directory (give the directory holding your Dockerfile, e.g. .)",
            a.context.display()
        );
    }
    // Tags are checked before any work is done.
    for t in &a.tags {
        Reference::parse(t).with_context(|| format!("-t {t}"))?;
    }
    let mut build_args = Vec::new();
    for b in &a.build_args {
        match b.split_once('=') {
            Some((k, v)) => build_args.push((k.to_string(), v.to_string())),
            None => {
                if let Ok(v) = std::env::var(b) {
                    build_args.push((b.clone(), v));
                }
            }
        }
    }
    let store = store()?;
    let o = vmc::build::BuildOptions {
        context: a.context.clone(),
        dockerfile: a.file.clone(),
        tags: a.tags.clone(),
        build_args,
        no_cache: a.no_cache,
        ns: a.mode == "ns",
        kernel: a.kernel.clone(),
        resources: Resources {
            cpus: a.cpus,
            memory: a.memory,
        },
        snapshots: runtime::snapshots_dir(),
    };
    let mut sink: Box<dyn std::io::Write> = if a.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    };
    match vmc::build::build(&store, &o, &mut sink) {
        Ok(img) => {
            if a.quiet {
                println!("{}", img.id());
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("vmc: build failed: {e}");
            Ok(e.exit_code())
        }
    }
}

fn pull(a: PullArgs) -> Result<i32> {
    let reference = Reference::parse(&a.reference)?;
    let store = store()?;
    let opts = image::pull::PullOptions {
        insecure: a.insecure,
        // Bars only for a person watching; logs and pipes get plain lines.
        progress: !a.quiet && std::io::stderr().is_terminal(),
    };
    let mut out: Box<dyn std::io::Write> = if a.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    };
    let pulled = image::pull::pull(&store, &reference, &opts, &mut out)?;
    if a.quiet {
        println!("{}", pulled.image.id());
    }
    Ok(0)
}

fn load(a: LoadArgs) -> Result<i32> {
    let store = store()?;
    let loaded = image::archive::load(&store, &a.input)?;
    for img in &loaded {
        if a.quiet {
            println!("{}", img.id());
        } else if img.names.is_empty() {
            println!("Loaded image ID: {}", img.id());
        } else {
            for n in &img.names {
                println!("Loaded image: {n}");
            }
        }
    }
    Ok(0)
}

fn save(a: SaveArgs) -> Result<i32> {
    let store = store()?;
    image::archive::save(&store, &a.images, &a.output)?;
    Ok(0)
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
