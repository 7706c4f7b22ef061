//! `vmc cp`: files out of and into a container as tar streams, Docker's
//! way. The container's side is walked by descriptors
//! (`vmc_spawn::walk`, so a container that swaps a directory for a symlink
//! mid-copy cannot lead the copy out of its root), and what arrives is
//! unpacked by the image layers' unpacker (every entry resolved inside the
//! destination, no device nodes, no xattrs, set-id bits dropped).
//!
//! A namespace container's root is reached through its init's
//! `/proc/PID/root` while it runs (volumes included), or, stopped, as its
//! overlay (image layers and its own upper directory) mounted for the copy
//! in a mount namespace of one thread. A microVM's is reached through its
//! agent (`HostMsg::CopyOut`/`CopyIn`) while it runs.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use vmc_proto::{GuestMsg, HostMsg};

use super::agent::{AgentConn, AgentError};
use super::state::{Container, Status};
use super::{ContainerConfig, Mode, RuntimeError};
use crate::image::layer::{self, Limits, Whiteouts};

/// What goes into a container.
pub enum Source<'a> {
    /// A tar stream (`vmc cp - CONTAINER:DIR`), unpacked as it is.
    Tar(&'a mut (dyn Read + Send)),
    /// A host path, named in the container as Docker names it.
    Host {
        path: &'a Path,
        follow: bool,
        owner: Option<(u32, u32)>,
    },
}

fn err(what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Copy(what.to_string())
}

/// The last name of `path` (`.` for the root).
pub fn base_name(path: &str) -> String {
    let clean = vmc_spawn::clean_path(&format!("/{path}"));
    match clean.rsplit_once('/') {
        Some((_, n)) if !n.is_empty() => n.to_string(),
        _ => ".".into(),
    }
}

/// Writes `path` of container `c` to `out` as a tar whose top entry is
/// `top`; `owner` replaces the entries' owners.
pub fn copy_out(
    c: &Container,
    cfg: &ContainerConfig,
    path: &str,
    follow: bool,
    top: &str,
    owner: Option<(u32, u32)>,
    out: &mut (dyn Write + Send),
) -> Result<(), RuntimeError> {
    match cfg.mode() {
        Mode::Ns => with_ns_root(c, cfg, |root| {
            vmc_spawn::walk::write_tar(root, path, follow, top, owner, out)
                .map_err(|e| err(format!("{path}: {e}")))
        }),
        Mode::Vm => with_agent(c, cfg, |conn, watch| {
            conn.send(&HostMsg::CopyOut {
                path: path.to_string(),
                follow,
                top: top.to_string(),
                owner,
            })?;
            loop {
                match conn.recv_watched(watch)? {
                    GuestMsg::Stdout(d) => out
                        .write_all(&d)
                        .map_err(|e| err(format!("writing the copy: {e}")))?,
                    GuestMsg::Committed => return Ok(()),
                    GuestMsg::Error(e) => return Err(err(e)),
                    m => return Err(AgentError::unexpected(&m).into()),
                }
            }
        }),
    }
}

type Watch<'a> = &'a mut dyn FnMut() -> Result<(), AgentError>;

