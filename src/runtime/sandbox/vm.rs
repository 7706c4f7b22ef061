//! A sandbox in a microVM: started once from the warm-start snapshot with
//! the base image as its root disk, fed further layers with `ApplyLayer`,
//! and asked for each process's changes with `Commit`.

use std::io::{Read, Write};
use std::path::Path;

use vmc_proto::{GuestMsg, HostMsg, ProcessSpec, IO_CHUNK};

use super::{RunResult, Sandbox};
use crate::runtime::agent::{AgentConn, AgentError};
use crate::runtime::microvm::{MicroVm, Start};
use crate::runtime::net::Network;
use crate::runtime::{ContainerConfig, RuntimeError};

/// A running sandbox VM.
pub struct VmSandbox {
    vm: MicroVm,
}

fn unexpected(m: GuestMsg) -> RuntimeError {
    match m {
        GuestMsg::Error(e) => AgentError::remote(e).into(),
        other => AgentError::unexpected(&other).into(),
    }
}

impl VmSandbox {
    /// Starts a VM for `cfg` (its root a disk, its engine part the VM's),
    /// with its state in `dir`.
    pub fn start(cfg: &ContainerConfig, dir: &Path) -> Result<VmSandbox, RuntimeError> {
        // With a network, the host's nameservers (as namespace builds);
        // the agent keeps the file out of the steps' layers.
        let etc = match cfg.network {
            Network::Passt => {
                let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let mut etc = vec![(
                    "resolv.conf".to_string(),
                    crate::runtime::net::resolv_conf(&host, &[]),
                )];
                if !cfg.extra_hosts.is_empty() {
                    etc.push((
                        "hosts".to_string(),
                        crate::runtime::net::hosts(&cfg.hostname, None, &cfg.extra_hosts),
                    ));
                }
                etc
            }
            Network::None => Vec::new(),
        };
        let root = |m: &MicroVm| m.root_spec(&cfg.hostname, etc.clone(), false);
        let (vm, conn) = MicroVm::start_ready(cfg, dir, Start::Warm, &root, &|| false)?;
        conn.close();
        Ok(VmSandbox { vm })
    }

    /// A new connection to the agent, `first` sent with its Hello.
    fn conn(&self, first: HostMsg) -> Result<AgentConn, RuntimeError> {
        Ok(self.vm.connect_sending(first)?)
    }
}

impl Sandbox for VmSandbox {
    fn apply_layer(&mut self, layer: &mut dyn Read) -> Result<(), RuntimeError> {
        let mut conn = self.conn(HostMsg::ApplyLayer)?;
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

    fn run(
        &mut self,
        spec: ProcessSpec,
        out: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<RunResult, RuntimeError> {
        let mut conn = self.conn(HostMsg::Start(spec))?;
        let mut watch = self.vm.watch(crate::runtime::microvm::ANSWER_CPU);
        match conn.recv_watched(&mut watch)? {
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

    fn commit(&mut self, sink: &mut dyn Write) -> Result<(), RuntimeError> {
        let mut conn = self.conn(HostMsg::Commit)?;
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

    fn stop(self: Box<Self>) {
        self.vm.stop();
    }
}
