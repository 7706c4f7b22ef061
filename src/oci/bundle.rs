//! A bundle's `config.json` (the OCI runtime spec, read with oci-spec's
//! types) turned into what vmc runs: the process, its root (the bundle's
//! `root.path`, a live directory the caller prepared, used as it is), its
//! mounts as [`RootOp`]s, namespaces, capabilities, limits and the rest.
//! What vmc cannot do as the spec says is refused here, by name, so that
//! `create` fails before anything starts.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use vmc_proto::ProcessSpec;
use vmc_spawn::RootOp;

use crate::runtime::{Mode, NsLimits};

/// The largest config.json read (runc has no bound; real ones are a few KiB).
pub const MAX_CONFIG: u64 = 4 << 20;

/// The annotation that picks the mode (`vm`, the default, or `ns`).
pub const MODE_ANNOTATION: &str = "io.vmc.mode";

/// A bundle, read and checked.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    /// The container's root directory, absolute.
    pub root: PathBuf,
    pub root_readonly: bool,
    pub process: ProcessSpec,
    /// Supplementary groups (`additionalGids`), exactly.
    pub groups: Vec<u32>,
    pub umask: Option<u32>,
    pub terminal: bool,
    pub hostname: Option<String>,
    /// The annotation's mode, when the bundle names one.
    pub mode: Option<Mode>,
    /// The root's preparation: mounts, masked and read-only paths.
    pub ops: Vec<RootOp>,
    /// The mounts a microVM's agent makes: binds (through virtio-fs) and
    /// tmpfs; the guest has its own /proc, /sys and /dev.
    pub vm_mounts: Vec<crate::runtime::volume::Mount>,
    /// Namespaces made new for the container.
    pub clone_flags: libc::c_int,
    /// Namespaces joined by path (`CLONE_NEWNET`, ...: setns's type).
    pub join: Vec<(libc::c_int, PathBuf)>,
    /// Capabilities kept (the bounding set).
    pub caps: u64,
    pub no_new_privs: bool,
    /// `linux.seccomp`, as JSON (the profile format vmc compiles).
    pub seccomp: Option<String>,
    /// (resource, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    pub oom_score_adj: Option<i32>,
    /// `net.*` sysctls, written in the container's network namespace.
    pub sysctls: Vec<(String, String)>,
    pub limits: NsLimits,
    pub annotations: BTreeMap<String, String>,
}

/// What is wrong with a bundle, in one line naming the part.
#[derive(Debug, thiserror::Error)]
#[error("bundle {0}: {1}")]
pub struct BundleError(pub String, pub String);

fn refuse(dir: &Path, what: impl Into<String>) -> BundleError {
    BundleError(dir.display().to_string(), what.into())
}

/// Reads `dir/config.json` (at most [`MAX_CONFIG`] bytes).
pub fn read_spec(dir: &Path) -> Result<Spec, BundleError> {
    let text = read_bounded(&dir.join("config.json"))?;
    serde_json::from_str(&text).map_err(|e| refuse(dir, format!("config.json: {e}")))
}

