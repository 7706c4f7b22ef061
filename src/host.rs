//! Host utilities every layer above may use, and which use nothing of
//! vmc's: ids, files only their owner reads, whether vmc runs rootless,
//! the environment knobs.
//! (The bottom of the module graph: see ARCHITECTURE.md.)

use std::path::{Path, PathBuf};

/// Whether this process runs without root on the host, and so namespace
/// mode in a user namespace of its own (rootless, as podman's).
pub fn rootless() -> bool {
    static ROOTLESS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: geteuid has no preconditions; taken before any user namespace
    // is entered (inside one, this process is uid 0).
    *ROOTLESS.get_or_init(|| unsafe { libc::geteuid() } != 0)
}

/// Creates `dir` (and its parents) with mode 0700, for vmc's own state:
/// nothing under it is another local user's business (unpacked layers keep
/// set-id bits and file capabilities; containers hold their environment).
/// An existing `dir` of this user's is tightened to 0700 when it is empty
/// or a vmc store (an older store made 0755); any other existing directory
/// (another user's, or one holding other things) is left as it is.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                r => r?,
            }
            // The mode asked for is subject to the umask; set it whole.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions.
            let mine = m.uid() == unsafe { libc::geteuid() };
            let ours = mine
                && (dir.join("oci-layout").exists() || std::fs::read_dir(dir)?.next().is_none());
            if m.is_dir() && ours && m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}

/// Opens `path` for writing, created with mode 0600 (truncating it unless
/// `append`): for files that hold a container's secrets (its environment,
/// its output, its disk, its memory).
pub fn private_file(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(path)
}

/// A new random container id (64 hex digits, like Docker's).
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    let mut done = 0;
    while done < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of b.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every `VMC_*` environment variable vmc reads, read once, in one place
/// (README: Environment). Other code asks [`knobs`] rather than the
/// environment.
#[derive(Debug, Default)]
pub struct Knobs {
    /// `VMC_HOME`: the state directory (default /var/lib/vmc as root).
    pub home: Option<PathBuf>,
    /// `VMC_SNAPSHOTS`: where warm-start snapshots live.
    pub snapshots: Option<PathBuf>,
    /// `VMC_ASSETS`: the installed kernel and agent's directory.
    pub assets: Option<PathBuf>,
    /// `VMC_GUEST`: the guest agent binary.
    pub guest: Option<PathBuf>,
    /// `VMC_CACHE`: the build cache of `make` (busybox rootfs, kernel).
    pub cache: Option<PathBuf>,
    /// `VMC_LOG`: debug, info, warn (default) or error.
    pub log: Option<String>,
    /// `VMC_KERNEL_ARGS`: extra guest kernel parameters (experiments).
    pub kernel_args: Option<String>,
    /// `VMC_MEM_REPORT`: where a VMM writes its memory figures (bench).
    pub mem_report: Option<PathBuf>,
    /// `VMC_GUEST_PROFILE`: where a VMM samples the boot vCPU's RIP.
    pub guest_profile: Option<PathBuf>,
    /// `VMC_PASST_PCAP`: where passt records a VM's frames.
    pub passt_pcap: Option<PathBuf>,
    /// `VMC_TIMINGS`: where `vmc run`/`exec` write their phases as JSON
    /// (the bench; `--timings` prints them).
    pub timings: Option<PathBuf>,
    /// `VMC_READY_SNAPSHOTS=0` turns ready snapshots off (`--rm` runs of an
    /// image restore its ready snapshot by default).
    pub ready_snapshots: bool,
    /// `VMC_JAIL=0` runs the VMM inside vmc's own process, unconfined (for
    /// comparison and debugging; never the default).
    pub jail: bool,
    /// `VMC_SECCOMP=log`: a VMM system call outside its thread's filter is
    /// logged by the kernel and allowed, instead of killing the VMM.
    pub seccomp_log: bool,
    /// `VMC_JAIL_UIDS=BASE:COUNT`: the uids (and gids) jailed VMMs run as
    /// when vmc runs as root, one per VM.
    pub jail_uids: Option<String>,
    /// `VMC_PULL`: `run`/`create`'s default `--pull` policy (missing,
    /// always, never; Docker's default is missing).
    pub pull: Option<String>,
    /// `VMC_INSECURE_REGISTRIES=HOST:PORT,...`: registries spoken to over
    /// plain http without `--insecure`, as the Docker daemon's
    /// `insecure-registries` setting.
    pub insecure_registries: Vec<String>,
}

