//! The VM peer in the same bench run: Debian's `qemu-system-x86_64` with its
//! `microvm` machine, vmc's guest kernel and the image's own root disk (the
//! EROFS disk vmc boots), one vCPU and 256 MiB as `vmc run` gives.
//!
//! The guest runs busybox `sh` as init on the serial console (echo off, no
//! prompt), the way HOST-KVM.md measured Firecracker. `boot` cold-boots it to
//! the shell's first output; `start` restores a saved state (`-incoming` of
//! a migration file made once from a cold boot, as a Firecracker snapshot
//! would be) and times the shell's answer to the workload's command line.
//! Both are timed from the QEMU process's spawn to the answer on the serial
//! line and to the process's exit (it is killed once it answered, as a
//! restored Firecracker guest would be).
//!
//! QEMU is driven through QMP (a UNIX socket: `qmp_capabilities`,
//! `query-status`, `migrate`, `query-migrate`, `quit`), which is QEMU's own
//! control protocol: no crate wraps it better than these few JSON lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vmm;
use crate::vmm::progress::{Threads, Verdict, Watchdog};

use super::runtimes::MeasureError;

/// The marker the guest's init prints once its shell reads commands.
const UP: &str = "vmc-peer-up";
/// The line its shell echoes before the state is saved.
const IDLE: &str = "vmc-peer-idle";
/// Guest memory and vCPUs, as `vmc run` gives by default.
const MEMORY_MIB: u32 = 256;
/// microvm's first virtio-mmio window, their size, and the IRQ of the first:
/// QEMU plugs the first device into the eighth window (`info qtree`), and
/// with ACPI off the kernel learns of it from the command line alone.
const MMIO_BASE: u64 = 0xfeb0_0000;
const MMIO_SIZE: u64 = 0x200;
const MMIO_SLOT: u64 = 7;
const MMIO_IRQ_BASE: u64 = 5;
/// Guest CPU time a cold boot may take here (kvm_pvm runs guest kernel code
/// through its emulator: tens of seconds).
const BOOT_CPU: Duration = Duration::from_secs(300);
/// Guest CPU time a restored guest may take to answer.
const ANSWER_CPU: Duration = Duration::from_secs(60);

/// The QEMU binary, if installed.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// A QEMU microvm set up for one image.
pub struct Qemu {
    bin: PathBuf,
    kernel: PathBuf,
    disk: PathBuf,
    dir: PathBuf,
    /// The saved state, once made.
    state: Option<PathBuf>,
}

/// A QEMU process with its serial line and QMP socket.
struct Running {
    child: Child,
    qmp: PathBuf,
    out: std::process::ChildStdout,
    pending: Vec<u8>,
}

impl Qemu {
    /// `dir` holds its sockets and its saved state.
    pub fn new(bin: PathBuf, kernel: PathBuf, disk: PathBuf, dir: PathBuf) -> Qemu {
        Qemu {
            bin,
            kernel,
            disk,
            dir,
            state: None,
        }
    }

    /// The guest's command line: vmc's own (quiet, kvm-clock, what this
    /// backend needs) with the serial console, the disk, and sh as init.
    fn cmdline(&self) -> String {
        let mut c: Vec<String> = vmm::base_cmdline(false, vmm::Backend::host())
            .into_iter()
            .filter(|w| w != "8250.nr_uarts=0")
            .collect();
        c.push("console=ttyS0".into());
        c.push(format!(
            "virtio_mmio.device={MMIO_SIZE}@{:#x}:{}",
            MMIO_BASE + MMIO_SLOT * MMIO_SIZE,
            MMIO_IRQ_BASE + MMIO_SLOT
        ));
        c.extend(["root=/dev/vda", "ro", "rootfstype=erofs", "init=/bin/sh"].map(String::from));
        c.push(format!(
            "-- -c \"stty -echo; export PS1=; echo {UP}; exec sh\""
        ));
        c.join(" ")
    }