/// Runs `f` with a connection to the agent of microVM container `c`: its
/// own VM's while it runs (or waits for `vmc start`), else a VM started for
/// the copy on the container's disks and stopped after it, the container
/// locked against a `vmc start` meanwhile (its writable layer is the
/// guest's ext4 filesystem, which the host never mounts).
fn with_agent<T>(
    c: &Container,
    cfg: &ContainerConfig,
    f: impl FnOnce(&mut AgentConn, Watch<'_>) -> Result<T, RuntimeError>,
) -> Result<T, RuntimeError> {
    let mut fresh = c.clone();
    let live = fresh.refresh() == Status::Running
        || (fresh.state.status == Status::Created && fresh.supervisor_alive());
    if live {
        let mut conn = agent(&fresh)?;
        let mut watch = super::guest::process_watch(vmm_pid(&fresh)?);
        return f(&mut conn, &mut watch);
    }
    let _lock = super::lifecycle::lock_dir(&c.dir).map_err(|e| err(e.to_string()))?;
    if fresh.refresh() == Status::Running {
        return Err(err(format!(
            "container {} started during the copy: copy again",
            c.state.name
        )));
    }
    let dir = c.dir.clone();
    let never = || false;
    let root = |m: &super::microvm::MicroVm| {
        let etc = super::net::etc_files(cfg, m.address().map(|a| a.to_string()).as_deref());
        m.root_spec(&cfg.hostname, etc, false)
    };
    let (mvm, mut conn) = super::microvm::MicroVm::start_ready(
        cfg,
        &dir,
        super::microvm::Start::Warm,
        &root,
        &never,
    )?;
    // Its writable layer is now what the copy leaves: a later start keeps it.
    super::state::mark_started(&dir);
    let result = {
        let mut watch = mvm.watch(super::guest::ANSWER_CPU);
        f(&mut conn, &mut watch)
    };
    conn.close();
    mvm.stop();
    result
}

/// Unpacks `src` at `path` in container `c`: into `path` when it is a
/// directory, else into its parent under `path`'s last name.
pub fn copy_in(
    c: &Container,
    cfg: &ContainerConfig,
    path: &str,
    src: Source<'_>,
) -> Result<(), RuntimeError> {
    let (mut tar, host) = match src {
        Source::Tar(r) => (Some(r), None),
        Source::Host {
            path,
            follow,
            owner,
        } => (None, Some((path.to_path_buf(), follow, owner))),
    };
    // The host side's tar, its top entry named `top`.
    let host_tar = |host: &(std::path::PathBuf, bool, Option<(u32, u32)>),
                    out: &mut dyn Write,
                    top: &str|
     -> std::io::Result<()> {
        let slash = OwnedFd::from(std::fs::File::open("/")?);
        vmc_spawn::walk::write_tar(&slash, &host.0.to_string_lossy(), host.1, top, host.2, out)
    };
    let src_name = host
        .as_ref()
        .map(|h| base_name(&h.0.to_string_lossy()))
        .unwrap_or_default();
    match cfg.mode() {
        Mode::Ns => with_ns_root(c, cfg, move |root| {
            let clean = vmc_spawn::clean_path(&format!("/{path}"));
            let (dir, top) = match vmc_spawn::open_dir_in_root(root, &clean) {
                Ok(d) => (d, src_name),
                Err(_) if tar.is_some() => {
                    return Err(err(format!(
                        "{path}: not a directory of the container (a tar from stdin is unpacked into one)"
                    )))
                }
                Err(_) => {
                    let (parent, name) = clean.rsplit_once('/').unwrap_or(("", &clean));
                    let d = vmc_spawn::open_dir_in_root(root, parent).map_err(|e| {
                        err(format!("{parent}/: no such directory in the container ({e})"))
                    })?;
                    (d, name.to_string())
                }
            };
            let at = |e: layer::LayerError| err(format!("{path}: {e}"));
            match (tar.take(), host) {
                // The user's own tar, unpacked as it is.
                (Some(r), _) => layer::unpack_fd(r, dir, Whiteouts::Plain, Limits::default())
                    .map(|_| ())
                    .map_err(at),
                (None, Some(h)) => {
                    let owner = h.2;
                    let name = top.clone();
                    piped(
                        move |w| host_tar(&h, w, &top),
                        move |r| {
                            layer::unpack_copy(r, dir, &name, owner)
                                .map(|_| ())
                                .map_err(at)
                        },
                    )
                }
                (None, None) => Ok(()),
            }
        }),
        Mode::Vm => with_agent(c, cfg, |conn, watch| {
            conn.send(&HostMsg::CopyIn {
                path: path.to_string(),
            })?;
            let mut sink = FrameSink {
                conn: &mut *conn,
                buf: Vec::with_capacity(CHUNK),
            };
            let sent = match (tar, &host) {
                (Some(r), _) => std::io::copy(r, &mut sink).map(|_| ()),
                (None, Some(h)) => host_tar(h, &mut sink, &src_name),
                (None, None) => Ok(()),
            };
            sent.and_then(|()| sink.flush())
                .map_err(|e| err(format!("sending the copy: {e}")))?;
            conn.send(&HostMsg::StdinEof)?;
            match conn.recv_watched(watch)? {
                GuestMsg::Applied => Ok(()),
                GuestMsg::Error(e) => Err(err(e)),
                m => Err(AgentError::unexpected(&m).into()),
            }
        }),
    }
}

const CHUNK: usize = 64 * 1024;

/// A writer that sends what it is given as `Stdin` frames.
struct FrameSink<'a> {
    conn: &'a mut AgentConn,
    buf: Vec<u8>,
}

