//! Volumes and mounts: `-v`, `--mount`, `--tmpfs` and an image's `VOLUME`
//! entries, read Docker's way into [`Mount`]s, and the named volumes vmc
//! keeps in its state directory (`$VMC_HOME/volumes/NAME/_data`, as
//! Docker's local driver lays them out).
//!
//! A volume lives until `vmc volume rm`; an anonymous one (an image's
//! `VOLUME`, or `-v /dir`) also goes with `vmc rm -v` and with its `--rm`
//! container. An empty volume is filled from the image's content at its
//! mount point when a container first mounts it (unless `nocopy`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::vmc_home;

/// What is mounted at a [`Mount`]'s target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum MountSource {
    /// A host directory or file (`-v /host:/ctr`, `--mount type=bind`).
    Bind { source: PathBuf },
    /// A named or anonymous volume of the store.
    Volume {
        name: String,
        anonymous: bool,
        /// Not filled from the image (`nocopy`, `volume-nocopy`).
        nocopy: bool,
    },
    /// A tmpfs: mount(2) flags (`MS_NOSUID`, ...) and data (`size=`, `mode=`).
    Tmpfs { flags: libc::c_ulong, data: String },
}

/// One mount of a container, at `target` inside its root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: MountSource,
    pub target: String,
    pub readonly: bool,
}

impl Mount {
    /// Docker's name for the kind (`bind`, `volume`, `tmpfs`).
    pub fn kind(&self) -> &'static str {
        match self.source {
            MountSource::Bind { .. } => "bind",
            MountSource::Volume { .. } => "volume",
            MountSource::Tmpfs { .. } => "tmpfs",
        }
    }

    /// The host directory or file behind it (none for a tmpfs).
    pub fn host_path(&self) -> Option<PathBuf> {
        match &self.source {
            MountSource::Bind { source } => Some(source.clone()),
            MountSource::Volume { name, .. } => Some(data_dir(name)),
            MountSource::Tmpfs { .. } => None,
        }
    }

    /// As `docker inspect` shows it under `Mounts`.
    pub fn inspect(&self) -> serde_json::Value {
        let (name, driver) = match &self.source {
            MountSource::Volume { name, .. } => (Some(name.as_str()), "local"),
            _ => (None, ""),
        };
        serde_json::json!({
            "Type": self.kind(),
            "Name": name,
            "Source": self.host_path().map(|p| p.display().to_string()).unwrap_or_default(),
            "Destination": self.target,
            "Driver": driver,
            "Mode": if self.readonly { "ro" } else { "" },
            "RW": !self.readonly,
            "Propagation": if matches!(self.source, MountSource::Bind { .. }) { "rprivate" } else { "" },
        })
    }
}

/// Errors of mount options and of the volume store, in Docker's words where
/// Docker has them.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume specification '{0}': {1}")]
    Spec(String, String),
    #[error("invalid mount config '{0}': {1}")]
    MountSpec(String, String),
    #[error("--tmpfs '{0}': {1}")]
    Tmpfs(String, String),
    #[error("duplicate mount point: {0}")]
    Duplicate(String),
    #[error(
        "'{0}' is not a valid volume name: use [a-zA-Z0-9][a-zA-Z0-9_.-]+ (a host directory is given by an absolute path)"
    )]
    Name(String),
    #[error("no such volume: {0}")]
    NoSuch(String),
    #[error("volume {0} is in use by container {1}: remove the container first (vmc rm {1})")]
    InUse(String, String),
    #[error("volume {0}: {1}")]
    Io(String, #[source] io::Error),
}

/// Where named volumes are kept.
pub fn volumes_dir() -> PathBuf {
    vmc_home().join("volumes")
}

/// The directory a volume's content is in.
pub fn data_dir(name: &str) -> PathBuf {
    volumes_dir().join(name).join("_data")
}

/// Docker's rule for a volume name: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_name(name: &str) -> bool {
    let mut c = name.chars();
    name.len() >= 2
        && name.len() <= 255
        && c.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && c.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A container path given to a mount: absolute, cleaned, not the root.
