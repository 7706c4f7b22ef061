//! `vmc volume create|ls|rm|inspect|prune`: the named and anonymous
//! volumes of the store (runtime::volume), in Docker's words.

use anyhow::Result;
use vmc::cli::VolumeCommand;
use vmc::runtime::volume;

use super::system::{disk_usage, human};
use super::{print_formatted, print_table};

pub(crate) fn volume_cmd(c: VolumeCommand) -> Result<i32> {
    match c {
        VolumeCommand::Create { labels, name } => {
            let name = name.unwrap_or_else(volume::anonymous_name);
            let labels = labels
                .iter()
                .map(|l| match l.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (l.clone(), String::new()),
                })
                .collect();
            let v = volume::create(&name, labels, false)?;
            println!("{}", v.name);
            Ok(0)
        }
        VolumeCommand::Ls { quiet, format } => {
            let all = volume::list();
            if let Some(f) = format {
                let values: Vec<_> = all.iter().map(|v| v.inspect()).collect();
                print_formatted(
                    &f,
                    &values,
                    &[("Name", "VOLUME NAME"), ("Driver", "DRIVER")],
                )?;
            } else if quiet {
                for v in &all {
                    println!("{}", v.name);
                }
            } else {
                let mut rows = vec![["DRIVER".to_string(), "VOLUME NAME".to_string()]];
                rows.extend(all.iter().map(|v| ["local".to_string(), v.name.clone()]));
                print_table(&rows);
            }
            Ok(0)
        }
        VolumeCommand::Rm { force: _, volumes } => {
            let mut failed = false;
            for name in volumes {
                match volume::remove(&name, false) {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("vmc: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
        VolumeCommand::Inspect { format, volumes } => {
            let mut out = Vec::new();
            for name in &volumes {
                out.push(volume::load(name)?.inspect());
            }
            match format {
                Some(f) => print_formatted(&f, &out, &[])?,
                None => println!("{}", serde_json::to_string_pretty(&out)?),
            }
            Ok(0)
        }
        VolumeCommand::Prune { all, force: _ } => {
            let mut freed = 0u64;
            for v in volume::list() {
                if (v.meta.anonymous || all) && volume::users(&v.name).is_empty() {
                    let size = disk_usage(&volume::data_dir(&v.name));
                    match volume::remove(&v.name, false) {
                        Ok(()) => {
                            println!("{}", v.name);
                            freed += size;
                        }
                        Err(e) => eprintln!("vmc: {e}"),
                    }
                }
            }
            println!("Total reclaimed space: {}", human(freed));
            Ok(0)
        }
    }
}

/// `vmc __fs-server`: serves a microVM's volumes until the VMM closes its
/// end of the socket.
pub(crate) fn fs_server(fd: i32, scratch: &std::path::Path, shares: &str) -> Result<i32> {
    use std::os::fd::FromRawFd;
    let shares: Vec<vmc::runtime::fsserver::Share> = serde_json::from_str(shares)?;
    if fd < 3 {
        anyhow::bail!("--fd {fd}: not a socket this process was given");
    }
    // SAFETY: the descriptor was left open for this process by its parent
    // (runtime::fsserver::start), and nothing else here owns it.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    vmc::runtime::fsserver::serve(sock, scratch, &shares)?;
    Ok(0)
}
