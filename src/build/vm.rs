//! The microVM a build stage's RUN steps execute in: started once per stage
//! from the warm-start snapshot with the stage's base image as its root disk,
//! fed the stage's other layers with `ApplyLayer`, and asked for each RUN
//! step's changes with `Commit`.

use std::io::{Read, Write};
use std::path::Path;

use vmc_proto::{ExitStatus, GuestMsg, HostMsg, ProcessSpec, StartFailure, IO_CHUNK};

use crate::runtime::agent::{AgentConn, AgentError};
use crate::runtime::microvm::{MicroVm, Start};
use crate::runtime::{ContainerConfig, Resources, Rootfs, RuntimeError};

/// How a RUN step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Exited(ExitStatus),
    StartFailed(StartFailure, String),
}

/// A running build VM.
pub struct BuildVm {
    vm: MicroVm,
}

fn unexpected(m: GuestMsg) -> RuntimeError {
    match m {
        GuestMsg::Error(e) => AgentError::remote(e).into(),
        other => AgentError::unexpected(&other).into(),
    }
}

impl BuildVm {
    /// Starts a VM whose root is the EROFS disk `base` (the stage's base
    /// image), with its state in `dir`.
    pub fn start(
        base: &Path,
        dir: &Path,
        kernel: &Path,
        resources: Resources,
        snapshots: &Path,
        network: crate::runtime::net::Network,
        extra_hosts: &[crate::runtime::net::ExtraHost],
    ) -> Result<BuildVm, RuntimeError> {
        let cfg = ContainerConfig {
            id: crate::runtime::new_id(),
            rootfs: Rootfs::Disk(base.to_path_buf()),
            image_id: None,
            process: ProcessSpec::default(),
            hostname: "buildkitsandbox".into(),
            ports: Vec::new(),
            network,
            dns: Vec::new(),
            extra_hosts: extra_hosts.to_vec(),
            engine: crate::runtime::EngineConfig::Vm(crate::runtime::VmEngineConfig {
                resources,
                kernel: kernel.to_path_buf(),
                debug: false,
                cold: false,
                snapshots: snapshots.to_path_buf(),
            }),
        };
        // With a network, the host's nameservers (as namespace builds);
        // the agent keeps the file out of the steps' layers.
        let etc = match network {
            crate::runtime::net::Network::Passt => {
                let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let mut etc = vec![(
                    "resolv.conf".to_string(),
                    crate::runtime::net::resolv_conf(&host, &[]),
                )];
                if !extra_hosts.is_empty() {
                    etc.push((
                        "hosts".to_string(),
                        crate::runtime::net::hosts("buildkitsandbox", None, extra_hosts),
                    ));
                }
                etc
            }
            crate::runtime::net::Network::None => Vec::new(),
        };
        let root = |m: &MicroVm| m.root_spec("buildkitsandbox", etc.clone());
        let (vm, conn) = MicroVm::start_ready(&cfg, dir, Start::Warm, &root, &|| false)?;
        conn.close();
        Ok(BuildVm { vm })
    }

    fn conn(&self) -> Result<AgentConn, RuntimeError> {
        Ok(self.vm.connect()?)
    }

    /// Makes the uncompressed layer tar `layer` part of the VM's root.
    pub fn apply_layer(&self, mut layer: impl Read) -> Result<(), RuntimeError> {
        let mut conn = self.conn()?;
        conn.send(&HostMsg::ApplyLayer)?;
        let mut buf = vec![0u8; IO_CHUNK];
        loop {
            let n = layer.read(&mut buf).map_err(AgentError::Io)?;
            if n == 0 {
                break;
            }
            conn.send(&HostMsg::Stdin(buf[..n].to_vec()))?;
        }
        match self.vm.request(&mut conn, &HostMsg::StdinEof)? {
            GuestMsg::Applied => Ok(()),
            m => Err(unexpected(m)),
        }
    }

    /// Runs a step's process; its output goes to `out` (stdout, stderr).
    pub fn run(
        &self,
        spec: ProcessSpec,
        out: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<RunResult, RuntimeError> {
        let mut conn = self.conn()?;
        match self.vm.request(&mut conn, &HostMsg::Start(spec))? {
            GuestMsg::Started { .. } => {}
            GuestMsg::StartFailed { kind, message } => {
                return Ok(RunResult::StartFailed(kind, message))
            }
            m => return Err(unexpected(m)),
        }
        // The step's own time is not bounded (it may sleep); the wait ends
        // if the VM does.
        let mut watch = crate::runtime::attach::while_running(
            self.vm.watch(crate::runtime::microvm::ANSWER_CPU),
        );
        loop {
            match conn.recv_watched(&mut watch)? {
                GuestMsg::Stdout(d) => out(false, &d),
                GuestMsg::Stderr(d) => out(true, &d),
                GuestMsg::Exited(s) => return Ok(RunResult::Exited(s)),
                m => return Err(unexpected(m)),
            }
        }
    }

    /// Writes the changes since the last layer (an OCI layer tar) to `sink`.
    pub fn commit(&self, sink: &mut dyn Write) -> Result<(), RuntimeError> {
        let mut conn = self.conn()?;
        conn.send(&HostMsg::Commit)?;
        // The agent's own work (no workload runs): each frame is bounded by
        // the guest's progress.
        loop {
            match conn.recv_watched(&mut self.vm.watch(crate::runtime::microvm::ANSWER_CPU))? {
                GuestMsg::Stdout(d) => sink.write_all(&d).map_err(AgentError::Io)?,
                GuestMsg::Committed => return Ok(()),
                m => return Err(unexpected(m)),
            }
        }
    }

    /// Stops the VM.
    pub fn stop(self) {
        self.vm.stop();
    }
}