fn target(given: &str, err: impl Fn(&str) -> VolumeError) -> Result<String, VolumeError> {
    if !given.starts_with('/') {
        return Err(err("the mount point must be an absolute path"));
    }
    let t = vmc_spawn::clean_path(given);
    if t == "/" {
        return Err(err("the mount point cannot be '/'"));
    }
    Ok(t)
}

/// A host path given to a bind mount: absolute, cleaned.
fn host_source(given: &str, err: impl Fn(&str) -> VolumeError) -> Result<PathBuf, VolumeError> {
    if !given.starts_with('/') {
        return Err(err("a host path must be absolute"));
    }
    Ok(PathBuf::from(vmc_spawn::clean_path(given)))
}

/// `-v SPEC`: `/ctr` (anonymous volume), `NAME:/ctr`, `/host:/ctr`, each
/// with `:OPTIONS` (`ro`, `rw`, `nocopy`; `z`/`Z` and `rprivate`/`private`
/// are accepted and change nothing here). A missing host directory is
/// created, as Docker's `-v` does.
pub fn parse_volume_flag(spec: &str) -> Result<Mount, VolumeError> {
    let err = |why: &str| VolumeError::Spec(spec.to_string(), why.to_string());
    let parts: Vec<&str> = spec.split(':').collect();
    let is_mode = |m: &str| {
        m.split(',').all(|o| {
            matches!(
                o,
                "ro" | "rw"
                    | "z"
                    | "Z"
                    | "nocopy"
                    | "private"
                    | "rprivate"
                    | "delegated"
                    | "cached"
                    | "consistent"
            )
        })
    };
    let (source, dest, mode) = match parts.as_slice() {
        [d] => (None, *d, ""),
        [d, m] if d.starts_with('/') && is_mode(m) => (None, *d, *m),
        [s, d] => (Some(*s), *d, ""),
        [s, d, m] => (Some(*s), *d, *m),
        _ => return Err(err("too many colons")),
    };
    let mut readonly = false;
    let mut nocopy = false;
    for o in mode.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => readonly = true,
            "rw" => readonly = false,
            "nocopy" => nocopy = true,
            "z" | "Z" | "private" | "rprivate" | "delegated" | "cached" | "consistent" => {}
            "shared" | "rshared" | "slave" | "rslave" => {
                return Err(err(&format!(
                    "'{o}' propagation is not supported (vmc's mounts are private)"
                )))
            }
            _ => return Err(err(&format!("unknown option '{o}'"))),
        }
    }
    let target = target(dest, err)?;
    let source = match source {
        None => MountSource::Volume {
            name: anonymous_name(),
            anonymous: true,
            nocopy,
        },
        Some("") => return Err(err("the source is empty")),
        Some(s) if s.starts_with('/') => {
            if nocopy {
                return Err(err("nocopy is for volumes, not host paths"));
            }
            MountSource::Bind {
                source: host_source(s, err)?,
            }
        }
        Some(s) if valid_name(s) => MountSource::Volume {
            name: s.to_string(),
            anonymous: false,
            nocopy,
        },
        Some(s) => return Err(VolumeError::Name(s.to_string())),
    };
    Ok(Mount {
        source,
        target,
        readonly,
    })
}

