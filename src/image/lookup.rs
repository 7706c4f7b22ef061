//! What a process start looks up in an image's root, recorded on the host
//! when the image's disk is built: its passwd and group files and the
//! executables in its PATH directories. A microVM container's first start
//! then sends the agent its executable and identity ready-made, and the
//! guest reads no file to find them (a few dozen lookups through overlayfs,
//! tens of milliseconds of guest-kernel work under software
//! virtualisation).
//!
//! Only true while the root is the image's: a container's later starts,
//! `vmc exec` and build steps see what the container wrote, and the agent
//! looks for itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use vmc_proto::{ProcessSpec, Resolved};

/// The most entries of one PATH directory recorded; a larger one is left
/// out (the agent looks there itself).
const MAX_DIR_ENTRIES: usize = 20_000;

/// The most PATH directories indexed, the default PATH's first: an
/// image's PATH may name any number (the rest are left to the agent).
const MAX_DIRS: usize = 32;

/// The largest index file read back.
const MAX_INDEX: u64 = 32 << 20;

/// An image root's lookup index.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lookup {
    passwd: String,
    group: String,
    /// PATH directory (as PATH names it) -> names of executable files.
    executables: BTreeMap<String, BTreeSet<String>>,
}

/// Where the index of the disk `disk` is kept: beside it.
pub fn index_path(disk: &Path) -> PathBuf {
    disk.with_extension("lookup.json")
}

impl Lookup {
    /// Indexes the unpacked root `tree` for the default PATH and the
    /// `PATH=` values in `env` (the image's configuration).
    pub fn of_tree(tree: &Path, env: &[String]) -> Lookup {
        // The same bounded, in-root read the agent makes.
        let read = |name: &str| vmc_spawn::read_in_root_path(tree, name);
        let mut dirs: Vec<String> = Vec::new();
        let paths = env.iter().filter_map(|e| e.strip_prefix("PATH="));
        for p in std::iter::once(vmc_spawn::DEFAULT_PATH).chain(paths) {
            for d in p.split(':').filter(|d| d.starts_with('/')) {
                let d = d.trim_end_matches('/').to_string();
                if dirs.len() < MAX_DIRS && !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        let mut executables = BTreeMap::new();
        for d in dirs {
            match vmc_spawn::executables_in(tree, &d, MAX_DIR_ENTRIES) {
                Ok(names) => {
                    executables.insert(d, names.into_iter().collect());
                }
                // Missing: nothing to find there, recorded as empty.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    executables.insert(d, BTreeSet::new());
                }
                // Too large, or not a directory: unknown, the agent looks.
                Err(e) => log::debug!("lookup index: leaving out {d}: {e}"),
            }
        }
        Lookup {
            passwd: read("/etc/passwd"),
            group: read("/etc/group"),
            executables,
        }
    }

    /// Writes the index atomically to `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        super::store::write_atomic(path, &data)
    }

