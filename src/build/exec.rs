//! Running a Dockerfile: stage by stage, step by step, with Docker's output.
//!
//! Config-only steps (ENV, WORKDIR, ...) change the image config. COPY and ADD
//! become layers made on the host from the build context. RUN steps execute in
//! one microVM per stage (started at the stage's first RUN that misses the
//! cache, fed the stage's layers so far), and each step's changes come back
//! from the guest as a layer tar. Every step's result is cached under a key
//! chained from the base image, the instructions, the build arguments in use
//! and the content of copied files. Nothing is named in the store until the
//! final image is complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder,
    MediaType, Os, RootFsBuilder,
};
use vmc_guest::{ExitStatus, ProcessSpec};

use super::cache::{self, Cache};
use super::context::{self, Context, CopySpec};
use super::dockerfile::{self, Cmd, Stage, Step, StepKind};
use super::ns::BuildNs;
use super::vm::{BuildVm, RunResult};
use super::words;
use crate::image::layer::Whiteouts;
use crate::image::store::{digest_of, rfc3339_now};
use crate::image::{self, Reference, Store, StoredImage};
use crate::runtime::Resources;

/// What to build.
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Dockerfile (default: `Dockerfile` in the context).
    pub dockerfile: Option<PathBuf>,
    pub tags: Vec<String>,
    pub build_args: Vec<(String, String)>,
    pub no_cache: bool,
    /// Run RUN steps in Linux namespaces on the host instead of a microVM.
    pub ns: bool,
    /// The guest kernel (`None`: the installed one); looked up, like KVM
    /// itself, only when a RUN step needs a VM.
    pub kernel: Option<PathBuf>,
    pub resources: Resources,
    pub snapshots: PathBuf,
    /// Network of RUN steps.
    pub network: crate::runtime::net::Network,
    /// `--add-host` entries of RUN steps.
    pub extra_hosts: Vec<crate::runtime::net::ExtraHost>,
    /// Cgroup limits of namespace RUN steps (none without root).
    pub ns_limits: crate::runtime::NsLimits,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Parse(#[from] dockerfile::ParseError),
    #[error("Dockerfile:{line}: {text}: {message}")]
    Step {
        line: usize,
        text: String,
        message: String,
    },
    #[error("Dockerfile:{line}: {text}: the command returned a non-zero code: {code}")]
    RunFailed {
        line: usize,
        text: String,
        code: i32,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Store(#[from] image::StoreError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}

impl BuildError {
    /// The exit code `vmc build` returns: a failing RUN's own, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::RunFailed { code, .. } => *code,
            _ => 1,
        }
    }
}

/// Why a COPY's `--chown` or `--from` cannot be used.
#[derive(Debug, thiserror::Error)]
enum CopySourceError {
    #[error("--chown: unknown user or group '{0}' in the image")]
    UnknownOwner(String),
    #[error("--from={0}: no such stage or image")]
    NoStage(String),
    #[error(transparent)]
    Store(#[from] image::StoreError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn step_err(step: &Step, message: impl ToString) -> BuildError {
    BuildError::Step {
        line: step.line,
        text: first_line(&step.text),
        message: message.to_string(),
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or_default();
    if s.lines().count() > 1 {
        format!("{l} ...")
    } else {
        l.to_string()
    }
}

/// A finished stage: what COPY --from needs.
struct StageResult {
    name: Option<String>,
    config: ImageConfiguration,
    layers: Vec<Descriptor>,
    /// Its root filesystem, unpacked on first COPY --from.
    unpacked: Option<PathBuf>,
}

/// The working state of one stage.
struct State {
    config: ImageConfiguration,
    layers: Vec<Descriptor>,
    key: String,
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    /// The base image (`None`: scratch); its root disk or layer directories
    /// are made when the first RUN needs them.
    base_image: Option<StoredImage>,
    /// Layers belonging to the base image (already in its disk).
    base_layers: usize,
    vm: Option<Sandbox>,
    /// Layers the VM has (base, applied or committed in it).
    vm_layers: usize,
    /// Whether this stage set CMD (a later ENTRYPOINT then keeps it).
    cmd_set: bool,
}

/// The builder.
pub struct Builder<'a> {
    store: &'a Store,
    o: &'a BuildOptions,
    cache: Cache,
    tmp: PathBuf,
    out: &'a mut dyn Write,
    stages: Vec<StageResult>,
    /// Build args given on the command line.
    build_args: HashMap<String, String>,
}

/// Builds the image and names it with every tag; returns it.
pub fn build(
    store: &Store,
    o: &BuildOptions,
    out: &mut dyn Write,
) -> Result<StoredImage, BuildError> {
    let _w = store.writer()?;
    let tmp = temp_dir(store.root())?;
    let mut b = Builder {
        store,
        o,
        cache: Cache::new(store.root()),
        tmp: tmp.clone(),
        out,
        stages: Vec::new(),
        build_args: o.build_args.iter().cloned().collect(),
    };
    let result = b.run();
    for s in &mut b.stages {
        s.unpacked = None;
    }
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// A private working directory under the store, locked while in use; the
/// leftovers of builds that died are removed here.
fn temp_dir(root: &Path) -> Result<PathBuf, BuildError> {
    let base = root.join("cache").join("build-tmp");
    let io = |e: std::io::Error| BuildError::Input(format!("{}: {e}", base.display()));
    fs::create_dir_all(&base).map_err(io)?;
    for e in fs::read_dir(&base).map_err(io)?.flatten() {
        if let Ok(f) = File::open(e.path().join(".lock")) {
            // SAFETY: flock on our own descriptor; a live build holds its lock.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(&crate::runtime::new_id()[..12]);
    fs::create_dir_all(&dir).map_err(io)?;
    let lock = File::create(dir.join(".lock")).map_err(io)?;
    // SAFETY: as above; the descriptor is leaked on purpose so the lock lasts
    // as long as this process.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    std::mem::forget(lock);
    Ok(dir)
}

fn default_config() -> ImageConfiguration {
    ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(Vec::<String>::new())
                .build()
                .expect("static"),
        )
        .build()
        .expect("static")
}

impl Builder<'_> {
    fn say(&mut self, s: &str) {
        let _ = writeln!(self.out, "{s}");
        let _ = self.out.flush();
    }

    fn run(&mut self) -> Result<StoredImage, BuildError> {
        // The context's own Dockerfile resolves inside the context (a
        // symlink to a host file reads nothing of the host); `-f FILE` is
        // the user's own path. Either way a regular file, bounded.
        let text = match &self.o.dockerfile {
            Some(path) => context::read_dockerfile_at(path).map_err(|e| {
                BuildError::Input(format!("cannot read the Dockerfile: {e}"))
            })?,
            None => context::read_control_file(&self.o.context, "Dockerfile")
                .map_err(|e| BuildError::Input(format!("cannot read the Dockerfile: {e}")))?
                .ok_or_else(|| {
                    BuildError::Input(format!(
                        "cannot read the Dockerfile {}: no such file in the build context (give one with -f)",
                        self.o.context.join("Dockerfile").display()
                    ))
                })?,
        };
        let df = dockerfile::parse(&text)?;
        let ctx = Context::open(&self.o.context).map_err(|e| BuildError::Input(e.to_string()))?;
        let total: usize = df.stages.iter().map(|s| s.steps.len() + 1).sum();
        // ARGs before the first FROM: usable in FROM lines.
        let mut global = BTreeMap::new();
        for (raw, line) in &df.global_args {
            let kv = words::key_values(raw, &|k| global.get(k).cloned())
                .map_err(|e| BuildError::Input(format!("Dockerfile:{line}: ARG {raw}: {e}")))?;
            for (k, default) in kv {
                let v = self
                    .build_args
                    .get(&k)
                    .cloned()
                    .or(default)
                    .unwrap_or_default();
                global.insert(k, v);
            }
        }
        let mut n = 0;
        let last = df.stages.len() - 1;
        for (i, stage) in df.stages.iter().enumerate() {
            let result = self.stage(stage, &global, &ctx, &mut n, total)?;
            if i == last {
                return self.finish(result);
            }
            self.stages.push(result);
        }
        unreachable!("a parsed Dockerfile has at least one stage")
    }

    fn stage(
        &mut self,
        stage: &Stage,
        global: &BTreeMap<String, String>,
        ctx: &Context,
        n: &mut usize,
        total: usize,
    ) -> Result<StageResult, BuildError> {
        *n += 1;
        self.say(&format!("Step {n}/{total} : {}", first_line(&stage.text)));
        let from = words::expand(&stage.from, &|k| global.get(k).cloned()).map_err(|e| {
            BuildError::Input(format!("Dockerfile:{}: {}: {e}", stage.line, stage.text))
        })?;
        let mut st = self.base(&from, stage)?;
        self.say(&format!(" ---> {}", short(&st.config)));
        for step in &stage.steps {
            *n += 1;
            self.say(&format!("Step {n}/{total} : {}", first_line(&step.text)));
            self.step(step, &mut st, ctx)?;
            self.say(&format!(" ---> {}", short(&st.config)));
        }
        if let Some(vm) = st.vm.take() {
            vm.stop();
        }
        Ok(StageResult {
            name: stage.name.clone(),
            config: st.config,
            layers: st.layers,
            unpacked: None,
        })
    }

    /// The state a stage starts from: scratch, an earlier stage, or an image.
    fn base(&mut self, from: &str, stage: &Stage) -> Result<State, BuildError> {
        let empty =
            |config, layers: Vec<Descriptor>, key: String, base: Option<StoredImage>| State {
                base_layers: layers.len(),
                vm_layers: layers.len(),
                config,
                layers,
                key,
                args: BTreeMap::new(),
                shell: vec!["/bin/sh".into(), "-c".into()],
                base_image: base,
                vm: None,
                cmd_set: false,
            };
        if from == "scratch" {
            return Ok(empty(
                default_config(),
                Vec::new(),
                cache::chain("", &["scratch"]),
                None,
            ));
        }
        if let Some(s) = self.stages.iter().find(|s| s.name.as_deref() == Some(from)) {
            // An earlier stage: its layers become this stage's base.
            let (config, layers) = (s.config.clone(), s.layers.clone());
            let img = self.store.commit(&config, layers.clone(), None)?;
            let key = cache::chain("", &[&img.id()]);
            return Ok(empty(config, layers, key, Some(img)));
        }
        let img = self.store.resolve(from).map_err(|e| BuildError::Step {
            line: stage.line,
            text: first_line(&stage.text),
            message: e.to_string(),
        })?;
        Ok(empty(
            img.config.clone(),
            img.manifest.layers().clone(),
            cache::chain("", &[&img.id()]),
            Some(img),
        ))
    }

    /// Variable lookup for expansion: the config's Env, then build args (a
    /// snapshot, so the step may change the state while expanding).
    fn env_lookup(st: &State) -> impl Fn(&str) -> Option<String> {
        let env = st
            .config
            .config()
            .as_ref()
            .and_then(|c| c.env().clone())
            .unwrap_or_default();
        let args = st.args.clone();
        move |k: &str| {
            env.iter()
                .rev()
                .find_map(|e| e.strip_prefix(&format!("{k}=")).map(String::from))
                .or_else(|| args.get(k).cloned())
        }
    }

    fn step(&mut self, step: &Step, st: &mut State, ctx: &Context) -> Result<(), BuildError> {
        let args_part: String = st.args.iter().map(|(k, v)| format!("{k}={v};")).collect();
        let key = cache::chain(&st.key, &[&step.text, &args_part]);
        match &step.kind {
            StepKind::Run { cmd, heredocs } => {
                if self.cached(&key, st) {
                    return Ok(());
                }
                self.run_step(step, st, cmd, heredocs)?;
            }
            StepKind::Copy { .. } => return self.copy_step(step, st, ctx, &key),
            StepKind::Arg(raw) => {
                let kv =
                    words::key_values(raw, &Self::env_lookup(st)).map_err(|e| step_err(step, e))?;
                for (k, default) in kv {
                    let v = self
                        .build_args
                        .get(&k)
                        .cloned()
                        .or(default)
                        .unwrap_or_default();
                    st.args.insert(k, v);
                }
                // Args change the key of later steps, not the image.
                st.key = key;
                return Ok(());
            }
            _ => {
                if self.cached(&key, st) {
                    // SHELL and CMD change builder state beyond the config.
                    self.replay_state(step, st);
                    return Ok(());
                }
                self.config_step(step, st)?
            }
        }
        st.key = key.clone();
        self.record(&key, st);
        Ok(())
    }

    /// What a config step does to the builder's own state, for cache hits.
    fn replay_state(&self, step: &Step, st: &mut State) {
        match &step.kind {
            StepKind::Shell(v) if !v.is_empty() => st.shell = v.clone(),
            StepKind::Cmd(_) => st.cmd_set = true,
            _ => {}
        }
    }

    /// Uses the cache entry for `key` if there is one.
    fn cached(&mut self, key: &str, st: &mut State) -> bool {
        if self.o.no_cache {
            return false;
        }
        let Some(e) = self.cache.get(key) else {
            return false;
        };
        if !e.layers.iter().all(|l| self.store.has_blob(l.digest())) {
            return false;
        }
        st.config = e.config;
        st.layers = e.layers;
        st.key = key.to_string();
        self.say(" ---> Using cache");
        true
    }

    fn record(&self, key: &str, st: &State) {
        self.cache.put(
            key,
            &cache::Entry {
                config: st.config.clone(),
                layers: st.layers.clone(),
            },
        );
    }

    fn history(st: &mut State, text: &str, empty: bool) {
        let mut b = HistoryBuilder::default()
            .created(rfc3339_now())
            .created_by(text.to_string());
        if empty {
            b = b.empty_layer(true);
        }
        let mut h = st.config.history().clone().unwrap_or_default();
        if let Ok(entry) = b.build() {
            h.push(entry);
        }
        st.config.set_history(Some(h));
    }

    fn add_layer(st: &mut State, desc: Descriptor, diff_id: String) {
        st.layers.push(desc);
        let mut ids = st.config.rootfs().diff_ids().clone();
        ids.push(diff_id);
        st.config.rootfs_mut().set_diff_ids(ids);
    }

    /// Stores the uncompressed layer tar in `file`; returns its descriptor.
    fn store_layer(&self, mut file: File) -> Result<Descriptor, BuildError> {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| BuildError::Input(format!("layer file: {e}")))?;
        let (d, size) = self.store.put_blob(file, None)?;
        Ok(Descriptor::new(MediaType::ImageLayer, size, d))
    }

    fn config_step(&mut self, step: &Step, st: &mut State) -> Result<(), BuildError> {
        let lookup_env = Self::env_lookup(st);
        let mut c = st
            .config
            .config()
            .clone()
            .unwrap_or_else(|| ConfigBuilder::default().build().expect("static"));
        let expand = |s: &str| words::expand(s, &lookup_env).map_err(|e| step_err(step, e));
        let shell_form = |s: &str, shell: &[String]| {
            let mut v = shell.to_vec();
            v.push(s.to_string());
            v
        };
        match &step.kind {
            StepKind::Env(raw) => {
                let kv = words::key_values(raw, &lookup_env).map_err(|e| step_err(step, e))?;
                let mut env = c.env().clone().unwrap_or_default();
                let new: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{k}={}", v.unwrap_or_default()))
                    .collect();
                crate::runtime::spec::merge_env(&mut env, &new);
                c.set_env(Some(env));
            }
            StepKind::Label(raw) => {
                let kv = words::key_values(raw, &lookup_env).map_err(|e| step_err(step, e))?;
                let mut labels = c.labels().clone().unwrap_or_default();
                for (k, v) in kv {
                    labels.insert(k, v.unwrap_or_default());
                }
                c.set_labels(Some(labels));
            }
            StepKind::Workdir(raw) => {
                let w = expand(raw)?;
                let base = c.working_dir().clone().unwrap_or_else(|| "/".into());
                let abs = if w.starts_with('/') {
                    w
                } else {
                    format!("{}/{w}", base.trim_end_matches('/'))
                };
                c.set_working_dir(Some(abs));
            }
            StepKind::User(raw) => {
                c.set_user(Some(expand(raw)?));
            }
            StepKind::Cmd(cmd) => {
                c.set_cmd(Some(match cmd {
                    Cmd::Exec(v) => v.clone(),
                    Cmd::Shell(s) => shell_form(s, &st.shell),
                }));
                st.cmd_set = true;
            }
            StepKind::Entrypoint(cmd) => {
                c.set_entrypoint(Some(match cmd {
                    Cmd::Exec(v) => v.clone(),
                    Cmd::Shell(s) => shell_form(s, &st.shell),
                }));
                // As in Docker: a new ENTRYPOINT drops a CMD inherited from the base.
                if !st.cmd_set {
                    c.set_cmd(None);
                }
            }
            StepKind::Expose(raw) => {
                let mut ports = c.exposed_ports().clone().unwrap_or_default();
                for p in words::split_words(raw, &lookup_env).map_err(|e| step_err(step, e))? {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
                c.set_exposed_ports(Some(ports));
            }
            StepKind::Volume(v) => {
                let mut vols = c.volumes().clone().unwrap_or_default();
                for x in v {
                    vols.push(expand(x)?);
                }
                c.set_volumes(Some(vols));
            }
            StepKind::Shell(v) => {
                if v.is_empty() {
                    return Err(step_err(
                        step,
                        "SHELL needs the JSON form, e.g. SHELL [\"/bin/bash\", \"-c\"]",
                    ));
                }
                st.shell = v.clone();
            }
            StepKind::Stopsignal(raw) => {
                c.set_stop_signal(Some(expand(raw)?));
            }
            StepKind::Maintainer(m) => {
                st.config.set_author(Some(m.clone()));
            }
            StepKind::Ignored(what) => {
                let msg = format!(" ---> {what} is not supported by vmc build and was ignored");
                self.say(&msg);
            }
            StepKind::Run { .. } | StepKind::Copy { .. } | StepKind::Arg(_) => {}
        }
        st.config.set_config(Some(c));
        Self::history(st, &step.text, true);
        Ok(())
    }

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

    fn run_step(
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

    fn copy_step(
        &mut self,
        step: &Step,
        st: &mut State,
        ctx: &Context,
        key: &str,
    ) -> Result<(), BuildError> {
        let StepKind::Copy {
            sources,
            dest,
            from,
            chown,
            add,
            inline,
        } = &step.kind
        else {
            return Ok(());
        };
        if !inline.is_empty() {
            return Err(step_err(
                step,
                "heredoc sources in COPY/ADD are not supported; put the file in the build context",
            ));
        }
        let (sources, dest, chown, from) = {
            let lookup = Self::env_lookup(st);
            let expand = |s: &str| words::expand(s, &lookup).map_err(|e| step_err(step, e));
            let sources: Vec<String> = sources
                .iter()
                .map(|s| expand(s))
                .collect::<Result<_, _>>()?;
            let chown = chown.as_deref().map(expand).transpose()?;
            let from = from.as_deref().map(expand).transpose()?;
            (sources, expand(dest)?, chown, from)
        };
        let chown = match chown {
            Some(c) => Some(self.resolve_chown(&c, st).map_err(|e| step_err(step, e))?),
            None => None,
        };
        let from_dir = match from {
            Some(f) => Some(self.stage_root(&f).map_err(|e| step_err(step, e))?),
            None => None,
        };
        let spec = CopySpec {
            sources,
            dest,
            workdir: st
                .config
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
                .unwrap_or_else(|| "/".into()),
            chown,
            from_dir,
            add: *add,
        };
        let mut file = tempfile_in(&self.tmp)?;
        let outcome = ctx
            .copy_layer(&spec, &mut file)
            .map_err(|e| step_err(step, e))?;
        let key = cache::chain(key, &[&outcome.content_hash]);
        if self.cached(&key, st) {
            return Ok(());
        }
        let desc = self.store_layer(file)?;
        let diff = desc.digest().to_string();
        Self::add_layer(st, desc, diff);
        Self::history(st, &step.text, false);
        st.key = key.clone();
        self.record(&key, st);
        Ok(())
    }

    /// `--chown=user:group` with names looked up in the image's passwd/group.
    fn resolve_chown(&self, spec: &str, st: &State) -> Result<(u32, u32), CopySourceError> {
        let (u, g) = spec
            .split_once(':')
            .map_or((spec, None), |(u, g)| (u, Some(g)));
        let passwd = self.file_in_layers(&st.layers, "etc/passwd");
        let group = self.file_in_layers(&st.layers, "etc/group");
        let lookup = |name: &str, db: &Option<String>, idx: usize| {
            if let Ok(n) = name.parse() {
                return Ok(n);
            }
            db.as_deref()
                .unwrap_or_default()
                .lines()
                .find(|l| l.split(':').next() == Some(name))
                .and_then(|l| l.split(':').nth(idx))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| CopySourceError::UnknownOwner(name.to_string()))
        };
        let uid = lookup(u, &passwd, 2)?;
        let gid = match g {
            Some(g) => lookup(g, &group, 2)?,
            None if u.parse::<u32>().is_ok() => uid,
            None => lookup(u, &passwd, 3)?,
        };
        Ok((uid, gid))
    }

    /// The content of `path` in the newest layer that has it.
    fn file_in_layers(&self, layers: &[Descriptor], path: &str) -> Option<String> {
        for l in layers.iter().rev() {
            let f = File::open(self.store.blob_path(l.digest())).ok()?;
            let r = crate::image::layer::decompress(f).ok()?;
            let mut a = tar::Archive::new(r);
            for e in a.entries().ok()?.flatten() {
                let Ok(p) = e.path() else { continue };
                let p = p
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .to_string();
                if p == path {
                    let mut s = String::new();
                    let mut e = e;
                    std::io::Read::read_to_string(&mut e, &mut s).ok()?;
                    return Some(s);
                }
            }
        }
        None
    }

    /// The unpacked root of an earlier stage (by name or index) or an image.
    fn stage_root(&mut self, from: &str) -> Result<PathBuf, CopySourceError> {
        let idx = from
            .parse::<usize>()
            .ok()
            .filter(|i| *i < self.stages.len())
            .or_else(|| {
                self.stages
                    .iter()
                    .position(|s| s.name.as_deref() == Some(from))
            });
        let (config, layers) = match idx {
            Some(i) => {
                if let Some(p) = &self.stages[i].unpacked {
                    return Ok(p.clone());
                }
                (self.stages[i].config.clone(), self.stages[i].layers.clone())
            }
            None => {
                let img = self
                    .store
                    .resolve(from)
                    .map_err(|_| CopySourceError::NoStage(from.to_string()))?;
                (img.config.clone(), img.manifest.layers().clone())
            }
        };
        let img = self.store.commit(&config, layers, None)?;
        let dir = self
            .tmp
            .join(format!("stage-{}", &crate::runtime::new_id()[..8]));
        fs::create_dir_all(&dir).map_err(|source| CopySourceError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        crate::image::disk::unpack_image(self.store, &img, &dir, Whiteouts::Apply)?;
        if let Some(i) = idx {
            self.stages[i].unpacked = Some(dir.clone());
        }
        Ok(dir)
    }

    fn finish(&mut self, r: StageResult) -> Result<StoredImage, BuildError> {
        let mut config = r.config;
        // The time of the newest step, so that a fully cached rebuild gives
        // the very same image id.
        let created = config
            .history()
            .as_ref()
            .and_then(|h| h.last())
            .and_then(|h| h.created().clone())
            .unwrap_or_else(rfc3339_now);
        config.set_created(Some(created));
        let names: Vec<String> = self
            .o
            .tags
            .iter()
            .map(|t| Reference::parse(t).map(|r| r.store_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::Input(e.to_string()))?;
        let img = self
            .store
            .commit(&config, r.layers, names.first().map(String::as_str))?;
        let desc = Descriptor::new(
            MediaType::ImageManifest,
            img.manifest_size,
            img.manifest_digest.clone(),
        );
        for n in names.iter().skip(1) {
            self.store.tag(n, &desc)?;
        }
        self.say(&format!("Successfully built {}", img.short_id()));
        for n in &names {
            self.say(&format!("Successfully tagged {n}"));
        }
        Ok(self.store.resolve(&img.id())?)
    }
}

/// The short id the image config would give at this point.
fn short(config: &ImageConfiguration) -> String {
    let d = digest_of(
        crate::image::store::canonical_json(config)
            .unwrap_or_default()
            .as_bytes(),
    );
    d.digest()[..12].to_string()
}

fn tempfile_in(dir: &Path) -> Result<File, BuildError> {
    let p = dir.join(format!("layer-{}", &crate::runtime::new_id()[..12]));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| BuildError::Input(format!("{}: {e}", p.display())))?;
    let _ = fs::remove_file(&p);
    Ok(f)
}

/// Where a stage's RUN steps execute.
enum Sandbox {
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

    fn stop(self) {
        match self {
            Sandbox::Vm(v) => v.stop(),
            Sandbox::Ns(n) => n.stop(),
        }
    }
}
