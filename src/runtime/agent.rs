//! The host end of the guest agent protocol: connect through the VMM's vsock
//! Unix socket, handshake, and exchange frames.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmc_proto::{
    read_frame, write_frame, FrameError, GuestMsg, HostMsg, MAX_FRAME, PROTOCOL_VERSION,
};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the VM stopped before its agent answered")]
    VmStopped,
    #[error("the guest stopped making progress: {0}")]
    Hung(String),
    #[error("interrupted before the container's process started")]
    Interrupted,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest agent speaks protocol {0}, this vmc speaks {PROTOCOL_VERSION}: rebuild the guest agent (make guest)")]
    Version(u32),
    #[error("guest agent: {0}")]
    Remote(String),
    #[error("unexpected agent frame: {0}")]
    Unexpected(String),
    #[error("the guest agent closed the connection before the process exited")]
    ClosedEarly,
    #[error(transparent)]
    Phases(#[from] super::timings::PhasesError),
}

/// The most of a guest-supplied text (a frame, an error message) that an
/// error quotes: a hostile guest must not make vmc print a megabyte.
const QUOTE_MAX: usize = 256;

/// `text` cut to [`QUOTE_MAX`] bytes (at a character boundary), saying so.
fn quote(text: String) -> String {
    if text.len() <= QUOTE_MAX {
        return text;
    }
    let mut end = QUOTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

impl AgentError {
    /// A frame the host did not expect here, quoted (bounded).
    pub fn unexpected(frame: &impl std::fmt::Debug) -> AgentError {
        AgentError::Unexpected(quote(format!("{frame:?}")))
    }

    /// An error the agent reported, quoted (bounded).
    pub fn remote(message: String) -> AgentError {
        AgentError::Remote(quote(message))
    }
}

/// What a wait on the guest calls between looks at the socket (every
/// [`POLL`]): `Err` ends the wait (the VM stopped, or its guest is hung; see
/// `vmm::progress`). Waits are bounded by the guest's progress, not by time.
pub type Watch<'a> = &'a mut dyn FnMut() -> Result<(), AgentError>;

/// How often a waiting host looks at the guest's progress.
pub const POLL: Duration = Duration::from_millis(100);

/// One connection to the agent.
#[derive(Debug)]
pub struct AgentConn {
    stream: UnixStream,
    /// Whether this connection asked for the agent's phases
    /// ([`AgentConn::connect_then`]); a `Phases` frame is unexpected otherwise.
    timings: bool,
}

/// Waits until `stream` is readable (or closed), up to [`POLL`].
fn readable(stream: &UnixStream) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, POLL.as_millis() as libc::c_int) };
    match n {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes (never more: after a `Connect`, the bytes
/// that follow the answer belong to the relayed stream), calling `watch`
/// while none arrive. Ok(false) if the stream ended before the first byte.
fn read_exact_watched(
    stream: &mut UnixStream,
    buf: &mut [u8],
    watch: Watch,
) -> Result<bool, AgentError> {
    let mut got = 0;
    while got < buf.len() {
        if !readable(stream)? {
            watch()?;
            continue;
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Opens the VMM's socket and asks for `port` (the hybrid vsock `CONNECT`);
/// None if nothing listens yet (the guest is still booting).
fn try_connect(uds: &Path, port: u32, watch: Watch) -> Result<Option<UnixStream>, AgentError> {
    let Ok(mut s) = crate::uds::connect(uds) else {
        return Ok(None);
    };
    if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_err() {
        return Ok(None);
    }
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if !read_exact_watched(&mut s, &mut b, watch)? {
            // The VMM refused: the guest does not listen on the port yet.
            return Ok(None);
        }
        match b[0] {
            b'\n' => break,
            _ if line.len() > 64 => {
                return Err(std::io::Error::from(std::io::ErrorKind::InvalidData).into())
            }
            c => line.push(c),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidData).into());
    }
    Ok(Some(s))
}

impl AgentConn {
    /// Connects to the agent on `port`, retrying while the guest boots, for
    /// as long as `watch` lets it.
    pub fn connect(uds: &Path, port: u32, watch: Watch) -> Result<AgentConn, AgentError> {
        Self::connect_then(uds, port, watch, false, &[])
    }

    /// Connects as [`AgentConn::connect`], and sends behind its `Hello`, in
    /// the same write, a `Timings` request (`timings`, when `--timings` is
    /// on) and the frames `then`: the agent takes frames in order, so the
    /// host waits for the guest once, not once per frame. The answers to
    /// `Hello` and `Timings` are taken here, those to `then` are left to
    /// read.
    pub fn connect_then(
        uds: &Path,
        port: u32,
        watch: Watch,
        timings: bool,
        then: &[HostMsg],
    ) -> Result<AgentConn, AgentError> {
        let ask = timings && super::timings::enabled();
        let hello = HostMsg::Hello {
            version: PROTOCOL_VERSION,
        };
        let asked = ask.then_some(HostMsg::Timings);
        let mut first = Vec::new();
        for m in std::iter::once(&hello).chain(&asked).chain(then) {
            write_frame(&mut first, m).map_err(AgentError::Io)?;
        }
        let mut delay = Duration::from_millis(5);
        loop {
            watch()?;
            if let Some(stream) = try_connect(uds, port, watch)? {
                let mut c = AgentConn {
                    stream,
                    timings: false,
                };
                c.stream.write_all(&first).map_err(AgentError::Io)?;
                c.expect_hello(watch)?;
                if ask {
                    c.take_first_phases(watch)?;
                }
                return Ok(c);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `msg` and waits for the answer for as long as `watch` lets it.
    pub fn request(&mut self, msg: &HostMsg, watch: Watch) -> Result<GuestMsg, AgentError> {
        self.send(msg)?;
        self.recv_watched(watch)
    }

    /// With `--timings` asked: the agent's first phases (accepting the
    /// connection); from now on its phases are kept by [`super::timings`]
    /// as they arrive.
    fn take_first_phases(&mut self, watch: Watch) -> Result<(), AgentError> {
        self.timings = true;
        match self.recv_frame_watched(watch)? {
            GuestMsg::Phases(p) => Ok(super::timings::guest(p)?),
            GuestMsg::Error(e) => Err(AgentError::remote(e)),
            other => Err(AgentError::unexpected(&other)),
        }
    }

    /// The agent's phases go to the timeline; they precede the answer they
    /// belong to.
    fn take_phases(&self, m: GuestMsg) -> Result<Option<GuestMsg>, AgentError> {
        match m {
            GuestMsg::Phases(p) if self.timings => {
                super::timings::guest(p)?;
                Ok(None)
            }
            GuestMsg::Phases(_) => Err(super::timings::PhasesError::Unasked.into()),
            m => Ok(Some(m)),
        }
    }

    /// Receives one frame, calling `watch` while none arrives.
    pub fn recv_watched(&mut self, watch: Watch) -> Result<GuestMsg, AgentError> {
        loop {
            let m = self.recv_frame_watched(watch)?;
            if let Some(m) = self.take_phases(m)? {
                return Ok(m);
            }
        }
    }

    fn recv_frame_watched(&mut self, watch: Watch) -> Result<GuestMsg, AgentError> {
        let mut len = [0u8; 4];
        if !read_exact_watched(&mut self.stream, &mut len, watch)? {
            return Err(FrameError::Closed.into());
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len).into());
        }
        let mut body = vec![0u8; len];
        if !read_exact_watched(&mut self.stream, &mut body, watch)? && len > 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        postcard::from_bytes(&body).map_err(|e| FrameError::Decode(e).into())
    }

    /// The answer to the `Hello` sent.
    fn expect_hello(&mut self, watch: Watch) -> Result<(), AgentError> {
        match self.recv_watched(watch)? {
            GuestMsg::Hello { version } if version == PROTOCOL_VERSION => Ok(()),
            GuestMsg::Hello { version } => Err(AgentError::Version(version)),
            GuestMsg::Error(e) => Err(AgentError::remote(e)),
            other => Err(AgentError::unexpected(&other)),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, msg: &HostMsg) -> Result<(), AgentError> {
        write_frame(&mut self.stream, msg).map_err(AgentError::Io)
    }

    /// Receives one frame.
    pub fn recv(&mut self) -> Result<GuestMsg, AgentError> {
        loop {
            let m = read_frame(&mut self.stream)?;
            if let Some(m) = self.take_phases(m)? {
                return Ok(m);
            }
        }
    }

    /// A second handle on the connection for a writer thread.
    pub fn try_clone(&self) -> std::io::Result<AgentConn> {
        Ok(AgentConn {
            stream: self.stream.try_clone()?,
            timings: self.timings,
        })
    }

    /// The underlying stream (after a `Connect`, it carries raw bytes).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Closes the connection in both directions.
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A fake VMM socket: it accepts one connection, answers its CONNECT
    /// line, then plays `vmm` on the stream (the agent's side).
    fn fake_vmm(
        vmm: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = [0u8; 64];
            let _ = s.read(&mut line).unwrap();
            s.write_all(b"OK 1073741824\n").unwrap();
            vmm(s);
        });
        (dir, uds)
    }

    /// The host end of a connection to a fake agent (behind a fake VMM
    /// socket) that handshakes, then plays `guest` on its end.
    pub(in crate::runtime) fn fake_agent(
        guest: impl FnOnce(UnixStream) + Send + 'static,
    ) -> AgentConn {
        let (_dir, uds) = fake_vmm(|mut s| {
            let _: HostMsg = read_frame(&mut s).unwrap();
            let hello = GuestMsg::Hello {
                version: PROTOCOL_VERSION,
            };
            write_frame(&mut s, &hello).unwrap();
            guest(s);
        });
        AgentConn::connect(&uds, 1, &mut || Ok(())).expect("handshake")
    }

    /// A watch that declares the guest hung at its `n`th look: it bounds a
    /// test's wait even when the host under test would wait forever.
    pub(in crate::runtime) fn hung_at(n: u32) -> impl FnMut() -> Result<(), AgentError> {
        let mut looks = 0;
        move || {
            looks += 1;
            if looks >= n {
                Err(AgentError::Hung(format!("look {looks}")))
            } else {
                Ok(())
            }
        }
    }

    /// A fake VMM socket whose "agent" answers the handshake with `reply`.
    fn agent_answering(reply: GuestMsg) -> (tempfile::TempDir, std::path::PathBuf) {
        fake_vmm(move |mut s| {
            let hello: HostMsg = read_frame(&mut s).unwrap();
            assert!(matches!(hello, HostMsg::Hello { version } if version == PROTOCOL_VERSION));
            write_frame(&mut s, &reply).unwrap();
        })
    }

    /// The agent's phases are taken only when asked for, and skipped on
    /// the way to the answer they precede.
    #[test]
    fn phases_are_taken_only_when_asked_for() {
        let phases = || {
            GuestMsg::Phases(vec![vmc_proto::Phase {
                name: "overlay".into(),
                us: 5,
            }])
        };
        let agent = move |mut s: UnixStream| {
            let _: HostMsg = read_frame(&mut s).unwrap();
            write_frame(&mut s, &phases()).unwrap();
            write_frame(&mut s, &phases()).unwrap();
            write_frame(&mut s, &GuestMsg::Mounted).unwrap();
        };
        let mut asked = fake_agent(agent);
        asked.timings = true;
        let answer = asked.request(&HostMsg::StdinEof, &mut hung_at(50));
        assert!(matches!(answer, Ok(GuestMsg::Mounted)), "{answer:?}");

        let mut unasked = fake_agent(agent);
        let answer = unasked.request(&HostMsg::StdinEof, &mut hung_at(50));
        assert!(matches!(answer, Err(AgentError::Phases(_))), "{answer:?}");
    }

    /// The frames given to `connect_then` reach the agent with the Hello,
    /// before it has answered anything: one round trip, not one per frame.
    #[test]
    fn connect_then_sends_its_frames_with_the_hello() {
        let (_d, uds) = fake_vmm(|mut s| {
            // Read all three before answering: a host that waited for the
            // Hello's answer before sending the rest would hang here.
            let frames: Vec<HostMsg> = (0..3).map(|_| read_frame(&mut s).unwrap()).collect();
            assert!(matches!(frames[0], HostMsg::Hello { .. }), "{frames:?}");
            assert!(matches!(frames[1], HostMsg::StdinEof), "{frames:?}");
            assert!(matches!(frames[2], HostMsg::Signal(9)), "{frames:?}");
            let hello = GuestMsg::Hello {
                version: PROTOCOL_VERSION,
            };
            write_frame(&mut s, &hello).unwrap();
            write_frame(&mut s, &GuestMsg::Mounted).unwrap();
        });
        let then = [HostMsg::StdinEof, HostMsg::Signal(9)];
        let mut c =
            AgentConn::connect_then(&uds, 1, &mut hung_at(50), false, &then).expect("handshake");
        let answer = c.recv_watched(&mut hung_at(50));
        assert!(matches!(answer, Ok(GuestMsg::Mounted)), "{answer:?}");
    }

    #[test]
    fn an_agent_of_another_protocol_version_is_refused_by_name() {
        let (_d, uds) = agent_answering(GuestMsg::Hello {
            version: PROTOCOL_VERSION + 1,
        });
        let e = AgentConn::connect(&uds, 1, &mut || Ok(())).expect_err("refused");
        assert!(matches!(e, AgentError::Version(v) if v == PROTOCOL_VERSION + 1));
        assert!(e.to_string().contains("make guest"), "{e}");
    }

    #[test]
    fn an_agent_that_answers_with_something_else_is_an_error() {
        let (_d, uds) = agent_answering(GuestMsg::Error("no".into()));
        let e = AgentConn::connect(&uds, 1, &mut || Ok(())).expect_err("refused");
        assert!(matches!(e, AgentError::Remote(ref m) if m == "no"), "{e}");
    }

    #[test]
    fn a_silent_agent_is_given_up_when_the_watch_says_so() {
        // The VMM accepts and the agent handshakes, but never answers a request.
        let (tx, rx) = std::sync::mpsc::channel();
        let (_d, uds) = fake_vmm(move |mut s| {
            let _: HostMsg = read_frame(&mut s).unwrap();
            // The answer arrives in pieces, a byte at a time.
            for b in vmc_proto::encode(&GuestMsg::Hello {
                version: PROTOCOL_VERSION,
            }) {
                s.write_all(&[b]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = rx.recv();
        });
        let mut c = AgentConn::connect(&uds, 1, &mut || Ok(())).expect("handshake");
        let mut looks = 0;
        let e = c
            .request(&HostMsg::Signal(15), &mut || {
                looks += 1;
                if looks == 3 {
                    Err(AgentError::Hung("test".into()))
                } else {
                    Ok(())
                }
            })
            .expect_err("given up");
        assert!(matches!(e, AgentError::Hung(_)), "{e}");
        assert_eq!(looks, 3, "the watch is asked between polls");
        tx.send(()).unwrap();
    }

    #[test]
    fn a_length_prefix_above_the_limit_is_refused_before_its_body_is_awaited() {
        for len in [MAX_FRAME as u32 + 1, u32::MAX] {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let mut c = fake_agent(move |mut s| {
                s.write_all(&len.to_le_bytes()).unwrap();
                // No body follows: a host that believed the length would
                // allocate it and wait for it.
                let _ = rx.recv();
            });
            let e = c.recv_watched(&mut hung_at(50)).expect_err("refused");
            assert!(
                matches!(e, AgentError::Frame(FrameError::TooLarge(n)) if n == len as usize),
                "{e}"
            );
            tx.send(()).unwrap();
        }
    }

    #[test]
    fn a_frame_of_the_largest_size_is_read() {
        // Variant index (1 byte) and length varint (3 bytes) before the data.
        let data = vec![7u8; MAX_FRAME - 4];
        let sent = GuestMsg::Stdout(data);
        let frame = vmc_proto::encode(&sent);
        assert_eq!(frame.len(), 4 + MAX_FRAME);
        let mut c = fake_agent(move |mut s| s.write_all(&frame).unwrap());
        assert_eq!(c.recv_watched(&mut hung_at(50)).unwrap(), sent);
    }

    #[test]
    fn a_frame_that_does_not_decode_is_an_error() {
        let mut c = fake_agent(|mut s| {
            // Variant 255 of GuestMsg does not exist.
            s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        });
        let e = c.recv_watched(&mut hung_at(50)).expect_err("malformed");
        assert!(matches!(e, AgentError::Frame(FrameError::Decode(_))), "{e}");
        assert!(e.to_string().contains("malformed agent frame"), "{e}");
    }

    #[test]
    fn an_agent_silent_after_connect_is_given_up_when_the_watch_says_so() {
        // The VMM connects, but the agent never answers the Hello.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (_d, uds) = fake_vmm(move |mut s| {
            let _: HostMsg = read_frame(&mut s).unwrap();
            let _ = rx.recv();
        });
        let e = AgentConn::connect(&uds, 1, &mut hung_at(3)).expect_err("given up");
        assert!(matches!(e, AgentError::Hung(_)), "{e}");
        tx.send(()).unwrap();
    }

    #[test]
    fn nothing_listening_is_retried_while_the_watch_allows() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("absent.sock");
        let mut looks = 0;
        let e = AgentConn::connect(&uds, 1, &mut || {
            looks += 1;
            if looks > 5 {
                Err(AgentError::VmStopped)
            } else {
                Ok(())
            }
        })
        .expect_err("no VMM");
        assert!(matches!(e, AgentError::VmStopped));
        assert_eq!(looks, 6);
    }

    /// A hostile guest's frame or error text is quoted, not printed whole.
    #[test]
    fn guest_texts_in_errors_are_bounded() {
        let e = AgentError::remote("x".repeat(1 << 20)).to_string();
        assert!(
            e.len() < 400 && e.ends_with(&format!("({} bytes in all)", 1 << 20)),
            "{e}"
        );
        let e = AgentError::unexpected(&GuestMsg::Stdout(vec![7u8; 100_000])).to_string();
        assert!(e.len() < 400 && e.contains("bytes in all"), "{e}");
        // Short texts are kept as they are; a cut never splits a character.
        assert_eq!(
            AgentError::remote("no".into()).to_string(),
            "guest agent: no"
        );
        let e = AgentError::remote("é".repeat(1000)).to_string();
        assert!(e.contains("... (2000 bytes in all)"), "{e}");
    }
}
