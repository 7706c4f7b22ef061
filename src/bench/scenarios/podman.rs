//! The `podman` scenario (run only when named): `podman run --rm` of the
//! bench's image under Debian's podman with conmon, each runtime podman can
//! be given as a column: crun and runc (podman's own, where installed) and
//! `vmc-runtime` in namespace mode and in a microVM. What is measured is
//! the whole command, as a user of podman waits for it: the overhead the
//! runtime adds under the same engine. podman keeps its store and state in
//! the bench's directory; the image comes from a `vmc save` archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{row, Bench, Metric};
use crate::bench::report::Summary;
use crate::bench::BenchError;

const PODMAN_RUN: Metric = ("podman run --rm IMAGE true, whole command", "ms", true);

/// One column: its name, the runtime binary, vmc's mode (annotation).
struct Column {
    name: &'static str,
    runtime: PathBuf,
    mode: Option<&'static str>,
}

impl Bench {
    pub(super) fn podman(&mut self) -> Result<(), BenchError> {
        self.workload(
            "podman",
            "`podman run --rm --network none IMAGE true` under podman with conmon (its store: vfs, cgroupfs), the runtime given by --runtime: podman's crun and runc, and vmc-runtime (annotation io.vmc.mode=ns or vm)",
        );
        if crate::runtime::find_on_path("podman").is_none() {
            self.note_once(
                "podman: not installed (make deps installs it); scenario skipped".into(),
            );
            return Ok(());
        }
        let dir = self.env.tmp.join("podman");
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Run(format!("{}: {e}", dir.display())))?;
        let link = dir.join("vmc-runtime");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&self.env.exe, &link)
            .map_err(|e| BenchError::Run(format!("{}: {e}", link.display())))?;
        self.status("podman: loading the image from a vmc save archive");
        let archive = dir.join("image.tar");
        let saved = Command::new(&self.env.exe)
            .args(["save", "-o"])
            .arg(&archive)
            .arg(&self.env.image)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BenchError::Run(format!("vmc save: {e}")))?;
        if !saved.status.success() {
            return Err(BenchError::Run(format!(
                "vmc save {}: {}",
                self.env.image,
                String::from_utf8_lossy(&saved.stderr).trim()
            )));
        }
        let loaded = podman(&dir, &link)
            .args(["load", "-i"])
            .arg(&archive)
            .output()
            .map_err(|e| BenchError::Run(format!("podman load: {e}")))?;
        if !loaded.status.success() {
            return Err(BenchError::Run(format!(
                "podman load: {}",
                String::from_utf8_lossy(&loaded.stderr).trim()
            )));
        }
        let mut columns = Vec::new();
        for name in ["crun", "runc"] {
            match crate::runtime::find_on_path(name) {
                Some(runtime) => columns.push(Column {
                    name: if name == "crun" {
                        "podman+crun"
                    } else {
                        "podman+runc"
                    },
                    runtime,
                    mode: None,
                }),
                None => self.note_once(format!("podman: {name} is not installed")),
            }
        }
        for (name, mode) in [("podman+vmc ns", "ns"), ("podman+vmc vm", "vm")] {
            columns.push(Column {
                name,
                runtime: link.clone(),
                mode: Some(mode),
            });
        }
        let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        // Run by run in turn, as every scenario: a warm-up first (the
        // microVM's makes its warm-start snapshot when there is none).
        for i in 0..self.warmup.max(1) + self.runs {
            let mut failed = Vec::new();
            for (n, c) in columns.iter().enumerate() {
                self.status(&format!("podman: {} run {}", c.name, i + 1));
                match run_once(&dir, c, &self.env.image) {
                    Ok(ms) if i >= self.warmup.max(1) => {
                        samples.entry(c.name.to_string()).or_default().push(ms)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.note_once(format!("podman: {} failed: {e}", c.name));
                        failed.push(n);
                    }
                }
            }
            for n in failed.into_iter().rev() {
                samples.remove(columns[n].name);
                columns.remove(n);
            }
        }
        let summaries = samples
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, Summary::of(&v)))
            .collect();
        self.rows.push(row("podman", PODMAN_RUN, summaries));
        Ok(())
    }
}

/// podman with its store and state under `dir`.
fn podman(dir: &Path, runtime: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ])
        .arg("--runtime")
        .arg(runtime)
        .stdin(Stdio::null());
    c
}

/// One `podman run --rm`, timed from spawn to exit (ms).
fn run_once(dir: &Path, c: &Column, image: &str) -> Result<f64, String> {
    let mut cmd = podman(dir, &c.runtime);
    // The host's open-files hard limit may be below podman's default.
    cmd.args([
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
    ]);
    if let Some(m) = c.mode {
        cmd.args(["--annotation", &format!("io.vmc.mode={m}")]);
    }
    cmd.args([image, "true"]);
    let t0 = Instant::now();
    let o = cmd.output().map_err(|e| e.to_string())?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(err
            .lines()
            .last()
            .unwrap_or("no message")
            .trim()
            .to_string());
    }
    Ok(ms)
}