    /// The index at `path`, if there is a readable one.
    pub fn load(path: &Path) -> Option<Lookup> {
        let f = std::fs::File::open(path).ok()?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_INDEX), &mut data).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// `spec`'s executable and identity, when the index knows them.
    pub fn resolve(&self, spec: &ProcessSpec) -> Option<Resolved> {
        vmc_spawn::resolve_ahead(spec, &self.passwd, &self.group, |dir, name| {
            self.executables.get(dir).map(|set| set.contains(name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn file(root: &Path, rel: &str, mode: u32, body: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn spec(args: &[&str], user: &str, env: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            user: user.into(),
            env: env.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A root shaped like a merged-/usr Debian: /bin -> usr/bin.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        file(r, "usr/bin/busybox", 0o755, "");
        symlink("busybox", r.join("usr/bin/echo")).unwrap();
        file(r, "usr/bin/notes", 0o644, "");
        std::fs::create_dir_all(r.join("usr/bin/adir")).unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        // Resolves inside the root (to /usr/bin/busybox), never the host's.
        symlink("/../../../usr/bin/busybox", r.join("usr/bin/up")).unwrap();
        file(r, "opt/app/run", 0o700, "");
        file(
            r,
            "etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        );
        file(
            r,
            "etc/group",
            0o644,
            "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
        );
        t
    }

    #[test]
    fn indexes_executables_of_path_directories_within_the_root() {
        let t = tree();
        let l = Lookup::of_tree(t.path(), &["PATH=/opt/app:/usr/bin".into()]);
        let names = |d: &str| l.executables[d].iter().cloned().collect::<Vec<_>>();
        assert_eq!(names("/usr/bin"), ["busybox", "echo", "up"]);
        assert_eq!(names("/bin"), ["busybox", "echo", "up"]);
        assert_eq!(names("/opt/app"), ["run"]);
        assert!(l.executables["/usr/local/bin"].is_empty());
        assert!(l.passwd.contains("app:x:1000"));
        assert!(l.group.contains("staff:x:50:app"));
    }

    #[test]
    fn resolves_as_the_agent_would_or_leaves_it_to_the_agent() {
        let t = tree();
        let l = Lookup::of_tree(t.path(), &[]);
        let r = l.resolve(&spec(&["echo", "hi"], "", &[])).unwrap();
        assert_eq!(
            r,
            Resolved {
                path: "/usr/bin/echo".into(),
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: "/root".into(),
            }
        );
        let r = l.resolve(&spec(&["echo"], "app", &["PATH=/bin"])).unwrap();
        assert_eq!((r.path.as_str(), r.uid, r.gid), ("/bin/echo", 1000, 1000));
        assert_eq!(r.groups, [1000, 50]);
        assert_eq!(r.home, "/home/app");
        // What the agent must look up itself, or report as an error.
        for s in [
            spec(&["/usr/bin/echo"], "", &[]),
            spec(&["notes"], "", &[]),
            spec(&["adir"], "", &[]),
            spec(&["missing"], "", &[]),
            spec(&["echo"], "nobody", &[]),
            spec(&["echo"], "app:nogroup", &[]),
            spec(&["echo"], "", &["PATH=.:/usr/bin"]),
            spec(&["echo"], "", &["PATH=/elsewhere:/usr/bin"]),
            spec(&[], "", &[]),
        ] {
            assert_eq!(l.resolve(&s), None, "{s:?}");
        }
        // The last PATH wins, as in the agent.
        let r = l.resolve(&spec(&["run"], "", &["PATH=/nope", "PATH=/opt/app"]));
        assert_eq!(r, None, "/opt/app is not indexed for this image");
        let l = Lookup::of_tree(t.path(), &["PATH=/opt/app".into()]);
        let r = l.resolve(&spec(&["run"], "", &["PATH=/nope", "PATH=/opt/app"]));
        assert_eq!(r.unwrap().path, "/opt/app/run");
    }

    #[test]
    fn a_hostile_path_is_indexed_within_bounds() {
        let t = tree();
        // Far more directories than are indexed: the first ones only.
        let many: Vec<String> = (0..500).map(|i| format!("/d{i:03}")).collect();
        let l = Lookup::of_tree(t.path(), &[format!("PATH={}", many.join(":"))]);
        assert_eq!(l.executables.len(), MAX_DIRS);
        assert!(
            l.executables.contains_key("/usr/bin"),
            "the default PATH first"
        );
        // A directory over the per-directory bound is left to the agent.
        let big = t.path().join("big");
        std::fs::create_dir(&big).unwrap();
        for i in 0..MAX_DIR_ENTRIES + 1 {
            std::fs::File::create(big.join(format!("f{i}"))).unwrap();
        }
        let l = Lookup::of_tree(t.path(), &["PATH=/big".into()]);
        assert!(!l.executables.contains_key("/big"));
        assert!(l.executables.contains_key("/usr/bin"));
    }

    #[test]
    fn an_index_survives_a_round_trip_and_a_damaged_one_is_ignored() {
        let t = tree();
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("abc.erofs");
        let p = index_path(&disk);
        assert_eq!(p, d.path().join("abc.lookup.json"));
        let l = Lookup::of_tree(t.path(), &[]);
        l.save(&p).unwrap();
        assert_eq!(Lookup::load(&p), Some(l));
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(Lookup::load(&p), None);
        assert_eq!(Lookup::load(&d.path().join("none.json")), None);
    }
}
