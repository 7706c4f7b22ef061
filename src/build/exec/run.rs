//! RUN steps: the script a step executes, the sandbox (a microVM or
//! namespaces on the host) started at a stage's first RUN that misses the
//! cache and fed its layers, and the layer each step commits.

use std::fs::File;
use std::io::Write;

use vmc_proto::{ExitStatus, ProcessSpec};

use super::{first_line, tempfile_in, BuildError, Builder, State};
use crate::build::dockerfile::{Cmd, Step};
use crate::build::ns::BuildNs;
use crate::build::vm::{BuildVm, RunResult};

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

    fn ensure_vm(&mut self, st: &mut State) -> Result<(), BuildError> {
        if st.vm.is_none() {
            let cache_dir = self.store.root().join("cache");
            let id = &crate::runtime::new_id()[..8];
            let sandbox = if self.o.ns {
                let lowers = match &st.base_image {
                    Some(img) => crate::image::disk::layer_dirs(self.store, img, &cache_dir)?,
                    None => Vec::new(),
                };
                Sandbox::Ns(BuildNs::start(
                    lowers,
                    &self.tmp.join(format!("ns-{id}")),
                    self.o.network,
                    &self.o.extra_hosts,
                    self.o.ns_limits,
                )?)
            } else {
                crate::vmm::open_kvm()
                    .map_err(|e| BuildError::Input(format!("RUN needs a microVM: {e}")))?;
                let kernel = crate::assets::kernel(self.o.kernel.as_deref())
                    .map_err(|e| BuildError::Input(e.to_string()))?;
                let disk = match &st.base_image {
                    Some(img) => crate::image::disk::root_disk(self.store, img, &cache_dir)?,
                    None => crate::image::disk::empty_disk(&cache_dir)?,
                };
                // Starting the VM takes seconds on slow backends: show it on a terminal.
                let spinner = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                    let s = indicatif::ProgressBar::new_spinner()
                        .with_message("starting the build microVM");
                    s.enable_steady_tick(std::time::Duration::from_millis(120));
                    s
                });
                let vm = BuildVm::start(
                    &disk,
                    &self.tmp.join(format!("vm-{id}")),
                    &kernel,
                    self.o.resources,
                    &self.o.snapshots,
                    self.o.network,
                    &self.o.extra_hosts,
                );
                if let Some(s) = spinner {
                    s.finish_and_clear();
                }
                Sandbox::Vm(Box::new(vm?))
            };
            st.vm = Some(sandbox);
            st.vm_layers = st.base_layers;
        }
        // Layers made since (COPY, cache hits) go in before the step runs.
        while st.vm_layers < st.layers.len() {
            let l = &st.layers[st.vm_layers];
            let p = self.store.blob_path(l.digest());
            let f =
                File::open(&p).map_err(|e| BuildError::Input(format!("{}: {e}", p.display())))?;
            let r =
                crate::image::layer::decompress(f).map_err(|e| BuildError::Input(e.to_string()))?;
            st.vm.as_mut().expect("started above").apply_layer(r)?;
            st.vm_layers += 1;
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
        self.ensure_vm(st)?;
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
        let vm = st.vm.as_mut().expect("started above");
        let result = vm.run(spec, &mut sink)?;
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
        vm.commit(&mut file)?;
        st.vm_layers += 1;
        let desc = self.store_layer(file)?;
        let diff = desc.digest().to_string();
        Self::add_layer(st, desc, diff);
        Self::history(st, &step.text, false);
        Ok(())
    }
}

/// Where a stage's RUN steps execute.
pub(super) enum Sandbox {
    Vm(Box<BuildVm>),
    Ns(BuildNs),
}

impl Sandbox {
    fn apply_layer(&mut self, r: impl std::io::Read) -> Result<(), crate::runtime::RuntimeError> {
        match self {
            Sandbox::Vm(v) => v.apply_layer(r),
            Sandbox::Ns(n) => n.apply_layer(r),
        }
    }

    fn run(
        &mut self,
        spec: ProcessSpec,
        out: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<RunResult, crate::runtime::RuntimeError> {
        match self {
            Sandbox::Vm(v) => v.run(spec, out),
            Sandbox::Ns(n) => n.run(spec, out),
        }
    }

    fn commit(&mut self, sink: &mut dyn Write) -> Result<(), crate::runtime::RuntimeError> {
        match self {
            Sandbox::Vm(v) => v.commit(sink),
            Sandbox::Ns(n) => n.commit(sink),
        }
    }

    pub(super) fn stop(self) {
        match self {
            Sandbox::Vm(v) => v.stop(),
            Sandbox::Ns(n) => n.stop(),
        }
    }
}