/// `--mount type=bind|volume|tmpfs,source=...,target=...[,readonly]
/// [,volume-nocopy][,tmpfs-size=N][,tmpfs-mode=OCTAL]` (Docker's keys and
/// their aliases; `bind-propagation=rprivate|private` and
/// `consistency=...` change nothing here). A bind's source must exist.
pub fn parse_mount_flag<'a>(spec: &'a str) -> Result<Mount, VolumeError> {
    let err = |why: &str| VolumeError::MountSpec(spec.to_string(), why.to_string());
    let mut kind = "volume";
    let mut source = None;
    let mut dest = None;
    let mut readonly = false;
    let mut nocopy = false;
    let mut tmpfs_data = Vec::new();
    for field in spec.split(',') {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (field.trim(), None),
        };
        let flag = |v: Option<&str>| match v {
            None | Some("1" | "true") => Ok(true),
            Some("0" | "false") => Ok(false),
            Some(o) => Err(err(&format!("'{k}={o}': give true or false"))),
        };
        let value = |v: Option<&'a str>| v.ok_or_else(|| err(&format!("'{k}' needs a value")));
        match k {
            "type" => kind = value(v)?,
            "source" | "src" => source = Some(value(v)?),
            "target" | "destination" | "dst" => dest = Some(value(v)?),
            "readonly" | "ro" => readonly = flag(v)?,
            "volume-nocopy" => nocopy = flag(v)?,
            "bind-propagation" => match value(v)? {
                "private" | "rprivate" => {}
                o => {
                    return Err(err(&format!(
                        "bind-propagation={o} is not supported (vmc's mounts are private)"
                    )))
                }
            },
            "consistency" => {
                value(v)?;
            }
            "volume-driver" => match value(v)? {
                "local" => {}
                o => return Err(err(&format!("volume driver '{o}': vmc has only 'local'"))),
            },
            "tmpfs-size" => {
                let s = value(v)?;
                if !size_ok(s) {
                    return Err(err(&format!("tmpfs-size={s}: give bytes, or k, m, g")));
                }
                tmpfs_data.push(format!("size={s}"));
            }
            "tmpfs-mode" => {
                let m = value(v)?;
                if u32::from_str_radix(m, 8).map_or(true, |m| m > 0o7777) {
                    return Err(err(&format!("tmpfs-mode={m}: give octal permissions")));
                }
                tmpfs_data.push(format!("mode={m}"));
            }
            "" => {}
            o => return Err(err(&format!("unknown key '{o}'"))),
        }
    }
    let target = target(dest.ok_or_else(|| err("a target is required"))?, err)?;
    if !tmpfs_data.is_empty() && kind != "tmpfs" {
        return Err(err("tmpfs-size and tmpfs-mode are for type=tmpfs"));
    }
    if nocopy && kind != "volume" {
        return Err(err("volume-nocopy is for type=volume"));
    }
    let source = match (kind, source) {
        ("bind", None) => return Err(err("a bind mount needs a source")),
        ("bind", Some(s)) => {
            let p = host_source(s, err)?;
            if !p.exists() {
                return Err(err(&format!(
                    "bind source path does not exist: {}",
                    p.display()
                )));
            }
            MountSource::Bind { source: p }
        }
        ("volume", None) => MountSource::Volume {
            name: anonymous_name(),
            anonymous: true,
            nocopy,
        },
        ("volume", Some(s)) if valid_name(s) => MountSource::Volume {
            name: s.to_string(),
            anonymous: false,
            nocopy,
        },
        ("volume", Some(s)) => return Err(VolumeError::Name(s.to_string())),
        ("tmpfs", Some(_)) => return Err(err("a tmpfs takes no source")),
        ("tmpfs", None) => MountSource::Tmpfs {
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: tmpfs_data.join(","),
        },
        (o, _) => {
            return Err(err(&format!(
                "type '{o}': vmc mounts bind, volume and tmpfs"
            )))
        }
    };
    Ok(Mount {
        source,
        target,
        readonly,
    })
}

