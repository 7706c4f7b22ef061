//! Cgroups of namespace-mode containers: the device allow-list (always, see
//! `devices.rs`) and the limits (`--memory`, `--cpus`, `--pids-limit`), on
//! cgroup v2 (unified) or v1 (one hierarchy per controller, as on hosts in
//! "hybrid" mode). A container's cgroups are made
//! below vmc's own ones, so vmc also works inside a delegated subtree; the
//! container's process joins them itself before it execs, and they are
//! removed when the container is gone.

use std::fs;
use std::path::{Path, PathBuf};

use super::NsLimits;

/// What goes wrong making, joining or removing a container's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0} in namespace mode need root: without it vmc runs in a user namespace and has no cgroup of its own to limit (run as root, or drop the flag)")]
    RootlessLimits(&'static str),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("the {0} cgroup controller is not available on this host")]
    NoController(String),
}

const ROOT: &str = "/sys/fs/cgroup";

/// A container's cgroups, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// On cgroup v2: the device rules are a BPF program attached to dirs[0].
    unified: bool,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(|source| CgroupError::Sys {
        what: format!("setting {} to {value}", p.display()),
        source,
    })
}

/// This process's cgroup path in the hierarchy whose line of `membership`
/// (the text of `/proc/self/cgroup`) matches `pick` (the v2 line is
/// `0::/path`).
fn own_path(membership: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
    membership.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        pick(ctrls).then(|| path.trim_start_matches('/').to_string())
    })
}

impl Cgroup {
    /// Creates the cgroups for container `id`: the device allow-list and
    /// `limits`. `None` without root (rootless namespace mode, where a user
    /// namespace cannot make device nodes at all), where limits are refused.
    pub fn create(id: &str, limits: &NsLimits) -> Result<Option<Cgroup>, CgroupError> {
        if crate::host::rootless() {
            let flag = if limits.memory.is_some() {
                "--memory"
            } else if limits.cpus.is_some() {
                "--cpus"
            } else if limits.pids.is_some() {
                "--pids-limit"
            } else {
                return Ok(None);
            };
            return Err(CgroupError::RootlessLimits(flag));
        }
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let cg = Self::create_in(Path::new(ROOT), &membership, id, limits, true)?;
        if cg.unified {
            super::devices::attach_v2(&cg.dirs[0], super::devices::ALLOWED).map_err(|source| {
                CgroupError::Sys {
                    what: format!(
                        "attaching the device allow-list (BPF) to {}",
                        cg.dirs[0].display()
                    ),
                    source,
                }
            })?;
        }
        Ok(Some(cg))
    }

