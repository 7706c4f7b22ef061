//! Cgroup limits for namespace-mode containers (`--memory`, `--cpus`,
//! `--pids-limit`), on cgroup v2 (unified) or v1 (one hierarchy per
//! controller, as on hosts in "hybrid" mode). A container's cgroups are made
//! below vmc's own ones, so vmc also works inside a delegated subtree; the
//! container's process joins them itself before it execs, and they are
//! removed when the container is gone.

use std::fs;
use std::path::{Path, PathBuf};

use super::ns::NsError;
use super::NsLimits;

const ROOT: &str = "/sys/fs/cgroup";

/// A container's cgroups, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), NsError> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(|source| NsError::Sys {
        what: format!("setting {} to {value}", p.display()),
        source,
    })
}

/// This process's cgroup path in the hierarchy whose `/proc/self/cgroup`
/// line matches `pick` (the v2 line is `0::/path`).
fn own_path(pick: impl Fn(&str) -> bool) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        pick(ctrls).then(|| path.trim_start_matches('/').to_string())
    })
}

impl Cgroup {
    /// Creates the cgroups for container `id` with `limits`; `None` when
    /// nothing is limited.
    pub fn create(id: &str, limits: &NsLimits) -> Result<Option<Cgroup>, NsError> {
        if limits.memory.is_none() && limits.cpus.is_none() && limits.pids.is_none() {
            return Ok(None);
        }
        if super::ns::rootless() {
            let flag = if limits.memory.is_some() {
                "--memory"
            } else if limits.cpus.is_some() {
                "--cpus"
            } else {
                "--pids-limit"
            };
            return Err(NsError::RootlessLimits(flag));
        }
        let name = format!("vmc-{}", &id[..12.min(id.len())]);
        let mut cg = Cgroup { dirs: Vec::new() };
        let mkdir = |p: &Path| {
            fs::create_dir_all(p).map_err(|source| NsError::Sys {
                what: format!("creating cgroup {}", p.display()),
                source,
            })
        };
        if Path::new(ROOT).join("cgroup.controllers").exists() {
            // v2: one directory; its parent must delegate the controllers.
            let own = own_path(|c| c.is_empty()).unwrap_or_default();
            let parent = Path::new(ROOT).join(&own);
            let mut want = Vec::new();
            if limits.memory.is_some() {
                want.push("+memory");
            }
            if limits.cpus.is_some() {
                want.push("+cpu");
            }
            if limits.pids.is_some() {
                want.push("+pids");
            }
            write(&parent, "cgroup.subtree_control", &want.join(" "))?;
            let dir = parent.join(&name);
            mkdir(&dir)?;
            cg.dirs.push(dir.clone());
            if let Some(m) = limits.memory {
                write(&dir, "memory.max", &m.to_string())?;
                let _ = write(&dir, "memory.swap.max", "0");
            }
            if let Some(c) = limits.cpus {
                write(
                    &dir,
                    "cpu.max",
                    &format!("{} 100000", u64::from(c) * 100_000),
                )?;
            }
            if let Some(p) = limits.pids {
                write(&dir, "pids.max", &p.to_string())?;
            }
            return Ok(Some(cg));
        }
        // v1: a directory per controller's hierarchy.
        let mut in_hierarchy = |ctrl: &str| -> Result<PathBuf, NsError> {
            let own = own_path(|c| c.split(',').any(|x| x == ctrl)).ok_or_else(|| {
                NsError::Start(format!(
                    "the {ctrl} cgroup controller is not available on this host"
                ))
            })?;
            let dir = Path::new(ROOT).join(ctrl).join(own).join(&name);
            mkdir(&dir)?;
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        if let Some(m) = limits.memory {
            let dir = in_hierarchy("memory")?;
            write(&dir, "memory.limit_in_bytes", &m.to_string())?;
            // Without swap accounting this file does not exist.
            let _ = write(&dir, "memory.memsw.limit_in_bytes", &m.to_string());
        }
        if let Some(c) = limits.cpus {
            let dir = in_hierarchy("cpu")?;
            write(&dir, "cpu.cfs_period_us", "100000")?;
            write(
                &dir,
                "cpu.cfs_quota_us",
                &(u64::from(c) * 100_000).to_string(),
            )?;
        }
        if let Some(p) = limits.pids {
            let dir = in_hierarchy("pids")?;
            write(&dir, "pids.max", &p.to_string())?;
        }
        Ok(Some(cg))
    }

    /// The cgroup directories (recorded with the container, so that `vmc rm`
    /// can remove them when the supervisor was killed).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The files a process writes `0` to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // The last processes may take a moment to leave.
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Removes cgroup directories recorded in `list` (one path per line),
/// waiting briefly for their last processes to go.
pub fn remove_listed(list: &Path) {
    let Ok(text) = fs::read_to_string(list) else {
        return;
    };
    for d in text.lines().map(PathBuf::from) {
        if !d.starts_with(ROOT) {
            continue;
        }
        for _ in 0..100 {
            if fs::remove_dir(&d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