/// Whether `s` is a tmpfs size the kernel takes: digits with an optional
/// `k`, `m`, `g` or `%`.
fn size_ok(s: &str) -> bool {
    let digits = s.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', '%']);
    !digits.is_empty() && s.len() - digits.len() <= 1 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `--tmpfs DIR[:OPTIONS]`: Docker's default `rw,noexec,nosuid,nodev`;
/// options `ro`/`rw`, `exec`/`noexec`, `suid`/`nosuid`, `dev`/`nodev`,
/// `size=`, `mode=`, `uid=`, `gid=`, `nr_inodes=`.
pub fn parse_tmpfs_flag(spec: &str) -> Result<Mount, VolumeError> {
    let err = |why: &str| VolumeError::Tmpfs(spec.to_string(), why.to_string());
    let (dest, opts) = spec.split_once(':').unwrap_or((spec, ""));
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut readonly = false;
    let mut data = Vec::new();
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            None => match o {
                "ro" => readonly = true,
                "rw" => readonly = false,
                "exec" => flags &= !libc::MS_NOEXEC,
                "noexec" => flags |= libc::MS_NOEXEC,
                "suid" => flags &= !libc::MS_NOSUID,
                "nosuid" => flags |= libc::MS_NOSUID,
                "dev" => flags &= !libc::MS_NODEV,
                "nodev" => flags |= libc::MS_NODEV,
                _ => return Err(err(&format!("unknown option '{o}'"))),
            },
            Some(("size", v)) if size_ok(v) => data.push(o.to_string()),
            Some(("mode", v)) if u32::from_str_radix(v, 8).is_ok_and(|m| m <= 0o7777) => {
                data.push(o.to_string())
            }
            Some(("uid" | "gid" | "nr_inodes", v)) if v.parse::<u32>().is_ok() => {
                data.push(o.to_string())
            }
            Some(_) => return Err(err(&format!("option '{o}' is not understood"))),
        }
    }
    Ok(Mount {
        source: MountSource::Tmpfs {
            flags,
            data: data.join(","),
        },
        target: target(dest, err)?,
        readonly,
    })
}

/// A fresh anonymous volume's name (64 hex digits, as Docker's).
pub fn anonymous_name() -> String {
    let a = super::new_id();
    let b = super::new_id();
    format!("{a}{b}").chars().take(64).collect()
}

/// The mounts of a container: `given` (from `-v`, `--mount`, `--tmpfs`) and
/// an anonymous volume for each of the image's `volumes` no given mount
/// covers; refuses two mounts at one place. Sorted parents first, the
/// order they are mounted in.
pub fn plan(mut given: Vec<Mount>, volumes: &[String]) -> Result<Vec<Mount>, VolumeError> {
    let mut seen = std::collections::HashSet::new();
    for m in &given {
        if !seen.insert(m.target.clone()) {
            return Err(VolumeError::Duplicate(m.target.clone()));
        }
    }
    for v in volumes {
        let t = vmc_spawn::clean_path(v);
        if t != "/" && v.starts_with('/') && seen.insert(t.clone()) {
            given.push(Mount {
                source: MountSource::Volume {
                    name: anonymous_name(),
                    anonymous: true,
                    nocopy: false,
                },
                target: t,
                readonly: false,
            });
        }
    }
    given.sort_by_key(|m| m.target.matches('/').count());
    Ok(given)
}

/// What `vmc volume inspect` shows, kept as the volume's `volume.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMeta {
    #[serde(rename = "CreatedAt")]
    pub created: String,
    #[serde(rename = "Labels", default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub anonymous: bool,
}

/// A volume of the store.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub meta: VolumeMeta,
}

impl Volume {
    /// As `docker volume inspect` shows it.
    pub fn inspect(&self) -> serde_json::Value {
        serde_json::json!({
            "CreatedAt": self.meta.created,
            "Driver": "local",
            "Labels": self.meta.labels,
            "Mountpoint": data_dir(&self.name),
            "Name": self.name,
            "Options": {},
            "Scope": "local",
            "Anonymous": self.meta.anonymous,
        })
    }
}

