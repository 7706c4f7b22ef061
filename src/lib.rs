//! vmc: Docker's workflow with a microVM boundary.
//!
//! Data flows one way: CLI -> runtime -> (vmm + devices) -> guest. Nothing
//! below `runtime` knows about the CLI. The VMM and its devices are a crate
//! of their own, `vmc-vmm` (re-exported here as [`vmm`], [`devices`] and
//! [`uds`]): it cannot name images or containers, as Cargo refuses a
//! dependency cycle. Under it are `vmc-proto` (the agent protocol's types
//! and framing) and `vmc-spawn` (the confined process start shared by the
//! guest agent and namespace mode); the agent itself, `vmc-guest`, is a
//! binary over those two. Within this crate the
//! layers, from the bottom up, are [`LAYERS`]; a test fails on a `crate::`
//! path that points up.

pub mod assets;
pub mod bench;
pub mod build;
pub mod cli;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod image;
pub mod oci;
pub mod runtime;
pub mod template;
#[doc(hidden)]
pub mod testing;

pub use vmc_vmm as vmm;
pub use vmc_vmm::{devices, uds};

/// The modules from the bottom up: each uses only modules of its own layer
/// or below (ARCHITECTURE.md).
pub const LAYERS: &[&[&str]] = &[
    &["host", "testing", "assets", "template"],
    &["disk"],
    &["image"],
    &["runtime"],
    &["build", "oci"],
    &["bench"],
    &["cli", "fuzzing"],
];

#[cfg(test)]
mod layering {
    use super::LAYERS;
    use std::path::Path;

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    fn sources(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                sources(&e.unwrap().path(), out);
            }
        } else if p.is_file() && p.extension().is_some_and(|e| e == "rs") {
            out.push(p.to_path_buf());
        }
    }

    /// Every `crate::MODULE` path in a module's files names a module of its
    /// layer or below.
    #[test]
    fn no_module_uses_one_above_it() {
        // The run-time value: a test binary reused from a clone elsewhere (a
        // shared target directory) still reads this checkout's sources.
        let root = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        let src = root.join("src");
        let mut upward = Vec::new();
        for module in LAYERS.iter().flat_map(|l| l.iter()) {
            let own = layer(module).unwrap();
            let mut files = Vec::new();
            sources(&src.join(module), &mut files);
            sources(&src.join(format!("{module}.rs")), &mut files);
            assert!(!files.is_empty(), "no sources for module {module}");
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap();
                for (i, line) in text.lines().enumerate() {
                    for (at, _) in line.match_indices("crate::") {
                        let used: String = line[at + 7..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if layer(&used).is_some_and(|l| l > own) {
                            upward.push(format!(
                                "{}:{}: {module} uses {used}",
                                f.strip_prefix(&src).unwrap().display(),
                                i + 1
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            upward.is_empty(),
            "arrows pointing up:\n{}",
            upward.join("\n")
        );
        // The other crates of the workspace and the vmc crates each may
        // use: Cargo refuses a cycle, this keeps them from growing sideways
        // (the VMM knows no protocol, the protocol no system calls).
        let allowed: &[(&str, &[&str])] = &[
            ("proto", &[]),
            ("spawn", &["vmc-proto"]),
            ("vmm", &[]),
            ("guest", &["vmc-proto", "vmc-spawn"]),
        ];
        for (krate, ok) in allowed {
            let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
            for l in manifest.lines().map(str::trim_start) {
                let name = l.split([' ', '=']).next().unwrap_or("");
                if name == "vmc" || name.starts_with("vmc-") {
                    assert!(ok.contains(&name), "{krate}/Cargo.toml depends on {name}");
                }
            }
        }
        // Every module of the crate is placed in a layer.
        for e in std::fs::read_dir(&src).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let module = name.trim_end_matches(".rs");
            // main.rs and cmd/ are the binary, over every layer.
            if !matches!(module, "lib" | "main" | "cmd") {
                assert!(layer(module).is_some(), "module {module} is in no layer");
            }
        }
    }
}
