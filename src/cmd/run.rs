//! `vmc run` (attached and detached), the supervisor of a detached container (`__supervise`), and what a run needs: options, network, state marks.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vmc::cli::RunArgs;
use vmc::image;
use vmc::runtime::lifecycle::{self, Meta, Started, Until};
use vmc::runtime::spec::{self, RunOverrides};
use vmc::runtime::state as cstate;
use vmc::runtime::Mode;
use vmc::runtime::{
    self, ContainerConfig, EngineConfig, NsEngineConfig, Resources, Rootfs, VmEngineConfig,
};
use vmc::{assets, vmm};

use super::*;

/// The image a run names, pulled first as `--pull` (else `VMC_PULL`, else
/// `missing`) says, Docker's way: `missing` pulls an image the store
/// lacks, `always` pulls every time, `never` never does. The pull's lines
/// go to stderr, so that stdout is the container's alone.
fn image_for_run(
    store: &image::Store,
    name: &str,
    policy: Option<&str>,
) -> Result<image::StoredImage> {
    let policy = policy
        .map(str::to_string)
        .or_else(|| vmc::host::knobs().pull.clone())
        .unwrap_or_else(|| "missing".into());
    let found = store.resolve(name);
    let pull = match (policy.as_str(), &found) {
        ("always", _) => true,
        ("missing", Err(image::StoreError::NotFound(_))) => true,
        ("missing" | "never", _) => false,
        (p, _) => bail!("VMC_PULL={p}: expected missing, always or never"),
    };
    if !pull {
        return Ok(found?);
    }
    // A name that is no reference (an id prefix, say) is not pulled.
    let Ok(reference) = image::Reference::parse(name) else {
        return Ok(found?);
    };
    if found.is_err() {
        eprintln!("Unable to find image '{name}' locally");
    }
    let opts = image::pull::PullOptions {
        insecure: false,
        progress: std::io::stderr().is_terminal(),
    };
    let pulled = image::pull::pull(store, &reference, &opts, &mut std::io::stderr())?;
    Ok(pulled.image)
}

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

