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
//!
//! The parts: `config` (the config-only steps), `run` (RUN steps and the
//! sandbox, microVM or namespaces, they execute in) and `copy` (COPY and
//! ADD, with `--chown` and `--from`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, MediaType, Os,
    RootFsBuilder,
};

use super::cache::{self, Cache};
use super::context::{self, Context};
use super::dockerfile::{self, Stage, Step, StepKind};
use super::words;
use crate::image::extras::Extras;
use crate::image::store::{digest_of, rfc3339_now};
use crate::image::{self, Reference, Store, StoredImage};
use crate::runtime::sandbox::Sandbox;
use crate::runtime::Resources;

mod config;
mod copy;
mod run;

/// What to build.
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Dockerfile (default: `Dockerfile` in the context).
    pub dockerfile: Option<PathBuf>,
    pub tags: Vec<String>,
    pub build_args: Vec<(String, String)>,
    /// `--target`: the stage to build (default: the last).
    pub target: Option<String>,
    /// `--label`s added to the image's config.
    pub labels: Vec<(String, String)>,
    /// The Dockerfile's text when it came on stdin (`-f -`).
    pub dockerfile_text: Option<String>,
    pub no_cache: bool,
    /// Where RUN steps run: a microVM, or Linux namespaces on the host.
    pub mode: crate::runtime::Mode,
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
    extras: Extras,
    layers: Vec<Descriptor>,
    /// Its root filesystem, unpacked on first COPY --from.
    unpacked: Option<PathBuf>,
}

/// The working state of one stage.
struct State {
    config: ImageConfiguration,
    /// HEALTHCHECK and ONBUILD, beside the OCI config.
    extras: Extras,
    layers: Vec<Descriptor>,
    key: String,
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    /// The base image (`None`: scratch); its root disk or layer directories
    /// are made when the first RUN needs them.
    base_image: Option<StoredImage>,
    /// Layers belonging to the base image (already in its disk).
    base_layers: usize,
    /// Where RUN steps run, started at the first one.
    sandbox: Option<Box<dyn Sandbox>>,
    /// Layers the sandbox has (base, applied or committed in it).
    sandbox_layers: usize,
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
    /// The stages built so far, by index (`None`: one the target does not
    /// need, skipped as BuildKit skips it).
    stages: Vec<Option<StageResult>>,
    /// Build args given on the command line.
    build_args: HashMap<String, String>,
    /// The ARGs before the first FROM, with their values: what a stage's
    /// `ARG NAME` without a value takes.
    global: BTreeMap<String, String>,
    /// Every ARG name the Dockerfile declares (a `--build-arg` of no other
    /// name is reported as not consumed, as Docker does).
    declared: BTreeSet<String>,
}

/// Docker's PATH (the one a container without PATH runs with), also what
/// a build whose base sets none gets in its config, as BuildKit adds it, so
/// that `ENV PATH=/x:$PATH` and RUN steps find the usual programs.
pub use vmc_spawn::DEFAULT_PATH;

