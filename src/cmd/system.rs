//! `vmc system prune` and `vmc info`.

use anyhow::{Context, Result};
use vmc::runtime;
use vmc::{assets, disk, vmm};

pub(crate) fn prune(all: bool) -> Result<i32> {
    let dir = runtime::snapshots_dir();
    let cache = runtime::vmc_home().join("cache");
    // What a run would use now; without a kernel or guest agent, nothing.
    let kernel = assets::kernel(None).ok();
    let agent = assets::guest_binary()
        .ok()
        .and_then(|g| disk::agent_disk_path(&g, &cache).ok());
    let current = match (&kernel, &agent, all) {
        (Some(k), Some(a), false) => Some(runtime::snapshot::SnapshotSpec {
            kernel: k,
            agent_disk: a,
            cpus: 1,
            memory: 0,
            backend: vmm::Backend::host(),
        }),
        _ => None,
    };
    let (n, bytes) = runtime::snapshot::prune(&dir, current.as_ref())
        .with_context(|| format!("pruning {}", dir.display()))?;
    let mut disks = 0;
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let in_use = current.is_some() && agent.as_ref().is_some_and(|a| *a == e.path())
                || building_agent(&name);
            if (name.starts_with("agent-") || name.starts_with(".agent-"))
                && !in_use
                && std::fs::remove_file(e.path())
                    .or_else(|_| std::fs::remove_dir_all(e.path()))
                    .is_ok()
            {
                disks += 1;
            }
        }
    }
    println!(
        "removed {n} snapshot(s) ({:.1} MiB) and {disks} cached agent disk(s)",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(0)
}

/// Whether `name` in the cache is a guest-agent disk a live process is
/// making now (`.agent-DIGEST.PID.RAND[.erofs]`, see `disk::agent_disk`).
pub(crate) fn building_agent(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(".agent-") else {
        return false;
    };
    rest.split('.')
        .nth(1)
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

pub(crate) fn info() -> Result<i32> {
    println!("vmc {}", env!("CARGO_PKG_VERSION"));
    println!("backend: {}", vmm::Backend::host());
    match vmm::open_kvm() {
        Ok(kvm) => println!(
            "kvm: API {}, up to {} vCPUs",
            kvm.get_api_version(),
            kvm.get_max_vcpus()
        ),
        Err(e) => println!("kvm: unavailable ({e})"),
    }
    let extra = vmm::Backend::host().guest_cmdline();
    if !extra.is_empty() {
        println!("guest workarounds: {extra}");
    }
    match assets::kernel(None) {
        Ok(p) => println!("kernel: {}", p.display()),
        Err(e) => println!("kernel: missing ({e})"),
    }
    match assets::guest_binary() {
        Ok(p) => println!("guest agent: {}", p.display()),
        Err(e) => println!("guest agent: missing ({e})"),
    }
    match runtime::net::program("passt") {
        Some(p) => println!("passt: {}", p.display()),
        None => println!("passt: missing (apt-get install passt; until then --network none)"),
    }
    println!("vmm: {}", runtime::jail::describe());
    println!("state: {}", runtime::vmc_home().display());
    println!("snapshots: {}", runtime::snapshots_dir().display());
    Ok(0)
}

/// `vmc system inspect-snapshot`: a readable account of a snapshot.
pub(crate) fn inspect_snapshot(dir: &std::path::Path) -> Result<i32> {
    print!(
        "{}",
        vmm::snapshot::report::report(dir)
            .with_context(|| format!("reading the snapshot {}", dir.display()))?
    );
    Ok(0)
}

/// `vmc version`: Docker's layout, one client (vmc is daemonless).
pub(crate) fn version(format: Option<&str>) -> Result<i32> {
    let v = serde_json::json!({
        "Client": {
            "Platform": {"Name": "vmc"},
            "Version": env!("CARGO_PKG_VERSION"),
            "Build": env!("VMC_BUILD_ID"),
            "Os": std::env::consts::OS,
            "Arch": match std::env::consts::ARCH {
                "x86_64" => "amd64",
                a => a,
            },
            "Backend": vmm::Backend::host().to_string(),
        }
    });
    if let Some(f) = format {
        super::print_formatted(f, &[v], &[])?;
        return Ok(0);
    }
    let c = &v["Client"];
    println!("Client: vmc");
    for (label, key) in [
        ("Version", "Version"),
        ("Build", "Build"),
        ("OS/Arch", ""),
        ("Backend", "Backend"),
    ] {
        let value = match key {
            "" => format!(
                "{}/{}",
                c["Os"].as_str().unwrap_or_default(),
                c["Arch"].as_str().unwrap_or_default()
            ),
            k => c[k].as_str().unwrap_or_default().to_string(),
        };
        println!(" {:<12}{value}", format!("{label}:"));
    }
    Ok(0)
}

/// Bytes a directory tree takes on disk (allocated blocks: sparse disks
/// count what they hold), not following symlinks.
pub(crate) fn disk_usage(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let mut n = md.blocks() * 512;
    if md.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            n += rd.flatten().map(|e| disk_usage(&e.path())).sum::<u64>();
        }
    }
    n
}