    fn spawn(&self, incoming: Option<&Path>) -> Result<Running, MeasureError> {
        let qmp = self.dir.join(format!("qmp-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&qmp);
        let mut c = Command::new(&self.bin);
        c.arg("-M")
            .arg("microvm,acpi=off,pit=off,pic=off,rtc=off,isa-serial=on")
            .args(["-enable-kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-m", &format!("{MEMORY_MIB}M"), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-monitor", "none"])
            .args([
                "-chardev",
                "stdio,id=s0,signal=off",
                "-serial",
                "chardev:s0",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-append")
            .arg(self.cmdline())
            .arg("-drive")
            .arg(format!(
                "id=d0,file={},format=raw,if=none,readonly=on",
                self.disk.display()
            ))
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-device", "virtio-blk-device,drive=d0"]);
        if let Some(state) = incoming {
            c.arg("-incoming")
                .arg(format!("exec:cat {}", shell_quote(state)));
        }
        // QEMU dies with the bench, however the bench ends.
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(MeasureError::io("spawning qemu-system-x86_64"))?;
        let out = child
            .stdout
            .take()
            .ok_or(MeasureError::Missing("no stdout"))?;
        Ok(Running {
            child,
            qmp,
            out,
            pending: Vec::new(),
        })
    }

    /// Cold boot to the shell's first output; ms to it and to the exit.
    pub fn boot(&self) -> Result<(f64, f64), MeasureError> {
        let t0 = Instant::now();
        let mut vm = self.spawn(None)?;
        let r = vm.wait_line(UP, BOOT_CPU);
        let first = t0.elapsed();
        vm.kill();
        r?;
        Ok((ms(first), ms(t0.elapsed())))
    }

    /// Whether [`Self::save`] made the saved state.
    pub fn saved(&self) -> bool {
        self.state.is_some()
    }

    /// Boots once and saves the guest, idle in its shell, for [`Self::run`].
    pub fn save(&mut self) -> Result<(), MeasureError> {
        let state = self.dir.join("qemu.state");
        let mut vm = self.spawn(None)?;
        let r = (|| {
            vm.wait_line(UP, BOOT_CPU)?;
            // Saved idle in its shell, as a snapshot of a booted guest
            // would be: the shell has answered once and reads again.
            vm.send(&format!("echo {IDLE}"))?;
            vm.wait_line(IDLE, ANSWER_CPU)?;
            vm.settle();
            let mut q = vm.qmp()?;
            // A running guest migrates into a file and restores running (a
            // stopped one would restore paused).
            q.call(&format!(
                r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
                shell_quote(&state)
            ))?;
            let mut dog = Watchdog::new(ANSWER_CPU);
            loop {
                vm.judge(&mut dog)?;
                let v = q.call(r#"{"execute":"query-migrate"}"#)?;
                match v["return"]["status"].as_str() {
                    Some("completed") => break,
                    Some("failed" | "cancelled") => {
                        return Err(MeasureError::Qemu(format!("migrate to a file: {v}")))
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = q.call(r#"{"execute":"quit"}"#);
            Ok(())
        })();
        vm.kill();
        r?;
        self.state = Some(state);
        Ok(())
    }

    /// Restores the saved guest, sends `line` to its shell and waits for the
    /// line `expect`; ms from the spawn to it and to the process's exit.
    pub fn run(&self, line: &str, expect: &str) -> Result<(f64, f64), MeasureError> {
        let state = self
            .state
            .as_deref()
            .ok_or(MeasureError::Missing("no saved QEMU state"))?;
        let t0 = Instant::now();
        let mut vm = self.spawn(Some(state))?;
        let r = (|| {
            // Input sent while the state loads is lost with the UART's old
            // state: the command goes once the guest runs.
            let mut q = vm.qmp()?;
            let mut dog = Watchdog::new(ANSWER_CPU);
            loop {
                let v = q.call(r#"{"execute":"query-status"}"#)?;
                if v["return"]["status"] == "running" {
                    break;
                }
                vm.judge(&mut dog)?;
                std::thread::sleep(Duration::from_millis(1));
            }
            vm.send(line)?;
            vm.wait_line(expect, ANSWER_CPU)
        })();
        let first = t0.elapsed();
        vm.kill();
        r?;
        Ok((ms(first), ms(t0.elapsed())))
    }
}

impl Running {
    /// Writes `line` to the guest's shell.
    fn send(&mut self, line: &str) -> Result<(), MeasureError> {
        self.child
            .stdin
            .as_mut()
            .ok_or(MeasureError::Missing("no stdin"))?
            .write_all(format!("{line}\n").as_bytes())
            .map_err(MeasureError::io("writing to the serial line"))
    }

    /// Waits (a few seconds at most) for QEMU's threads to go quiet: the
    /// guest halted, its shell blocked on the serial line.
    fn settle(&self) {
        let threads = Threads::all_of(self.child.id());
        let mut last = threads.sample().busy_ns;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = threads.sample().busy_ns;
            if now.saturating_sub(last) < 5_000_000 {
                return;
            }
            last = now;
        }
    }

    /// Connects to QMP (QEMU creates the socket as it starts).
    fn qmp(&mut self) -> Result<Qmp, MeasureError> {
        let mut dog = Watchdog::new(ANSWER_CPU);
        let stream = loop {
            match UnixStream::connect(&self.qmp) {
                Ok(s) => break s,
                Err(_) => {
                    self.judge(&mut dog)?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        // QEMU answers at once or has died; a wall-clock bound on one
        // socket read only catches a wedged QEMU.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(MeasureError::io("QMP socket"))?;
        let mut q = Qmp {
            r: BufReader::new(stream.try_clone().map_err(MeasureError::io("QMP socket"))?),
            w: stream,
        };
        q.read()?; // the greeting
        q.call(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Fails when QEMU is gone or its guest sits idle or spins.
    fn judge(&mut self, dog: &mut Watchdog) -> Result<(), MeasureError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(MeasureError::Failed {
                status,
                stderr: err.trim().to_string(),
            });
        }
        let a = Threads::all_of(self.child.id()).sample();
        match dog.observe(Instant::now(), a) {
            Verdict::Hung(why) => Err(MeasureError::Qemu(format!("the guest stopped ({why})"))),
            _ => Ok(()),
        }
    }

    /// Reads the serial line until a line equal to `want`; bounded by the
    /// guest's progress.
    fn wait_line(&mut self, want: &str, cpu: Duration) -> Result<(), MeasureError> {
        let mut dog = Watchdog::new(cpu);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.out);
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.pending.drain(..=end).collect();
                if String::from_utf8_lossy(&l).trim_end() == want {
                    return Ok(());
                }
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n > 0 {
                let mut b = [0u8; 4096];
                let got = self
                    .out
                    .read(&mut b)
                    .map_err(MeasureError::io("reading the serial line"))?;
                if got == 0 {
                    self.judge(&mut dog)?;
                    return Err(MeasureError::Qemu("QEMU closed its serial line".into()));
                }
                if self.pending.len() < 1 << 20 {
                    self.pending.extend_from_slice(&b[..got]);
                }
            } else {
                self.judge(&mut dog)?;
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn read(&mut self) -> Result<serde_json::Value, MeasureError> {
        let mut l = String::new();
        let n = (&mut self.r)
            .take(1 << 20)
            .read_line(&mut l)
            .map_err(MeasureError::io("reading QMP"))?;
        if n == 0 {
            return Err(MeasureError::Qemu("QEMU closed its QMP socket".into()));
        }
        serde_json::from_str(&l).map_err(|e| MeasureError::Qemu(format!("QMP: {e}")))
    }

    /// Sends one command and returns its answer (events are skipped).
    fn call(&mut self, cmd: &str) -> Result<serde_json::Value, MeasureError> {
        self.w
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(MeasureError::io("writing QMP"))?;
        loop {
            let v = self.read()?;
            if v.get("return").is_some() {
                return Ok(v);
            }
            if let Some(e) = v.get("error") {
                return Err(MeasureError::Qemu(format!("QMP {cmd}: {e}")));
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `p` in single quotes for `sh` (QEMU runs `exec:` URIs through it).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_the_disk_window_and_sh_as_init() {
        let q = Qemu::new("qemu".into(), "k".into(), "d".into(), "/tmp".into());
        let c = q.cmdline();
        assert!(c.contains("virtio_mmio.device=512@0xfeb00e00:12"), "{c}");
        assert!(
            c.contains("console=ttyS0") && !c.contains("8250.nr_uarts=0"),
            "{c}"
        );
        assert!(c.contains("clocksource=kvm-clock"), "{c}");
        assert!(
            c.ends_with(&format!(
                "init=/bin/sh -- -c \"stty -echo; export PS1=; echo {UP}; exec sh\""
            )),
            "{c}"
        );
    }

    #[test]
    fn paths_are_quoted_for_sh() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
    }
}