impl Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.conn
                .send(&HostMsg::Stdin(chunk))
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// Runs `produce` (writing a tar) and `consume` (reading it) at once, over
/// a pipe.
fn piped(
    produce: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + Send,
    consume: impl FnOnce(&mut dyn Read) -> Result<(), RuntimeError>,
) -> Result<(), RuntimeError> {
    let (r, w) = vmc_spawn::sys::pipe().map_err(|e| err(format!("a pipe: {e}")))?;
    let (mut r, mut w) = (std::fs::File::from(r), std::fs::File::from(w));
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let done = produce(&mut w);
            drop(w);
            done
        });
        let consumed = consume(&mut r);
        // Unblocks a producer still writing when the consumer stopped.
        drop(r);
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the copy's reader failed")));
        consumed?;
        produced.map_err(|e| err(format!("reading the copy: {e}")))
    })
}

fn vmm_pid(c: &Container) -> Result<u32, RuntimeError> {
    c.state
        .pid
        .map(|p| p as u32)
        .ok_or(RuntimeError::NotReady("VM"))
}

/// A connection to a running microVM container's agent.
fn agent(c: &Container) -> Result<AgentConn, RuntimeError> {
    if super::pause::is_paused(c) {
        return Err(err(format!(
            "container {0} is paused: its guest cannot answer; unpause it first (vmc unpause {0})",
            c.state.name
        )));
    }
    let mut watch = super::guest::process_watch(vmm_pid(c)?);
    Ok(AgentConn::connect(
        &c.dir.join("vsock.sock"),
        vmc_proto::AGENT_PORT,
        &mut watch,
    )?)
}

/// Runs `f` with a descriptor of namespace container `c`'s root: its
/// init's `/proc/PID/root` while it runs, else its overlay, mounted for
/// the call in a mount namespace of a thread of its own (which goes with
/// the thread).
fn with_ns_root<T: Send>(
    c: &Container,
    cfg: &ContainerConfig,
    f: impl FnOnce(&OwnedFd) -> Result<T, RuntimeError> + Send,
) -> Result<T, RuntimeError> {
    let pid: Option<i32> = std::fs::read_to_string(c.dir.join("init.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    if let (Status::Running | Status::Created, Some(pid)) = (c.state.status, pid) {
        let root = vmc_spawn::sys::open_dir_path(format!("/proc/{pid}/root"))
            .map_err(|e| err(format!("the container's root (process {pid}): {e}")))?;
        return f(&root);
    }
    let lowers = cfg.rootfs.lowers()?;
    let dir = c.dir.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            // This thread's own mounts (CLONE_FS), gone with it.
            vmc_spawn::sys::unshare_mounts(libc::CLONE_FS)
                .map_err(|e| err(format!("a mount namespace for the copy: {e}")))?;
            let at = dir.join("cp-root");
            let _mounted = super::ns::OverlayRoot::mount(
                &lowers,
                &dir.join("upper"),
                &dir.join("work"),
                &at,
                &dir,
            )?;
            let root = vmc_spawn::sys::open_dir_path(&at)
                .map_err(|e| err(format!("the container's root: {e}")))?;
            f(&root)
        })
        .join()
        .unwrap_or_else(|_| Err(err("the copy failed")))
    })
}
