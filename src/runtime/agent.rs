//! The host end of the guest agent protocol: connect through the VMM's vsock
//! Unix socket, handshake, and exchange frames.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmc_guest::{read_frame, write_frame, FrameError, GuestMsg, HostMsg, PROTOCOL_VERSION};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the VM stopped before its agent answered")]
    VmStopped,
    #[error("the guest agent did not answer within {0} s (the guest may be hung; retry with --debug to see its console)")]
    Timeout(u64),
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
}

/// One connection to the agent.
pub struct AgentConn {
    stream: UnixStream,
}

fn try_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Err(std::io::ErrorKind::ConnectionRefused.into()),
            _ if b[0] == b'\n' => break,
            _ if line.len() > 64 => return Err(std::io::ErrorKind::InvalidData.into()),
            _ => line.push(b[0]),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

impl AgentConn {
    /// Connects to the agent on `port`, retrying while the guest boots.
    /// `alive` says whether the VM still runs.
    pub fn connect(
        uds: &Path,
        port: u32,
        timeout: Duration,
        alive: &dyn Fn() -> bool,
    ) -> Result<AgentConn, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(5);
        loop {
            if !alive() {
                return Err(AgentError::VmStopped);
            }
            if let Ok(stream) = try_connect(uds, port) {
                let mut c = AgentConn { stream };
                c.handshake()?;
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(AgentError::Timeout(timeout.as_secs()));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    fn handshake(&mut self) -> Result<(), AgentError> {
        self.send(&HostMsg::Hello {
            version: PROTOCOL_VERSION,
        })?;
        match self.recv()? {
            GuestMsg::Hello { version } if version == PROTOCOL_VERSION => Ok(()),
            GuestMsg::Hello { version } => Err(AgentError::Version(version)),
            GuestMsg::Error(e) => Err(AgentError::Remote(e)),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, msg: &HostMsg) -> Result<(), AgentError> {
        write_frame(&mut self.stream, msg).map_err(AgentError::Io)
    }

    /// Receives one frame.
    pub fn recv(&mut self) -> Result<GuestMsg, AgentError> {
        Ok(read_frame(&mut self.stream)?)
    }

    /// A second handle on the connection for a writer thread.
    pub fn try_clone(&self) -> std::io::Result<AgentConn> {
        Ok(AgentConn {
            stream: self.stream.try_clone()?,
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
mod tests {
    use super::*;

    /// A fake VMM socket whose "agent" answers the handshake with `reply`.
    fn agent_answering(reply: GuestMsg) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = [0u8; 64];
            let _ = s.read(&mut line).unwrap();
            s.write_all(b"OK 1073741824\n").unwrap();
            let hello: HostMsg = read_frame(&mut s).unwrap();
            assert!(matches!(hello, HostMsg::Hello { version } if version == PROTOCOL_VERSION));
            write_frame(&mut s, &reply).unwrap();
        });
        (dir, uds)
    }

    #[test]
    fn an_agent_of_another_protocol_version_is_refused_by_name() {
        let (_d, uds) = agent_answering(GuestMsg::Hello {
            version: PROTOCOL_VERSION + 1,
        });
        let e = AgentConn::connect(&uds, 1, Duration::from_secs(5), &|| true)
            .err()
            .expect("refused");
        assert!(matches!(e, AgentError::Version(v) if v == PROTOCOL_VERSION + 1));
        assert!(e.to_string().contains("make guest"), "{e}");
    }

    #[test]
    fn an_agent_that_answers_with_something_else_is_an_error() {
        let (_d, uds) = agent_answering(GuestMsg::Error("no".into()));
        let e = AgentConn::connect(&uds, 1, Duration::from_secs(5), &|| true)
            .err()
            .expect("refused");
        assert!(matches!(e, AgentError::Remote(ref m) if m == "no"), "{e}");
    }
}