    /// Creates the cgroups for container `id` below `root` (a cgroup v2
    /// mount, or a directory of v1 mounts named by controller), given this
    /// process's `membership` (`/proc/self/cgroup`). Separate from `create`
    /// so that the v2 path is tested on hosts that have v1.
    fn create_in(
        root: &Path,
        membership: &str,
        id: &str,
        limits: &NsLimits,
        devices: bool,
    ) -> Result<Cgroup, CgroupError> {
        let name = format!("vmc-{}", &id[..12.min(id.len())]);
        let mut cg = Cgroup {
            dirs: Vec::new(),
            unified: false,
        };
        let mkdir = |p: &Path| {
            fs::create_dir_all(p).map_err(|source| CgroupError::Sys {
                what: format!("creating cgroup {}", p.display()),
                source,
            })
        };
        if root.join("cgroup.controllers").exists() {
            // v2: one directory; its parent must delegate the controllers.
            let own = own_path(membership, |c| c.is_empty()).unwrap_or_default();
            let parent = root.join(&own);
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
            if !want.is_empty() {
                write(&parent, "cgroup.subtree_control", &want.join(" "))?;
            }
            let dir = parent.join(&name);
            mkdir(&dir)?;
            cg.dirs.push(dir.clone());
            cg.unified = true;
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
            return Ok(cg);
        }
        // v1: a directory per controller's hierarchy.
        let mut in_hierarchy = |ctrl: &str| -> Result<PathBuf, CgroupError> {
            let own = own_path(membership, |c| c.split(',').any(|x| x == ctrl))
                .ok_or_else(|| CgroupError::NoController(ctrl.to_string()))?;
            let dir = root.join(ctrl).join(own).join(&name);
            mkdir(&dir)?;
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        // Docker's device rules: everything denied, then the allow-list,
        // one rule per write.
        if devices {
            let dir = in_hierarchy("devices")?;
            write(&dir, "devices.deny", "a")?;
            for r in super::devices::ALLOWED {
                write(&dir, "devices.allow", &super::devices::v1_line(r))?;
            }
            // A container's processes are also kept together for `vmc
            // pause` (the freezer) and counted for `vmc stats` (cpuacct,
            // blkio, and memory and pids without a limit), where the host
            // has those hierarchies.
            for ctrl in ["freezer", "cpuacct", "blkio"] {
                match in_hierarchy(ctrl) {
                    Ok(_) | Err(CgroupError::NoController(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            for (ctrl, limited) in [("memory", limits.memory), ("pids", limits.pids.map(|_| 0))] {
                if limited.is_none() {
                    match in_hierarchy(ctrl) {
                        Ok(_) | Err(CgroupError::NoController(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if let Some(m) = limits.memory {
            let dir = in_hierarchy("memory")?;
            // The memory+swap limit may never be below the memory limit:
            // in a reused directory (a VMM's slot) it is raised first, for
            // a larger limit (for a smaller one that first write fails, and
            // the one after the memory limit's succeeds). Without swap
            // accounting the file does not exist.
            let memsw = |dir: &Path| write(dir, "memory.memsw.limit_in_bytes", &m.to_string());
            let _ = memsw(&dir);
            write(&dir, "memory.limit_in_bytes", &m.to_string())?;
            let _ = memsw(&dir);
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
        Ok(cg)
    }

    /// The cgroups of a VMM process (`name` unique among them): `limits`
    /// and no device rules (a jailed VMM opens no device). None when vmc
    /// runs rootless (no cgroup of its own to divide).
    pub fn for_vmm(name: &str, limits: &NsLimits) -> Result<Option<Cgroup>, CgroupError> {
        if crate::host::rootless() {
            return Ok(None);
        }
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::create_in(Path::new(ROOT), &membership, name, limits, false).map(Some)
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

/// Moves this process into the cgroups recorded in `list` (one path per
/// line), as `vmc exec` does before it joins a container's namespaces: what
/// it runs counts against the container's limits and gets its device rules.
/// A missing list (a rootless container has no cgroups) joins nothing.
pub fn join_listed(list: &Path) -> Result<(), CgroupError> {
    let text = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Sys {
                what: format!("reading {}", list.display()),
                source,
            })
        }
    };
    for d in text.lines().map(PathBuf::from) {
        if !d.starts_with(ROOT) || d.components().any(|c| c == std::path::Component::ParentDir) {
            continue;
        }
        write(&d, "cgroup.procs", &std::process::id().to_string())?;
    }
    Ok(())
}

/// The cgroup directories recorded in `list` (one path per line), each
/// checked to be under the cgroup mount and without `..`.
pub fn listed(list: &Path) -> Vec<PathBuf> {
    fs::read_to_string(list)
        .unwrap_or_default()
        .lines()
        .map(PathBuf::from)
        .filter(|d| {
            d.starts_with(ROOT) && !d.components().any(|c| c == std::path::Component::ParentDir)
        })
        .collect()
}

/// The freezer of a container's cgroups: the v1 freezer hierarchy's
/// directory, or the v2 directory (every non-root v2 cgroup has
/// `cgroup.freeze`).
pub fn freezer_of(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .find(|d| d.join("freezer.state").exists())
        .or_else(|| dirs.iter().find(|d| d.join("cgroup.freeze").exists()))
        .cloned()
}

/// Freezes (`frozen`) or thaws the processes of the cgroup `dir` and waits
/// until the kernel reports it done. Freezing ends when every task stopped;
/// a task in an uninterruptible sleep can hold it up, so the wait is
/// bounded (a minute, loosely) and then undone.
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    let v1 = dir.join("freezer.state").exists();
    if v1 {
        write(
            dir,
            "freezer.state",
            if frozen { "FROZEN" } else { "THAWED" },
        )?;
    } else {
        write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    }
    let done = || {
        if v1 {
            let st = fs::read_to_string(dir.join("freezer.state")).unwrap_or_default();
            st.trim() == if frozen { "FROZEN" } else { "THAWED" }
        } else {
            let want = if frozen { "frozen 1" } else { "frozen 0" };
            fs::read_to_string(dir.join("cgroup.events"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == want)
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        if std::time::Instant::now() > deadline {
            if frozen {
                let _ = set_frozen(dir, false);
            }
            return Err(CgroupError::Sys {
                what: format!("freezing {}", dir.display()),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        // v1 moves FREEZING on to FROZEN only when asked again.
        if v1 && frozen {
            let _ = write(dir, "freezer.state", "FROZEN");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Whether the cgroup `dir` is frozen.
pub fn is_frozen(dir: &Path) -> bool {
    if dir.join("freezer.state").exists() {
        return fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() != "THAWED");
    }
    fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
}

/// Thaws `dir` if it is a frozen freezer cgroup.
fn thaw(dir: &Path) -> Result<(), CgroupError> {
    if is_frozen(dir) {
        return set_frozen(dir, false);
    }
    Ok(())
}

/// Removes cgroup directories recorded in `list` (one path per line), for
/// `vmc rm` after a container's supervisor is gone: whatever is still in
/// them is that container's leftover, and is killed first (as `docker rm
/// -f` does). A killed process always ends, so the wait is bounded loosely
/// (a minute), only against a cgroup that cannot be removed at all.
pub fn remove_listed(list: &Path) {
    let Ok(text) = fs::read_to_string(list) else {
        return;
    };
    for d in text.lines().map(PathBuf::from) {
        if !d.starts_with(ROOT) {
            continue;
        }
        // A paused container's processes die only once thawed (v1).
        let _ = thaw(&d);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while fs::remove_dir(&d).is_err() && d.exists() && std::time::Instant::now() < deadline {
            for pid in fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                .filter(|&pid| pid > 0)
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> NsLimits {
        NsLimits {
            memory: Some(32 << 20),
            cpus: Some(2),
            pids: Some(8),
        }
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    /// cgroup v2: one directory below this process's own cgroup, the
    /// controllers delegated by its parent, the limits in the v2 files. (On
    /// a v1 or hybrid host, such as this project's CI machines, the v2 path
    /// cannot apply limits for real: the controllers are bound to v1.)
    #[test]
    fn v2_limits_go_in_one_directory_below_our_own_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::write(r.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::create_dir_all(r.join("user.slice/session-1.scope")).unwrap();
        let membership = "0::/user.slice/session-1.scope\n";
        let id = "0123456789abcdef0123";
        let cg = Cgroup::create_in(r, membership, id, &limits(), true).unwrap();
        let own = r.join("user.slice/session-1.scope");
        let dir = own.join("vmc-0123456789ab");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(
            read(&own.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(read(&dir.join("memory.max")), (32u64 << 20).to_string());
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("cpu.max")), "200000 100000");
        assert_eq!(read(&dir.join("pids.max")), "8");
        assert_eq!(cg.procs_files(), [dir.join("cgroup.procs")]);
        // Only what is limited is delegated and written.
        let only_pids = NsLimits {
            memory: None,
            cpus: None,
            pids: Some(3),
        };
        let cg2 = Cgroup::create_in(r, membership, "fedcba9876543210", &only_pids, true).unwrap();
        let dir2 = own.join("vmc-fedcba987654");
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+pids");
        assert!(!dir2.join("memory.max").exists());
        assert_eq!(read(&dir2.join("pids.max")), "3");
        // Dropping removes the directories (here they hold our files, so
        // remove those first, as the kernel's would be gone).
        for d in [&dir, &dir2] {
            for f in fs::read_dir(d).unwrap() {
                fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        drop((cg, cg2));
        assert!(!dir.exists() && !dir2.exists());
    }

    /// A v2 parent that refuses to delegate (controllers not enabled in its
    /// own parent) is an error naming the file and the value.
    #[test]
    fn v2_without_delegation_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::write(r.join("cgroup.controllers"), "").unwrap();
        // No such cgroup directory: the write to its subtree_control fails.
        let err = Cgroup::create_in(r, "0::/missing\n", "0123456789abcdef", &limits(), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing/cgroup.subtree_control") && err.contains("+memory +cpu +pids"),
            "{err}"
        );
    }

    /// cgroup v1: a directory per controller's hierarchy, each below this
    /// process's cgroup in that hierarchy.
    #[test]
    fn v1_limits_go_in_each_controllers_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let membership = "5:devices:/d\n4:memory:/a\n3:pids:/\n2:cpu,cpuacct:/b\n0::/\n";
        for d in ["devices/d", "memory/a", "pids", "cpu/b"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        let cg = Cgroup::create_in(r, membership, "0123456789abcdef", &limits(), true).unwrap();
        let name = "vmc-0123456789ab";
        // cpuacct (for vmc stats) too, as the host has it; no freezer or
        // blkio hierarchy here, so none.
        assert_eq!(
            cg.dirs(),
            [
                r.join("devices/d").join(name),
                r.join("cpuacct/b").join(name),
                r.join("memory/a").join(name),
                r.join("cpu/b").join(name),
                r.join("pids").join(name)
            ]
        );
        assert_eq!(
            read(&r.join("memory/a").join(name).join("memory.limit_in_bytes")),
            (32u64 << 20).to_string()
        );
        assert_eq!(
            read(&r.join("cpu/b").join(name).join("cpu.cfs_quota_us")),
            "200000"
        );
        assert_eq!(read(&r.join("pids").join(name).join("pids.max")), "8");
        // The devices hierarchy: everything denied, then the allow-list
        // (the fake files keep only the last write).
        let devices = r.join("devices/d").join(name);
        assert_eq!(read(&devices.join("devices.deny")), "a");
        assert_eq!(read(&devices.join("devices.allow")), "c 136:* rwm");
        std::mem::forget(cg);
        // Without limits: the devices cgroup, and those vmc stats reads.
        let cg = Cgroup::create_in(
            r,
            membership,
            "aaaabbbbccccdddd",
            &NsLimits::default(),
            true,
        )
        .unwrap();
        assert_eq!(
            cg.dirs(),
            [
                r.join("devices/d/vmc-aaaabbbbcccc"),
                r.join("cpuacct/b/vmc-aaaabbbbcccc"),
                r.join("memory/a/vmc-aaaabbbbcccc"),
                r.join("pids/vmc-aaaabbbbcccc")
            ]
        );
        std::mem::forget(cg);
        // A controller the host does not have is named.
        let err = Cgroup::create_in(
            r,
            "5:devices:/\n0::/\n",
            "0123456789abcdef",
            &limits(),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("memory cgroup controller is not available"),
            "{err}"
        );
    }
}