pub(crate) fn run(args: RunArgs, create_only: bool) -> Result<i32> {
    let ns = args.mode == Mode::Ns;
    if args.timings && (args.detach || create_only) {
        bail!("--timings reports an attached run: leave out -d (and use vmc run, not vmc create)");
    }
    let restart = runtime::restart::RestartPolicy::parse(&args.restart)?;
    if args.rm && restart != runtime::restart::RestartPolicy::No {
        bail!("conflicting options: --restart and --rm (a removed container cannot be restarted)");
    }
    let parked = args.start == vmc::cli::StartMode::Parked;
    if parked && (ns || !args.rm || args.rootfs.is_some() || args.tty || args.cold) {
        bail!("--start=parked is for a --rm run of an image in a microVM, without -t or --cold");
    }
    if !(args.detach || create_only) {
        start_timings(args.timings);
    }
    if let Some(n) = &args.name {
        check_container_name(n)?;
        cstate::check_name_free(n)?;
    }
    // Fail before anything else when KVM cannot be used at all.
    if !ns {
        vmm::open_kvm()?;
    }
    let vm_memory = args.memory.unwrap_or(runtime::DEFAULT_VM_MEMORY);
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
    let mut image_health = None;
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
            let img = image_for_run(&store, name, args.pull.as_deref())?;
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
            image_health = img.extras.healthcheck.clone();
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
    let mounts = mounts(&args, image_config.as_ref())?;
    let network = network_for(ns, args.network.as_deref())?;
    let mut ports = Vec::new();
    for p in &args.publish {
        ports.extend(runtime::ports::parse(p)?);
    }
    if args.publish_all {
        // -P: every port the image EXPOSEs, on a port the system chooses.
        for e in image_config
            .as_ref()
            .and_then(|c| c.exposed_ports().clone())
            .unwrap_or_default()
        {
            match e.split_once('/').unwrap_or((&e, "tcp")) {
                (p, "tcp") => ports.extend(runtime::ports::parse(p)?),
                (p, "udp") => ports.extend(runtime::ports::parse(&format!("{p}/udp"))?),
                _ => log::warn!("-P: EXPOSE {e} is not published (vmc forwards TCP and UDP)"),
            }
        }
    }
    // A port in use fails the run before anything starts; a host port
    // left to the system is chosen now, and kept.
    let bound = runtime::ports::bind(&ports)?;
    let ports: Vec<runtime::ports::PortMap> = bound.iter().map(|(_, m)| *m).collect();
    drop(bound);
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
    // The microVM's agent runs its init; namespace mode binds it (cfg.init).
    process.init = args.init;
    if args.tty {
        process.tty = Some(runtime::tty::initial_size());
        // Docker's default for a terminal; the image's or -e's TERM wins.
        if !process.env.iter().any(|e| e.starts_with("TERM=")) {
            process.env.push("TERM=xterm".into());
        }
    }
    spec::merge_env(&mut process.env, &[format!("HOSTNAME={hostname}")]);
    let extra_hosts = extra_hosts(&args.add_host)?;
    let caps = runtime::caps::effective(&args.cap_add, &args.cap_drop)?;
    if caps.is_some() && !ns {
        bail!(
            "--cap-add/--cap-drop apply to namespace mode (--mode ns): in a microVM the guest kernel is the boundary and the workload has every capability of the guest"
        );
    }
    let seccomp = security_options(&args.security_opt, ns)?;
    let engine = if ns {
        EngineConfig::Ns(NsEngineConfig {
            limits: runtime::NsLimits {
                memory: args.memory,
                cpus: args.cpus,
                pids: args.pids_limit,
            },
            caps,
            seccomp,
        })
    } else {
        EngineConfig::Vm(VmEngineConfig {
            resources: Resources {
                cpus: args.cpus.unwrap_or(runtime::DEFAULT_VM_CPUS),
                memory: vm_memory,
            },
            kernel,
            debug: args.debug,
            cold: args.cold,
            snapshots: runtime::snapshots_dir(),
            upper_in_memory: args.rm,
            parked,
        })
    };
    let cfg = ContainerConfig {
        netns: None,
        extra_hosts,
        mounts,
        read_only: args.read_only,
        restart,
        init: args.init,
        healthcheck: healthcheck(&args, image_health)?,
        stdin_open: args.interactive && (args.detach || create_only),
        id: id.clone(),
        rootfs,
        image_id,
        process,
        hostname,
        ports,
        network,
        dns: args.dns.iter().map(|d| d.to_string()).collect(),
        engine,
    };
    // Like Docker: -i forwards stdin; so does a pipe or file without -t (a
    // terminal's input only goes to a container that asks for it).
    let detach = args.detach || create_only;
    let forward_stdin =
        !detach && (args.interactive || (!args.tty && !std::io::stdin().is_terminal()));
    let dir = cstate::containers_dir().join(&id);
    let meta = Meta {
        name: args
            .name
            .clone()
            .unwrap_or_else(|| cstate::generate_name(&id)),
        image: image_shown,
        stop_signal,
        auto_remove: args.rm,
        labels: args
            .labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.clone(), String::new()),
            })
            .collect(),
    };
    let mut c = lifecycle::create(&dir, &cfg, meta)?;
    if !detach {
        // Attached: this process is the supervisor.
        // A VMM killed by its seccomp filter is said in the filter's own
        // words, as the one line of the README.
        let code = match lifecycle::run_here(&mut c, &cfg, forward_stdin) {
            Err(lifecycle::LifecycleError::Runtime(e)) if e.is_vmm_killed() => {
                Err(anyhow::Error::new(e))
            }
            r => r.context("run"),
        };
        report_timings(args.timings);
        return code;
    }
    let mut supervisor = lifecycle::supervisor_command(&dir);
    let until = if create_only {
        supervisor.arg("--created");
        Until::Created
    } else {
        Until::Started
    };
    match lifecycle::start_detached(&c, supervisor, until)? {
        Started::Running | Started::Removed => {
            println!("{id}");
            Ok(0)
        }
        Started::Failed { why, code } => {
            eprintln!("vmc: {why}");
            Ok(code)
        }
    }
}