impl Knobs {
    fn from_env() -> Knobs {
        let path = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let text = |k: &str| std::env::var(k).ok();
        Knobs {
            home: path("VMC_HOME"),
            snapshots: path("VMC_SNAPSHOTS"),
            assets: path("VMC_ASSETS"),
            guest: path("VMC_GUEST"),
            cache: path("VMC_CACHE"),
            log: text("VMC_LOG"),
            kernel_args: text("VMC_KERNEL_ARGS"),
            mem_report: path("VMC_MEM_REPORT"),
            guest_profile: path("VMC_GUEST_PROFILE"),
            passt_pcap: path("VMC_PASST_PCAP"),
            timings: path("VMC_TIMINGS"),
            ready_snapshots: text("VMC_READY_SNAPSHOTS").is_none_or(|v| v != "0"),
            jail: text("VMC_JAIL").is_none_or(|v| v != "0"),
            seccomp_log: text("VMC_SECCOMP").is_some_and(|v| v == "log"),
            jail_uids: text("VMC_JAIL_UIDS"),
            pull: text("VMC_PULL").filter(|v| !v.is_empty()),
            insecure_registries: text("VMC_INSECURE_REGISTRIES")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect(),
        }
    }
}

/// The environment knobs of this process.
pub fn knobs() -> &'static Knobs {
    static KNOBS: std::sync::OnceLock<Knobs> = std::sync::OnceLock::new();
    KNOBS.get_or_init(Knobs::from_env)
}

/// An error and its causes on one line, `outer: inner: ...`, a cause
/// left out when the line already says it (a wrapper that repeats its
/// source). The one way vmc prints an error: `main`, a container's
/// supervisor (into its log) and builds use it.
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// Makes `c` start detached: in a session of its own (no controlling
/// terminal, out of the caller's process group) with no stdio.
pub fn detach(c: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid in the child before exec; async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("pulling busybox")]
        Pull(#[source] std::io::Error),
        #[error("reading config: {0}")]
        Repeats(#[source] std::io::Error),
    }

    /// Causes are joined with ": ", and a cause the line already holds
    /// (a wrapper that repeats its source) is said once.
    #[test]
    fn an_error_is_one_line_of_its_causes_without_repeats() {
        let io = || std::io::Error::other("connection refused");
        assert_eq!(
            error_line(&Outer::Pull(io())),
            "pulling busybox: connection refused"
        );
        assert_eq!(
            error_line(&Outer::Repeats(io())),
            "reading config: connection refused"
        );
    }

    #[test]
    fn private_dirs_are_made_0700_and_only_ours_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let t = tempfile::tempdir().unwrap();
        // New, parents included.
        let new = t.path().join("a/b/vmc");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        // An older store (0755, with its oci-layout) and an empty directory
        // are tightened; a directory holding other things is left alone.
        set(&new, 0o755);
        std::fs::write(new.join("oci-layout"), "{}").unwrap();
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700, "an existing store");
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        set(&empty, 0o755);
        private_dir(&empty).unwrap();
        assert_eq!(mode(&empty), 0o700, "an empty directory");
        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes"), "").unwrap();
        set(&other, 0o755);
        private_dir(&other).unwrap();
        assert_eq!(mode(&other), 0o755, "someone's directory with other files");
        // Another user's empty directory is not ours to change (vmc as that
        // directory's non-owner would fail there).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            set(&theirs, 0o777);
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            private_dir(&theirs).unwrap();
            assert_eq!(mode(&theirs), 0o777);
        }
        // Files for secrets are 0600 whatever the umask.
        let f = t.path().join("secret");
        private_file(&f, false).unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn ids_are_64_hex_digits_and_differ() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }
}