/// Sizes as Docker prints them (`16.43MB`, `0B`).
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + UNITS[u]
    }
}

/// `vmc system df`: Docker's table, plus vmc's warm-start snapshots.
pub(crate) fn df() -> Result<i32> {
    use vmc::runtime::state::{self as cstate, Status};
    let store = super::store()?;
    let images = store.images()?;
    let mut containers = cstate::list();
    for c in &mut containers {
        c.refresh();
    }
    let used: std::collections::BTreeSet<String> = containers
        .iter()
        .filter_map(|c| c.config().and_then(|cfg| cfg.image_id))
        .collect();
    let image_size: u64 = images.iter().map(|i| i.size()).sum();
    let image_free: u64 = images
        .iter()
        .filter(|i| !used.contains(&i.id()))
        .map(|i| i.size())
        .sum();
    let sizes: Vec<(bool, u64)> = containers
        .iter()
        .map(|c| (c.state.status == Status::Running, disk_usage(&c.dir)))
        .collect();
    let ctr_size: u64 = sizes.iter().map(|s| s.1).sum();
    let ctr_free: u64 = sizes.iter().filter(|s| !s.0).map(|s| s.1).sum();
    let cache = disk_usage(&runtime::vmc_home().join("cache"));
    let volumes: Vec<(bool, u64)> = runtime::volume::list()
        .iter()
        .map(|v| {
            (
                !runtime::volume::users(&v.name).is_empty(),
                disk_usage(&runtime::volume::data_dir(&v.name)),
            )
        })
        .collect();
    let vol_size: u64 = volumes.iter().map(|v| v.1).sum();
    let vol_free: u64 = volumes.iter().filter(|v| !v.0).map(|v| v.1).sum();
    let snaps = disk_usage(&runtime::snapshots_dir());
    let pct = |part: u64, all: u64| {
        (part * 100)
            .checked_div(all)
            .map_or_else(String::new, |p| format!(" ({p}%)"))
    };
    let rows = [
        ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"].map(String::from),
        [
            "Images".into(),
            images.len().to_string(),
            images
                .iter()
                .filter(|i| used.contains(&i.id()))
                .count()
                .to_string(),
            human(image_size),
            format!("{}{}", human(image_free), pct(image_free, image_size)),
        ],
        [
            "Containers".into(),
            containers.len().to_string(),
            sizes.iter().filter(|s| s.0).count().to_string(),
            human(ctr_size),
            format!("{}{}", human(ctr_free), pct(ctr_free, ctr_size)),
        ],
        [
            "Local Volumes".into(),
            volumes.len().to_string(),
            volumes.iter().filter(|v| v.0).count().to_string(),
            human(vol_size),
            format!("{}{}", human(vol_free), pct(vol_free, vol_size)),
        ],
        [
            "Build Cache".into(),
            "1".into(),
            "0".into(),
            human(cache),
            human(cache),
        ],
        [
            "Snapshots".into(),
            "1".into(),
            "0".into(),
            human(snaps),
            human(snaps),
        ],
    ];
    super::print_table(&rows);
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_print_as_docker_prints_them() {
        assert_eq!(super::human(0), "0B");
        assert_eq!(super::human(999), "999B");
        assert_eq!(super::human(16_430_000), "16.43MB");
        assert_eq!(super::human(1_000_000), "1MB");
        assert_eq!(super::human(2_500_000_000), "2.5GB");
    }
}
