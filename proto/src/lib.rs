//! The host <-> guest agent protocol of vmc, defined once and used by both sides.
//!
//! The host opens a vsock stream to [`AGENT_PORT`] (through the VMM's Unix-socket
//! bridge) and exchanges length-prefixed frames: a little-endian `u32` payload
//! length followed by a postcard-encoded [`HostMsg`] or [`GuestMsg`]. Every
//! connection starts with a [`HostMsg::Hello`] / [`GuestMsg::Hello`] pair carrying
//! [`PROTOCOL_VERSION`]; either side closes the connection on a version it does
//! not speak, after sending an error that says so.
//!
//! One connection carries one process session: `Hello`, optionally `Mount`,
//! then `Start`, then stdin / signals from the host and output / exit from the
//! guest.

//!
//! This crate holds only the data types and the framing: no system calls, no
//! container notions beyond what crosses the connection. `vmc-spawn` (the
//! process start shared by the agent and namespace mode) and both ends
//! build on it; it builds on nothing of vmc.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of the frames below; bumped on every incompatible change.
pub const PROTOCOL_VERSION: u32 = 13;

/// vsock port on which the guest agent listens.
pub const AGENT_PORT: u32 = 1024;

/// Largest frame either side accepts. Output is sent in chunks well below it.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest chunk of stdio data put in one frame.
pub const IO_CHUNK: usize = 64 * 1024;

/// Most phases one [`GuestMsg::Phases`] frame may carry, and the longest
/// name of one: the host refuses more.
pub const MAX_PHASES: usize = 16;
pub const MAX_PHASE_NAME: usize = 24;

/// A step of the agent's work and the time it took, in microseconds of the
/// guest's monotonic clock (`vmc run --timings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub us: u64,
}

/// How the container's root filesystem is assembled inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// Read-only disk holding the image (e.g. `/dev/vda`).
    pub image_dev: String,
    /// Filesystem type of the image disk (`erofs` or `ext4`).
    pub image_fstype: String,
    /// Writable disk for the overlay's upper and work dirs (e.g. `/dev/vdb`).
    pub scratch_dev: String,
    /// Hostname of the container.
    pub hostname: String,
    /// Sizes of the image and scratch disks in 512-byte sectors. A guest
    /// restored from a snapshot learns them through a config interrupt; the
    /// agent waits until the kernel sees these sizes before mounting.
    pub image_sectors: u64,
    pub scratch_sectors: u64,
    /// The network interface to configure (none: loopback only).
    pub network: Option<NetSpec>,
    /// An interface to bring up with no address: a ready snapshot's, so
    /// that a run restored from it only adds its address and route
    /// (bringing a virtio-net link up fills its receive ring, the larger
    /// part of configuring it).
    pub link: Option<LinkSpec>,
    /// Files bind-mounted over the root's /etc (resolv.conf, hosts,
    /// hostname), as (name, content); empty for builds.
    pub etc: Vec<(String, String)>,
    /// The overlay's upper and work directories on a tmpfs in guest memory
    /// instead of the scratch disk (`vmc run --rm`: the changes go with the
    /// VM): the disk's filesystem is not mounted, and nothing is synced
    /// when the process ends.
    pub upper_in_memory: bool,
    /// Volumes and tmpfs mounts, parents first, made in the root once it
    /// is assembled (or personalized).
    #[serde(default)]
    pub mounts: Vec<GuestMount>,
    /// `--read-only`: the root remounted read-only after the mounts.
    #[serde(default)]
    pub read_only: bool,
    /// The root is entry `/N` of the virtio-fs share, used as it is: a
    /// live directory of the host's (an OCI bundle's `root.path`), with no
    /// image disk, overlay or scratch disk; what the container writes goes
    /// straight into it.
    #[serde(default)]
    pub root_share: Option<u32>,
}

/// A mount the agent makes in the container root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// Inside the root (resolved within it).
    pub target: String,
    pub readonly: bool,
    pub kind: GuestMountKind,
}

