//! vmc's command line: parse, dispatch, print any error once, exit with the
//! right code (the workload's own, or 125 when vmc itself failed).

use anyhow::{Context, Result};
use clap::Parser;
use vmc::bench;
use vmc::cli::{Cli, Command, SystemCommand};
use vmc::runtime;
use vmc::runtime::Mode;

mod cmd;
use cmd::*;

/// Docker's exit code for "the runtime itself failed".
use vmc::runtime::lifecycle::EXIT_VMC_ERROR;

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    /// vmc's own records at the level asked for; the libraries' (rustls,
    /// reqwest, ...) only at debug: their errors reach the user as vmc's
    /// one-line error, not twice.
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0 && (m.target().starts_with("vmc") || self.0 >= log::LevelFilter::Debug)
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("vmc [{}] {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match vmc::host::knobs().log.as_deref() {
        Some("debug") | Some("trace") => log::LevelFilter::Debug,
        Some("info") => log::LevelFilter::Info,
        Some("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn main() {
    // A VMM process (vmm::process): its parent passed exactly the
    // descriptors it needs (3 and 4, closing every other one); nothing
    // else here applies to it.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__vmm") {
        init_logging();
        std::process::exit(vmc::vmm::process::serve());
    }
    // vmc as an OCI runtime (a link named vmc-runtime): runc's command
    // line, and the descriptors its caller passes on (--preserve-fds) kept.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.first().is_some_and(|a| vmc::oci::called_as_runtime(a)) {
        init_logging();
        std::process::exit(vmc::oci::main(args));
    }
    // Descriptors inherited from whoever started vmc never reach a
    // container, passt, the VMM or a detached supervisor. (A volume file
    // server's parent passed it exactly its socket, as descriptor 3.)
    let fs_server = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__fs-server");
    if fs_server {
    } else if let Err(e) = vmc_spawn::sys::close_inherited_fds() {
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
    let cli = match Cli::try_parse_from(docker_aliases(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => {
            // A Docker flag vmc does not have: named as such (Docker's
            // wording), exit 125.
            let flag = match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(s)) => s.clone(),
                _ => "?".to_string(),
            };
            let flag = flag.split('=').next().unwrap_or_default();
            eprintln!("vmc: unknown flag: {flag}");
            std::process::exit(EXIT_VMC_ERROR);
        }
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
    let code = dispatch(cli);
    // A ready snapshot this run found missing is made now, in the background.
    vmc::runtime::snapshot::start_pending();
    let code = match code {
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

/// Docker's management-command spellings as vmc's verbs: `container ls`
/// is `ps`, `image ls` is `images`, `image rm` is `rmi`, and `container X`
/// / `image X` is `X` for the verbs both have.
fn docker_aliases(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(group) = argv.get(1).and_then(|a| a.to_str()).map(String::from) else {
        return argv;
    };
    let Some(verb) = argv.get(2).and_then(|a| a.to_str()).map(String::from) else {
        return argv;
    };
    let to = match (group.as_str(), verb.as_str()) {
        ("container", "ls" | "list" | "ps") => "ps",
        (
            "container",
            "run" | "create" | "start" | "stop" | "kill" | "rm" | "logs" | "exec" | "inspect"
            | "wait" | "port",
        ) => verb.as_str(),
        ("image", "ls" | "list") => "images",
        ("image", "rm" | "remove") => "rmi",
        ("image", "build" | "pull" | "inspect" | "tag" | "save" | "load" | "import") => {
            verb.as_str()
        }
        _ => return argv,
    };
    // `image inspect` looks at images only, `container inspect` at
    // containers only.
    let mut with: Vec<std::ffi::OsString> = vec![to.into()];
    if verb == "inspect" {
        with.extend(["--type".into(), group.clone().into()]);
    }
    argv.splice(1..3, with);
    argv
}

/// Whether `command` enters a namespace container (and so must run from a
/// read-only binary: `runtime::ns::run_from_read_only_binary`).
fn enters_namespace_container(command: &Command) -> bool {
    match command {
        Command::Run(a) | Command::Create(a) => a.mode == Mode::Ns,
        Command::Build(a) => a.mode == Mode::Ns,
        Command::Exec(_) | Command::Cp(_) | Command::Supervise { .. } => true,
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
        Command::Run(args) => run(args, false),
        Command::Build(a) => build(a),
        Command::Info => info(),
        Command::Version { format } => version(format.as_deref()),
        Command::System(SystemCommand::Df) => df(),
        Command::Ps(a) => ps(a),
        Command::Logs(a) => logs(a),
        Command::Stop(a) => stop(a),
        Command::Kill(a) => kill(a),
        Command::Rm(a) => rm(a),
        Command::Wait(a) => wait(a),
        Command::Exec(a) => exec(a),
        Command::Port { container } => port(&container),
        Command::Cp(a) => cp(a),
        Command::Rename { container, name } => rename(&container, &name),
        Command::Supervise {
            dir,
            created,
            restart,
        } => supervise(&dir, created, restart),
        Command::MakeReady { job } => runtime::snapshot::make_pending(&job)
            .map(|_| 0)
            .map_err(Into::into),
        Command::Create(args) => create(args),
        Command::Start(a) => start(a),
        Command::Restart(a) => restart(a),
        Command::Pause { containers } => pause(&containers, true),
        Command::Top { container, ps_args } => top(&container, &ps_args),
        Command::Stats(a) => stats(a),
        Command::Attach(a) => attach(a),
        Command::Unpause { containers } => pause(&containers, false),
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
        Command::System(SystemCommand::InspectSnapshot { dir }) => inspect_snapshot(&dir),
        Command::Volume(c) => volume_cmd(c),
        Command::FsServer {
            fd,
            scratch,
            shares,
        } => fs_server(fd, &scratch, &shares),
    }
}
