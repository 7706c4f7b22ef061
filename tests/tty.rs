//! `-t` in both modes: the workload gets a real pseudo-terminal made inside
//! the container, vmc's window size reaches it and follows resizes, stdin
//! reaches it with -i, and `vmc exec -t` gets one too.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, ok, snapshots, store_with_busybox, vmc};

/// vmc running with a terminal as its stdin/stdout/stderr and controlling
/// terminal, as in an interactive shell; the test holds the terminal's master.
struct OnTerminal {
    child: std::process::Child,
    master: std::fs::File,
    /// vmc's side of the terminal, to read its modes.
    slave: OwnedFd,
    output: Arc<Mutex<Vec<u8>>>,
}

impl OnTerminal {
    fn start(home: &Path, args: &[&str], rows: u16, cols: u16) -> OnTerminal {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors; the other pointers may be null or valid.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned these descriptors; we own them.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmc"));
        cmd.env("VMC_HOME", home)
            .env("VMC_SNAPSHOTS", snapshots())
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the slave.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        {
            let (mut r, output) = (master.try_clone().unwrap(), output.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        OnTerminal {
            child,
            master,
            slave,
            output,
        }
    }

    /// Whether vmc's terminal is in raw mode (no line editing, no echo).
    fn raw(&self) -> bool {
        // SAFETY: termios is plain data; tcgetattr fills it from an open terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let r = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(r, 0);
        t.c_lflag & (libc::ICANON | libc::ECHO) == 0
    }

    /// What vmc wrote to the terminal, without carriage returns (the
    /// terminal adds its own to each line feed: vmc is not in raw mode here).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).replace('\r', "")
    }

    fn wait_for(&self, what: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let t = self.text();
            if t.contains(what) {
                return t;
            }
            assert!(Instant::now() < end, "no {what:?} in {t:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resizes the terminal: the kernel sends vmc SIGWINCH.
    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
    }

    fn wait(mut self, timeout: Duration) -> i32 {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("vmc did not exit; output: {:?}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tty(mode: &str) {
    let home = store_with_busybox();
    let h = home.path();
    let long = Duration::from_secs(240);

    // The workload's stdio is a terminal of the container's devpts (and its
    // controlling terminal: /dev/tty opens), 24x80 when vmc has no terminal
    // to take the size from; its output arrives with the terminal's line
    // endings; exit codes pass.
    let out = ok(&vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            mode,
            "-t",
            "busybox",
            "sh",
            "-c",
            "tty; stty size; echo ctty > /dev/tty",
        ],
    ));
    assert_eq!(out, "/dev/pts/0\r\n24 80\r\nctty\r\n");
    let o = vmc(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            mode,
            "-t",
            "busybox",
            "sh",
            "-c",
            "echo out; echo err >&2; [ -t 0 ] && [ -t 2 ] && exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\r\nerr\r\n");
    // Without -t there is no terminal, as with Docker.
    let o = vmc(h, &["run", "--rm", "--mode", mode, "busybox", "tty"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "not a tty\n");

    // -i -t: piped input goes through the terminal (echoed by it), and its
    // end is the terminal's end-of-file character.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmc"))
        .env("VMC_HOME", h)
        .env("VMC_SNAPSHOTS", snapshots())
        .args(["run", "--rm", "--mode", mode, "-i", "-t", "busybox", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello tty\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello tty\r\nhello tty\r\n"
    );

    // vmc on a terminal: its size is the container's, and a resize reaches
    // the workload as SIGWINCH with the new size.
    let script = "stty size; trap 'stty size; exit 3' WINCH; echo ready; \
                  while true; do sleep 0.1; done";
    let t = OnTerminal::start(
        h,
        &[
            "run", "--rm", "--mode", mode, "-t", "busybox", "sh", "-c", script,
        ],
        41,
        133,
    );
    let seen = t.wait_for("ready", long);
    assert!(seen.starts_with("41 133\n"), "{seen:?}");
    t.resize(50, 100);
    t.wait_for("50 100\n", Duration::from_secs(60));
    assert_eq!(t.wait(Duration::from_secs(60)), 3);

    // -i -t on a terminal: vmc's terminal is raw while attached (keys go to
    // the container's terminal, which edits and echoes them) and is given
    // back as it was.
    let t = OnTerminal::start(
        h,
        &[
            "run",
            "--rm",
            "--mode",
            mode,
            "-i",
            "-t",
            "busybox",
            "sh",
            "-c",
            "echo ready; read x; echo \"got:$x\"",
        ],
        24,
        80,
    );
    t.wait_for("ready", long);
    assert!(t.raw(), "vmc -i -t attached without raw mode");
    (&t.master).write_all(b"hi\r").unwrap();
    t.wait_for("got:hi", Duration::from_secs(60));
    let slave = t.slave.try_clone().unwrap();
    assert_eq!(t.wait(Duration::from_secs(60)), 0);
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut after: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on the terminal's open slave.
    let r = unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut after) };
    assert_eq!(r, 0);
    assert_ne!(
        after.c_lflag & libc::ICANON,
        0,
        "vmc left its terminal in raw mode"
    );

    // exec -t into a running container.
    ok(&vmc(
        h,
        &[
            "run", "-d", "--mode", mode, "--name", "box", "busybox", "sleep", "600",
        ],
    ));
    let out = ok(&vmc(h, &["exec", "-t", "box", "sh", "-c", "tty; exit 0"]));
    assert!(
        out.starts_with("/dev/pts/") && out.ends_with("\r\n"),
        "{out:?}"
    );
    let o = vmc(h, &["exec", "box", "tty"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "not a tty\n");
    ok(&vmc(h, &["rm", "-f", "box"]));
}

#[test]
fn tty_in_namespace_mode() {
    if !common::is_root() {
        return;
    }
    tty("ns");
}

#[test]
fn tty_in_vm_mode() {
    if !kvm_available() {
        return;
    }
    tty("vm");
}
