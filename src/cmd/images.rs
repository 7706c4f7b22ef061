//! Image verbs: images, inspect, tag, rmi, import, pull, load, save.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use vmc::cli::{
    ImagesArgs, ImportArgs, InspectArgs, LoadArgs, PullArgs, RmiArgs, SaveArgs, TagArgs,
};
use vmc::image::{self, Reference};
use vmc::runtime;
use vmc::runtime::state::{self as cstate, Status};

use super::*;

pub(crate) fn images(a: ImagesArgs) -> Result<i32> {
    let store = store()?;
    let list = store.images()?;
    if a.quiet {
        for img in &list {
            println!("{}", img.short_id());
        }
        return Ok(0);
    }
    println!(
        "{:<40} {:<20} {:<14} {:<22} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"
    );
    for img in &list {
        let created = img.config.created().clone().unwrap_or_default();
        let size = format!("{:.1}MB", img.size() as f64 / 1e6);
        let names: Vec<(String, String)> = if img.names.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            img.names
                .iter()
                .map(|n| match n.rsplit_once(':') {
                    Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
                    _ => (n.clone(), "<none>".into()),
                })
                .collect()
        };
        for (repo, tag) in names {
            println!(
                "{repo:<40} {tag:<20} {:<14} {created:<22} {size:>10}",
                img.short_id()
            );
        }
    }
    Ok(0)
}

pub(crate) fn inspect(a: InspectArgs) -> Result<i32> {
    let store = store()?;
    let mut out = Vec::new();
    for name in &a.images {
        // A container by that name or id first, as docker inspect does.
        let container = match a.kind.as_deref() {
            Some("image") => None,
            _ => cstate::resolve(name).ok(),
        };
        if a.kind.as_deref() == Some("container") && container.is_none() {
            bail!("no such container: {name}");
        }
        if let Some(mut c) = container {
            c.refresh();
            let s = &c.state;
            let cfg = c.config();
            let time = |t: Option<u64>| t.map(|t| image::store::rfc3339(t as i64));
            out.push(serde_json::json!({
                "Id": s.id,
                "Name": s.name,
                "Created": image::store::rfc3339(s.created as i64),
                "Image": s.image,
                "ImageId": cfg.as_ref().and_then(|c| c.image_id.clone()),
                "RestartCount": s.restart_count,
                "Mode": s.mode,
                "State": {
                    "Status": if runtime::pause::is_paused(&c) {
                        serde_json::json!("paused")
                    } else {
                        serde_json::json!(s.status)
                    },
                    "Paused": runtime::pause::is_paused(&c),
                    "Health": runtime::health::read(&c.dir),
                    "Running": s.status.is_live(),
                    "Restarting": s.status == Status::Restarting,
                    "Pid": s.pid,
                    "ExitCode": s.exit_code,
                    "StartedAt": time(s.started),
                    "FinishedAt": time(s.finished),
                },
                "Config": cfg.as_ref().map(|c| serde_json::json!({
                    "Cmd": c.process.args,
                    "Env": c.process.env,
                    "WorkingDir": c.process.cwd,
                    "User": c.process.user,
                    "Hostname": c.hostname,
                    "StopSignal": s.stop_signal,
                    "Image": s.image,
                    "Labels": s.labels,
                    "Tty": c.process.tty.is_some(),
                    "Healthcheck": c.healthcheck,
                })),
                // Docker's places for what `run` was told: ports (while
                // running, as Docker shows them), --rm, the network.
                "HostConfig": cfg.as_ref().map(|c| serde_json::json!({
                    "PortBindings": port_bindings(&c.ports),
                    "AutoRemove": s.auto_remove,
                    "RestartPolicy": {
                        "Name": c.restart.name(),
                        "MaximumRetryCount": c.restart.max_retries(),
                    },
                    "ReadonlyRootfs": c.read_only,
                    "Binds": c.mounts.iter().filter_map(|m| match &m.source {
                        runtime::volume::MountSource::Bind { source } => Some(format!(
                            "{}:{}{}", source.display(), m.target, if m.readonly { ":ro" } else { "" })),
                        runtime::volume::MountSource::Volume { name, anonymous: false, .. } => Some(format!(
                            "{name}:{}{}", m.target, if m.readonly { ":ro" } else { "" })),
                        _ => None,
                    }).collect::<Vec<_>>(),
                    "NetworkMode": c.network,
                })),
                "NetworkSettings": {
                    "Ports": if s.status == Status::Running {
                        port_bindings(&cfg.as_ref().map(|c| c.ports.clone()).unwrap_or_default())
                    } else {
                        serde_json::json!({})
                    },
                },
                "Mounts": cfg.as_ref().map(|c| {
                    c.mounts.iter().map(|m| m.inspect()).collect::<Vec<_>>()
                }).unwrap_or_default(),
                "LogPath": c.log_path(),
                // A running VM's VMM: its process, ids, jail, namespaces,
                // seccomp filters and cgroups (vmc's own field).
                "VmmConfinement": (s.status == Status::Running)
                    .then(|| runtime::jail::Confinement::of_container(&c.dir))
                    .flatten(),
            }));
            continue;
        }
        let img = store.resolve(name)?;
        out.push(serde_json::json!({
            "Id": img.id(),
            "RepoTags": img.names,
            "ManifestDigest": img.manifest_digest.to_string(),
            "Created": img.config.created(),
            "Architecture": img.config.architecture().to_string(),
            "Os": img.config.os().to_string(),
            "Size": img.size(),
            // With Docker's Healthcheck and OnBuild, beside the OCI fields.
            "Config": image_config_json(&img),
            "RootFS": img.config.rootfs(),
            "History": img.config.history(),
        }));
    }
    match &a.format {
        Some(f) => print_formatted(f, &out, &[])?,
        None => println!("{}", serde_json::to_string_pretty(&out)?),
    }
    Ok(0)
}