/// Creates volume `name` unless it exists (as `docker volume create`,
/// which answers with the name either way). Made under a temporary name
/// and renamed into place, so a volume is never seen half made; of two
/// racing creators one wins and both use its volume.
pub fn create(
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
    anonymous: bool,
) -> Result<Volume, VolumeError> {
    if !valid_name(name) {
        return Err(VolumeError::Name(name.to_string()));
    }
    let io = |e| VolumeError::Io(name.to_string(), e);
    if let Ok(v) = load(name) {
        return Ok(v);
    }
    let dir = volumes_dir();
    crate::host::private_dir(&dir).map_err(io)?;
    let tmp = dir.join(format!(".new-{}", super::new_id()));
    std::fs::create_dir(&tmp).map_err(io)?;
    let meta = VolumeMeta {
        created: crate::image::store::rfc3339(super::state::now_secs() as i64),
        labels,
        anonymous,
    };
    let made = (|| {
        std::fs::create_dir(tmp.join("_data"))?;
        // Like Docker's: the container sees a root-owned 0755 directory.
        std::fs::set_permissions(
            tmp.join("_data"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        std::fs::write(tmp.join("volume.json"), serde_json::to_vec_pretty(&meta)?)?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another creator won the race: its volume is this one.
        if let Ok(v) = load(name) {
            return Ok(v);
        }
        return Err(io(e));
    }
    Ok(Volume {
        name: name.to_string(),
        meta,
    })
}

/// Volume `name` of the store.
pub fn load(name: &str) -> Result<Volume, VolumeError> {
    if !valid_name(name) {
        return Err(VolumeError::NoSuch(name.to_string()));
    }
    let text = std::fs::read(volumes_dir().join(name).join("volume.json"))
        .map_err(|_| VolumeError::NoSuch(name.to_string()))?;
    let meta = serde_json::from_slice(&text)
        .map_err(|e| VolumeError::Io(name.to_string(), io::Error::other(e)))?;
    Ok(Volume {
        name: name.to_string(),
        meta,
    })
}

/// Every volume of the store, by name.
pub fn list() -> Vec<Volume> {
    let mut v: Vec<Volume> = std::fs::read_dir(volumes_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| load(&e.file_name().to_string_lossy()).ok())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The containers (ids) whose mounts name volume `name`.
pub fn users(name: &str) -> Vec<String> {
    super::state::list()
        .into_iter()
        .filter(|c| {
            c.config().is_some_and(|cfg| {
                cfg.mounts
                    .iter()
                    .any(|m| matches!(&m.source, MountSource::Volume { name: n, .. } if n == name))
            })
        })
        .map(|c| c.state.id)
        .collect()
}

/// Removes volume `name`, refused while a container (running or not) has
/// it, unless `force` (Docker's `volume rm -f` still refuses a volume in
/// use; `force` here is for a container's own anonymous volumes as the
/// container goes).
pub fn remove(name: &str, force: bool) -> Result<(), VolumeError> {
    load(name)?;
    if !force {
        if let Some(id) = users(name).first() {
            return Err(VolumeError::InUse(name.to_string(), id[..12].to_string()));
        }
    }
    let dir = volumes_dir().join(name);
    // Renamed away first: the name is free at once and a half-removed
    // volume is never seen.
    let gone = volumes_dir().join(format!(".rm-{}", super::new_id()));
    std::fs::rename(&dir, &gone).map_err(|e| VolumeError::Io(name.to_string(), e))?;
    super::state::remove_dir(&gone).map_err(|e| VolumeError::Io(name.to_string(), e))
}

/// Removes the anonymous volumes of `mounts` no container has any more:
/// those of a container removed with `--rm` or `vmc rm -v`. Named volumes
/// stay until `vmc volume rm`.
pub fn remove_anonymous(mounts: &[Mount]) {
    for m in mounts {
        if let MountSource::Volume {
            name,
            anonymous: true,
            ..
        } = &m.source
        {
            if users(name).is_empty() {
                if let Err(e) = remove(name, true) {
                    log::warn!("{e}");
                }
            }
        }
    }
}

/// The volumes of `mounts` made ready: each created if missing. Returns
/// the ones that are empty (to be filled from the image unless `nocopy`).
pub fn prepare(mounts: &[Mount]) -> Result<Vec<Mount>, VolumeError> {
    let mut empty = Vec::new();
    for m in mounts {
        if let MountSource::Volume {
            name,
            anonymous,
            nocopy,
        } = &m.source
        {
            create(name, Default::default(), *anonymous)?;
            let data = data_dir(name);
            let is_empty = std::fs::read_dir(&data)
                .map_err(|e| VolumeError::Io(name.clone(), e))?
                .next()
                .is_none();
            // Filled once, from its first mount point (a volume mounted
            // twice is one directory).
            let twice = empty.iter().any(
                |e: &Mount| matches!(&e.source, MountSource::Volume { name: n, .. } if n == name),
            );
            if is_empty && !nocopy && !twice {
                empty.push(m.clone());
            }
        }
    }
    Ok(mounts
        .iter()
        .filter(|m| empty.contains(m))
        .cloned()
        .collect())
}

/// Fills the empty volume directory `data` from `path` of the root mounted
/// at `root` (resolved inside it: an image's symlinks cannot lead out),
/// keeping modes, owners and times; symlinks are copied as links, device
/// nodes are left out. Nothing is copied when the image has no directory
/// there.
pub fn populate(root: &Path, path: &str, data: &Path) -> io::Result<()> {
    let root_fd = open_dir(libc::AT_FDCWD, root.as_os_str().as_bytes(), true)?;
    let Ok(src) = vmc_spawn::open_dir_in_root(&root_fd, path) else {
        return Ok(());
    };
    let dst = open_dir(libc::AT_FDCWD, data.as_os_str().as_bytes(), true)?;
    copy_dir(&src, &dst, 0)?;
    copy_attrs(&src, &dst)
}

fn cstr(b: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens directory `name` under `dir` (never through a symlink unless
/// `follow`).
fn open_dir(dir: libc::c_int, name: &[u8], follow: bool) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    // SAFETY: openat on a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | nofollow,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Owner, mode and times of `src` given to `dst` (both open).
fn copy_attrs(src: &OwnedFd, dst: &OwnedFd) -> io::Result<()> {
    // SAFETY: fstat into a zeroed stat; fchown/fchmod/futimens on open fds.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        vmc_spawn::sys::check(libc::fstat(src.as_raw_fd(), &mut st))?;
        vmc_spawn::sys::check(libc::fchown(dst.as_raw_fd(), st.st_uid, st.st_gid))?;
        vmc_spawn::sys::check(libc::fchmod(dst.as_raw_fd(), st.st_mode & 0o7777))?;
        let times = [
            libc::timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec,
            },
        ];
        vmc_spawn::sys::check(libc::futimens(dst.as_raw_fd(), times.as_ptr()))?;
    }
    Ok(())
}

/// How deep a copied tree may go (an image's path depth is bounded by
/// PATH_MAX long before this).
const MAX_DEPTH: usize = 512;

fn copy_dir(src: &OwnedFd, dst: &OwnedFd, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("the directory tree is too deep to copy"));
    }
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", src.as_raw_fd()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let name = name.as_bytes();
        let c = cstr(name)?;
        // SAFETY: fstatat without following, into a zeroed stat.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            vmc_spawn::sys::check(libc::fstatat(
                src.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ))?;
            st
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                // SAFETY: mkdirat on a NUL-terminated name.
                vmc_spawn::sys::check(unsafe {
                    libc::mkdirat(dst.as_raw_fd(), c.as_ptr(), 0o700)
                })?;
                let s = open_dir(src.as_raw_fd(), name, false)?;
                let d = open_dir(dst.as_raw_fd(), name, false)?;
                copy_dir(&s, &d, depth + 1)?;
                copy_attrs(&s, &d)?;
            }
            libc::S_IFREG => {
                // SAFETY: openat with O_NOFOLLOW on NUL-terminated names.
                let (s, d) = unsafe {
                    let s = vmc_spawn::sys::check(libc::openat(
                        src.as_raw_fd(),
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    ))?;
                    let s = std::fs::File::from_raw_fd(s);
                    let d = vmc_spawn::sys::check(libc::openat(
                        dst.as_raw_fd(),
                        c.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    ))?;
                    (s, std::fs::File::from_raw_fd(d))
                };
                io::copy(&mut &s, &mut &d)?;
                copy_attrs(&s.into(), &d.into())?;
            }
            libc::S_IFLNK => {
                let t = vmc_spawn::walk::read_link_at(src.as_raw_fd(), &c)?;
                // SAFETY: symlinkat and fchownat on NUL-terminated names.
                unsafe {
                    vmc_spawn::sys::check(libc::symlinkat(
                        t.as_ptr(),
                        dst.as_raw_fd(),
                        c.as_ptr(),
                    ))?;
                    vmc_spawn::sys::check(libc::fchownat(
                        dst.as_raw_fd(),
                        c.as_ptr(),
                        st.st_uid,
                        st.st_gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    ))?;
                }
            }
            // Device nodes, fifos and sockets are not a volume's content.
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
