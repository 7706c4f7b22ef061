//! Container verbs: ps, logs, stop, kill, rm, exec, wait.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Context, Result};
use vmc::cli::{CpArgs, ExecArgs, KillArgs, LogsArgs, PsArgs, RmArgs, StopArgs, WaitArgs};
use vmc::image;
use vmc::runtime;
use vmc::runtime::spec;
use vmc::runtime::state::{self as cstate, Container, Status};

use super::*;

/// `ps --filter`: KEY=VALUE pairs; a container matches when, for every
/// key given, one of that key's values matches (Docker's rule).
struct PsFilter(Vec<(String, String)>);

const PS_FILTERS: &[&str] = &[
    "id", "name", "label", "status", "exited", "ancestor", "health",
];

impl PsFilter {
    fn parse(given: &[String]) -> Result<PsFilter> {
        let mut v = Vec::new();
        for f in given {
            let Some((k, val)) = f.split_once('=') else {
                bail!(
                    "--filter {f}: expected KEY=VALUE ({})",
                    PS_FILTERS.join(", ")
                );
            };
            if !PS_FILTERS.contains(&k) {
                bail!(
                    "--filter {f}: invalid filter '{k}' (vmc takes {})",
                    PS_FILTERS.join(", ")
                );
            }
            if k == "exited" && val.parse::<i32>().is_err() {
                bail!("--filter {f}: exited takes an exit code");
            }
            v.push((k.to_string(), val.to_string()));
        }
        Ok(PsFilter(v))
    }

    fn one(k: &str, val: &str, c: &cstate::Container) -> bool {
        let s = &c.state;
        match k {
            "id" => s.id.starts_with(val),
            "name" => s.name.contains(val),
            "label" => match val.split_once('=') {
                Some((lk, lv)) => s.labels.get(lk).is_some_and(|v| v == lv),
                None => s.labels.contains_key(val),
            },
            "status" => {
                if runtime::pause::is_paused(c) {
                    val == "paused"
                } else {
                    status_word(s.status) == val
                }
            }
            "exited" => {
                s.status == Status::Exited
                    && s.exit_code.map(|e| e.to_string()).as_deref() == Some(val)
            }
            "health" => {
                let h = (s.status == Status::Running)
                    .then(|| runtime::health::read(&c.dir).map(|h| h.status))
                    .flatten();
                h.as_deref().unwrap_or("none") == val
            }
            "ancestor" => {
                s.image == val
                    || s.image == format!("{val}:latest")
                    || c.config().and_then(|c| c.image_id).is_some_and(|id| {
                        let hex = id.trim_start_matches("sha256:");
                        val.len() >= 4 && hex.starts_with(val.trim_start_matches("sha256:"))
                    })
            }
            _ => false,
        }
    }

    fn matches(&self, c: &cstate::Container) -> bool {
        PS_FILTERS.iter().all(|key| {
            let mut vals = self.0.iter().filter(|(k, _)| k == key).peekable();
            vals.peek().is_none() || vals.any(|(k, v)| Self::one(k, v, c))
        })
    }
}

/// Docker's word for a status (`ps --filter status=`, `{{.State}}`).
fn status_word(s: Status) -> &'static str {
    match s {
        Status::Created => "created",
        Status::Running => "running",
        Status::Restarting => "restarting",
        Status::Exited => "exited",
    }
}

/// Docker's column titles for `ps --format 'table ...'`.
const PS_HEADERS: &[(&str, &str)] = &[
    ("ID", "CONTAINER ID"),
    ("Image", "IMAGE"),
    ("Command", "COMMAND"),
    ("CreatedAt", "CREATED AT"),
    ("RunningFor", "CREATED"),
    ("Ports", "PORTS"),
    ("Status", "STATUS"),
    ("State", "STATE"),
    ("Names", "NAMES"),
    ("Labels", "LABELS"),
    ("Mode", "MODE"),
];