/// A JSON file of the caller's (config.json, an exec's process), at most
/// [`MAX_CONFIG`] bytes.
pub fn read_bounded(path: &Path) -> Result<String, BundleError> {
    let file = std::fs::File::open(path).map_err(|e| refuse(path, e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(|e| refuse(path, e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(refuse(path, "larger than 4 MiB"));
    }
    Ok(text)
}

/// Reads and checks the bundle in `dir`.
pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
    let dir = std::path::absolute(dir).map_err(|e| refuse(dir, e.to_string()))?;
    let spec = read_spec(&dir)?;
    from_spec(&dir, &spec)
}

/// The bundle `spec` describes, its relative paths taken from `dir`.
pub fn from_spec(dir: &Path, spec: &Spec) -> Result<Bundle, BundleError> {
    let no = |what: &str| refuse(dir, what.to_string());
    if let Some(h) = spec.hooks() {
        let any = [
            h.prestart(),
            h.create_runtime(),
            h.create_container(),
            h.start_container(),
            h.poststart(),
            h.poststop(),
        ]
        .iter()
        .any(|l| l.as_ref().is_some_and(|v| !v.is_empty()));
        if any {
            return Err(no("hooks are not supported by vmc-runtime"));
        }
    }
    let root = spec.root().as_ref().ok_or_else(|| no("no root"))?;
    let root_path = dir.join(root.path());
    if !root_path.is_dir() {
        return Err(no(&format!(
            "root.path {} is not a directory",
            root_path.display()
        )));
    }
    let process = spec.process().as_ref().ok_or_else(|| no("no process"))?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(no("process.args is empty"));
    }
    let user = process.user();
    if process.apparmor_profile().is_some() && host_has("/sys/module/apparmor/parameters/enabled") {
        return Err(no("process.apparmorProfile: AppArmor is not supported"));
    }
    if process.selinux_label().is_some() && host_has("/sys/fs/selinux/enforce") {
        return Err(no("process.selinuxLabel: SELinux is not supported"));
    }
    let caps = match process
        .capabilities()
        .as_ref()
        .and_then(|c| c.bounding().clone())
    {
        Some(set) => {
            let mut bits = 0u64;
            for c in set {
                let name = serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                bits |= crate::runtime::caps::bits(&name).map_err(|e| no(&e.to_string()))?;
            }
            bits
        }
        None => 0,
    };
    let rlimits = process
        .rlimits()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|r| (r.typ() as u32, r.soft(), r.hard()))
        .collect();

    let linux = spec.linux().clone().unwrap_or_default();
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(no(
            "linux.uidMappings/gidMappings (user namespaces) are not supported",
        ));
    }
    if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(no(
            "linux.devices are not supported (only the default /dev nodes)",
        ));
    }
    let mut clone_flags = 0;
    let mut join = Vec::new();
    let mut new_mount_ns = false;
    for ns in linux.namespaces().clone().unwrap_or_default() {
        let flag = match ns.typ() {
            LinuxNamespaceType::Mount => {
                if ns.path().is_some() {
                    return Err(no("joining a mount namespace by path is not supported"));
                }
                new_mount_ns = true;
                continue;
            }
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            LinuxNamespaceType::User => return Err(no("user namespaces are not supported")),
            LinuxNamespaceType::Time => return Err(no("time namespaces are not supported")),
        };
        match ns.path() {
            None => clone_flags |= flag,
            Some(p)
                if matches!(
                    flag,
                    libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
                ) =>
            {
                join.push((flag, p.clone()))
            }
            Some(p) => {
                return Err(no(&format!(
                    "joining the {} namespace {} is not supported",
                    ns.typ(),
                    p.display()
                )))
            }
        }
    }
    if !new_mount_ns {
        return Err(no(
            "a container without a mount namespace of its own is not supported",
        ));
    }
    let mut sysctls = Vec::new();
    for (k, v) in linux.sysctl().clone().unwrap_or_default() {
        if !k.starts_with("net.") {
            return Err(no(&format!("sysctl {k}: only net.* sysctls are supported")));
        }
        if k.contains('/') || k.contains("..") {
            return Err(no(&format!("sysctl {k}: not a sysctl name")));
        }
        sysctls.push((k, v));
    }
    sysctls.sort();

    let mut ops = Vec::new();
    let mut vm_mounts = Vec::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        ops.extend(mount_ops(dir, &m)?);
        vm_mounts.extend(vm_mount(dir, &m));
    }
    for p in linux.masked_paths().clone().unwrap_or_default() {
        ops.push(masked(&p));
    }
    for p in linux.readonly_paths().clone().unwrap_or_default() {
        ops.extend(read_only(&p));
    }

    let limits = limits(dir, &linux)?;
    let annotations: BTreeMap<String, String> = spec
        .annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mode = match annotations.get(MODE_ANNOTATION).map(String::as_str) {
        None => None,
        Some("vm") => Some(Mode::Vm),
        Some("ns") => Some(Mode::Ns),
        Some(other) => {
            return Err(no(&format!(
                "annotation {MODE_ANNOTATION}={other}: the modes are vm and ns"
            )))
        }
    };
    Ok(Bundle {
        dir: dir.to_path_buf(),
        root: root_path,
        root_readonly: root.readonly().unwrap_or(false),
        process: ProcessSpec {
            args,
            env: process.env().clone().unwrap_or_default(),
            cwd: process.cwd().display().to_string(),
            user: format!("{}:{}", user.uid(), user.gid()),
            ..Default::default()
        },
        groups: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        terminal: process.terminal().unwrap_or(false),
        hostname: spec.hostname().clone(),
        mode,
        ops,
        vm_mounts,
        clone_flags,
        join,
        caps,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        seccomp: linux
            .seccomp()
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_default()),
        rlimits,
        oom_score_adj: process.oom_score_adj(),
        sysctls,
        limits,
        annotations,
    })
}

fn host_has(flag_file: &str) -> bool {
    std::fs::read_to_string(flag_file).is_ok_and(|s| matches!(s.trim(), "Y" | "1"))
}

