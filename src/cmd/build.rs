//! `vmc build`.

use anyhow::{bail, Context, Result};
use vmc::cli::BuildArgs;
use vmc::image::Reference;
use vmc::runtime::Mode;
use vmc::runtime::{self, Resources};
use vmc::vmm;

use super::*;

pub(crate) fn build(mut a: BuildArgs) -> Result<i32> {
    vmm::check_memory(a.memory)?;
    let stdin_file = a.file.as_deref() == Some(std::path::Path::new("-"));
    // `vmc build - < Dockerfile`: no context, the Dockerfile on stdin (an
    // empty directory stands for the context).
    let empty_context = if a.context.as_os_str() == "-" {
        if a.file.is_some() && !stdin_file {
            bail!("a context on stdin (-) takes no -f: the Dockerfile is what stdin holds");
        }
        let d = tempfile::tempdir().context("making an empty build context")?;
        a.context = d.path().to_path_buf();
        Some(d)
    } else {
        None
    };
    let dockerfile_text = if stdin_file || empty_context.is_some() {
        Some(
            vmc::build::context::read_dockerfile_from(std::io::stdin().lock())
                .map_err(|e| anyhow::anyhow!("cannot read the Dockerfile: {e}"))?,
        )
    } else {
        None
    };
    let mut labels = Vec::new();
    for l in &a.labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => labels.push((k.to_string(), v.to_string())),
            _ => bail!("--label {l}: expected KEY=VALUE"),
        }
    }
    let quiet = a.quiet || a.progress == "quiet";
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
        dockerfile: a.file.clone().filter(|_| !stdin_file),
        dockerfile_text,
        tags: a.tags.clone(),
        build_args,
        target: a.target.clone(),
        labels,
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
    let mut sink: Box<dyn std::io::Write> = if quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    };
    match vmc::build::build(&store, &o, &mut sink) {
        Ok(img) => {
            if quiet {
                println!("{}", img.id());
            }
            if let Some(f) = &a.iidfile {
                std::fs::write(f, img.id())
                    .with_context(|| format!("--iidfile {}", f.display()))?;
            }
            runtime::microvm::ready_for_new_image(&img);
            drop(empty_context);
            Ok(0)
        }
        Err(e) => {
            eprintln!("vmc: build failed: {}", vmc::host::error_line(&e));
            Ok(e.exit_code())
        }
    }
}
