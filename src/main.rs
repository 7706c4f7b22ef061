//! vmc's command line: parse, dispatch, print any error once, exit with the
//! right code (the workload's own, or 125 when vmc itself failed).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmc::cli::{
    BuildArgs, Cli, Command, ExecArgs, ImagesArgs, ImportArgs, InspectArgs, KillArgs, LoadArgs,
    LogsArgs, PsArgs, PullArgs, RmArgs, RmiArgs, RunArgs, SaveArgs, StopArgs, SystemCommand,
    TagArgs, WaitArgs,
};
use vmc::image::{self, Reference, Store};
use vmc::runtime::spec::{self, RunOverrides};
use vmc::runtime::state::{self as cstate, Container, Status};
use vmc::runtime::{self, ContainerConfig, Resources, Rootfs};
use vmc::{assets, bench, disk, vmm};

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
    // Descriptors inherited from whoever started vmc never reach a
    // container, passt, the VMM or a detached supervisor.
    if let Err(e) = vmc_guest::sys::close_inherited_fds() {
        eprintln!("vmc: cannot close inherited file descriptors: {e}");
        std::process::exit(EXIT_VMC_ERROR);
    }
    if std::env::var_os(vmc::runtime::ns::REEXEC_ENV).is_some() {
        // SAFETY: single-threaded still; the marker is for this process only.
        unsafe { std::env::remove_var(vmc::runtime::ns::REEXEC_ENV) };
        // Kept as a fact for the loop check, without the variable.
        vmc::runtime::ns::REEXECUTED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
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

/// `--security-opt` values as Docker spells them; what vmc cannot honour
/// is refused, not ignored.
fn security_options(opts: &[String], ns: bool) -> Result<runtime::seccomp::Seccomp> {
    let mut seccomp = runtime::seccomp::Seccomp::Default;
    for opt in opts {
        // Docker also takes the older `key:value`.
        let (key, value) = opt
            .split_once('=')
            .or_else(|| opt.split_once(':'))
            .unwrap_or((opt.as_str(), ""));
        match (key, value) {
            ("seccomp", "unconfined") => seccomp = runtime::seccomp::Seccomp::Unconfined,
            ("seccomp", "") => bail!("--security-opt seccomp needs a value: seccomp=unconfined or seccomp=PROFILE.json"),
            ("seccomp", v) => {
                if !ns {
                    bail!("--security-opt seccomp=PROFILE applies to namespace mode (--mode ns): in a microVM the guest kernel is the boundary and no filter is installed");
                }
                seccomp = runtime::seccomp::Seccomp::from_option(v)?;
            }
            ("no-new-privileges", "" | "true") => {}
            ("no-new-privileges", _) => bail!("--security-opt {opt}: vmc always sets no_new_privs in namespace mode (a microVM's workload is confined by its kernel)"),
            _ => bail!("--security-opt {opt} is not supported (vmc knows seccomp=unconfined, seccomp=PROFILE.json and no-new-privileges)"),
        }
    }
    Ok(seccomp)
}

/// The `--add-host` entries, checked.
fn extra_hosts(given: &[String]) -> Result<Vec<runtime::net::ExtraHost>> {
    given
        .iter()
        .map(|s| runtime::net::ExtraHost::parse(s).map_err(anyhow::Error::msg))
        .collect()
}

/// Whether `command` enters a namespace container (and so must run from a
/// read-only binary: `runtime::ns::run_from_read_only_binary`).
fn enters_namespace_container(command: &Command) -> bool {
    match command {
        Command::Run(a) => a.mode == "ns",
        Command::Build(a) => a.mode == "ns",
        Command::Exec(_) | Command::Supervise { .. } => true,
        _ => false,
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    if enters_namespace_container(&cli.command) {
        runtime::ns::run_from_read_only_binary()?;
    }
    // Made (or tightened) 0700 before anything is written under it.
    let home = runtime::vmc_home();
    runtime::private_dir(&home)
        .with_context(|| format!("making vmc's state directory {}", home.display()))?;
    match cli.command {
        Command::Run(args) => run(args),
        Command::Build(a) => build(a),
        Command::Info => info(),
        Command::Ps(a) => ps(a),
        Command::Logs(a) => logs(a),
        Command::Stop(a) => stop(a),
        Command::Kill(a) => kill(a),
        Command::Rm(a) => rm(a),
        Command::Wait(a) => wait(a),
        Command::Exec(a) => exec(a),
        Command::Port { container } => {
            let c = cstate::resolve(&container)?;
            for m in c.config().map(|c| c.ports).unwrap_or_default() {
                println!("{m}");
            }
            Ok(0)
        }
        Command::Supervise { dir } => supervise(&dir),
        Command::Images(a) => images(a),
        Command::Inspect(a) => inspect(a),
        Command::Tag(a) => tag(a),
        Command::Rmi(a) => rmi(a),
        Command::Import(a) => import(a),
        Command::Pull(a) => pull(a),
        Command::Load(a) => load(a),
        Command::Save(a) => save(a),
        Command::Bench(args) => bench::run(args).map(|_| 0).map_err(Into::into),
        Command::System(SystemCommand::Prune { all }) => prune(all),
        Command::System(SystemCommand::InspectSnapshot { dir }) => {
            print!(
                "{}",
                vmm::snapshot::report::report(&dir)
                    .with_context(|| format!("reading the snapshot {}", dir.display()))?
            );
            Ok(0)
        }
    }
}

/// The image store at $VMC_HOME.
fn store() -> Result<Store> {
    Ok(Store::open(&runtime::vmc_home())?)
}

fn run(args: RunArgs) -> Result<i32> {
    let ns = args.mode == "ns";
    if let Some(n) = &args.name {
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            bail!("--name '{n}': use letters, digits, '_', '.' and '-'");
        }
        cstate::check_name_free(n)?;
    }
    // Fail before anything else when KVM cannot be used at all.
    if !ns {
        vmm::open_kvm()?;
    }
    let vm_memory = args.memory.unwrap_or(256 << 20);
    if !ns {
        vmm::check_memory(vm_memory)?;
    }
    if ns && args.memory.is_some_and(|m| m < (4 << 20)) {
        bail!("--memory: a container needs at least 4 MiB");
    }
    if !ns && args.pids_limit.is_some() {
        bail!("--pids-limit is for namespace mode (--mode ns); a microVM is limited by its memory");
    }
    let kernel = if ns {
        PathBuf::new()
    } else {
        assets::kernel(args.kernel.as_deref())?
    };
    let mut env = Vec::new();
    // --env-file first: -e overrides it, as in Docker.
    for f in &args.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("--env-file {}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
                    env.push(line.to_string())
                }
                Some(_) => bail!(
                    "--env-file {}:{}: '{line}' is not KEY=VALUE",
                    f.display(),
                    n + 1
                ),
                None => {
                    if let Ok(v) = std::env::var(line.trim()) {
                        env.push(format!("{}={v}", line.trim()));
                    }
                }
            }
        }
    }
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
    let network = network_for(ns, args.network.as_deref())?;
    let mut ports = Vec::new();
    for p in &args.publish {
        ports.push(runtime::ports::parse(p).map_err(anyhow::Error::msg)?);
    }
    // A port in use fails the run before anything starts.
    drop(runtime::ports::bind(&ports).map_err(anyhow::Error::msg)?);
    let stop_signal = image_config
        .as_ref()
        .and_then(|c| c.stop_signal().clone())
        .unwrap_or_else(|| "SIGTERM".into());
    let image_shown = match &args.rootfs {
        Some(d) => d.display().to_string(),
        None => args.args[0].clone(),
    };
    let id = runtime::new_id();
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    let mut process = process;
    if args.tty {
        process.tty = Some(runtime::tty::initial_size());
    }
    spec::merge_env(&mut process.env, &[format!("HOSTNAME={hostname}")]);
    let extra_hosts = extra_hosts(&args.add_host)?;
    let caps =
        runtime::caps::effective(&args.cap_add, &args.cap_drop).map_err(anyhow::Error::msg)?;
    if caps.is_some() && !ns {
        bail!(
            "--cap-add/--cap-drop apply to namespace mode (--mode ns): in a microVM the guest kernel is the boundary and the workload has every capability of the guest"
        );
    }
    let seccomp = security_options(&args.security_opt, ns)?;
    let cfg = ContainerConfig {
        caps,
        seccomp,
        extra_hosts,
        id: id.clone(),
        rootfs,
        image_id,
        process,
        hostname,
        resources: Resources {
            cpus: args.cpus.unwrap_or(1),
            memory: vm_memory,
        },
        kernel,
        debug: args.debug,
        snapshots: runtime::snapshots_dir(),
        ports,
        limits: runtime::NsLimits {
            memory: args.memory,
            cpus: args.cpus,
            pids: args.pids_limit,
        },
        network,
        dns: args.dns.iter().map(|d| d.to_string()).collect(),
    };
    // Like Docker: -i forwards stdin; so does a pipe or file without -t (a
    // terminal's input only goes to a container that asks for it).
    let forward_stdin =
        !args.detach && (args.interactive || (!args.tty && !std::io::stdin().is_terminal()));
    let dir = cstate::containers_dir().join(&id);
    runtime::private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let setup = || -> Result<Container> {
        // Its environment (`-e` values) is the container's secret.
        let cfg_json = serde_json::to_vec_pretty(&cfg)?;
        std::io::Write::write_all(
            &mut runtime::private_file(&dir.join("config.json"), false)?,
            &cfg_json,
        )?;
        if let Some(img) = &cfg.image_id {
            std::fs::write(dir.join("image-id"), img)?;
        }
        let c = Container {
            dir: dir.clone(),
            state: cstate::State {
                id: id.clone(),
                name: args
                    .name
                    .clone()
                    .unwrap_or_else(|| cstate::generate_name(&id)),
                image: image_shown.clone(),
                command: cfg.process.args.clone(),
                mode: args.mode.clone(),
                created: cstate::now_secs(),
                status: Status::Created,
                pid: None,
                pid_start: None,
                started: None,
                finished: None,
                exit_code: None,
                stop_signal: stop_signal.clone(),
                auto_remove: args.rm,
            },
        };
        c.save()?;
        Ok(c)
    };
    let mut c = match setup() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.context("creating the container"));
        }
    };
    if args.detach {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("__supervise")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid in the child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut supervisor = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("starting the container's supervisor: {e}");
            }
        };
        return wait_started(&dir, &id, &mut supervisor);
    }
    // Attached: this process is the supervisor.
    mark_running(&mut c)?;
    let result = execute(&cfg, &dir, ns, forward_stdin, args.cold);
    let _ = mark_exited(&mut c, *result.as_ref().unwrap_or(&EXIT_VMC_ERROR));
    // A run that failed in vmc itself leaves nothing behind.
    if args.rm || result.is_err() {
        let _ = cstate::remove_dir(&dir);
    }
    result.context("run")
}