/// The container's health check: the image's HEALTHCHECK with the
/// `--health-*` flags over it (Docker's rules), none with
/// `--no-healthcheck`.
fn healthcheck(
    args: &RunArgs,
    image: Option<image::extras::Healthcheck>,
) -> Result<Option<image::extras::Healthcheck>> {
    let given = args.health_cmd.is_some()
        || args.health_interval.is_some()
        || args.health_timeout.is_some()
        || args.health_retries.is_some()
        || args.health_start_period.is_some()
        || args.health_start_interval.is_some();
    if args.no_healthcheck {
        if given {
            bail!("--no-healthcheck conflicts with --health-* options");
        }
        return Ok(Some(image::extras::Healthcheck {
            test: vec!["NONE".into()],
            ..Default::default()
        }));
    }
    let mut h = image.unwrap_or_default();
    if let Some(cmd) = &args.health_cmd {
        h.test = vec!["CMD-SHELL".into(), cmd.clone()];
    }
    let duration = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
        let Some(v) = v else { return Ok(None) };
        match vmc::build::dockerfile::go_duration(v) {
            Some(d) if d == 0 || d >= 1_000_000 => Ok(Some(d)),
            Some(_) => bail!("--{flag}: cannot be less than 1ms"),
            None => bail!("--{flag} {v}: not a duration (30s, 1m30s, 500ms)"),
        }
    };
    if let Some(d) = duration("health-interval", &args.health_interval)? {
        h.interval = d;
    }
    if let Some(d) = duration("health-timeout", &args.health_timeout)? {
        h.timeout = d;
    }
    if let Some(d) = duration("health-start-period", &args.health_start_period)? {
        h.start_period = d;
    }
    if let Some(d) = duration("health-start-interval", &args.health_start_interval)? {
        h.start_interval = d;
    }
    if let Some(r) = args.health_retries {
        h.retries = r;
    }
    if h.test.is_empty() {
        if given {
            bail!("--health-* options need a health check: give --health-cmd (the image has no HEALTHCHECK)");
        }
        return Ok(None);
    }
    Ok(Some(h))
}

/// The container's mounts: `-v`, `--mount` and `--tmpfs`, and an anonymous
/// volume for each of the image's VOLUMEs; the volumes are created now, as
/// Docker creates them with the container (a microVM's reach it through
/// virtio-fs).
fn mounts(
    args: &RunArgs,
    image: Option<&oci_spec::image::Config>,
) -> Result<Vec<runtime::volume::Mount>> {
    use runtime::volume;
    let mut given = Vec::new();
    for v in &args.volumes {
        let m = volume::parse_volume_flag(v)?;
        // Docker's -v makes a missing host directory (--mount does not).
        if let volume::MountSource::Bind { source } = &m.source {
            if !source.exists() {
                std::fs::create_dir_all(source)
                    .with_context(|| format!("-v {v}: creating {}", source.display()))?;
            }
        }
        given.push(m);
    }
    for m in &args.mounts {
        given.push(volume::parse_mount_flag(m)?);
    }
    for t in &args.tmpfs {
        given.push(volume::parse_tmpfs_flag(t)?);
    }
    let image_volumes: Vec<String> = image.and_then(|c| c.volumes().clone()).unwrap_or_default();
    let mounts = volume::plan(given, &image_volumes)?;
    volume::prepare(&mounts)?;
    Ok(mounts)
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

/// `vmc __supervise [--created] DIR`: the supervisor of a detached
/// container.
pub(crate) fn supervise(dir: &std::path::Path, created: bool, restart: bool) -> Result<i32> {
    let until = if created {
        Until::Created
    } else if restart {
        Until::Restart
    } else {
        Until::Started
    };
    lifecycle::supervise(dir, until)?;
    Ok(0)
}

/// `vmc create`: `vmc run -d`'s container, made but not started.
pub(crate) fn create(args: RunArgs) -> Result<i32> {
    if args.detach || args.tty || args.rm {
        bail!("vmc create takes no -d, -t or --rm: vmc start runs the container detached (-i keeps its stdin open for vmc attach and vmc start -a -i)");
    }
    run(args, true)
}
