//! Before a namespace container starts: vmc re-executed from a read-only
//! copy of its binary (so that a container cannot overwrite the host's vmc
//! through /proc/self/exe), and the user namespace of rootless mode.

use super::*;

/// Set in the environment of the re-executed vmc by
/// [`run_from_read_only_binary`], against a loop; `main` removes it first
/// thing and sets [`REEXECUTED`] instead.
pub const REEXEC_ENV: &str = "VMC_READ_ONLY_REEXEC";

/// This process is vmc re-executed from its read-only binary.
pub static REEXECUTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `path` is reached through a read-only mount (statvfs follows a
/// `/proc/PID/exe` link to the file and the mount it was reached by).
pub fn on_read_only_mount(path: &Path) -> bool {
    let Ok(p) = vmc_spawn::sys::cstr(path) else {
        return false;
    };
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(p.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
    }
}

/// Whether this process's own executable is reached through a read-only
/// mount.
pub fn own_binary_read_only() -> bool {
    on_read_only_mount(Path::new("/proc/self/exe"))
}

/// Before vmc enters a namespace container (run and build in namespace
/// mode, exec, a detached supervisor): makes sure its own binary is mapped
/// through a read-only mount, re-executing itself if it is not (the
/// CVE-2019-5736 class). A process of the container could otherwise reach
/// the host's vmc binary through `/proc/PID/exe` of vmc's child before it
/// execs the workload, or of a workload that is a `#!/proc/self/exe`
/// script, and rewrite it once no process runs it. Here vmc moves into a
/// mount namespace of its own, binds its binary read-only over itself and
/// runs again from there: a write through any such link fails with EROFS.
/// (runc answers with a sealed memfd copy; vmc's binary is tens of MiB, a
/// bind costs nothing.) Must run while single-threaded. Without root the
/// container's root is the calling user, who owns nothing more of the host
/// than before; nothing is done then.
pub fn run_from_read_only_binary() -> Result<(), NsError> {
    if rootless() || own_binary_read_only() {
        return Ok(());
    }
    if REEXECUTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(NsError::Start(
            "vmc re-ran itself from a read-only bind of its binary, which is still writable".into(),
        ));
    }
    let path = std::fs::read_link("/proc/self/exe").map_err(sys("/proc/self/exe"))?;
    if !path.exists() {
        return Err(NsError::Start(format!(
            "vmc's binary {} was replaced or removed while it ran; run vmc again",
            path.display()
        )));
    }
    let path_s = path.display().to_string();
    // SAFETY: unshare/mount with valid arguments; results checked.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)")?;
    }
    vmc_spawn::sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(sys("making mounts private"))?;
    // By its path: /proc/self/exe leads to the mount of the namespace left
    // behind, which cannot be the source of a bind here.
    vmc_spawn::sys::mount(Some(&path_s), &path_s, None, libc::MS_BIND, None)
        .map_err(sys(format!("binding {path_s} over itself")))?;
    vmc_spawn::sys::mount(
        None,
        &path_s,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
    .map_err(sys(format!("making {path_s} read-only")))?;
    let cstr = |s: &std::ffi::OsStr| {
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(s))
            .map_err(|_| NsError::Start("an argument holds a NUL byte".into()))
    };
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .map(|a| cstr(&a))
        .collect::<Result<_, _>>()?;
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstr(&kv)
        })
        .collect::<Result<_, _>>()?;
    env.push(cstr(std::ffi::OsStr::new(&format!("{REEXEC_ENV}=1")))?);
    let ptrs = |v: &[std::ffi::CString]| {
        let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    let (argv, envp) = (ptrs(&args), ptrs(&env));
    let exe = cstr(path.as_os_str())?;
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that live
    // until the call, which returns only on failure.
    unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(sys(format!("re-running {path_s}"))(
        std::io::Error::last_os_error(),
    ))
}

/// Without root: moves this process into a new user namespace where its
/// own uid and gid are 0 and it holds every capability over the namespaces
/// it creates next (the container's), none over the host's. A single id is
/// mapped (no /etc/subuid ranges, no setuid helper): every file of the
/// image belongs to the container's root. Must run while the process is
/// single-threaded (unshare(CLONE_NEWUSER) requires it).
fn enter_user_namespace() -> Result<(), NsError> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare with a constant flag; result checked.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            // The kernel's answer to a process with several threads.
            return Err(NsError::Start(
                "entering a user namespace: vmc has started threads already (a bug: please report it)".into(),
            ));
        }
        return Err(NsError::NoUserns(e));
    }
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(sys(format!("writing /proc/self/{file}")))
    };
    // setgroups must be denied before an unprivileged gid_map is written.
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1"))?;
    write("gid_map", format!("0 {gid} 1"))
}

/// Without root, enters the user namespace of [`enter_user_namespace`]
/// unless already in it; a process that starts threads before it runs a
/// container calls this first.
pub fn user_namespace() -> Result<(), NsError> {
    // SAFETY: geteuid has no preconditions.
    if rootless() && unsafe { libc::geteuid() } != 0 {
        enter_user_namespace()?;
    }
    Ok(())
}
