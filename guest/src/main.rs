//! vmc-guest: PID 1 inside a vmc microVM.
//!
//! It mounts the pseudo filesystems, then serves the host over vsock: each
//! connection assembles the container root (once) and runs one process, with
//! its stdio and exit status carried over the connection. It reaps every
//! process in the VM and reboots the VM when the host's main process exits.

mod init;
mod laps;
mod layers;
mod netcfg;
mod reaper;
mod rootfs;
mod session;
#[cfg(test)]
mod testns;
mod vsock;

use vmc_proto::AGENT_PORT;

fn main() {
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
    loop {
        match listener.accept() {
            Ok(conn) => {
                let accepted = std::time::Instant::now();
                std::thread::spawn(move || session::serve(conn, accepted));
            }
            Err(e) => {
                eprintln!("vmc-guest: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
