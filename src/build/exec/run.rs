//! RUN steps: the script a step executes, the sandbox (a microVM or
//! namespaces on the host) started at a stage's first RUN that misses the
//! cache and fed its layers, and the layer each step commits.

use std::fs::File;

use vmc_proto::{ExitStatus, ProcessSpec};

use super::{first_line, tempfile_in, BuildError, Builder, State};
use crate::build::dockerfile::{Cmd, Step};
use crate::runtime::engine;
use crate::runtime::sandbox::{self, RunResult};
use crate::runtime::{ContainerConfig, EngineConfig, Mode, NsEngineConfig, Rootfs, VmEngineConfig};

impl Builder<'_> {
    /// The script a RUN executes, heredocs included.
    fn run_args(st: &State, cmd: &Cmd, heredocs: &[(String, String)]) -> Vec<String> {
        match cmd {
            Cmd::Exec(v) => v.clone(),
            Cmd::Shell(s) => {
                let script = match heredocs {
                    [] => s.clone(),
                    // `RUN <<EOF`: the body is the script.
                    [(_, body)] if s.trim().is_empty() => body.clone(),
                    // `RUN <<EOF command`: the body is the command's stdin.
                    _ => {
                        let mut script = s.clone();
                        for (delim, _) in heredocs {
                            script.push_str(&format!(" <<{delim}"));
                        }
                        for (delim, body) in heredocs {
                            script.push('\n');
                            script.push_str(body);
                            if !body.ends_with('\n') {
                                script.push('\n');
                            }
                            script.push_str(delim.trim_matches('\''));
                        }
                        script
                    }
                };
                let mut v = st.shell.clone();
                v.push(script);
                v
            }
        }
    }

    fn ensure_sandbox(&mut self, st: &mut State) -> Result<(), BuildError> {
        if st.sandbox.is_none() {
            let cache_dir = self.store.root().join("cache");
            let id = &crate::runtime::new_id()[..8];
            let (rootfs, engine) = match self.o.mode {
                Mode::Ns => {
                    let lowers = match &st.base_image {
                        Some(img) => crate::image::disk::layer_dirs(self.store, img, &cache_dir)?,
                        None => Vec::new(),
                    };
                    // RUN steps get Docker's default capabilities and
                    // filter, as BuildKit gives them.
                    let ns = NsEngineConfig {
                        limits: self.o.ns_limits,
                        caps: None,
                        seccomp: Default::default(),
                    };
                    (Rootfs::Layers(lowers), EngineConfig::Ns(ns))
                }
                Mode::Vm => {
                    crate::vmm::open_kvm()
                        .map_err(|e| BuildError::Input(format!("RUN needs a microVM: {e}")))?;
                    let kernel = crate::assets::kernel(self.o.kernel.as_deref())
                        .map_err(|e| BuildError::Input(e.to_string()))?;
                    let disk = match &st.base_image {
                        Some(img) => crate::image::disk::root_disk(self.store, img, &cache_dir)?,
                        None => crate::image::disk::empty_disk(&cache_dir)?,
                    };
                    let vm = VmEngineConfig {
                        upper_in_memory: false,
                        parked: false,
                        resources: self.o.resources,
                        kernel,
                        debug: false,
                        cold: false,
                        snapshots: self.o.snapshots.clone(),
                    };
                    (Rootfs::Disk(disk), EngineConfig::Vm(vm))
                }
            };
            let cfg = ContainerConfig {
                netns: None,
                id: crate::runtime::new_id(),
                rootfs,
                image_id: None,
                process: ProcessSpec::default(),
                hostname: sandbox::HOSTNAME.into(),
                ports: Vec::new(),
                network: self.o.network,
                dns: Vec::new(),
                extra_hosts: self.o.extra_hosts.clone(),
                mounts: Vec::new(),
                read_only: false,
                restart: Default::default(),
                init: false,
                healthcheck: None,
                stdin_open: false,
                engine,
            };
            let dir = self.tmp.join(format!("{}-{id}", self.o.mode));
            // Starting a VM takes seconds on slow backends: show it on a terminal.
            let spinner = (self.o.mode == Mode::Vm
                && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(|| {
                let s = indicatif::ProgressBar::new_spinner()
                    .with_message("starting the build microVM");
                s.enable_steady_tick(std::time::Duration::from_millis(120));
                s
            });
            let started = engine::for_mode(self.o.mode).sandbox(&cfg, &dir);
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            st.sandbox = Some(started?);
            st.sandbox_layers = st.base_layers;
        }
        // Layers made since (COPY, cache hits) go in before the step runs.
        while st.sandbox_layers < st.layers.len() {
            let l = &st.layers[st.sandbox_layers];
            let p = self.store.blob_path(l.digest());
            let f =
                File::open(&p).map_err(|e| BuildError::Input(format!("{}: {e}", p.display())))?;
            let mut r =
                crate::image::layer::decompress(f).map_err(|e| BuildError::Input(e.to_string()))?;
            st.sandbox
                .as_mut()
                .expect("started above")
                .apply_layer(&mut r)?;
            st.sandbox_layers += 1;
        }
        Ok(())
    }

    pub(super) fn run_step(
        &mut self,
        step: &Step,
        st: &mut State,
        cmd: &Cmd,
        heredocs: &[(String, String)],
    ) -> Result<(), BuildError> {
        self.ensure_sandbox(st)?;
        let c = st.config.config().clone();
        let mut env: Vec<String> = c.as_ref().and_then(|c| c.env().clone()).unwrap_or_default();
        // Build arguments are visible to RUN steps as environment variables.
        let args: Vec<String> = st.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut with_args = args;
        crate::runtime::spec::merge_env(&mut with_args, &env);
        env = with_args;
        let spec = ProcessSpec {
            args: Self::run_args(st, cmd, heredocs),
            env,
            cwd: c
                .as_ref()
                .and_then(|c| c.working_dir().clone())
                .unwrap_or_else(|| "/".into()),
            user: c
                .as_ref()
                .and_then(|c| c.user().clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        self.say(&format!(
            " ---> Running in {}",
            &crate::runtime::new_id()[..12]
        ));
        let out = &mut *self.out;
        let mut at_line_start = true;
        let mut sink = |_err: bool, d: &[u8]| {
            let _ = out.write_all(d);
            let _ = out.flush();
            if let Some(&last) = d.last() {
                at_line_start = last == b'\n';
            }
        };
        let sandbox = st.sandbox.as_mut().expect("started above");
        crate::phase!("RUN step: starting the process");
        let result = sandbox.run(spec, &mut sink)?;
        crate::phase!("RUN step: process ended");
        if !at_line_start {
            self.say("");
        }
        let code = match result {
            RunResult::Exited(ExitStatus::Code(0)) => None,
            RunResult::Exited(s) => Some(s.shell_code()),
            RunResult::StartFailed(kind, message) => {
                self.say(&message);
                Some(kind.exit_code())
            }
        };
        if let Some(code) = code {
            return Err(BuildError::RunFailed {
                line: step.line,
                text: first_line(&step.text),
                code,
            });
        }
        let mut file = tempfile_in(&self.tmp)?;
        sandbox.commit(&mut file)?;
        crate::phase!("RUN step: changes committed");
        st.sandbox_layers += 1;
        let desc = self.store_layer(file)?;
        crate::phase!("RUN step: layer stored");
        let diff = desc.digest().to_string();
        Self::add_layer(st, desc, diff);
        Self::history(st, &step.text, false);
        Ok(())
    }
}
