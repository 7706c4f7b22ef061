//! COPY and ADD: the layer made on the host from the build context (or
//! from an earlier stage or image with `--from`), with `--chown` names
//! looked up in the image's passwd and group files.

use std::fs::{self, File};
use std::path::PathBuf;

use oci_spec::image::Descriptor;

use super::{step_err, tempfile_in, BuildError, Builder, State};
use crate::build::cache;
use crate::build::context::{Context, CopySpec};
use crate::build::dockerfile::{Step, StepKind};
use crate::build::words;
use crate::image;
use crate::image::layer::Whiteouts;

/// Why a COPY's `--chown` or `--from` cannot be used.
#[derive(Debug, thiserror::Error)]
enum CopySourceError {
    #[error("--chown: unknown user or group '{0}' in the image")]
    UnknownOwner(String),
    #[error("--from={0}: no such stage or image")]
    NoStage(String),
    #[error(transparent)]
    Store(#[from] image::StoreError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl Builder<'_> {
    pub(super) fn copy_step(
        &mut self,
        step: &Step,
        st: &mut State,
        ctx: &Context,
        key: &str,
    ) -> Result<(), BuildError> {
        let StepKind::Copy {
            sources,
            dest,
            from,
            chown,
            chmod,
            add,
            inline,
        } = &step.kind
        else {
            return Ok(());
        };
        if !inline.is_empty() && (!sources.is_empty() || from.is_some()) {
            return Err(step_err(
                step,
                "heredoc sources cannot be mixed with files or --from in one COPY/ADD: use two steps",
            ));
        }
        let (mut sources, dest, chown, from) = {
            let lookup = Self::env_lookup(st);
            let expand = |s: &str| words::expand(s, &lookup).map_err(|e| step_err(step, e));
            let sources: Vec<String> = sources
                .iter()
                .map(|s| expand(s))
                .collect::<Result<_, _>>()?;
            let chown = chown.as_deref().map(expand).transpose()?;
            let from = from.as_deref().map(expand).transpose()?;
            (sources, expand(dest)?, chown, from)
        };
        let chmod = match chmod {
            Some(m) => Some(
                u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        step_err(
                            step,
                            format!("--chmod={m}: not an octal mode (e.g. 0755 or 644)"),
                        )
                    })?,
            ),
            None => None,
        };
        let chown = match chown {
            Some(c) => Some(self.resolve_chown(&c, st).map_err(|e| step_err(step, e))?),
            None => None,
        };
        let mut from_dir = match from {
            Some(f) => Some(self.stage_root(&f).map_err(|e| step_err(step, e))?),
            None => None,
        };
        if !inline.is_empty() {
            let dir = self.heredoc_files(step, st, inline)?;
            sources = inline
                .iter()
                .map(|(d, _)| d.trim_matches('\'').to_string())
                .collect();
            from_dir = Some(dir);
        }
        let spec = CopySpec {
            sources,
            dest,
            workdir: st
                .config
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
                .unwrap_or_else(|| "/".into()),
            chown,
            chmod,
            from_dir,
            add: *add,
        };
        let mut file = tempfile_in(&self.tmp)?;
        let outcome = ctx
            .copy_layer(&spec, &mut file)
            .map_err(|e| step_err(step, e))?;
        let key = cache::chain(key, &[&outcome.content_hash]);
        if self.cached(&key, st) {
            return Ok(());
        }
        let desc = self.store_layer(file)?;
        let diff = desc.digest().to_string();
        Self::add_layer(st, desc, diff);
        Self::history(st, &step.text, false);
        st.key = key.clone();
        self.record(&key, st);
        Ok(())
    }

    /// `COPY <<EOF /dest`: each heredoc's body as a file named after its
    /// delimiter (0644, as BuildKit makes them), in a fresh directory under
    /// the build's own; an unquoted delimiter's body has its variables
    /// expanded, as in Docker.
    fn heredoc_files(
        &self,
        step: &Step,
        st: &State,
        inline: &[(String, String)],
    ) -> Result<PathBuf, BuildError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self
            .tmp
            .join(format!("heredocs-{}", &crate::runtime::new_id()[..12]));
        let io = |e: std::io::Error| step_err(step, format!("{}: {e}", dir.display()));
        fs::create_dir(&dir).map_err(io)?;
        let lookup = Self::env_lookup(st);
        for (delim, body) in inline {
            let name = delim.trim_matches('\'');
            let body = if delim.starts_with('\'') {
                body.clone()
            } else {
                words::expand(body, &lookup).map_err(|e| step_err(step, e))?
            };
            let path = dir.join(name);
            fs::write(&path, body).map_err(io)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(io)?;
        }
        Ok(dir)
    }

    /// `--chown=user:group` with names looked up in the image's passwd/group.
    fn resolve_chown(&self, spec: &str, st: &State) -> Result<(u32, u32), CopySourceError> {
        let (u, g) = spec
            .split_once(':')
            .map_or((spec, None), |(u, g)| (u, Some(g)));
        let passwd = self.file_in_layers(&st.layers, "etc/passwd");
        let group = self.file_in_layers(&st.layers, "etc/group");
        let lookup = |name: &str, db: &Option<String>, idx: usize| {
            if let Ok(n) = name.parse() {
                return Ok(n);
            }
            db.as_deref()
                .unwrap_or_default()
                .lines()
                .find(|l| l.split(':').next() == Some(name))
                .and_then(|l| l.split(':').nth(idx))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| CopySourceError::UnknownOwner(name.to_string()))
        };
        let uid = lookup(u, &passwd, 2)?;
        let gid = match g {
            Some(g) => lookup(g, &group, 2)?,
            None if u.parse::<u32>().is_ok() => uid,
            None => lookup(u, &passwd, 3)?,
        };
        Ok((uid, gid))
    }

    /// The content of `path` in the newest layer that has it.
    fn file_in_layers(&self, layers: &[Descriptor], path: &str) -> Option<String> {
        for l in layers.iter().rev() {
            let f = File::open(self.store.blob_path(l.digest())).ok()?;
            let r = crate::image::layer::decompress(f).ok()?;
            let mut a = tar::Archive::new(r);
            for e in a.entries().ok()?.flatten() {
                let Ok(p) = e.path() else { continue };
                let p = p
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .to_string();
                if p == path {
                    let mut s = String::new();
                    let mut e = e;
                    std::io::Read::read_to_string(&mut e, &mut s).ok()?;
                    return Some(s);
                }
            }
        }
        None
    }

    /// The unpacked root of an earlier stage (by name or index) or an image.
    fn stage_root(&mut self, from: &str) -> Result<PathBuf, CopySourceError> {
        // An earlier stage (by index or name; stages the target does not
        // need are never built, and a reference makes one needed).
        let idx = from
            .parse::<usize>()
            .ok()
            .filter(|i| matches!(self.stages.get(*i), Some(Some(_))))
            .or_else(|| {
                self.stages
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|s| s.name.as_deref() == Some(from)))
            });
        let (config, layers) = match idx.and_then(|i| self.stages[i].as_ref()) {
            Some(s) => {
                if let Some(p) = &s.unpacked {
                    return Ok(p.clone());
                }
                (s.config.clone(), s.layers.clone())
            }
            None => {
                let img = self
                    .store
                    .resolve(from)
                    .map_err(|_| CopySourceError::NoStage(from.to_string()))?;
                (img.config.clone(), img.manifest.layers().clone())
            }
        };
        let img = self.store.commit(&config, layers, None)?;
        let dir = self
            .tmp
            .join(format!("stage-{}", &crate::runtime::new_id()[..8]));
        fs::create_dir_all(&dir).map_err(|source| CopySourceError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        crate::image::disk::unpack_image(self.store, &img, &dir, Whiteouts::Apply)?;
        if let Some(Some(s)) = idx.map(|i| &mut self.stages[i]) {
            s.unpacked = Some(dir.clone());
        }
        Ok(dir)
    }
}
