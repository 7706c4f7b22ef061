//! What vmc-runtime keeps of a container under `--root` (runc's
//! `/run/runc` layout: a directory per id), and its status as the runtime
//! spec defines it: `created` (the process exists and waits for `start`),
//! `running`, `stopped` (the process has ended), plus runc's `paused`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::Mode;

/// The record of a created container, `ROOT/ID/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub mode: Mode,
    /// The container's process (what the caller waits for).
    pub pid: i32,
    /// Its start time (/proc/PID/stat field 22): a pid reused by another
    /// process is not taken for the container's.
    pub pid_start: u64,
    /// The process that holds a created container until `start`.
    pub holder: i32,
    /// RFC 3339.
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    /// Its cgroup directories (namespace mode).
    pub cgroups: Vec<PathBuf>,
}

/// The runtime spec's statuses (and runc's `paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// A container id as runc takes it: letters, digits, `_ + - .`, not
/// starting with a dot: one path component under the root, never more.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
}

/// The marker that the container was created and not yet started.
pub const CREATED: &str = "created";

impl Record {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> std::io::Result<Record> {
        let text = std::fs::read_to_string(Self::path(dir))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Written to a temporary name, then renamed over.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, Self::path(dir))
    }

    /// Whether the container's process is alive (a zombie is not).
    pub fn alive(&self) -> bool {
        process_alive(self.pid, Some(self.pid_start))
    }

    pub fn status(&self, dir: &Path) -> Status {
        if !self.alive() {
            return Status::Stopped;
        }
        if dir.join(CREATED).exists() {
            return Status::Created;
        }
        let frozen = match self.mode {
            Mode::Vm => super::vm::paused(dir),
            Mode::Ns => crate::runtime::cgroup::freezer_of(&self.cgroups)
                .is_some_and(|f| crate::runtime::cgroup::is_frozen(&f)),
        };
        if frozen {
            Status::Paused
        } else {
            Status::Running
        }
    }

    /// The runtime spec's state JSON (with runc's `rootfs`, `created`
    /// and `owner`).
    pub fn state_json(&self, dir: &Path) -> serde_json::Value {
        let status = self.status(dir);
        let mut v = serde_json::json!({
            "ociVersion": oci_spec::runtime::VERSION,
            "id": self.id,
            "status": status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
        });
        // The pid is there while the process is (runc: 0 once stopped).
        v["pid"] = serde_json::json!(if status == Status::Stopped {
            0
        } else {
            self.pid
        });
        if !self.annotations.is_empty() {
            v["annotations"] = serde_json::json!(self.annotations);
        }
        v
    }
}

/// Whether `pid` runs (not a zombie), and is the process that started at
/// `start` when given (runtime::state::process_start's reading of /proc).
pub fn process_alive(pid: i32, start: Option<u64>) -> bool {
    pid > 0
        && crate::runtime::state::process_start(pid).is_some_and(|t| start.is_none_or(|s| s == t))
}

/// Now, in RFC 3339 (UTC), as runc records `created`.
pub fn now_rfc3339() -> String {
    crate::image::store::rfc3339_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_safe_path_component() {
        for ok in ["abc", "a-b_c.d+e", "0123456789abcdef"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "x\n"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn this_process_is_alive_and_its_start_time_checked() {
        let me = std::process::id() as i32;
        let start = crate::runtime::state::process_start(me).unwrap();
        assert!(process_alive(me, Some(start)));
        assert!(!process_alive(me, Some(start + 1)));
        assert!(!process_alive(0, None));
    }
}