/// `run -d`: returns once the supervisor has started the workload, as
/// Docker's does, so that `exec` and published ports work right after it.
/// A workload that could not start fails the run with its error and code.
fn wait_started(
    dir: &std::path::Path,
    id: &str,
    supervisor: &mut std::process::Child,
) -> Result<i32> {
    // The supervisor gives up by itself (the agent's connect timeout) and
    // records why; this is only a safety net against one that hangs, long
    // enough for many VMs starting at once on a slow backend (32 on this
    // project's 2-core kvm_pvm machines took over 10 minutes).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1800);
    loop {
        let Some(mut c) = Container::load(dir) else {
            // Removed already: an --rm container that ran and ended.
            println!("{id}");
            return Ok(0);
        };
        if c.started() {
            println!("{id}");
            return Ok(0);
        }
        if c.state.status != Status::Created && c.refresh() == Status::Exited {
            let why = cstate::read_log(&c.log_path())
                .into_iter()
                .filter(|l| l.stream == "stderr")
                .map(|l| l.log.trim_end().to_string())
                .next_back()
                .unwrap_or_else(|| "the container's supervisor ended".into());
            eprintln!("vmc: {}", why.trim_start_matches("vmc: "));
            return Ok(c.state.exit_code.unwrap_or(EXIT_VMC_ERROR));
        }
        if c.state.status == Status::Created {
            if let Ok(Some(st)) = supervisor.try_wait() {
                // It may have recorded its end just before: look again.
                let fresh = Container::load(dir);
                if fresh.is_none_or(|f| f.state.status != Status::Created || f.started()) {
                    continue;
                }
                // Gone before it could record anything (killed, crashed).
                bail!(
                    "the supervisor of container {} ended before starting it ({st}); \
                     remove it with vmc rm {}",
                    &id[..12],
                    &id[..12]
                );
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "container {} did not start in time (see vmc logs {})",
                &id[..12],
                &id[..12]
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `--network MODE` of run and build, in namespace mode (`ns`) or a VM.
fn network_for(ns: bool, requested: Option<&str>) -> Result<runtime::net::Network> {
    // The same choice in both modes (passt serves VMs, pasta namespaces),
    // but for rootless namespace mode, whose pasta needs /dev/net/tun.
    let net = runtime::net::Network::choose(requested).map_err(anyhow::Error::msg)?;
    if ns && net == runtime::net::Network::Passt && vmc::host::rootless() {
        if let Err(e) = runtime::net::tun_usable() {
            if requested.is_some() {
                anyhow::bail!(
                    "--network passt without root: pasta cannot use /dev/net/tun ({e}); \
                     make it read-write for everyone (chmod 0666 /dev/net/tun, as Debian's \
                     udev rules do), run as root, or use --network none"
                );
            }
            return Ok(runtime::net::Network::None);
        }
    }
    Ok(net)
}

fn mark_running(c: &mut Container) -> Result<()> {
    let pid = std::process::id() as i32;
    c.state.status = Status::Running;
    c.state.pid = Some(pid);
    c.state.pid_start = cstate::process_start(pid);
    c.state.started = Some(cstate::now_secs());
    c.save()?;
    Ok(())
}

/// Records that the container ended with `code`, now.
fn mark_exited(c: &mut Container, code: i32) -> Result<()> {
    c.state.status = Status::Exited;
    c.state.exit_code = Some(code);
    c.state.finished = Some(cstate::now_secs());
    c.save()?;
    Ok(())
}

/// Runs the container in this process, in its mode.
fn execute(
    cfg: &ContainerConfig,
    dir: &std::path::Path,
    ns: bool,
    forward_stdin: bool,
    cold: bool,
) -> Result<i32> {
    if ns {
        let lowers = match &cfg.rootfs {
            Rootfs::Layers(l) => l.clone(),
            Rootfs::Dir(d) => vec![d.clone()],
            Rootfs::Disk(_) => bail!("namespace mode takes an image's layers, not its disk"),
        };
        let listeners = runtime::ports::bind(&cfg.ports).map_err(anyhow::Error::msg)?;
        return Ok(runtime::ns::run_attached(
            cfg,
            &lowers,
            dir,
            listeners,
            forward_stdin,
        )?);
    }
    let listeners = runtime::ports::bind(&cfg.ports).map_err(anyhow::Error::msg)?;
    let _serving = runtime::ports::serve(
        listeners,
        runtime::ports::Target::Vm(dir.join("vsock.sock")),
    );
    let how = if cold {
        runtime::microvm::Start::Cold
    } else {
        runtime::microvm::Start::Warm
    };
    Ok(runtime::attach::run_attached(cfg, dir, forward_stdin, how)?)
}

/// `vmc __supervise DIR`: runs a detached container with its output going
/// to its log, and records how it ended.
fn supervise(dir: &std::path::Path) -> Result<i32> {
    let mut c = Container::load(dir).context("reading the container's state")?;
    let cfg = c.config().context("reading the container's config")?;
    let log = c.log_path();
    let pipe = || -> Result<(std::fs::File, std::fs::File)> {
        let (r, w) = vmc_guest::sys::pipe()?;
        Ok((r.into(), w.into()))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let null = std::fs::File::open("/dev/null")?;
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto our own standard descriptors.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(out_w.as_raw_fd(), 1);
        libc::dup2(err_w.as_raw_fd(), 2);
    }
    drop((out_w, err_w));
    // The signals the container gets forwarded are blocked before any thread
    // exists, so that only the runtime's forwarding ever receives them.
    runtime::ns::block_forwarded();
    if c.state.mode == "ns" {
        // Without root, the user namespace can only be entered while this
        // process has a single thread. A failure is recorded as the
        // container's exit, for `run -d` to report at once.
        if let Err(e) = runtime::ns::user_namespace() {
            cstate::log_stream(format!("vmc: {e}\n").as_bytes(), &log, "stderr");
            mark_exited(&mut c, EXIT_VMC_ERROR)?;
            return Err(e.into());
        }
    }
    let (l1, l2) = (log.clone(), log.clone());
    let t1 = std::thread::spawn(move || cstate::log_stream(out_r, &l1, "stdout"));
    let t2 = std::thread::spawn(move || cstate::log_stream(err_r, &l2, "stderr"));
    mark_running(&mut c)?;
    let result = execute(&cfg, dir, c.state.mode == "ns", false, false);
    let code = match &result {
        Ok(code) => *code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vmc: {}", chain.join(": "));
            EXIT_VMC_ERROR
        }
    };
    // SAFETY: as above; the loggers then see end of file.
    unsafe {
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(null.as_raw_fd(), 2);
    }
    let _ = (t1.join(), t2.join());
    mark_exited(&mut c, code)?;
    if c.state.auto_remove {
        let _ = cstate::remove_dir(dir);
    }
    Ok(0)
}

fn ps(a: PsArgs) -> Result<i32> {
    let mut list = cstate::list();
    for c in &mut list {
        c.refresh();
    }
    list.retain(|c| a.all || c.state.status == Status::Running);
    if a.quiet {
        for c in &list {
            println!("{}", &c.state.id[..12]);
        }
        return Ok(0);
    }
    let mut rows = vec![[
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "MODE",
        "NAMES",
    ]
    .map(String::from)];
    let now = cstate::now_secs();
    for c in &list {
        let s = &c.state;
        let mut cmd = format!("\"{}\"", s.command.join(" "));
        if cmd.chars().count() > 22 {
            cmd = format!("{}…\"", cmd.chars().take(20).collect::<String>());
        }
        let status = match s.status {
            Status::Running => format!(
                "Up {}",
                cstate::human_duration(now.saturating_sub(s.started.unwrap_or(now)))
            ),
            Status::Exited => format!(
                "Exited ({}) {} ago",
                s.exit_code.unwrap_or(0),
                cstate::human_duration(now.saturating_sub(s.finished.unwrap_or(now)))
            ),
            Status::Created => "Created".into(),
        };
        rows.push([
            s.id[..12].to_string(),
            s.image.clone(),
            cmd,
            format!(
                "{} ago",
                cstate::human_duration(now.saturating_sub(s.created))
            ),
            status,
            s.mode.clone(),
            s.name.clone(),
        ]);
    }
    print_table(&rows);
    Ok(0)
}

/// Prints rows as columns as wide as their widest cell, three spaces
/// apart, like Docker's tables.
fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn logs(a: LogsArgs) -> Result<i32> {
    use std::io::Write;
    let mut c = cstate::resolve(&a.container)?;
    let path = c.log_path();
    let lines = cstate::read_log(&path);
    let skip = match a.tail.as_str() {
        "all" => 0,
        n => {
            let n: usize = n
                .parse()
                .map_err(|_| anyhow::anyhow!("--tail {n}: give a number of lines or 'all'"))?;
            lines.len().saturating_sub(n)
        }
    };
    let print = |l: &cstate::LogLine| {
        let text = if a.timestamps {
            format!("{} {}", l.time, l.log)
        } else {
            l.log.clone()
        };
        if l.stream == "stderr" {
            let _ = std::io::stderr().write_all(text.as_bytes());
        } else {
            let mut o = std::io::stdout();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        }
    };
    for l in &lines[skip..] {
        print(l);
    }
    if a.follow {
        let mut seen = lines.len();
        loop {
            let running = c.refresh() == Status::Running;
            let lines = cstate::read_log(&path);
            for l in lines.iter().skip(seen) {
                print(l);
            }
            seen = seen.max(lines.len());
            if !running {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(0)
}

/// Signals the supervisor of a running container; true if it was running.
fn signal_container(c: &mut Container, sig: i32) -> bool {
    if c.refresh() != Status::Running {
        return false;
    }
    if let Some(pid) = c.state.pid {
        // SAFETY: kill with a pid we verified by its start time.
        unsafe { libc::kill(pid, sig) };
    }
    true
}

/// Waits up to `timeout` for the container to stop running (the grace
/// period a user gave), and then for its supervisor to be gone: the
/// supervisor records the exit before it ends, and its published ports are
/// free only once it has, which is what a user of `docker stop` or `docker
/// wait` relies on.
fn wait_exit(c: &mut Container, timeout: std::time::Duration) -> bool {
    let now = std::time::Instant::now;
    let end = now() + timeout;
    while now() < end {
        if let Some(fresh) = Container::load(&c.dir) {
            *c = fresh;
        }
        if c.refresh() != Status::Running {
            wait_supervisor_gone(c);
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Waits for the container's supervisor process to be gone, for as long as
/// it makes progress (`vmm::progress`): a VMM tearing down its guest's
/// memory takes a while on a loaded host, under software virtualisation and
/// with many at once; one that sits idle for the quiet limit is left.
fn wait_supervisor_gone(c: &Container) {
    use vmm::progress::{Threads, Verdict, Watchdog};
    let Some(pid) = c.state.pid else {
        return;
    };
    let threads = Threads::all_of(pid as u32);
    let mut dog = Watchdog::new(std::time::Duration::from_secs(120));
    while c.supervisor_alive() {
        if dog.observe(std::time::Instant::now(), threads.sample()) != Verdict::Working {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn force_kill(c: &mut Container) {
    // rm waits for a killed supervisor, so that its ports and files are
    // free when rm returns.
    if signal_container(c, libc::SIGKILL) {
        wait_supervisor_gone(c);
        c.refresh();
    }
}

fn stop(a: StopArgs) -> Result<i32> {
    let mut failed = false;
    for name in &a.containers {
        let mut c = match cstate::resolve(name) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmc: {e}");
                failed = true;
                continue;
            }
        };
        let sig = cstate::signal_number(&c.state.stop_signal).unwrap_or(libc::SIGTERM);
        if signal_container(&mut c, sig)
            && !wait_exit(&mut c, std::time::Duration::from_secs(a.time))
        {
            force_kill(&mut c);
        }
        println!("{name}");
    }
    Ok(if failed { 1 } else { 0 })
}

fn kill(a: KillArgs) -> Result<i32> {
    let sig = cstate::signal_number(&a.signal)
        .ok_or_else(|| anyhow::anyhow!("--signal {}: unknown signal", a.signal))?;
    const FORWARDED: [i32; 7] = [
        libc::SIGKILL,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ];
    if !FORWARDED.contains(&sig) {
        bail!(
            "--signal {}: vmc forwards KILL, TERM, INT, HUP, QUIT, USR1 and USR2",
            a.signal
        );
    }
    let mut failed = false;
    for name in &a.containers {
        match cstate::resolve(name) {
            Ok(mut c) => {
                if sig == libc::SIGKILL {
                    if c.refresh() == Status::Running {
                        force_kill(&mut c);
                        println!("{name}");
                        continue;
                    }
                } else if signal_container(&mut c, sig) {
                    println!("{name}");
                    continue;
                }
                eprintln!("vmc: container {name} is not running");
                failed = true;
            }
            Err(e) => {
                eprintln!("vmc: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

fn rm(a: RmArgs) -> Result<i32> {
    let mut failed = false;
    for name in &a.containers {
        let mut c = match cstate::resolve(name) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmc: {e}");
                failed = true;
                continue;
            }
        };
        if c.refresh() == Status::Running {
            if !a.force {
                eprintln!(
                    "vmc: container {name} is running: stop it first (vmc stop {name}) or use vmc rm -f"
                );
                failed = true;
                continue;
            }
            force_kill(&mut c);
        }
        // Cgroups a killed supervisor could not remove itself.
        runtime::cgroup::remove_listed(&c.dir.join("cgroups"));
        // Another remover (a second `rm`, an --rm supervisor) may be at
        // the same directory: what counts is that it is gone.
        if let Err(e) = cstate::remove_dir(&c.dir) {
            if c.dir.exists() && cstate::remove_dir(&c.dir).is_err() && c.dir.exists() {
                return Err(e).with_context(|| format!("removing {}", c.dir.display()));
            }
        }
        println!("{name}");
    }
    Ok(if failed { 1 } else { 0 })
}

fn exec(a: ExecArgs) -> Result<i32> {
    let mut c = cstate::resolve(&a.container)?;
    if c.refresh() != Status::Running {
        bail!(
            "container {} is not running: start a new one with vmc run",
            a.container
        );
    }
    let cfg = c.config().context("reading the container's config")?;
    let mut spec = cfg.process.clone();
    spec.args = a.command.clone();
    let mut env = Vec::new();
    for e in &a.env {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    spec::merge_env(&mut spec.env, &env);
    if let Some(w) = &a.workdir {
        spec.cwd = w.clone();
    }
    if let Some(u) = &a.user {
        spec.user = u.clone();
    }
    if a.tty {
        spec.tty = Some(runtime::tty::initial_size());
    }
    let forward_stdin = a.interactive || (!a.tty && !std::io::stdin().is_terminal());
    if c.state.mode == "ns" {
        let pid: i32 = std::fs::read_to_string(c.dir.join("init.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .context("the container's process is not known yet: try again")?;
        if !forward_stdin {
            let null = std::fs::File::open("/dev/null")?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
            // SAFETY: redirecting our own stdin to /dev/null before the child inherits it.
            unsafe { libc::dup2(fd, 0) };
        }
        return Ok(runtime::ns::exec_attached(
            pid,
            cfg.caps,
            &cfg.seccomp,
            &c.dir.join("cgroups"),
            &spec,
            forward_stdin,
        )?);
    }
    let vmm_pid = c
        .state
        .pid
        .context("the container's VM is not known yet: try again")?;
    Ok(runtime::attach::exec_attached(
        &c.dir.join("vsock.sock"),
        vmm_pid as u32,
        spec,
        forward_stdin,
    )?)
}

fn wait(a: WaitArgs) -> Result<i32> {
    for name in &a.containers {
        let mut c = cstate::resolve(name)?;
        while !wait_exit(&mut c, std::time::Duration::from_secs(3600)) {}
        println!("{}", c.state.exit_code.unwrap_or(0));
    }
    Ok(0)
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
        // A container by that name or id first, as docker inspect does.
        if let Ok(mut c) = cstate::resolve(name) {
            c.refresh();
            let s = &c.state;
            let cfg = c.config();
            let time = |t: Option<u64>| t.map(|t| image::store::rfc3339(t as i64));
            out.push(serde_json::json!({
                "Id": s.id,
                "Name": s.name,
                "Created": image::store::rfc3339(s.created as i64),
                "Image": s.image,
                "ImageId": cfg.as_ref().and_then(|c| c.image_id.clone()),
                "Mode": s.mode,
                "State": {
                    "Status": s.status,
                    "Running": s.status == Status::Running,
                    "Pid": s.pid,
                    "ExitCode": s.exit_code,
                    "StartedAt": time(s.started),
                    "FinishedAt": time(s.finished),
                },
                "Config": cfg.as_ref().map(|c| serde_json::json!({
                    "Cmd": c.process.args,
                    "Env": c.process.env,
                    "WorkingDir": c.process.cwd,
                    "User": c.process.user,
                    "Hostname": c.hostname,
                    "StopSignal": s.stop_signal,
                })),
                "LogPath": c.log_path(),
            }));
            continue;
        }
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
    vmm::check_memory(a.memory)?;
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
    if a.mode == "ns" {
        // Without root the build's RUN steps run in a user namespace, which
        // this process enters now, before any thread exists.
        runtime::ns::user_namespace()?;
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
        network: network_for(a.mode == "ns", a.network.as_deref())?,
        extra_hosts: extra_hosts(&a.add_host)?,
        // Without root there is no cgroup to limit a namespace build with
        // (its user namespace bounds what it may touch, not what it uses).
        ns_limits: if vmc::host::rootless() {
            runtime::NsLimits::default()
        } else {
            runtime::NsLimits {
                memory: Some(a.memory),
                cpus: Some(a.cpus),
                pids: Some(a.pids_limit),
            }
        },
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

fn prune(all: bool) -> Result<i32> {
    let dir = runtime::snapshots_dir();
    let cache = runtime::vmc_home().join("cache");
    // What a run would use now; without a kernel or guest agent, nothing.
    let kernel = assets::kernel(None).ok();
    let agent = assets::guest_binary()
        .ok()
        .and_then(|g| disk::agent_disk_path(&g, &cache).ok());
    let current = match (&kernel, &agent, all) {
        (Some(k), Some(a), false) => Some(runtime::snapshot::SnapshotSpec {
            kernel: k,
            agent_disk: a,
            cpus: 1,
            memory: 0,
            backend: vmm::Backend::detect(),
        }),
        _ => None,
    };
    let (n, bytes) = runtime::snapshot::prune(&dir, current.as_ref())
        .with_context(|| format!("pruning {}", dir.display()))?;
    let mut disks = 0;
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let in_use = current.is_some() && agent.as_ref().is_some_and(|a| *a == e.path())
                || building_agent(&name);
            if (name.starts_with("agent-") || name.starts_with(".agent-"))
                && !in_use
                && std::fs::remove_file(e.path())
                    .or_else(|_| std::fs::remove_dir_all(e.path()))
                    .is_ok()
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

/// Whether `name` in the cache is a guest-agent disk a live process is
/// making now (`.agent-DIGEST.PID.RAND[.erofs]`, see `disk::agent_disk`).
fn building_agent(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(".agent-") else {
        return false;
    };
    rest.split('.')
        .nth(1)
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
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
    match runtime::net::program("passt") {
        Some(p) => println!("passt: {}", p.display()),
        None => println!("passt: missing (apt-get install passt; until then --network none)"),
    }
    println!("state: {}", runtime::vmc_home().display());
    println!("snapshots: {}", runtime::snapshots_dir().display());
    Ok(0)
}
