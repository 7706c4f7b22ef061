//! A sandbox in Linux namespaces (`vmc build --mode ns` runs its RUN steps
//! in one): the layers are overlayfs lowers, each process runs confined as
//! in `vmc run --mode ns` over a fresh upper directory, and that upper
//! becomes its layer (the same tar writer as the guest agent's) and then the
//! next lower.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use vmc_proto::{ExitStatus, ProcessSpec};
use vmc_spawn::{self as spawn, RootOp};

use super::{RunResult, Sandbox};
use crate::image::layer::{self, Limits, Whiteouts};
use crate::runtime::net::{maps_host_loopback, ExtraHost, Network, Pasta};
use crate::runtime::ns::{isolation, private_mounts, OverlayRoot};
use crate::runtime::{ContainerConfig, RuntimeError};

/// A sandbox in namespaces.
pub struct NsSandbox {
    dir: PathBuf,
    /// Bottom first.
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    next: usize,
    network: Network,
    /// `--add-host` entries (for /etc/hosts; `host-gateway` also opens the
    /// host's loopback).
    extra_hosts: Vec<ExtraHost>,
    hostname: String,
    /// Cgroup limits of each step (with the device allow-list).
    limits: crate::runtime::NsLimits,
    /// The capability set (`None`: Docker's default set) and system-call
    /// filter of each step.
    caps: Option<u64>,
    seccomp: crate::runtime::seccomp::Seccomp,
    /// Files the current upper has only to be mounted over (resolv.conf).
    placeholders: Vec<String>,
    /// Where the steps write (their upper and work directories): an ext4
    /// disk of [`STEPS_DISK`] bytes through a loop device, as a build VM's
    /// scratch disk bounds its steps; `None` without root (a user namespace
    /// cannot mount one: the steps write into `dir`, unbounded).
    steps: Option<crate::disk::LoopMount>,
}

/// What a stage's RUN steps may write in all (their layers, before
/// compression): the size of a build VM's scratch disk.
pub const STEPS_DISK: u64 = crate::runtime::microvm::SCRATCH_SIZE;

fn err(what: &str) -> impl Fn(std::io::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Namespace(format!("{what}: {e}"))
}

impl NsSandbox {
    /// A sandbox for `cfg` (its root layer directories, its engine part the
    /// namespaces'), working in `dir`.
    pub fn start(cfg: &ContainerConfig, dir: &Path) -> Result<NsSandbox, RuntimeError> {
        let engine = cfg.ns()?;
        let lowers = cfg.rootfs.lowers()?;
        private_mounts()?;
        fs::create_dir_all(dir).map_err(err("creating the build directory"))?;
        let mut ns = NsSandbox {
            dir: dir.to_path_buf(),
            lowers,
            upper: PathBuf::new(),
            next: 0,
            network: cfg.network,
            extra_hosts: cfg.extra_hosts.clone(),
            hostname: cfg.hostname.clone(),
            limits: engine.limits,
            caps: engine.caps,
            seccomp: engine.seccomp.clone(),
            placeholders: Vec::new(),
            steps: None,
        };
        if !crate::host::rootless() {
            let image = dir.join("steps.ext4");
            crate::disk::build_scratch(&image, STEPS_DISK)
                .map_err(|e| RuntimeError::Namespace(format!("the steps' disk: {e}")))?;
            let target = dir.join("steps");
            fs::create_dir_all(&target).map_err(err("creating the steps' mount point"))?;
            ns.steps = Some(
                crate::disk::LoopMount::ext4(&image, &target, libc::MS_NODEV)
                    .map_err(err("mounting the steps' disk (loop device)"))?,
            );
        }
        ns.upper = ns.fresh("upper")?;
        Ok(ns)
    }

    /// A new directory for `what`: step uppers and work directories on the
    /// steps' disk, unpacked base layers beside it.
    fn fresh(&mut self, what: &str) -> Result<PathBuf, RuntimeError> {
        self.next += 1;
        let base = match &self.steps {
            Some(m) if what != "layer" => m.target().to_path_buf(),
            _ => self.dir.clone(),
        };
        let p = base.join(format!("{what}-{}", self.next));
        fs::create_dir_all(&p).map_err(err("creating a layer directory"))?;
        Ok(p)
    }
}

impl Sandbox for NsSandbox {
    fn apply_layer(&mut self, r: &mut dyn Read) -> Result<(), RuntimeError> {
        let d = self.fresh("layer")?;
        layer::unpack(r, &d, Whiteouts::Overlay, Limits::default())
            .map_err(|e| RuntimeError::Namespace(format!("unpacking a layer: {e}")))?;
        self.lowers.push(d);
        Ok(())
    }

