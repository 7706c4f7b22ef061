//! The seam between a container's lifecycle and the way it is isolated:
//! an [`Engine`] runs a container's process to its end, runs further
//! processes in it (`vmc exec`), and makes build sandboxes (`vmc build`). Two engines: [`MicroVm`] (a VM restored
//! from a warm-start snapshot, or booted) and [`Namespaces`] (Linux
//! namespaces on the host). The command line picks one by
//! [`Mode`](super::Mode) and is otherwise the same for both.

use std::path::Path;

use vmc_proto::ProcessSpec;

use super::sandbox::{ns::NsSandbox, vm::VmSandbox, Sandbox};
use super::state::Container;
use super::{ContainerConfig, Mode, RuntimeError};

pub use super::StartGate;

/// Runs containers one way.
pub trait Engine {
    /// Runs the container `cfg` whose state directory is `dir`, attached
    /// to this process's stdio (stdin only with `forward_stdin`), with its
    /// published ports served meanwhile: makes it, opens `gate`, starts the
    /// workload; returns its exit code as Docker reports it.
    fn run_attached(
        &self,
        cfg: &ContainerConfig,
        dir: &Path,
        forward_stdin: bool,
        gate: &mut dyn StartGate,
    ) -> Result<i32, RuntimeError>;

    /// Runs `spec` in the running container `c` (made from `cfg`), attached
    /// to this process's stdio; returns its exit code.
    fn exec_attached(
        &self,
        c: &Container,
        cfg: &ContainerConfig,
        spec: ProcessSpec,
        forward_stdin: bool,
    ) -> Result<i32, RuntimeError>;

    /// Starts a build sandbox whose root is `cfg.rootfs` (its process and
    /// ports unused), with its state in `dir`.
    fn sandbox(&self, cfg: &ContainerConfig, dir: &Path) -> Result<Box<dyn Sandbox>, RuntimeError>;
}

/// The engine for `mode`.
pub fn for_mode(mode: Mode) -> Box<dyn Engine> {
    match mode {
        Mode::Vm => Box::new(MicroVm),
        Mode::Ns => Box::new(Namespaces),
    }
}

/// A microVM per container.
pub struct MicroVm;

impl Engine for MicroVm {
    fn run_attached(
        &self,
        cfg: &ContainerConfig,
        dir: &Path,
        forward_stdin: bool,
        gate: &mut dyn StartGate,
    ) -> Result<i32, RuntimeError> {
        let listeners = super::ports::bind(&cfg.ports)?;
        let _serving =
            super::ports::serve(listeners, super::ports::Target::Vm(dir.join("vsock.sock")));
        let how = if cfg.vm()?.cold {
            super::microvm::Start::Cold
        } else {
            super::microvm::Start::Warm
        };
        super::attach::run_attached(cfg, dir, forward_stdin, how, gate)
    }

    fn exec_attached(
        &self,
        c: &Container,
        _cfg: &ContainerConfig,
        spec: ProcessSpec,
        forward_stdin: bool,
    ) -> Result<i32, RuntimeError> {
        let vmm_pid = c.state.pid.ok_or(RuntimeError::NotReady("VM"))?;
        super::attach::exec_attached(
            &c.dir.join("vsock.sock"),
            vmm_pid as u32,
            spec,
            forward_stdin,
        )
    }

    fn sandbox(&self, cfg: &ContainerConfig, dir: &Path) -> Result<Box<dyn Sandbox>, RuntimeError> {
        Ok(Box::new(VmSandbox::start(cfg, dir)?))
    }
}

/// Linux namespaces on the host, confined as Docker's defaults.
pub struct Namespaces;

impl Engine for Namespaces {
    fn run_attached(
        &self,
        cfg: &ContainerConfig,
        dir: &Path,
        forward_stdin: bool,
        gate: &mut dyn StartGate,
    ) -> Result<i32, RuntimeError> {
        let lowers = cfg.rootfs.lowers()?;
        let listeners = super::ports::bind(&cfg.ports)?;
        super::ns::run_attached(cfg, &lowers, dir, listeners, forward_stdin, gate)
    }

    fn exec_attached(
        &self,
        c: &Container,
        cfg: &ContainerConfig,
        spec: ProcessSpec,
        forward_stdin: bool,
    ) -> Result<i32, RuntimeError> {
        let pid: i32 = std::fs::read_to_string(c.dir.join("init.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or(RuntimeError::NotReady("process"))?;
        if !forward_stdin {
            let null = std::fs::File::open("/dev/null").map_err(|source| RuntimeError::State {
                path: "/dev/null".into(),
                source,
            })?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
            // SAFETY: redirecting our own stdin to /dev/null before the child inherits it.
            unsafe { libc::dup2(fd, 0) };
        }
        let ns_cfg = cfg.ns()?;
        super::timings::mark("prepare");
        let code = super::ns::exec_attached(
            pid,
            ns_cfg.caps,
            &ns_cfg.seccomp,
            &c.dir.join("cgroups"),
            &spec,
            forward_stdin,
        );
        super::timings::mark("exit");
        code
    }

    fn sandbox(&self, cfg: &ContainerConfig, dir: &Path) -> Result<Box<dyn Sandbox>, RuntimeError> {
        Ok(Box::new(NsSandbox::start(cfg, dir)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{EngineConfig, NsEngineConfig, Rootfs, VmEngineConfig};

    fn config(rootfs: Rootfs, engine: EngineConfig) -> ContainerConfig {
        ContainerConfig {
            rootfs,
            ..crate::runtime::tests::config(engine)
        }
    }

    /// An engine asked for a sandbox it cannot make (the other engine's
    /// config, or a namespace sandbox over a disk) says so and makes
    /// nothing.
    #[test]
    fn a_sandbox_the_engine_cannot_make_is_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sandbox");
        let ns = config(
            Rootfs::Layers(Vec::new()),
            EngineConfig::Ns(NsEngineConfig::default()),
        );
        assert!(matches!(
            for_mode(Mode::Vm).sandbox(&ns, &dir).map(|_| ()),
            Err(RuntimeError::WrongEngine(Mode::Ns, Mode::Vm))
        ));
        let vm = config(
            Rootfs::Disk("/nonexistent.erofs".into()),
            EngineConfig::Vm(VmEngineConfig {
                upper_in_memory: false,
                parked: false,
                resources: crate::runtime::Resources {
                    cpus: 1,
                    memory: 256 << 20,
                },
                kernel: "/k".into(),
                debug: false,
                cold: false,
                snapshots: "/s".into(),
            }),
        );
        assert!(matches!(
            for_mode(Mode::Ns).sandbox(&vm, &dir).map(|_| ()),
            Err(RuntimeError::WrongEngine(Mode::Vm, Mode::Ns))
        ));
        let disk = config(
            Rootfs::Disk("/nonexistent.erofs".into()),
            EngineConfig::Ns(NsEngineConfig::default()),
        );
        let err = for_mode(Mode::Ns)
            .sandbox(&disk, &dir)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("not its disk"), "{err}");
        assert!(!dir.exists());
    }
}
