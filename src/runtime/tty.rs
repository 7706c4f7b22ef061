//! `-t`: the host side of a container's pseudo-terminal. The terminal
//! itself is made inside the container (see `vmc_spawn::spawn_pty`);
//! here vmc puts its own terminal in raw mode while attached and reports
//! its size.

use std::os::fd::AsRawFd;

use vmc_proto::WinSize;

/// The size of the terminal on vmc's stdin, stdout or stderr, if any.
pub fn host_size() -> Option<WinSize> {
    (0..3).find_map(|fd| {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it or fails.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out pointer for TIOCGWINSZ.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some(WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        })
    })
}

/// The size a container's terminal starts with: vmc's own, or 24x80.
pub fn initial_size() -> WinSize {
    host_size().unwrap_or_default()
}

/// vmc's stdin in raw mode (no echo, no line editing, no signals from
/// ^C: those bytes go to the container's terminal, which acts on them) until
/// dropped. Does nothing when stdin is not a terminal.
pub struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        // SAFETY: termios is plain data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawMode { saved: None };
        }
        let saved = t;
        // SAFETY: t is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // Output processing stays on, so that "\n" from vmc's own messages
        // still returns the carriage.
        t.c_oflag |= libc::OPOST;
        // SAFETY: fd 0 and a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the settings read in enter().
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// End of input on a terminal: the VEOF character (^D), which makes a
/// reading program at the start of a line see end of file. A pty's master
/// cannot be half-closed, so this is how stdin's end reaches the container.
pub const EOF_BYTE: u8 = 0x04;

/// Applies `size` to a master (namespace mode, on SIGWINCH).
pub fn resize(master: &impl AsRawFd, size: WinSize) {
    let _ = vmc_spawn::sys::set_winsize(master, size);
}