/// Build args Docker predefines: never reported as not consumed.
const PREDEFINED_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

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
        global: BTreeMap::new(),
        declared: BTreeSet::new(),
    };
    let result = b.run();
    for s in b.stages.iter_mut().flatten() {
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
            _ if self.o.dockerfile_text.is_some() => {
                self.o.dockerfile_text.clone().unwrap_or_default()
            }
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
                self.declared.insert(k.clone());
                global.insert(k, v);
            }
        }
        self.global = global.clone();
        let target = match &self.o.target {
            None => df.stages.len() - 1,
            Some(t) => df
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(t.to_lowercase().as_str()))
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        df.stages.iter().filter_map(|s| s.name.as_deref()).collect();
                    BuildError::Input(format!(
                        "--target {t}: no stage of that name in the Dockerfile ({})",
                        if names.is_empty() {
                            "it names none: FROM IMAGE AS NAME names one".to_string()
                        } else {
                            format!("it has: {}", names.join(", "))
                        }
                    ))
                })?,
        };
        let needed = needed_stages(&df, target, &global);
        let total: usize = df
            .stages
            .iter()
            .zip(&needed)
            .filter(|(_, n)| **n)
            .map(|(s, _)| s.steps.len() + 1)
            .sum();
        let mut n = 0;
        for (i, stage) in df.stages.iter().enumerate().take(target + 1) {
            if !needed[i] {
                self.stages.push(None);
                continue;
            }
            let result = self.stage(stage, &global, &ctx, &mut n, total)?;
            if i == target {
                self.warn_unused_args();
                return self.finish(result);
            }
            self.stages.push(Some(result));
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
        let (mut st, triggers) = self.base(&from, stage)?;
        self.say(&format!(" ---> {}", short(&st.config)));
        // The base image's ONBUILD triggers run first, as if written
        // right after FROM (they are not passed on to this image).
        if !triggers.is_empty() {
            self.say(&format!("# Executing {} build trigger(s)", triggers.len()));
        }
        for t in &triggers {
            let step = dockerfile::trigger_step(t).map_err(|e| BuildError::Step {
                line: stage.line,
                text: format!("ONBUILD {t}"),
                message: e.message,
            })?;
            self.say(&format!(
                " ---> Running trigger: {}",
                first_line(&step.text)
            ));
            self.step(&step, &mut st, ctx)?;
        }
        for step in &stage.steps {
            *n += 1;
            self.say(&format!("Step {n}/{total} : {}", first_line(&step.text)));
            self.step(step, &mut st, ctx)?;
            self.say(&format!(" ---> {}", short(&st.config)));
        }
        if let Some(sandbox) = st.sandbox.take() {
            sandbox.stop();
        }
        Ok(StageResult {
            name: stage.name.clone(),
            config: st.config,
            extras: st.extras,
            layers: st.layers,
            unpacked: None,
        })
    }

    /// The state a stage starts from: scratch, an earlier stage, or an
    /// image; its config gets `DEFAULT_PATH` if it has no PATH. Also the
    /// base image's ONBUILD triggers, to run first.
    fn base(&mut self, from: &str, stage: &Stage) -> Result<(State, Vec<String>), BuildError> {
        let empty = |config,
                     extras: Extras,
                     layers: Vec<Descriptor>,
                     key: String,
                     base: Option<StoredImage>| State {
            config: with_path(config),
            // A HEALTHCHECK is inherited; ONBUILD triggers are not.
            extras: Extras {
                on_build: Vec::new(),
                ..extras
            },
            base_layers: layers.len(),
            sandbox_layers: layers.len(),
            layers,
            key,
            args: BTreeMap::new(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            base_image: base,
            sandbox: None,
            cmd_set: false,
        };
        if from == "scratch" {
            return Ok((
                empty(
                    default_config(),
                    Extras::default(),
                    Vec::new(),
                    cache::chain("", &["scratch"]),
                    None,
                ),
                Vec::new(),
            ));
        }
        if let Some(s) = self
            .stages
            .iter()
            .flatten()
            .find(|s| s.name.as_deref() == Some(from))
        {
            // An earlier stage: its layers become this stage's base.
            let (config, extras, layers) = (s.config.clone(), s.extras.clone(), s.layers.clone());
            let img = self.store.commit(&config, layers.clone(), None)?;
            let key = cache::chain("", &[&img.id()]);
            return Ok((empty(config, extras, layers, key, Some(img)), Vec::new()));
        }
        let img = self.store.resolve(from).map_err(|e| BuildError::Step {
            line: stage.line,
            text: first_line(&stage.text),
            message: e.to_string(),
        })?;
        let triggers = img.extras.on_build.clone();
        Ok((
            empty(
                img.config.clone(),
                img.extras.clone(),
                img.manifest.layers().clone(),
                cache::chain("", &[&img.id()]),
                Some(img),
            ),
            triggers,
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
                    // `--build-arg`, else the step's default, else (`ARG
                    // NAME` alone) the global ARG's value, as in Docker.
                    let v = self
                        .build_args
                        .get(&k)
                        .cloned()
                        .or(default)
                        .or_else(|| self.global.get(&k).cloned())
                        .unwrap_or_default();
                    self.declared.insert(k.clone());
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

    /// Docker's warning for `--build-arg`s no ARG declares.
    fn warn_unused_args(&mut self) {
        let mut unused: Vec<&String> = self
            .build_args
            .keys()
            .filter(|k| !self.declared.contains(*k) && !PREDEFINED_ARGS.contains(&k.as_str()))
            .collect();
        if unused.is_empty() {
            return;
        }
        unused.sort();
        let list = unused
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        self.say(&format!(
            "[Warning] One or more build-args [{list}] were not consumed"
        ));
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
        st.extras = e.extras;
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
                extras: st.extras.clone(),
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
        if !self.o.labels.is_empty() {
            let mut c = config.config().clone().unwrap_or_else(|| {
                oci_spec::image::ConfigBuilder::default()
                    .build()
                    .expect("static")
            });
            let mut labels = c.labels().clone().unwrap_or_default();
            labels.extend(self.o.labels.iter().cloned());
            c.set_labels(Some(labels));
            config.set_config(Some(c));
        }
        let names: Vec<String> = self
            .o
            .tags
            .iter()
            .map(|t| Reference::parse(t).map(|r| r.store_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::Input(e.to_string()))?;
        let img = self.store.commit_with(
            &config,
            &r.extras,
            r.layers,
            names.first().map(String::as_str),
        )?;
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

/// Which stages the build of stage `target` needs, as BuildKit decides:
/// the target, and every earlier stage a needed one names in FROM or in
/// `COPY --from` (a `--from` holding a variable, known only as the stage
/// runs, needs every stage before it).
fn needed_stages(
    df: &dockerfile::Dockerfile,
    target: usize,
    global: &BTreeMap<String, String>,
) -> Vec<bool> {
    let mut needed = vec![false; df.stages.len()];
    needed[target] = true;
    for i in (0..=target).rev() {
        if !needed[i] {
            continue;
        }
        let stage = &df.stages[i];
        let by_name = |name: &str| {
            df.stages[..i]
                .iter()
                .position(|s| s.name.as_deref() == Some(name))
        };
        let from = words::expand(&stage.from, &|k| global.get(k).cloned()).unwrap_or_default();
        if let Some(j) = by_name(&from) {
            needed[j] = true;
        }
        for step in &stage.steps {
            let StepKind::Copy {
                from: Some(from), ..
            } = &step.kind
            else {
                continue;
            };
            if from.contains('$') {
                needed[..i].iter_mut().for_each(|n| *n = true);
            } else if let Some(j) = from.parse::<usize>().ok().filter(|j| *j < i) {
                needed[j] = true;
            } else if let Some(j) = by_name(&from.to_lowercase()) {
                needed[j] = true;
            }
        }
    }
    needed
}

/// `config` with `PATH=DEFAULT_PATH` added to its Env if that has no PATH.
fn with_path(mut config: ImageConfiguration) -> ImageConfiguration {
    let mut c = config.config().clone().unwrap_or_else(|| {
        oci_spec::image::ConfigBuilder::default()
            .build()
            .expect("static")
    });
    let mut env = c.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
        c.set_env(Some(env));
        config.set_config(Some(c));
    }
    config
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
