//! `vmc build`.

use anyhow::{bail, Context, Result};
use vmc::cli::BuildArgs;
use vmc::image::Reference;
use vmc::runtime::Mode;
use vmc::runtime::{self, Resources};
use vmc::vmm;

use super::*;

pub(crate) fn build(a: BuildArgs) -> Result<i32> {
    vmm::check_memory(a.memory)?;
    if !a.context.is_dir() {
        bail!(
            "build context {}: no such directory (give the directory holding your Dockerfile, e.g. .)",
            a.context.display()
        );
    }
    // Tags are checked before any work is done.
    for t in &a.tags {
        Reference::parse(t).with_context(|| format!("-t {t}"))?;
    }
    let mut build_args = Vec::new();
    for b in &a.build_args {
        match b.split_once('=') {
            Some((k, v)) => build_args.push((k.to_string(), v.to_string())),
            None => {
                if let Ok(v) = std::env::var(b) {
                    build_args.push((b.clone(), v));
                }
            }
        }
    }
    if a.mode == Mode::Ns {
        // Without root the build's RUN steps run in a user namespace, which
        // this process enters now, before any thread exists.
        runtime::ns::user_namespace()?;
    }
    let store = store()?;
    let o = vmc::build::BuildOptions {
        context: a.context.clone(),
        dockerfile: a.file.clone(),
        tags: a.tags.clone(),
        build_args,
        no_cache: a.no_cache,
        mode: a.mode,
        kernel: a.kernel.clone(),
        resources: Resources {
            cpus: a.cpus,
            memory: a.memory,
        },
        snapshots: runtime::snapshots_dir(),
        network: network_for(a.mode == Mode::Ns, a.network.as_deref())?,
        extra_hosts: extra_hosts(&a.add_host)?,
        // Without root there is no cgroup to limit a namespace build with
        // (its user namespace bounds what it may touch, not what it uses).
        ns_limits: if vmc::host::rootless() {
            runtime::NsLimits::default()
        } else {
            runtime::NsLimits {
                memory: Some(a.memory),
                cpus: Some(a.cpus),
                pids: Some(a.pids_limit),
            }
        },
    };
    let mut sink: Box<dyn std::io::Write> = if a.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    };
    match vmc::build::build(&store, &o, &mut sink) {
        Ok(img) => {
            if a.quiet {
                println!("{}", img.id());
            }
            runtime::microvm::ready_for_new_image(&img);
            Ok(0)
        }
        Err(e) => {
            eprintln!("vmc: build failed: {}", vmc::host::error_line(&e));
            Ok(e.exit_code())
        }
    }
}