    fn run(
        &mut self,
        spec: ProcessSpec,
        out: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<RunResult, RuntimeError> {
        let root = self.dir.join("rootfs");
        let work = self.fresh("work")?;
        let _mounted = OverlayRoot::mount(&self.lowers, &self.upper, &work, &root, &self.dir)?;
        let root_s = root.display().to_string();
        let mut iso = isolation(&self.hostname, self.caps, &self.seccomp)?;
        if self.network == Network::Passt {
            // The host's nameservers over the image's resolv.conf (and, with
            // --add-host, Docker's hosts file over its hosts): bind mounts,
            // so that the step's layer does not change. An image without
            // one gets an empty placeholder to mount over, which the layer
            // leaves out (as the guest agent does in a microVM).
            let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            let mut files = vec![("resolv.conf", crate::runtime::net::resolv_conf(&host, &[]))];
            if !self.extra_hosts.is_empty() {
                files.push((
                    "hosts",
                    crate::runtime::net::hosts(&self.hostname, None, &self.extra_hosts),
                ));
            }
            let etc_dir = fs::symlink_metadata(root.join("etc")).is_ok_and(|m| m.is_dir());
            for (name, text) in files {
                let target = root.join("etc").join(name);
                if etc_dir && fs::symlink_metadata(&target).is_err() {
                    fs::write(&target, b"").map_err(err("creating an /etc placeholder"))?;
                    self.placeholders.push(format!("etc/{name}"));
                }
                let file = self.dir.join(name);
                fs::write(&file, text).map_err(err("writing an /etc file"))?;
                // Readable by a step's non-root user.
                fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .map_err(err("writing an /etc file"))?;
                iso.ops.push(RootOp::Mount {
                    source: file.display().to_string(),
                    source_in_root: false,
                    target: format!("/etc/{name}"),
                    fstype: String::new(),
                    flags: libc::MS_BIND,
                    data: String::new(),
                    optional: true,
                });
            }
        }
        // The device allow-list and the build's limits.
        let _cgroup =
            crate::runtime::ns::join_cgroups(&mut iso, &crate::runtime::new_id(), &self.limits)?;
        let prepared = match spawn::prepare_isolated(&spec, &root_s, &root_s, &iso) {
            Ok(p) => p,
            Err(e) => return Ok(RunResult::StartFailed(e.kind, e.message)),
        };
        let null = fs::File::open("/dev/null").map_err(err("/dev/null"))?;
        let (out_r, out_w) = vmc_spawn::sys::pipe().map_err(err("pipe"))?;
        let (err_r, err_w) = vmc_spawn::sys::pipe().map_err(err("pipe"))?;
        // The step's network is connected before it execs and goes with it.
        let mut pasta = None;
        let dir = self.dir.clone();
        let extra_hosts = self.extra_hosts.clone();
        let mut connect = |pid: u32| -> Result<(), Box<dyn std::error::Error>> {
            if self.network == Network::Passt {
                pasta = Some(Pasta::attach(pid, &dir, maps_host_loopback(&extra_hosts))?);
            }
            Ok(())
        };
        let pid = match spawn::spawn_with(
            &prepared,
            None,
            [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
            Some(&mut connect),
        ) {
            Ok((pid, _)) => pid as libc::pid_t,
            Err(e) => return Ok(RunResult::StartFailed(e.kind, e.message)),
        };
        drop((out_w, err_w, null));
        pump(&out_r, &err_r, out);
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(RuntimeError::Namespace(
                    "waiting for the step's process".into(),
                ));
            }
        }
        Ok(RunResult::Exited(if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }))
    }

    fn commit(&mut self, sink: &mut dyn Write) -> Result<(), RuntimeError> {
        let userxattr = crate::host::rootless();
        vmc_spawn::upper::write_layer_except(&self.upper, sink, &self.placeholders, userxattr)
            .map_err(err("writing the layer"))?;
        self.placeholders.clear();
        let done = std::mem::take(&mut self.upper);
        self.lowers.push(done);
        self.upper = self.fresh("upper")?;
        Ok(())
    }

    /// Removes the sandbox's directories (the steps' disk unmounted first).
    fn stop(mut self: Box<Self>) {
        drop(self.steps.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Copies both pipes to `out` until both reach end of file.
fn pump(out_r: &OwnedFd, err_r: &OwnedFd, out: &mut dyn FnMut(bool, &[u8])) {
    let mut open = [true, true];
    let mut buf = vec![0u8; 64 * 1024];
    while open[0] || open[1] {
        let mut fds = [
            libc::pollfd {
                fd: if open[0] { out_r.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if open[1] { err_r.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.fd < 0 || fd.revents == 0 {
                continue;
            }
            match vmc_spawn::sys::read(fd.fd, &mut buf) {
                Ok(0) | Err(_) => open[i] = false,
                Ok(n) => out(i == 1, &buf[..n]),
            }
        }
    }
}