/// What a [`GuestMount`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMountKind {
    /// Entry `/N` of the virtio-fs share (tag `vmc`), a directory or (with
    /// `file`) a file, bound at the target.
    Share { index: u32, file: bool },
    /// A tmpfs: mount(2) flags and data.
    Tmpfs { flags: u64, data: String },
}

/// A guest network interface to bring up without an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub ifname: String,
    pub mtu: u16,
}

/// A guest network interface's configuration (IPv4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    pub ifname: String,
    pub address: [u8; 4],
    pub prefix: u8,
    pub gateway: [u8; 4],
    pub mtu: u16,
    /// The hardware address to take (a network namespace's interface's,
    /// whose frames the VM gets); none keeps the device's.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
}

/// A process to start in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcessSpec {
    /// argv; argv\[0\] is looked up in `PATH` from `env` when it has no `/`.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// Working directory inside the container root.
    pub cwd: String,
    /// `user[:group]`, names or numeric ids; empty means root.
    pub user: String,
    /// Whether the host will send stdin data (otherwise stdin is /dev/null).
    pub stdin: bool,
    /// When the process exits, report and then reboot the VM.
    pub reboot_on_exit: bool,
    /// Run on a new pseudo-terminal of this size (`-t`): it is the process's
    /// stdin, stdout and stderr and its controlling terminal; all output
    /// arrives as `Stdout`.
    #[serde(default)]
    pub tty: Option<WinSize>,
    /// The executable and identity, found by the host in the image's index
    /// (a container's first start, whose root is still the image's): the
    /// agent then reads no passwd, group or PATH directory.
    #[serde(default)]
    pub resolved: Option<Resolved>,
    /// `--init`: the agent's tiny init (`docker-init`) is the process, with
    /// this one as its child that it passes signals to and reaps orphans
    /// for.
    #[serde(default)]
    pub init: bool,
}

