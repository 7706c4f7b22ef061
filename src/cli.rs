//! Command-line types (clap derive only; no logic beyond value parsing).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

// The bench owns its options; the CLI only names them.
pub use crate::bench::BenchArgs;
use crate::runtime::Mode;

/// Docker's workflow with a microVM boundary: every container boots its own
/// minimal Linux kernel under KVM.
#[derive(Parser, Debug)]
#[command(
    name = "vmc",
    version = concat!(env!("CARGO_PKG_VERSION"), " (build ", env!("VMC_BUILD_ID"), ")"),
    about,
    long_about = "vmc runs containers the way Docker does, but each one inside its own \
                  lightweight virtual machine: a minimal Linux kernel boots under KVM and \
                  runs the container's root filesystem, with vmc's agent as PID 1.\n\n\
                  Environment: VMC_HOME (state, default /var/lib/vmc for root), \
                  VMC_ASSETS (guest kernel and agent, default ~/.local/share/vmc), \
                  VMC_KERNEL, VMC_GUEST, VMC_LOG (error|warn|info|debug)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `vmc run --start`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    Fresh,
    Parked,
}

// Parsed once per process and matched at once: the size of its largest
// variant (`run`'s many flags) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a new microVM container.
    #[command(
        long_about = "Run a command in a new container inside its own microVM.\n\n\
                      The container's root filesystem is an image from the store (vmc images) or \
                      a directory (--rootfs); it is never modified: writes go to a per-container \
                      scratch disk. The command is the image's Entrypoint followed by the given \
                      arguments (or its Cmd), as with docker run. The command's stdout and \
                      stderr arrive on vmc's stdout and stderr, stdin is forwarded when it is \
                      not a terminal (or with -i), SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 \
                      sent to vmc reach the command, and vmc exits with the command's exit \
                      code (128+N when it was killed by signal N; 127 when the command does \
                      not exist, 126 when it cannot be executed, 125 when vmc itself failed).",
        after_help = "Examples:\n  vmc run --rm busybox echo hello\n  \
                      vmc run --rm --rootfs ./rootfs -- echo hello\n  \
                      echo hi | vmc run --rm busybox cat\n  \
                      vmc run --rm --cpus 2 --memory 1G busybox nproc"
    )]
    Run(RunArgs),
    /// Build an image from a Dockerfile; RUN steps execute in a microVM.
    #[command(
        long_about = "Build an image from a Dockerfile and a build context directory.\n\n\
                      COPY and ADD take files from the context (minus .dockerignore); every RUN \
                      step executes inside a microVM (one per build stage, restored from the \
                      warm-start snapshot), and its changes come back as a layer. Each step is \
                      cached: an unchanged rebuild uses the cache throughout. A failing RUN \
                      stops the build with the command's exit code; nothing half-built is named.",
        after_help = "Examples:\n  vmc build -t hello .\n  \
                      vmc build -t app:1 -f docker/Dockerfile --build-arg VERSION=2 .\n  \
                      vmc build --no-cache -t app ."
    )]
    Build(BuildArgs),
    /// List containers.
    Ps(PsArgs),
    /// Show a container's output.
    Logs(LogsArgs),
    /// Stop running containers (the stop signal, then SIGKILL after a timeout).
    Stop(StopArgs),
    /// Send a signal to running containers.
    Kill(KillArgs),
    /// Remove containers.
    Rm(RmArgs),
    /// Wait for containers to exit and print their exit codes.
    Wait(WaitArgs),
    /// Run a command in a running container.
    Exec(ExecArgs),
    /// List a container's published ports.
    Port { container: String },
    /// Give a container a new name.
    Rename { container: String, name: String },
    /// Copy files between a container and the host: `vmc cp NAME:PATH
    /// DEST`, `vmc cp SRC NAME:PATH`; `-` for a tar on stdout or stdin.
    Cp(CpArgs),
    /// Create a container (its VM restored and its disks mounted, or its
    /// namespaces made) without starting its command; `vmc start` starts it.
    /// Takes `vmc run`'s options.
    Create(RunArgs),
    /// Start containers: made by `vmc create`, or exited (run again, their
    /// writable layer kept).
    Start(StartArgs),
    /// Stop containers (as `vmc stop`) and start them again.
    Restart(StopArgs),
    /// Pause containers: every process stopped where it is (namespace
    /// mode: the freezer cgroup; a microVM: its VMM, vCPUs and all).
    Pause {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Let paused containers run again.
    Unpause {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Attach this terminal to a running container's output, and its stdin
    /// when it was made with -i; ends with the container (ctrl-p ctrl-q
    /// detaches).
    Attach(AttachArgs),
    /// Show a container's processes (namespace mode: the host's ps with
    /// the options given, default -ef; a microVM: its guest's, as ps -ef).
    Top {
        container: String,
        /// ps options (namespace mode).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Show containers' use of CPU, memory, network, disks and processes.
    Stats(StatsArgs),
    /// (internal) Make a ready snapshot in the background (runtime/snapshot.rs).
    #[command(name = "__make-ready", hide = true)]
    MakeReady { job: PathBuf },
    /// (internal) Serve a microVM's volumes over the socket at descriptor
    /// `fd` (runtime/fsserver.rs).
    #[command(name = "__fs-server", hide = true)]
    FsServer {
        #[arg(long)]
        fd: i32,
        /// An empty directory to build the server's root in.
        #[arg(long)]
        scratch: PathBuf,
        /// The shares, as JSON.
        #[arg(long)]
        shares: String,
    },
    /// (internal) Supervise a detached container.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        dir: PathBuf,
        /// Make the container and wait for `vmc start` (vmc create).
        #[arg(long)]
        created: bool,
        /// Run a restarting container again after its backoff.
        #[arg(long, conflicts_with = "created")]
        restart: bool,
    },
    /// Show the virtualisation backend, guest kernel and agent vmc will use.
    Info,
    /// Show vmc's version (Docker's `version`; `--format` takes a template).
    Version {
        /// A Go template over the version's fields ('{{.Client.Version}}').
        #[arg(short, long, value_name = "TEMPLATE")]
        format: Option<String>,
    },
    /// List images.
    Images(ImagesArgs),
    /// Show an image's configuration as JSON.
    Inspect(InspectArgs),
    /// Give an image another name.
    Tag(TagArgs),
    /// Remove images.
    Rmi(RmiArgs),
    /// Make an image from a root filesystem tarball (plain, gzip or zstd).
    Import(ImportArgs),
    /// Pull an image from a registry (OCI distribution or Docker registry API).
    #[command(
        long_about = "Pull an image from a registry into the store.\n\n\
                      REF is [REGISTRY/]NAME[:TAG][@DIGEST]; names without a registry host are \
                      Docker Hub's. Multi-platform images give their linux/amd64 image. Every \
                      manifest and blob is checked against its digest, layers are stored as \
                      the registry serves them (gzip or zstd compressed), and the image keeps \
                      the registry's id. Pulls are anonymous. Registries are spoken to over \
                      https; --insecure uses plain http (a local or test registry).",
        after_help = "Examples:\n  vmc pull alpine:3.20\n  \
                      vmc pull --insecure localhost:5000/app:1\n  \
                      vmc pull -q registry.example.com/team/app@sha256:<64 hex digits>"
    )]
    Pull(PullArgs),
    /// Load images from a docker-archive (docker save) or an OCI archive.
    Load(LoadArgs),
    /// Write images to an OCI archive (readable by skopeo and umoci).
    Save(SaveArgs),
    /// Container vs microVM benchmarks: both modes side by side (and crun, peers).
    Bench(BenchArgs),
    /// Manage vmc's own data.
    #[command(subcommand)]
    System(SystemCommand),
    /// Manage volumes (kept in vmc's state directory, as Docker's local driver).
    #[command(subcommand)]
    Volume(VolumeCommand),
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (a name is generated when none is given); an
    /// existing one is kept as it is.
    Create {
        /// Set a label (KEY=VALUE).
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        name: Option<String>,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Only show volume names.
        #[arg(short, long)]
        quiet: bool,
        /// A Go template per volume ('{{.Name}}', '{{.Mountpoint}}').
        #[arg(long, value_name = "TEMPLATE")]
        format: Option<String>,
    },
    /// Remove volumes no container has.
    #[command(alias = "remove")]
    Rm {
        /// Accepted for Docker's sake: a volume a container has is still
        /// refused (remove the container first).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Show volumes as JSON.
    Inspect {
        #[arg(short, long, value_name = "TEMPLATE")]
        format: Option<String>,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Remove the anonymous volumes no container has (with --all, named
    /// ones too).
    Prune {
        #[arg(short, long)]
        all: bool,
        /// Do not ask (vmc never asks).
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SystemCommand {
    /// Show the disk space images, containers, the build cache and
    /// warm-start snapshots take.
    Df,
    /// Remove stale warm-start snapshots and agent disks: those of another
    /// kernel, guest agent, vmc build or backend (rebuilt on demand).
    Prune {
        /// Remove every snapshot and agent disk, current ones too.
        #[arg(short, long)]
        all: bool,
    },
    /// Describe a warm-start snapshot: each vCPU's state and timer, pending
    /// interrupts, and every virtio queue's positions (for diagnosing a
    /// guest that does not answer after a restore).
    InspectSnapshot {
        /// The snapshot directory (holding state.bin and memory.img).
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Pull the image: missing (when the store lacks it, the default),
    /// always, or never (default: VMC_PULL, else missing).
    #[arg(long, value_name = "POLICY", value_parser = ["missing", "always", "never"])]
    pub pull: Option<String>,

    /// Run a root filesystem directory instead of an image (every argument is then the command).
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,

    /// Override the image's entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,

    /// Where the container runs: vm (its own microVM, the default) or ns
    /// (Linux namespaces on the host, like crun; root only).
    #[arg(long, value_enum, default_value_t = Mode::Vm)]
    pub mode: Mode,

    /// Run in the background and print the container id (see vmc ps, logs, stop).
    #[arg(short = 'd', long)]
    pub detach: bool,

    /// Publish a container port on the host: [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp]
    /// (ranges, [IPv6]; no host port: one the system chooses; repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[IP:][HOST:]CONTAINER")]
    pub publish: Vec<String>,

    /// Publish every port the image EXPOSEs on ports the system chooses.
    #[arg(short = 'P', long = "publish-all")]
    pub publish_all: bool,

    /// Network: passt (user-mode networking, the default where passt is
    /// installed; namespace mode for now) or none (loopback only).
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,

    /// A nameserver for the container's /etc/resolv.conf (repeatable;
    /// default: the host's).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<std::net::IpAddr>,

    /// An /etc/hosts entry NAME:IP (repeatable). NAME:host-gateway also lets
    /// the container reach the host's loopback services through the
    /// gateway address, which it cannot by default.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,

    /// Namespace mode: add a capability to Docker's default set (NET_ADMIN,
    /// ALL, ...; repeatable).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,

    /// Namespace mode: drop a capability from the set (CHOWN, ALL, ...;
    /// repeatable).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,

    /// Security options (repeatable): seccomp=unconfined or
    /// seccomp=PROFILE.json (namespace mode; default: Docker's profile),
    /// no-new-privileges (always on).
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,

    /// Set a label on the container (KEY=VALUE, or KEY for an empty value; repeatable).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// A name for the container (default: a generated one).
    #[arg(long)]
    pub name: Option<String>,

    /// Remove the container's state (scratch disk) when it exits.
    #[arg(long)]
    pub rm: bool,

    /// A health check command, run in the container through /bin/sh -c
    /// (replaces the image's HEALTHCHECK).
    #[arg(long = "health-cmd", value_name = "CMD")]
    pub health_cmd: Option<String>,
    /// Time between health checks (30s, 1m30s, 500ms).
    #[arg(long = "health-interval", value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// The longest a health check may run.
    #[arg(long = "health-timeout", value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// Failures in a row that make the container unhealthy.
    #[arg(long = "health-retries", value_name = "N")]
    pub health_retries: Option<u32>,
    /// Time to start in, whose failures do not count.
    #[arg(long = "health-start-period", value_name = "DURATION")]
    pub health_start_period: Option<String>,
    /// Time between health checks in the start period.
    #[arg(long = "health-start-interval", value_name = "DURATION")]
    pub health_start_interval: Option<String>,
    /// Disable the image's HEALTHCHECK.
    #[arg(long = "no-healthcheck")]
    pub no_healthcheck: bool,

    /// Run a tiny init as PID 1 that passes signals to the command and
    /// reaps orphans (namespace mode; a microVM's agent already reaps).
    #[arg(long)]
    pub init: bool,

    /// Restart policy: no, on-failure[:N], always or unless-stopped (the
    /// container's supervisor runs it again, with Docker's backoff).
    #[arg(long, value_name = "POLICY", default_value = "no")]
    pub restart: String,

    /// CPUs: the VM's vCPUs (default 1); in namespace mode a CPU-time
    /// limit (default none).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: Option<u8>,

    /// Memory, e.g. 256M or 1G (units b, k, m, g): the VM's RAM (default
    /// 256M); in namespace mode a cgroup limit (default none).
    #[arg(short = 'm', long, value_parser = parse_size)]
    pub memory: Option<u64>,

    /// Namespace mode: the most processes the container may have.
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,

    /// Read environment variables from a file (KEY=VALUE lines; repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,

    /// Guest kernel (default: the one `make kernel` installed).
    #[arg(long, value_name = "PATH", env = "VMC_KERNEL")]
    pub kernel: Option<PathBuf>,

    /// Show the guest kernel's console on stderr (slow: every byte is a VM
    /// exit). Implies --cold, so the boot is there to see.
    #[arg(long)]
    pub debug: bool,

    /// Boot the guest kernel instead of restoring the warm-start snapshot.
    #[arg(long)]
    pub cold: bool,

    /// How the workload starts: `fresh` (exec'd at each run, the default)
    /// or `parked` (a `--rm` run of an image in a microVM: the first leaves
    /// a snapshot holding the process exec'd and stopped at its entry, and
    /// later runs of the same command restore it and let it run; restored
    /// copies share its ASLR layout and AT_RANDOM, see the README).
    #[arg(long = "start", value_enum, default_value_t = StartMode::Fresh)]
    pub start: StartMode,

    /// Print where the run's time went when it ends (host phases and the
    /// guest agent's steps), on stderr; attached runs only.
    #[arg(long)]
    pub timings: bool,

    /// Set an environment variable (KEY=VALUE, or KEY to copy vmc's own).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,

    /// User to run as: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,

    /// Container hostname (default: the short container id).
    #[arg(long)]
    pub hostname: Option<String>,

    /// Keep stdin open and forward it even when it is a terminal.
    #[arg(short = 'i', long)]
    pub interactive: bool,

    /// Mount a volume or host path: /host:/ctr[:ro], NAME:/ctr[:ro],
    /// /ctr (a new anonymous volume). Namespace mode only, for now.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:OPTS]")]
    pub volumes: Vec<String>,

    /// Mount as Docker's --mount: type=bind|volume|tmpfs,source=,target=
    /// [,readonly][,volume-nocopy][,tmpfs-size=][,tmpfs-mode=].
    #[arg(long = "mount", value_name = "SPEC")]
    pub mounts: Vec<String>,

    /// Mount a tmpfs: DIR[:OPTS] (default noexec,nosuid,nodev).
    #[arg(long = "tmpfs", value_name = "DIR[:OPTS]")]
    pub tmpfs: Vec<String>,

    /// Mount the container's root filesystem read-only.
    #[arg(long = "read-only")]
    pub read_only: bool,

    /// Allocate a pseudo-terminal in the container (its stdin, stdout and
    /// stderr; vmc's window size is forwarded).
    #[arg(short = 't', long)]
    pub tty: bool,

    /// IMAGE [CMD [ARG...]], or with --rootfs: CMD [ARG...]. Everything
    /// after the image belongs to the command; a flag vmc does not know
    /// before it is an error, never taken for the image.
    #[arg(trailing_var_arg = true, value_name = "IMAGE [CMD]")]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Only show image ids.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Go template for each object ('{{.State.Pid}}', '{{json .Config}}').
    #[arg(short = 'f', long, value_name = "TEMPLATE")]
    pub format: Option<String>,
    /// Only look for this kind of object: container or image.
    #[arg(long = "type", value_name = "TYPE", value_parser = ["container", "image"])]
    pub kind: Option<String>,
    /// Container or image: name, id or id prefix.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// The existing image.
    pub source: String,
    /// The new name (NAME[:TAG]).
    pub target: String,
}

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Remove even if a container uses the image.
    #[arg(short, long)]
    pub force: bool,
    /// Images to remove.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The tarball (a root filesystem, e.g. from mmdebstrap).
    pub file: PathBuf,
    /// Name for the image (NAME[:TAG]).
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Name and optionally a tag (NAME[:TAG]); may be given more than once.
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    pub tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads it from stdin).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Set a build argument (KEY=VALUE, or KEY to take vmc's own environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Run every step, ignoring the build cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Build this stage (FROM ... AS STAGE) and only the stages it needs.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Add a label to the image (KEY=VALUE; repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Write the image id (sha256:...) to FILE.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,
    /// Output: auto, plain and tty all print Docker's step lines; quiet is -q.
    #[arg(long, value_name = "MODE", default_value = "auto",
          value_parser = ["auto", "plain", "tty", "quiet"])]
    pub progress: String,
    /// Where RUN steps execute: vm (a microVM, the default) or ns (namespaces).
    #[arg(long, value_enum, default_value_t = Mode::Vm)]
    pub mode: Mode,
    /// Network for RUN steps: passt (the default where installed; namespace
    /// builds for now) or none.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// An /etc/hosts entry NAME:IP for RUN steps (repeatable);
    /// NAME:host-gateway also lets them reach the host's loopback services.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// CPUs of RUN steps: the build VM's vCPUs, or (namespace builds, with
    /// root) their cgroup's CPU limit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,
    /// Memory of RUN steps, e.g. 512M or 1G: the build VM's, or (namespace
    /// builds, with root) their cgroup's limit.
    #[arg(short = 'm', long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Namespace builds (with root): the most processes a RUN step may
    /// have. (A build VM is bounded by its memory and vCPUs.)
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub pids_limit: u64,
    /// Guest kernel (default: the one `make kernel` installed).
    #[arg(long, value_name = "PATH", env = "VMC_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Print only the image id.
    #[arg(short, long)]
    pub quiet: bool,
    /// The build context directory (`-`: none, the Dockerfile on stdin).
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Speak plain http to the registry instead of https.
    #[arg(long)]
    pub insecure: bool,
    /// Print only the image id.
    #[arg(short, long)]
    pub quiet: bool,
    /// The image: [REGISTRY/]NAME[:TAG][@DIGEST].
    #[arg(value_name = "REF")]
    pub reference: String,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show every container (default: running ones).
    #[arg(short, long)]
    pub all: bool,
    /// Only ids.
    #[arg(short, long)]
    pub quiet: bool,
    /// Only containers that match (repeatable; the same key twice is
    /// either): id=, name=, label=KEY[=VALUE], status=, exited=N,
    /// ancestor=IMAGE.
    #[arg(short = 'f', long = "filter", value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
    /// A Go template per container ('{{.ID}} {{.Names}}'); 'table ...'
    /// adds a header and aligns columns.
    #[arg(long, value_name = "TEMPLATE")]
    pub format: Option<String>,
    /// Full ids and commands.
    #[arg(long)]
    pub no_trunc: bool,
    /// The N most recently created containers (any state).
    #[arg(short = 'n', long = "last", value_name = "N")]
    pub last: Option<usize>,
    /// The most recently created container (any state).
    #[arg(short = 'l', long)]
    pub latest: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep printing new output until the container stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines ("all" for every line).
    #[arg(short = 'n', long, default_value = "all")]
    pub tail: String,
    /// Prefix each line with its time.
    #[arg(short, long)]
    pub timestamps: bool,
    pub container: String,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Attach to the container's output (and with -i its stdin) and exit
    /// with its exit code.
    #[arg(short, long)]
    pub attach: bool,
    /// Attach stdin too (a container made with -i).
    #[arg(short, long)]
    pub interactive: bool,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Do not attach stdin.
    #[arg(long)]
    pub no_stdin: bool,
    /// Pass the signals vmc gets to the container (not with -t).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub sig_proxy: bool,
    /// The keys that detach (Docker's spelling).
    #[arg(long, default_value = "ctrl-p,ctrl-q", value_name = "KEYS")]
    pub detach_keys: String,
    pub container: String,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// The signal (name or number).
    #[arg(short, long, default_value = "KILL")]
    pub signal: String,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill and remove running containers too.
    #[arg(short, long)]
    pub force: bool,
    /// Remove the containers' anonymous volumes too.
    #[arg(short, long)]
    pub volumes: bool,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CpArgs {
    /// Keep the owners (uid and gid) of what is copied; without it, files
    /// copied out belong to the user running vmc, and files copied in to
    /// the container's root user (Docker's rule).
    #[arg(short, long)]
    pub archive: bool,
    /// Follow a symlink given as the source.
    #[arg(short = 'L', long = "follow-link")]
    pub follow_link: bool,
    /// Print nothing (vmc prints no progress anyway).
    #[arg(short, long)]
    pub quiet: bool,
    /// NAME:PATH, a host path, or `-` (a tar on stdin).
    pub src: String,
    /// NAME:PATH, a host path, or `-` (a tar on stdout).
    pub dest: String,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Forward stdin even when it is a terminal.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal for the command.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// Print where the command's time went when it ends, on stderr.
    #[arg(long)]
    pub timings: bool,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Every container (default: running ones).
    #[arg(short, long)]
    pub all: bool,
    /// Print one table and end (default: refresh every second).
    #[arg(long)]
    pub no_stream: bool,
    /// Full ids.
    #[arg(long)]
    pub no_trunc: bool,
    /// A Go template per container ('{{.Name}} {{.CPUPerc}}'); 'table ...'
    /// adds a header; `json` one JSON object per line.
    #[arg(long, value_name = "TEMPLATE")]
    pub format: Option<String>,
    /// Containers (default: every running one).
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The archive to read (plain, gzip or zstd tar; default: stdin).
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Print only the loaded image ids.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Where to write the archive (default: stdout, unless a terminal).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Images to save (names, tags or ids).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// A size that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size '{0}': expected a number with an optional unit (b, k, m, g)")]
    NotANumber(String),
    #[error("invalid size '{0}': unknown unit '{1}' (use b, k, m or g)")]
    Unit(String, String),
    #[error("invalid size '{0}': too large")]
    TooLarge(String),
}

/// Parses sizes like `256M`, `1g`, `512MiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::NotANumber(s.to_string()))?;
    let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" if unit.is_empty() || unit == "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(SizeError::Unit(s.to_string(), unit.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10b"), Ok(10));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(
            parse_size("12q"),
            Err(SizeError::Unit("12q".into(), "q".into()))
        );
        assert_eq!(parse_size("M"), Err(SizeError::NotANumber("M".into())));
        assert_eq!(
            parse_size("99999999999g"),
            Err(SizeError::TooLarge("99999999999g".into()))
        );
    }

    /// `vmc --version` shows the build id that build.rs hashes from `src/`
    /// and Cargo.lock (the one warm-start snapshot keys include).
    #[test]
    fn version_shows_the_build_id() {
        let id = env!("VMC_BUILD_ID");
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        let e = Cli::try_parse_from(["vmc", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            e.to_string().trim_end(),
            format!("vmc {} (build {id})", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_image_and_everything_after_it_as_the_command() {
        let ok =
            Cli::try_parse_from(["vmc", "run", "--rootfs", "r", "--", "echo", "-n", "hi"]).unwrap();
        let Command::Run(r) = ok.command else {
            panic!()
        };
        assert_eq!(r.args, vec!["echo", "-n", "hi"]);
        let ok =
            Cli::try_parse_from(["vmc", "run", "--rm", "alpine", "ls", "-la", "--rm"]).unwrap();
        let Command::Run(r) = ok.command else {
            panic!()
        };
        assert!(r.rm);
        assert_eq!(
            r.args,
            vec!["alpine", "ls", "-la", "--rm"],
            "options after the image belong to the command"
        );
        assert!(
            Cli::try_parse_from(["vmc", "run", "--cpus", "0", "--rootfs", "r", "--", "x"]).is_err()
        );
    }

    /// Docker flags vmc lacks are refused as flags (main.rs words it
    /// `vmc: unknown flag: -v`), never read as the image or the command.
    #[test]
    fn unknown_flags_are_not_taken_for_the_image() {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        for argv in [
            &["vmc", "run", "--privileged", "img"][..],
            &["vmc", "run", "--rm", "--device=/dev/sda", "img", "ls"],
            &["vmc", "create", "--ipc", "host", "img"],
            &["vmc", "run", "--rootfs", "r", "--gpus", "x"],
            &["vmc", "exec", "--privileged", "c", "ls"],
            &["vmc", "ps", "--size"],
        ] {
            let e = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{argv:?}");
            let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else {
                panic!("{argv:?}: no flag named")
            };
            assert!(flag.starts_with('-'), "{argv:?}: {flag}");
        }
        // After the image (or `--`), flags are the command's.
        let Command::Run(r) = Cli::try_parse_from(["vmc", "run", "img", "-v", "--x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(r.args, ["img", "-v", "--x"]);
        let Command::Run(r) = Cli::try_parse_from(["vmc", "run", "--rootfs", "r", "--", "-v"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(r.args, ["-v"]);
    }

    #[test]
    fn stop_waits_10_seconds_and_kill_sends_kill_by_default() {
        let Command::Stop(s) = Cli::try_parse_from(["vmc", "stop", "x"]).unwrap().command else {
            panic!()
        };
        assert_eq!((s.time, s.containers), (10, vec!["x".to_string()]));
        let Command::Stop(s) = Cli::try_parse_from(["vmc", "stop", "-t", "3", "x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(s.time, 3);
        let Command::Kill(k) = Cli::try_parse_from(["vmc", "kill", "x"]).unwrap().command else {
            panic!()
        };
        assert_eq!(
            (k.signal.as_str(), k.containers),
            ("KILL", vec!["x".to_string()])
        );
        let Command::Kill(k) = Cli::try_parse_from(["vmc", "kill", "-s", "USR1", "x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(k.signal, "USR1");
        assert!(
            Cli::try_parse_from(["vmc", "stop"]).is_err(),
            "a container is needed"
        );
        assert!(
            Cli::try_parse_from(["vmc", "kill"]).is_err(),
            "a container is needed"
        );
    }

    #[test]
    fn cpus_are_1_to_64_for_run_and_build() {
        let run = |n: &str| Cli::try_parse_from(["vmc", "run", "--cpus", n, "img"]);
        let Command::Run(r) = run("64").unwrap().command else {
            panic!()
        };
        assert_eq!(r.cpus, Some(64));
        let Command::Run(r) = run("1").unwrap().command else {
            panic!()
        };
        assert_eq!(r.cpus, Some(1));
        for bad in ["65", "0", "256", "-1"] {
            assert!(run(bad).is_err(), "--cpus {bad}");
        }
        let build = |n: &str| Cli::try_parse_from(["vmc", "build", "--cpus", n, "."]);
        let Command::Build(b) = build("64").unwrap().command else {
            panic!()
        };
        assert_eq!(b.cpus, 64);
        assert!(build("65").is_err());
        let Command::Build(b) = Cli::try_parse_from(["vmc", "build", "."]).unwrap().command else {
            panic!()
        };
        assert_eq!(
            (b.cpus, b.memory),
            (1, 256 << 20),
            "the build VM's defaults"
        );
    }

    /// `--memory` parses any size; the 64 MiB minimum of a microVM is
    /// checked by `vmm::check_memory` (its test: vmm's
    /// `guest_memory_below_64_mib_is_refused`), since a namespace container
    /// may have less.
    #[test]
    fn memory_takes_docker_sizes() {
        let Command::Run(r) = Cli::try_parse_from(["vmc", "run", "-m", "64M", "img"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(r.memory, Some(64 << 20));
        crate::vmm::check_memory(r.memory.unwrap()).unwrap();
        let Command::Run(r) = Cli::try_parse_from(["vmc", "run", "--memory", "63M", "img"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(crate::vmm::check_memory(r.memory.unwrap()).is_err());
        assert!(Cli::try_parse_from(["vmc", "run", "--memory", "12q", "img"]).is_err());
    }
}