/// The memory, pids and CPU limits of `linux.resources` (namespace mode's
/// cgroups take whole CPUs).
fn limits(dir: &Path, linux: &oci_spec::runtime::Linux) -> Result<NsLimits, BundleError> {
    let mut l = NsLimits::default();
    let Some(r) = linux.resources() else {
        return Ok(l);
    };
    if let Some(m) = r.memory().as_ref().and_then(|m| m.limit()) {
        if m > 0 {
            l.memory = Some(m as u64);
        }
    }
    if let Some(p) = r.pids().as_ref().map(|p| p.limit()) {
        if p > 0 {
            l.pids = Some(p as u64);
        }
    }
    if let Some(cpu) = r.cpu() {
        if let (Some(q), Some(p)) = (cpu.quota(), cpu.period()) {
            if q > 0 && p > 0 {
                if q as u64 % p != 0 || q as u64 / p > 255 {
                    return Err(refuse(
                        dir,
                        format!("linux.resources.cpu: quota {q} / period {p} is not a whole number of CPUs (vmc takes whole CPUs)"),
                    ));
                }
                l.cpus = Some((q as u64 / p) as u8);
            }
        }
    }
    Ok(l)
}

/// A mount option's flag (set or cleared) or propagation; `None` for data
/// options passed to the filesystem.
fn flag(option: &str) -> Option<(bool, libc::c_ulong)> {
    Some(match option {
        "ro" => (true, libc::MS_RDONLY),
        "rw" => (false, libc::MS_RDONLY),
        "nosuid" => (true, libc::MS_NOSUID),
        "suid" => (false, libc::MS_NOSUID),
        "nodev" => (true, libc::MS_NODEV),
        "dev" => (false, libc::MS_NODEV),
        "noexec" => (true, libc::MS_NOEXEC),
        "exec" => (false, libc::MS_NOEXEC),
        "sync" => (true, libc::MS_SYNCHRONOUS),
        "async" => (false, libc::MS_SYNCHRONOUS),
        "dirsync" => (true, libc::MS_DIRSYNC),
        "noatime" => (true, libc::MS_NOATIME),
        "atime" => (false, libc::MS_NOATIME),
        "nodiratime" => (true, libc::MS_NODIRATIME),
        "diratime" => (false, libc::MS_NODIRATIME),
        "relatime" => (true, libc::MS_RELATIME),
        "norelatime" => (false, libc::MS_RELATIME),
        "strictatime" => (true, libc::MS_STRICTATIME),
        "nostrictatime" => (false, libc::MS_STRICTATIME),
        "bind" => (true, libc::MS_BIND),
        "rbind" => (true, libc::MS_BIND | libc::MS_REC),
        // The container's mount namespace is private as a whole: private
        // propagation is what it has anyway.
        "private" | "rprivate" => (true, 0),
        _ => return None,
    })
}

/// A mount's options: its flags (set and cleared in the order given), the
/// data options passed to the filesystem, and the first propagation option
/// vmc refuses (shared, slave, unbindable), if any.
fn options(m: &Mount) -> (libc::c_ulong, Vec<String>, Option<String>) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    let mut refused = None;
    for o in m.options().clone().unwrap_or_default() {
        match flag(&o) {
            Some((true, f)) => flags |= f,
            Some((false, f)) => flags &= !f,
            None if matches!(
                o.as_str(),
                "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable"
            ) =>
            {
                refused.get_or_insert(o);
            }
            None => data.push(o),
        }
    }
    (flags, data, refused)
}

