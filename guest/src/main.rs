//! vmc-guest: PID 1 inside a vmc microVM.
//!
//! It mounts the pseudo filesystems, then serves the host over vsock: each
//! connection assembles the container root (once) and runs one process, with
//! its stdio and exit status carried over the connection. It reaps every
//! process in the VM and reboots the VM when the host's main process exits.

mod copy;
mod init;
mod laps;
mod layers;
mod netcfg;
mod procs;
mod reaper;
mod rootfs;
mod session;
#[cfg(test)]
mod testns;
mod tinyinit;
mod volumes;
mod vsock;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmc_proto::AGENT_PORT;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.first().is_some_and(|a| tinyinit::called_as_init(a)) {
        tinyinit::main(args);
    }
    if std::process::id() != 1 {
        eprintln!("vmc-guest: this is the init of a vmc microVM; it only runs as PID 1 there");
        std::process::exit(2);
    }
    reaper::block_sigchld();
    if let Err(e) = init::early_init() {
        eprintln!("vmc-guest: early init failed: {e}");
    }
    let _ = init::set_hostname("vmc");
    std::thread::spawn(|| reaper::run());

    let listener = loop {
        match vsock::VsockListener::bind(AGENT_PORT) {
            Ok(l) => break l,
            Err(e) => {
                eprintln!("vmc-guest: vsock port {AGENT_PORT}: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    };
    let workers = Workers::new();
    loop {
        match listener.accept() {
            Ok(conn) => workers.serve(conn, std::time::Instant::now()),
            Err(e) => {
                eprintln!("vmc-guest: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// The threads that serve connections. One waits from the start (so a
/// snapshot holds it: a restored VM's first connection costs no thread
/// creation, which is tens of milliseconds of guest-kernel work under
/// software virtualisation); a thread whose session ends waits for the
/// next; one more is made only when a connection finds none waiting.
struct Workers {
    jobs: std::sync::mpsc::Sender<(vsock::VsockStream, std::time::Instant)>,
    queue: Arc<Mutex<std::sync::mpsc::Receiver<(vsock::VsockStream, std::time::Instant)>>>,
    idle: Arc<AtomicUsize>,
}

impl Workers {
    fn new() -> Workers {
        let (jobs, queue) = std::sync::mpsc::channel();
        let w = Workers {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::new(AtomicUsize::new(0)),
        };
        w.add();
        w
    }

    fn add(&self) {
        let queue = self.queue.clone();
        let idle = self.idle.clone();
        idle.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || loop {
            let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok((conn, accepted)) = job else { return };
            idle.fetch_sub(1, Ordering::SeqCst);
            session::serve(conn, accepted);
            idle.fetch_add(1, Ordering::SeqCst);
        });
    }

    /// Hands `conn` to a waiting thread (made first if none waits).
    fn serve(&self, conn: vsock::VsockStream, accepted: std::time::Instant) {
        if self.idle.load(Ordering::SeqCst) == 0 {
            self.add();
        }
        // The receiver lives as long as the workers, which never all end.
        let _ = self.jobs.send((conn, accepted));
    }
}
