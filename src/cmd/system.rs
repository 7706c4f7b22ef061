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