/// The steps for one of the spec's mounts.
fn mount_ops(dir: &Path, m: &Mount) -> Result<Vec<RootOp>, BundleError> {
    let target = m.destination().display().to_string();
    if !target.starts_with('/') {
        return Err(refuse(
            dir,
            format!("mount destination {target} is not absolute"),
        ));
    }
    let typ = m.typ().clone().unwrap_or_default();
    let (flags, data, refused) = options(m);
    if let Some(o) = refused {
        return Err(refuse(
            dir,
            format!("mount {target}: {o} propagation is not supported"),
        ));
    }
    let bind = flags & libc::MS_BIND != 0 || typ == "bind";
    let mount = |source: String, fstype: &str, flags, data: String| RootOp::Mount {
        source,
        source_in_root: false,
        target: target.clone(),
        fstype: fstype.into(),
        flags,
        data,
        optional: false,
    };
    if bind {
        let source = m
            .source()
            .as_ref()
            .ok_or_else(|| refuse(dir, format!("bind mount {target} has no source")))?;
        let source = dir.join(source);
        let meta = std::fs::metadata(&source).map_err(|e| {
            refuse(
                dir,
                format!("bind mount {target}: {}: {e}", source.display()),
            )
        })?;
        let mut ops = vec![if meta.is_dir() {
            RootOp::Mkdir(target.clone(), 0o755)
        } else {
            RootOp::Touch(target.clone())
        }];
        let rec = flags & libc::MS_REC;
        ops.push(mount(
            source.display().to_string(),
            "",
            libc::MS_BIND | rec,
            String::new(),
        ));
        // The other flags take a remount of the bind.
        let rest = flags & !(libc::MS_BIND | libc::MS_REC);
        if rest != 0 {
            ops.push(mount(
                String::new(),
                "",
                libc::MS_BIND | libc::MS_REMOUNT | rec | rest,
                String::new(),
            ));
        }
        return Ok(ops);
    }
    let data = data.join(",");
    let source = m
        .source()
        .as_ref()
        .map(|s| s.display().to_string())
        .unwrap_or_else(|| typ.clone());
    let mut ops = vec![RootOp::Mkdir(target.clone(), 0o755)];
    match typ.as_str() {
        "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" => {
            ops.push(mount(source, &typ, flags, data));
        }
        "cgroup" | "cgroup2" => {
            if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                ops.push(mount("cgroup2".into(), "cgroup2", flags, String::new()));
            }
            // cgroup v1: the hierarchies are not mounted in the container
            // (namespace mode's own containers see none either).
        }
        other => {
            return Err(refuse(
                dir,
                format!("mount {target}: type {other:?} is not supported"),
            ))
        }
    }
    if target == "/dev" && typ == "tmpfs" {
        ops.extend(dev_nodes());
    }
    if target == "/dev/pts" && typ == "devpts" {
        ops.push(RootOp::Symlink {
            target: "pts/ptmx".into(),
            link: "/dev/ptmx".into(),
        });
    }
    Ok(ops)
}

/// A spec mount as a microVM's agent makes it (checked by [`mount_ops`]
/// first): a bind through the file server, a tmpfs of the guest's; the
/// pseudo filesystems and /dev are the guest's own already.
fn vm_mount(dir: &Path, m: &Mount) -> Option<crate::runtime::volume::Mount> {
    use crate::runtime::volume::{Mount as VmMount, MountSource};
    let target = m.destination().display().to_string();
    let typ = m.typ().clone().unwrap_or_default();
    let (flags, data, _) = options(m);
    let readonly = flags & libc::MS_RDONLY != 0;
    if flags & libc::MS_BIND != 0 || typ == "bind" {
        let source = dir.join(m.source().as_ref()?);
        return Some(VmMount {
            source: MountSource::Bind { source },
            target,
            readonly,
        });
    }
    (typ == "tmpfs" && target != "/dev").then(|| VmMount {
        source: MountSource::Tmpfs {
            flags: flags & !(libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC),
            data: data.join(","),
        },
        target,
        readonly,
    })
}

/// The device nodes and links runc makes in a container's /dev: the
/// host's nodes bound (a tmpfs here is nodev, so made ones would not open).
fn dev_nodes() -> Vec<RootOp> {
    let mut ops = Vec::new();
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let path = format!("/dev/{n}");
        ops.push(RootOp::Touch(path.clone()));
        ops.push(RootOp::Mount {
            source: path.clone(),
            source_in_root: false,
            target: path,
            fstype: String::new(),
            flags: libc::MS_BIND,
            data: String::new(),
            optional: false,
        });
    }
    ops.push(RootOp::Symlink {
        target: "/proc/self/fd".into(),
        link: "/dev/fd".into(),
    });
    for (i, n) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        ops.push(RootOp::Symlink {
            target: format!("/proc/self/fd/{i}"),
            link: format!("/dev/{n}"),
        });
    }
    ops
}

/// A masked path: a directory behind an empty read-only tmpfs, anything
/// else behind /dev/null (what it is on this kernel: the paths are in
/// /proc and /sys); absent ones are skipped.
fn masked(path: &str) -> RootOp {
    let dir = Path::new(path).is_dir();
    RootOp::Mount {
        source: if dir { "tmpfs" } else { "/dev/null" }.into(),
        source_in_root: false,
        target: path.into(),
        fstype: if dir { "tmpfs" } else { "" }.into(),
        flags: if dir { libc::MS_RDONLY } else { libc::MS_BIND },
        data: if dir { "size=0" } else { "" }.into(),
        optional: true,
    }
}

/// A read-only path: bound onto itself, then remounted read-only.
fn read_only(path: &str) -> [RootOp; 2] {
    [
        RootOp::Mount {
            source: path.into(),
            source_in_root: true,
            target: path.into(),
            fstype: String::new(),
            flags: libc::MS_BIND | libc::MS_REC,
            data: String::new(),
            optional: true,
        },
        RootOp::Mount {
            source: String::new(),
            source_in_root: false,
            target: path.into(),
            fstype: String::new(),
            flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            data: String::new(),
            optional: true,
        },
    ]
}