/// Published ports as Docker's inspect shows them:
/// `{"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}`.
/// An image's `Config` as Docker shows it: the OCI fields, and the
/// Healthcheck and OnBuild kept beside them.
fn image_config_json(img: &image::StoredImage) -> serde_json::Value {
    let mut v = serde_json::json!({ "config": img.config.config() });
    img.extras.add_to(&mut v);
    v["config"].take()
}

fn port_bindings(ports: &[runtime::ports::PortMap]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for p in ports {
        let e = m
            .entry(format!("{}/{}", p.container_port, p.proto))
            .or_insert_with(|| serde_json::json!([]));
        if let Some(a) = e.as_array_mut() {
            a.push(serde_json::json!({
                "HostIp": p.host_ip.to_string(),
                "HostPort": p.host_port.to_string(),
            }));
        }
    }
    serde_json::Value::Object(m)
}

pub(crate) fn tag(a: TagArgs) -> Result<i32> {
    let store = store()?;
    let img = store.resolve(&a.source)?;
    let target = Reference::parse(&a.target)?;
    let desc = oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::ImageManifest,
        img.manifest_size,
        img.manifest_digest.clone(),
    );
    store.tag(&target.store_name(), &desc)?;
    Ok(0)
}

/// Image ids used by containers whose state is still on disk.
pub(crate) fn images_in_use() -> Vec<String> {
    let dir = runtime::vmc_home().join("containers");
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(id) = std::fs::read_to_string(e.path().join("image-id")) {
                ids.push(id.trim().to_string());
            }
        }
    }
    ids
}

pub(crate) fn rmi(a: RmiArgs) -> Result<i32> {
    let store = store()?;
    let in_use = images_in_use();
    for name in &a.images {
        let img = store.resolve(name)?;
        // A name removes that name only, like docker rmi, unless it is the last.
        let by_name = Reference::parse(name)
            .ok()
            .map(|r| r.store_name())
            .filter(|n| img.names.contains(n));
        let last = img.names.len() <= 1 || by_name.is_none();
        if last && !a.force && in_use.contains(&img.id()) {
            bail!(
                "image {name} is used by a container; remove the container first or use vmc rmi -f"
            );
        }
        match by_name {
            Some(n) if img.names.len() > 1 => {
                store.untag(&n)?;
                println!("Untagged: {n}");
            }
            _ => {
                for n in &img.names {
                    println!("Untagged: {n}");
                }
                store.remove_manifest(&img.manifest_digest)?;
                println!("Deleted: {}", img.id());
            }
        }
    }
    store.gc()?;
    Ok(0)
}

pub(crate) fn import(a: ImportArgs) -> Result<i32> {
    let store = store()?;
    let name = match &a.name {
        Some(n) => Some(Reference::parse(n)?.store_name()),
        None => None,
    };
    let img = image::import::import_rootfs(&store, &a.file, name.as_deref())?;
    println!("{}", img.id());
    runtime::microvm::ready_for_new_image(&img);
    Ok(0)
}

pub(crate) fn pull(a: PullArgs) -> Result<i32> {
    let reference = Reference::parse(&a.reference)?;
    let store = store()?;
    let opts = image::pull::PullOptions {
        insecure: a.insecure,
        // Bars only for a person watching; logs and pipes get plain lines.
        progress: !a.quiet && std::io::stderr().is_terminal(),
    };
    let mut out: Box<dyn std::io::Write> = if a.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    };
    let pulled = image::pull::pull(&store, &reference, &opts, &mut out)?;
    if a.quiet {
        println!("{}", pulled.image.id());
    }
    runtime::microvm::ready_for_new_image(&pulled.image);
    Ok(0)
}

pub(crate) fn load(a: LoadArgs) -> Result<i32> {
    let store = store()?;
    let loaded = match &a.input {
        Some(input) => image::archive::load(&store, input)?,
        None => {
            // The loader reads the archive twice (its index, then its
            // blobs): stdin is copied to an unnamed file first.
            if std::io::stdin().is_terminal() {
                bail!("no archive on stdin: give -i FILE or redirect stdin (vmc load < FILE)");
            }
            let dir = tempfile::tempdir_in(runtime::vmc_home())
                .context("a temporary directory for the archive on stdin")?;
            let path = dir.path().join("stdin.tar");
            let mut tmp = std::fs::File::create_new(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::copy(&mut std::io::stdin().lock(), &mut tmp)
                .context("reading the archive from stdin")?;
            let loaded = image::archive::load(&store, &path);
            drop(dir);
            loaded?
        }
    };
    // One background maker per command: the last image of the archive.
    if let Some(img) = loaded.last() {
        runtime::microvm::ready_for_new_image(img);
    }
    for img in &loaded {
        if a.quiet {
            println!("{}", img.id());
        } else if img.names.is_empty() {
            println!("Loaded image ID: {}", img.id());
        } else {
            for n in &img.names {
                println!("Loaded image: {n}");
            }
        }
    }
    Ok(0)
}

pub(crate) fn save(a: SaveArgs) -> Result<i32> {
    let store = store()?;
    match &a.output {
        Some(out) => image::archive::save(&store, &a.images, out)?,
        None => {
            if std::io::stdout().is_terminal() {
                bail!(
                    "refusing to write an archive to a terminal: give -o FILE or redirect stdout"
                );
            }
            image::archive::save_to(&store, &a.images, std::io::stdout().lock())?
        }
    }
    Ok(0)
}