/// A process's executable and identity, resolved ahead of its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// As execve takes it, inside the container root.
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The user's home directory (HOME when the environment has none).
    pub home: String,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for WinSize {
    /// What a terminal without a size reports to programs that ask.
    fn default() -> Self {
        WinSize { rows: 24, cols: 80 }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Normal exit with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The exit code a shell (and Docker) reports: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Why a process could not be started; mirrors the exit codes Docker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFailure {
    /// The executable was not found (exit code 127).
    NotFound,
    /// The executable could not be run: permission denied, not executable (126).
    CannotExecute,
    /// Anything else in setting up the process (125, as `docker run` itself failing).
    Setup,
}

impl StartFailure {
    /// Exit code the CLI returns for this failure.
    pub fn exit_code(self) -> i32 {
        match self {
            StartFailure::NotFound => 127,
            StartFailure::CannotExecute => 126,
            StartFailure::Setup => 125,
        }
    }
}

/// Frames from the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// First frame on a connection.
    Hello { version: u32 },
    /// After a snapshot restore: set the wall clock (nanoseconds since the
    /// epoch) and mix fresh host entropy into the kernel's pool, reseeding it.
    Refresh {
        realtime_ns: u64,
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
    },
    /// Assemble the container root (once per VM; later sessions skip it,
    /// but for a root whose writable layer is in memory, as in a VM
    /// restored from a ready snapshot: its /etc files, hostname and network
    /// are set again from this spec).
    Mount(RootSpec),
    /// Builds: the layer tar that follows (as `Stdin` frames ended by
    /// `StdinEof`) is unpacked into the root and becomes a layer of its own.
    ApplyLayer,
    /// Builds: stream the changes since the last layer as an OCI layer tar
    /// (`Stdout` frames, then `Committed`) and start a new layer.
    Commit,
    /// Start a process.
    Start(ProcessSpec),
    /// Data for the process's stdin.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Close the process's stdin.
    StdinEof,
    /// Deliver a signal to the process.
    Signal(i32),
    /// The host terminal changed size: resize the process's pseudo-terminal
    /// (the kernel sends it SIGWINCH).
    Resize(WinSize),
    /// Published ports: connect to this TCP port on the guest's loopback;
    /// after `Connected` the connection carries the TCP stream's bytes both
    /// ways, unframed, with half-closes passed on.
    Connect { port: u16 },
    /// Report the agent's own phases on this connection: answered at once
    /// with a [`GuestMsg::Phases`] of accepting it, then before each answer
    /// to `Mount` and `Start` a `Phases` of its steps.
    Timings,
    /// Before a ready snapshot is taken: look this process up as `Start`
    /// would and read the start of its executable, so that the snapshot's
    /// page cache holds it. Nothing runs. Answered with `Warmed`.
    Warm(ProcessSpec),
    /// Before a parked snapshot is taken (`vmc run --start=parked`): start
    /// this process (stdin, stdout and stderr on pipes) and stop it at the
    /// entry of its executable, after execve and before its first
    /// instruction. Answered with `Parked`.
    Park(ProcessSpec),
    /// In a guest restored from a parked snapshot: let the parked process
    /// run, as `Start` would have started it (`stdin`: the host sends
    /// stdin; otherwise the process's stdin is closed). Answered like
    /// `Start`.
    StartParked { stdin: bool, reboot_on_exit: bool },
    /// `vmc cp` out of the container: `path` of the root (symlinks along it
    /// resolved inside the root; the last one too with `follow`) as a tar
    /// whose top entry is named `top`, every entry's owner `owner` when
    /// given. Answered with `Stdout` frames, then `Committed` (or `Error`).
    CopyOut {
        path: String,
        follow: bool,
        top: String,
        owner: Option<(u32, u32)>,
    },
    /// `vmc cp` into the container: the tar that follows (`Stdin` frames
    /// ended by `StdinEof`) is unpacked into `path` when it is a directory,
    /// else into its parent with the top entry renamed to `path`'s last
    /// name. Answered with `Applied` (or `Error`).
    CopyIn { path: String },
    /// `vmc top`: the container's processes (every process of the guest
    /// but the agent and the kernel's threads). Answered with `Processes`.
    Processes,
    /// `vmc stats`: the guest's own view of its use. Answered with `Stats`.
    Stats,
    /// Published UDP ports: a socket connected to this UDP port on the
    /// guest's loopback; after `Connected` the connection carries
    /// datagrams both ways, each a little-endian `u16` length and its
    /// bytes.
    ConnectUdp { port: u16 },
}

/// The most processes a [`GuestMsg::Processes`] lists.
pub const MAX_PROCESSES: usize = 2000;
/// The longest command line a [`ProcessInfo`] carries, in bytes.
pub const MAX_CMDLINE: usize = 256;

/// One process of the container, as `vmc top` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// The user's name in the container's /etc/passwd (empty: none).
    pub user: String,
    /// CPU time used, user and system, in ms.
    pub cpu_ms: u64,
    /// When it started, in ms since the epoch (the guest's clock).
    pub started_ms: u64,
    /// Its controlling terminal (`pts/0`), or empty.
    pub tty: String,
    /// Its command line (arguments joined by spaces; `[name]` when it has
    /// none), at most [`MAX_CMDLINE`] bytes.
    pub cmd: String,
}

/// The guest's view of its use (`vmc stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Memory in use (total less what is available), bytes.
    pub mem_used: u64,
    /// The guest's memory, bytes.
    pub mem_total: u64,
    /// Bytes received and sent on its network interfaces (not loopback).
    pub net_rx: u64,
    pub net_tx: u64,
    /// Bytes read from and written to its disks.
    pub blk_read: u64,
    pub blk_write: u64,
    /// The container's processes.
    pub pids: u32,
}