/// A container as `ps` shows it, with Docker's field names (its
/// `--format` fields).
fn ps_row(c: &cstate::Container, no_trunc: bool, now: u64) -> serde_json::Value {
    let s = &c.state;
    let mut cmd = format!("\"{}\"", s.command.join(" "));
    if !no_trunc && cmd.chars().count() > 22 {
        cmd = format!("{}…\"", cmd.chars().take(20).collect::<String>());
    }
    let paused = runtime::pause::is_paused(c);
    let health = match runtime::health::read(&c.dir).map(|h| h.status) {
        Some(h) if s.status == Status::Running && h == "starting" => " (health: starting)".into(),
        Some(h) if s.status == Status::Running => format!(" ({h})"),
        _ => String::new(),
    };
    let status = match s.status {
        Status::Running => format!(
            "Up {}{}{health}",
            cstate::human_duration(now.saturating_sub(s.started.unwrap_or(now))),
            if paused { " (Paused)" } else { "" }
        ),
        Status::Exited => format!(
            "Exited ({}) {} ago",
            s.exit_code.unwrap_or(0),
            cstate::human_duration(now.saturating_sub(s.finished.unwrap_or(now)))
        ),
        Status::Restarting => format!(
            "Restarting ({}) {} ago",
            s.exit_code.unwrap_or(0),
            cstate::human_duration(now.saturating_sub(s.finished.unwrap_or(now)))
        ),
        Status::Created => "Created".into(),
    };
    // Docker's PORTS: published ports while the container runs.
    let ports = if s.status == Status::Running {
        c.config()
            .map(|cfg| {
                cfg.ports
                    .iter()
                    .map(|p| {
                        format!(
                            "{}->{}/{}",
                            std::net::SocketAddr::new(p.host_ip, p.host_port),
                            p.container_port,
                            p.proto
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    serde_json::json!({
        "ID": if no_trunc { s.id.clone() } else { s.id[..12].to_string() },
        "Image": s.image,
        "Command": cmd,
        "CreatedAt": image::store::rfc3339(s.created as i64),
        "RunningFor": format!("{} ago", cstate::human_duration(now.saturating_sub(s.created))),
        "Ports": ports,
        "Status": status,
        "State": if paused { "paused" } else { status_word(s.status) },
        "Names": s.name,
        "Labels": labels.join(","),
        "Mode": s.mode.to_string(),
    })
}

pub(crate) fn ps(a: PsArgs) -> Result<i32> {
    let filter = PsFilter::parse(&a.filter)?;
    let mut list = cstate::list(); // newest first
    for c in &mut list {
        c.refresh();
    }
    let last = if a.latest { Some(1) } else { a.last };
    // A restarting container is listed with the running ones (Docker's).
    list.retain(|c| a.all || last.is_some() || c.state.status.is_live());
    if let Some(n) = last {
        list.truncate(n);
    }
    list.retain(|c| filter.matches(c));
    let now = cstate::now_secs();
    let rows: Vec<serde_json::Value> = list.iter().map(|c| ps_row(c, a.no_trunc, now)).collect();
    if a.quiet {
        for r in &rows {
            println!("{}", r["ID"].as_str().unwrap_or_default());
        }
        return Ok(0);
    }
    if let Some(f) = &a.format {
        print_formatted(f, &rows, PS_HEADERS)?;
        return Ok(0);
    }
    let columns = [
        "ID",
        "Image",
        "Command",
        "RunningFor",
        "Status",
        "Ports",
        "Mode",
        "Names",
    ];
    print_columns(&rows, &columns, PS_HEADERS);
    Ok(0)
}

/// Prints `rows` (JSON objects) as a table of `columns` under Docker's
/// titles (`headers`: field, title).
fn print_columns<const N: usize>(
    rows: &[serde_json::Value],
    columns: &[&str; N],
    headers: &[(&str, &str)],
) {
    let mut table = vec![columns.map(|c| {
        headers
            .iter()
            .find(|(f, _)| *f == c)
            .map_or(c, |(_, h)| *h)
            .to_string()
    })];
    for r in rows {
        table.push(columns.map(|c| r[c].as_str().unwrap_or_default().to_string()));
    }
    print_table(&table);
}

pub(crate) fn logs(a: LogsArgs) -> Result<i32> {
    use std::io::Write;
    let mut c = cstate::resolve(&a.container)?;
    let mut follower = runtime::follow::LogFollower::new(&c.log_path(), Some(0));
    let lines = follower.next_lines();
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
        loop {
            let running = c.refresh().is_live();
            for l in &follower.next_lines() {
                print(l);
            }
            if !running {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(0)
}

/// Docker's way with several containers: each named one in turn, its name
/// printed when `act` succeeds, an error (an unknown name, or what `act`
/// says) printed and the rest done anyway; exit code 1 if any failed.
fn each_container(
    names: &[String],
    mut act: impl FnMut(&str, Container) -> Result<std::result::Result<(), Box<dyn std::error::Error>>>,
) -> Result<i32> {
    let mut failed = false;
    for name in names {
        let outcome = match cstate::resolve(name) {
            Ok(c) => act(name, c)?,
            Err(e) => Err(e.into()),
        };
        match outcome {
            Ok(()) => println!("{name}"),
            Err(why) => {
                eprintln!("vmc: {}", vmc::host::error_line(&*why));
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// Starts `c` (`vmc start`): Ok, or why not.
fn start_one(name: &str, c: &mut Container) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use vmc::runtime::lifecycle::{self, Started};
    match lifecycle::start(c) {
        Ok(Started::Running | Started::Removed) => Ok(()),
        Ok(Started::Failed { why, .. }) => Err(format!("{name}: {why}").into()),
        Err(e) => Err(e.into()),
    }
}

/// `vmc start NAME...`: starts containers made by `vmc create`, and runs
/// exited ones again; each name printed once its workload runs. With `-a`
/// (one container) this process attaches to it and exits as it does.
pub(crate) fn start(a: vmc::cli::StartArgs) -> Result<i32> {
    if !a.attach && !a.interactive {
        return each_container(&a.containers, |name, mut c| Ok(start_one(name, &mut c)));
    }
    let [name] = a.containers.as_slice() else {
        bail!("vmc start -a/-i takes one container");
    };
    let mut c = cstate::resolve(name)?;
    // The output from this start on: the log's end before it.
    let log_len = std::fs::metadata(c.log_path()).map_or(0, |m| m.len());
    if let Err(e) = start_one(name, &mut c) {
        bail!("{}", vmc::host::error_line(&*e));
    }
    attach_to(&mut c, a.interactive, true, "ctrl-p,ctrl-q", Some(log_len))
}

/// `vmc attach`.
pub(crate) fn attach(a: vmc::cli::AttachArgs) -> Result<i32> {
    let mut c = cstate::resolve(&a.container)?;
    if c.refresh() != Status::Running {
        bail!(
            "you cannot attach to a stopped container, start it first (vmc start -a {})",
            a.container
        );
    }
    if runtime::pause::is_paused(&c) {
        bail!(
            "you cannot attach to a paused container, unpause it first (vmc unpause {})",
            a.container
        );
    }
    attach_to(&mut c, !a.no_stdin, a.sig_proxy, &a.detach_keys, None)
}

fn attach_to(
    c: &mut Container,
    stdin: bool,
    sig_proxy: bool,
    keys: &str,
    from: Option<u64>,
) -> Result<i32> {
    use runtime::follow::{self, Ended};
    let keys = follow::parse_detach_keys(keys)
        .ok_or_else(|| anyhow::anyhow!("--detach-keys {keys}: expected keys like ctrl-p,ctrl-q"))?;
    match follow::attach(c, stdin, sig_proxy, &keys, from)? {
        Ended::Exited(code) => Ok(code),
        Ended::Detached => Ok(0),
    }
}

/// Stops `c` as `vmc stop` does: its stop signal, SIGKILL after `grace`.
/// Its restart policy does not run it again.
fn stop_one(c: &mut Container, grace: std::time::Duration) {
    if c.refresh().is_live() {
        cstate::mark_stopped_by_user(&c.dir);
    }
    let sig = cstate::signal_number(&c.state.stop_signal).unwrap_or(libc::SIGTERM);
    let sent = c.signal(sig);
    // A paused container takes the signal as it is let go (Docker's).
    runtime::pause::thaw_for_end(c);
    if sent && !c.wait_exit(grace) {
        c.kill_now();
    }
}

pub(crate) fn stop(a: StopArgs) -> Result<i32> {
    each_container(&a.containers, |_, mut c| {
        stop_one(&mut c, std::time::Duration::from_secs(a.time));
        Ok(Ok(()))
    })
}

/// `vmc pause` (`on`) and `vmc unpause`.
pub(crate) fn pause(names: &[String], on: bool) -> Result<i32> {
    each_container(names, |_, mut c| {
        let r = if on {
            runtime::pause::pause(&mut c)
        } else {
            runtime::pause::unpause(&mut c)
        };
        Ok(r.map_err(Into::into))
    })
}

/// `vmc restart`: each container stopped (if it runs) and started again.
pub(crate) fn restart(a: StopArgs) -> Result<i32> {
    each_container(&a.containers, |name, mut c| {
        stop_one(&mut c, std::time::Duration::from_secs(a.time));
        Ok(start_one(name, &mut c))
    })
}

pub(crate) fn kill(a: KillArgs) -> Result<i32> {
    let sig = cstate::signal_number(&a.signal)
        .ok_or_else(|| anyhow::anyhow!("--signal {}: unknown signal", a.signal))?;
    if sig != libc::SIGKILL && !runtime::FORWARDED_SIGNALS.contains(&sig) {
        bail!(
            "--signal {}: vmc forwards KILL, TERM, INT, HUP, QUIT, USR1 and USR2",
            a.signal
        );
    }
    each_container(&a.containers, |name, mut c| {
        // A signal that ends the workload is a stop by the user: its
        // restart policy does not run it again (Docker's rule).
        let ending = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGQUIT].contains(&sig)
            || cstate::signal_number(&c.state.stop_signal) == Some(sig);
        if ending && c.refresh().is_live() {
            cstate::mark_stopped_by_user(&c.dir);
        }
        let sent = if sig == libc::SIGKILL {
            runtime::pause::thaw_for_end(&c);
            let running = c.refresh().is_live();
            if running {
                c.kill_now();
            }
            running
        } else {
            let sent = c.signal(sig);
            runtime::pause::thaw_for_end(&c);
            sent
        };
        Ok(if sent {
            Ok(())
        } else {
            Err(cstate::StateError::NotRunning(name.to_string()).into())
        })
    })
}

pub(crate) fn rm(a: RmArgs) -> Result<i32> {
    each_container(&a.containers, |name, mut c| {
        match c.refresh() {
            Status::Running | Status::Restarting if !a.force => {
                return Ok(Err(
                    cstate::StateError::StillRunning(name.to_string()).into()
                ));
            }
            Status::Running | Status::Restarting => {
                runtime::pause::thaw_for_end(&c);
                c.kill_now()
            }
            // Made by `vmc create` (or still being made): its supervisor goes.
            Status::Created if c.supervisor_alive() => c.kill_now(),
            _ => {}
        }
        // Cgroups a killed supervisor could not remove itself.
        runtime::cgroup::remove_listed(&c.dir.join("cgroups"));
        let mounts = c.config().map(|cfg| cfg.mounts).unwrap_or_default();
        // Another remover (a second `rm`, an --rm supervisor) may be at
        // the same directory: what counts is that it is gone.
        if let Err(e) = cstate::remove_dir(&c.dir) {
            if c.dir.exists() && cstate::remove_dir(&c.dir).is_err() && c.dir.exists() {
                return Err(e).with_context(|| format!("removing {}", c.dir.display()));
            }
        }
        if a.volumes {
            runtime::volume::remove_anonymous(&mounts);
        }
        Ok(Ok(()))
    })
}

pub(crate) fn exec(a: ExecArgs) -> Result<i32> {
    start_timings(a.timings);
    let mut c = cstate::resolve(&a.container)?;
    if c.refresh() != Status::Running {
        bail!(
            "container {} is not running: start a new one with vmc run",
            a.container
        );
    }
    if runtime::pause::is_paused(&c) {
        bail!(
            "container {0} is paused: unpause it first (vmc unpause {0})",
            a.container
        );
    }
    let cfg = c.config().context("reading the container's config")?;
    let mut spec = cfg.process.clone();
    spec.args = a.command.clone();
    let env: Vec<String> = a.env.iter().filter_map(|e| env_entry(e)).collect();
    spec::merge_env(&mut spec.env, &env);
    if let Some(w) = &a.workdir {
        spec.cwd = w.clone();
    }
    if let Some(u) = &a.user {
        spec.user = u.clone();
    }
    // Only what exec itself asks for: no terminal without -t (even in a
    // container run with one), never the container's --init.
    spec.tty = a.tty.then(runtime::tty::initial_size);
    spec.init = false;
    let forward_stdin = a.interactive || (!a.tty && !std::io::stdin().is_terminal());
    let engine = runtime::engine::for_mode(c.state.mode);
    let code = engine.exec_attached(&c, &cfg, spec, forward_stdin);
    report_timings(a.timings);
    Ok(code?)
}

/// One side of `vmc cp`: `NAME:PATH` (a colon before any slash), `-`, or
/// a host path (`./a:b` for a host name with a colon).
enum CpSide<'a> {
    Container(&'a str, &'a str),
    Stdio,
    Host(&'a std::path::Path),
}

fn cp_side(s: &str) -> CpSide<'_> {
    if s == "-" {
        return CpSide::Stdio;
    }
    match s.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            CpSide::Container(name, if path.is_empty() { "/" } else { path })
        }
        _ => CpSide::Host(std::path::Path::new(s)),
    }
}

/// `vmc cp`: Docker's rules. Out of a container: into DEST when it is a
/// directory, else as DEST (its parent must exist); `-` writes a tar to
/// stdout. Into one: the same at PATH; `-` reads a tar from stdin into
/// the directory PATH.
pub(crate) fn cp(a: CpArgs) -> Result<i32> {
    use runtime::copy;
    // SAFETY: getuid/getgid have no preconditions.
    let me = unsafe { (libc::getuid(), libc::getgid()) };
    let resolve = |name: &str| -> Result<(cstate::Container, runtime::ContainerConfig)> {
        let mut c = cstate::resolve(name)?;
        c.refresh();
        let cfg = c.config().context("reading the container's config")?;
        Ok((c, cfg))
    };
    match (cp_side(&a.src), cp_side(&a.dest)) {
        (CpSide::Container(name, path), CpSide::Stdio) => {
            let (c, cfg) = resolve(name)?;
            let owner = (!a.archive).then_some(me);
            let mut out = std::io::stdout();
            copy::copy_out(
                &c,
                &cfg,
                path,
                a.follow_link,
                &copy::base_name(path),
                owner,
                &mut out,
            )?;
            out.flush()?;
        }
        (CpSide::Container(name, path), CpSide::Host(dest)) => {
            let (c, cfg) = resolve(name)?;
            let (dir, top) = if dest.is_dir() {
                (dest.to_path_buf(), copy::base_name(path))
            } else {
                let parent = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                };
                if !parent.is_dir() {
                    bail!("{}: no such directory", parent.display());
                }
                let top = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .context("the destination has no name")?;
                (parent, top)
            };
            let owner = (!a.archive).then_some(me);
            let (r, w) = vmc_spawn::sys::pipe()?;
            let (mut r, mut w) = (std::fs::File::from(r), std::fs::File::from(w));
            let unpacked = std::thread::scope(|s| {
                let name = top.clone();
                let t = s.spawn(move || {
                    let dir = std::fs::File::open(&dir)?;
                    // Checked on this side: the tar comes from the
                    // container (a microVM's from its guest).
                    vmc::image::layer::unpack_copy(&mut r, dir.into(), &name, owner)
                        .map_err(anyhow::Error::from)
                });
                let sent = copy::copy_out(&c, &cfg, path, a.follow_link, &top, owner, &mut w);
                drop(w);
                let got = t.join().map_err(|_| anyhow::anyhow!("the copy failed"))?;
                sent?;
                got.map(|_| ())
            });
            unpacked.context("copying to the host")?;
        }
        (CpSide::Stdio, CpSide::Container(name, path)) => {
            let (c, cfg) = resolve(name)?;
            let mut stdin = std::io::stdin();
            copy::copy_in(&c, &cfg, path, copy::Source::Tar(&mut stdin))?;
        }
        (CpSide::Host(src), CpSide::Container(name, path)) => {
            let (c, cfg) = resolve(name)?;
            let src = std::path::absolute(src)?;
            if std::fs::symlink_metadata(&src).is_err() {
                bail!("{}: no such file or directory", src.display());
            }
            let owner = (!a.archive).then_some((0, 0));
            copy::copy_in(
                &c,
                &cfg,
                path,
                copy::Source::Host {
                    path: &src,
                    follow: a.follow_link,
                    owner,
                },
            )?;
        }
        (CpSide::Container(..), CpSide::Container(..)) => {
            bail!("copying between containers is not supported: copy to the host first")
        }
        _ => bail!("one of SRC and DEST must be a container's path (NAME:PATH)"),
    }
    Ok(0)
}

/// `vmc rename OLD NEW`.
pub(crate) fn rename(container: &str, name: &str) -> Result<i32> {
    let c = cstate::resolve(container)?;
    super::check_container_name(name)?;
    if c.state.name == name {
        bail!("renaming {container}: it already has the name {name}");
    }
    cstate::rename(&c, name)?;
    Ok(0)
}

pub(crate) fn wait(a: WaitArgs) -> Result<i32> {
    for name in &a.containers {
        let mut c = cstate::resolve(name)?;
        while !c.wait_next_exit(std::time::Duration::from_secs(3600)) {}
        println!("{}", c.state.exit_code.unwrap_or(0));
    }
    Ok(0)
}

/// `vmc port`: the container's published ports.
pub(crate) fn port(container: &str) -> Result<i32> {
    let c = cstate::resolve(container)?;
    for m in c.config().map(|c| c.ports).unwrap_or_default() {
        println!("{m}");
    }
    Ok(0)
}

/// `vmc top NAME [ps OPTIONS]`.
pub(crate) fn top(container: &str, ps_args: &[String]) -> Result<i32> {
    let mut c = cstate::resolve(container)?;
    let rows = runtime::observe::top(&mut c, ps_args)?;
    print_cells(&rows);
    Ok(0)
}

/// `value` with at most `sig` significant digits, as C's `%g` without an
/// exponent (Docker's sizes: `1.523MiB`, `648B`).
fn g(value: f64, sig: i32) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let digits = value.abs().log10().floor() as i32 + 1;
    let decimals = (sig - digits).max(0) as usize;
    let s = format!("{value:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Bytes in binary units (Docker's memory column): `1.523MiB`.
fn binary_size(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{}{}", g(v, 4), units[i])
}

/// Bytes in decimal units (Docker's network and block columns): `1.2kB`.
fn decimal_size(b: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    format!("{}{}", g(v, 3), units[i])
}

/// Docker's column titles for `stats --format 'table ...'`.
const STATS_HEADERS: &[(&str, &str)] = &[
    ("Container", "CONTAINER"),
    ("ID", "CONTAINER ID"),
    ("Name", "NAME"),
    ("CPUPerc", "CPU %"),
    ("MemUsage", "MEM USAGE / LIMIT"),
    ("MemPerc", "MEM %"),
    ("NetIO", "NET I/O"),
    ("BlockIO", "BLOCK I/O"),
    ("PIDs", "PIDS"),
    ("Mode", "MODE"),
    ("VmmMem", "VMM MEM"),
];

/// One `stats` row, with Docker's field names (and vmc's `Mode` and
/// `VmmMem`: a VM's VMM process's resident memory on the host).
fn stats_row(
    c: &Container,
    now: &runtime::observe::Sample,
    before: &runtime::observe::Sample,
    no_trunc: bool,
) -> serde_json::Value {
    let id = if no_trunc {
        c.state.id.clone()
    } else {
        c.state.id[..12].to_string()
    };
    let mem_perc = if now.mem_limit > 0 {
        now.mem_used as f64 / now.mem_limit as f64 * 100.0
    } else {
        0.0
    };
    serde_json::json!({
        "Container": id,
        "ID": id,
        "Name": c.state.name,
        "CPUPerc": format!("{:.2}%", now.cpu_percent(before)),
        "MemUsage": format!("{} / {}", binary_size(now.mem_used), binary_size(now.mem_limit)),
        "MemPerc": format!("{mem_perc:.2}%"),
        "NetIO": format!("{} / {}", decimal_size(now.net_rx), decimal_size(now.net_tx)),
        "BlockIO": format!("{} / {}", decimal_size(now.blk_read), decimal_size(now.blk_write)),
        "PIDs": now.pids.to_string(),
        "Mode": c.state.mode.to_string(),
        "VmmMem": now.vmm_rss.map(binary_size).unwrap_or_else(|| "--".into()),
    })
}

/// `vmc stats`: every running container (or those named), sampled twice
/// for the CPU column; with `--no-stream` one table, else one a second
/// until interrupted.
pub(crate) fn stats(a: vmc::cli::StatsArgs) -> Result<i32> {
    use runtime::observe;
    let pick = || -> Result<Vec<Container>> {
        if a.containers.is_empty() {
            let mut all = cstate::list();
            all.retain_mut(|c| {
                let st = c.refresh();
                a.all || st == Status::Running
            });
            return Ok(all);
        }
        a.containers
            .iter()
            .map(|n| cstate::resolve(n).map_err(Into::into))
            .collect()
    };
    let take = |cs: &mut [Container]| -> Vec<Option<observe::Sample>> {
        cs.iter_mut()
            .map(|c| match observe::sample(c) {
                Ok(s) => Some(s),
                Err(e) => {
                    // A named container that cannot be looked at is an
                    // error; one that ended meanwhile shows as zeros.
                    if !a.containers.is_empty() && c.state.status == Status::Running {
                        eprintln!("vmc: {}", vmc::host::error_line(&e));
                    }
                    None
                }
            })
            .collect()
    };
    let mut containers = pick()?;
    let mut before = take(&mut containers);
    let interval = std::time::Duration::from_secs(1);
    loop {
        std::thread::sleep(if a.no_stream {
            std::time::Duration::from_millis(500)
        } else {
            interval
        });
        let now = take(&mut containers);
        let rows: Vec<serde_json::Value> = containers
            .iter()
            .zip(now.iter().zip(&before))
            .map(|(c, (n, b))| {
                let zero = observe::Sample::default();
                stats_row(
                    c,
                    n.as_ref().unwrap_or(&zero),
                    b.as_ref().unwrap_or(&zero),
                    a.no_trunc,
                )
            })
            .collect();
        if !a.no_stream {
            // Docker's redraw: clear the screen and go home.
            print!("\x1b[2J\x1b[H");
        }
        match a.format.as_deref() {
            Some("json") => {
                for r in &rows {
                    println!("{r}");
                }
            }
            Some(f) => print_formatted(f, &rows, STATS_HEADERS)?,
            None => {
                let columns = [
                    "ID", "Name", "CPUPerc", "MemUsage", "MemPerc", "NetIO", "BlockIO", "PIDs",
                ];
                print_columns(&rows, &columns, STATS_HEADERS);
            }
        }
        let _ = std::io::stdout().flush();
        if a.no_stream {
            return Ok(0);
        }
        before = now;
        if a.containers.is_empty() {
            // Containers that started or ended meanwhile come and go.
            let fresh = pick()?;
            if fresh
                .iter()
                .map(|c| &c.state.id)
                .ne(containers.iter().map(|c| &c.state.id))
            {
                containers = fresh;
                before = take(&mut containers);
            }
        }
    }
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    /// Sizes as Docker prints them: binary for memory, decimal for I/O,
    /// four and three significant digits.
    #[test]
    fn sizes_read_as_dockers() {
        assert_eq!(binary_size(0), "0B");
        assert_eq!(binary_size(1597000), "1.523MiB");
        assert_eq!(binary_size(256 << 20), "256MiB");
        assert_eq!(binary_size(8232000000), "7.667GiB");
        assert_eq!(decimal_size(648), "648B");
        assert_eq!(decimal_size(1234), "1.23kB");
        assert_eq!(decimal_size(15_000_000), "15MB");
    }
}
