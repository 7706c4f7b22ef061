//! `vmc run` (attached and detached), the supervisor of a detached container (`__supervise`), and what a run needs: options, network, state marks.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vmc::cli::RunArgs;
use vmc::image;
use vmc::runtime::spec::{self, RunOverrides};
use vmc::runtime::state::{self as cstate, Container, Status};
use vmc::runtime::Mode;
use vmc::runtime::{self, ContainerConfig, Resources, Rootfs};
use vmc::{assets, vmm};

use super::*;
use crate::EXIT_VMC_ERROR;

/// `--security-opt` values as Docker spells them; what vmc cannot honour
/// is refused, not ignored.
pub(crate) fn security_options(opts: &[String], ns: bool) -> Result<runtime::seccomp::Seccomp> {
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
pub(crate) fn extra_hosts(given: &[String]) -> Result<Vec<runtime::net::ExtraHost>> {
    given
        .iter()
        .map(|s| Ok(runtime::net::ExtraHost::parse(s)?))
        .collect()
}

pub(crate) fn run(args: RunArgs) -> Result<i32> {
    let ns = args.mode == Mode::Ns;
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
                None => env.extend(env_entry(line.trim())),
            }
        }
    }
    env.extend(args.env.iter().filter_map(|e| env_entry(e)));
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
                mode: args.mode,
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
    c.mark_running()?;
    let result = execute(&cfg, &dir, args.mode, forward_stdin, args.cold);
    let _ = c.mark_exited(*result.as_ref().unwrap_or(&EXIT_VMC_ERROR));
    // A run that failed in vmc itself leaves nothing behind.
    if args.rm || result.is_err() {
        let _ = cstate::remove_dir(&dir);
    }
    result.context("run")
}

/// `run -d`: returns once the supervisor has started the workload, as
/// Docker's does, so that `exec` and published ports work right after it.
/// A workload that could not start fails the run with its error and code.
pub(crate) fn wait_started(
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
pub(crate) fn network_for(ns: bool, requested: Option<&str>) -> Result<runtime::net::Network> {
    // The same choice in both modes (passt serves VMs, pasta namespaces),
    // but for rootless namespace mode, whose pasta needs /dev/net/tun.
    let net = runtime::net::Network::choose(requested)?;
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

/// Runs the container in this process, in its mode.
pub(crate) fn execute(
    cfg: &ContainerConfig,
    dir: &std::path::Path,
    mode: Mode,
    forward_stdin: bool,
    cold: bool,
) -> Result<i32> {
    let engine = runtime::engine::for_mode(mode, cold);
    Ok(engine.run_attached(cfg, dir, forward_stdin)?)
}

/// `vmc __supervise DIR`: runs a detached container with its output going
/// to its log, and records how it ended.
pub(crate) fn supervise(dir: &std::path::Path) -> Result<i32> {
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
    if c.state.mode == Mode::Ns {
        // Without root, the user namespace can only be entered while this
        // process has a single thread. A failure is recorded as the
        // container's exit, for `run -d` to report at once.
        if let Err(e) = runtime::ns::user_namespace() {
            cstate::log_stream(format!("vmc: {e}\n").as_bytes(), &log, "stderr");
            c.mark_exited(EXIT_VMC_ERROR)?;
            return Err(e.into());
        }
    }
    let (l1, l2) = (log.clone(), log.clone());
    let t1 = std::thread::spawn(move || cstate::log_stream(out_r, &l1, "stdout"));
    let t2 = std::thread::spawn(move || cstate::log_stream(err_r, &l2, "stderr"));
    c.mark_running()?;
    let result = execute(&cfg, dir, c.state.mode, false, false);
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
    c.mark_exited(code)?;
    if c.state.auto_remove {
        let _ = cstate::remove_dir(dir);
    }
    Ok(0)
}