/// Frames from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// Answer to [`HostMsg::Hello`].
    Hello { version: u32 },
    /// The clock and entropy pool are refreshed.
    Refreshed,
    /// The root filesystem is assembled.
    Mounted,
    /// The layer sent with `ApplyLayer` is in place.
    Applied,
    /// The layer tar of a `Commit` is complete.
    Committed,
    /// Answer to `Connect`: raw bytes follow.
    Connected,
    /// The process runs with this pid (inside the guest).
    Started { pid: u32 },
    /// The process could not be started.
    StartFailed { kind: StartFailure, message: String },
    /// Output on stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Output on stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended; all its output was sent before this frame.
    Exited(ExitStatus),
    /// The request failed; the message names the problem.
    Error(String),
    /// After [`HostMsg::Timings`]: the steps of the agent's work on the
    /// request being answered, in order (at most [`MAX_PHASES`]).
    Phases(Vec<Phase>),
    /// Answer to [`HostMsg::Warm`] (whether or not the executable was found).
    Warmed,
    /// Answer to [`HostMsg::Park`]: the process waits at its entry.
    Parked { pid: u32 },
    /// Answer to [`HostMsg::Processes`].
    Processes(Vec<ProcessInfo>),
    /// Answer to [`HostMsg::Stats`].
    Stats(GuestStats),
}

/// Errors reading or writing frames.
#[derive(Debug)]
pub enum FrameError {
    /// The underlying stream failed.
    Io(io::Error),
    /// The peer closed the stream at a frame boundary.
    Closed,
    /// A frame announced a length above [`MAX_FRAME`].
    TooLarge(usize),
    /// A frame's payload did not decode.
    Decode(postcard::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "agent connection: {e}"),
            FrameError::Closed => write!(f, "agent connection closed"),
            FrameError::TooLarge(n) => write!(f, "agent frame of {n} bytes exceeds the limit"),
            FrameError::Decode(e) => write!(f, "malformed agent frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; 4];
    // Serialising our own enums into a Vec cannot fail.
    let body = postcard::to_stdvec(msg).unwrap_or_default();
    buf.extend_from_slice(&body);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf
}

/// Writes `msg` as one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

/// Reads one frame. [`FrameError::Closed`] on a clean end of stream.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(FrameError::Decode)
}

/// Incremental frame decoder for non-blocking readers: feed bytes, take frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Takes the next complete frame, if any.
    pub fn next_frame<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = postcard::from_bytes(&self.buf[4..4 + len]).map_err(FrameError::Decode);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_stream() {
        let msgs = vec![
            HostMsg::Hello {
                version: PROTOCOL_VERSION,
            },
            HostMsg::Start(ProcessSpec {
                args: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                ..Default::default()
            }),
            HostMsg::Stdin(vec![0, 1, 2, 255]),
            HostMsg::Signal(15),
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &msgs {
            let got: HostMsg = read_frame(&mut r).unwrap();
            assert_eq!(&got, m);
        }
        assert!(matches!(
            read_frame::<_, HostMsg>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_and_truncated_frames_are_rejected() {
        let mut wire = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 8]);
        assert!(matches!(
            read_frame::<_, GuestMsg>(&mut &wire[..]),
            Err(FrameError::TooLarge(_))
        ));
        let frame = encode(&GuestMsg::Stdout(vec![7; 100]));
        assert!(matches!(
            read_frame::<_, GuestMsg>(&mut &frame[..50]),
            Err(FrameError::Io(_))
        ));
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, GuestMsg>(&mut &garbage[..]),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn decoder_handles_split_and_joined_frames() {
        let mut wire = encode(&GuestMsg::Stdout(b"hello".to_vec()));
        wire.extend(encode(&GuestMsg::Exited(ExitStatus::Code(7))));
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        for b in wire.chunks(3) {
            d.feed(b);
            while let Some(m) = d.next_frame::<GuestMsg>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(
            out,
            vec![
                GuestMsg::Stdout(b"hello".to_vec()),
                GuestMsg::Exited(ExitStatus::Code(7))
            ]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(StartFailure::NotFound.exit_code(), 127);
    }
}
