//! The checks every layer entry passes before anything of it is written
//! (the entry count, a path under the root, the size limit, whiteout names),
//! shared by [`unpack`](super::unpack) and [`verify`], which runs them over
//! a whole layer without writing anything.

use std::io::{self, Read};
use std::path::PathBuf;

use super::{clean, LayerError, Limits, Stats};

const WH_PREFIX: &str = ".wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";

/// What an entry's name says it is.
pub(super) enum Whiteout {
    None,
    /// `.wh..wh..opq`: the directory hides what lower layers put in it.
    Opaque,
    /// `.wh.NAME`: NAME, in the same directory, is deleted.
    Of(String),
}

/// An entry that passed the checks every entry passes before anything of it
/// is written.
pub(super) struct Admitted {
    /// Its path, relative to the root, without `.` or `..`.
    pub(super) path: PathBuf,
    /// Its path as the archive gives it, for messages.
    pub(super) shown: String,
    pub(super) name: std::ffi::OsString,
    pub(super) whiteout: Whiteout,
}

/// The checks of one entry, shared by [`unpack`](super::unpack) and
/// [`verify`]: the entry count, a path that stays under the root, the size
/// limit, and whiteouts that name one entry of their directory (`.wh..` or
/// `.wh...` would resolve to the directory or its parent: one such entry
/// emptied the whole layer cache). `None` for the root directory itself.
pub(super) fn admit<R: Read>(
    stats: &mut Stats,
    limits: &Limits,
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<Admitted>, LayerError> {
    let raw = entry.path().map_err(LayerError::Read)?.into_owned();
    let shown = raw.display().to_string();
    stats.entries += 1;
    if stats.entries > limits.max_entries {
        return Err(LayerError::TooLarge(format!(
            "{} entries",
            limits.max_entries
        )));
    }
    let hostile = |why| LayerError::Hostile {
        path: shown.clone(),
        why,
    };
    let path = clean(&raw).map_err(hostile)?;
    let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
        return Ok(None);
    };
    let size = entry.header().entry_size().map_err(LayerError::Read)?;
    if size > limits.max_file {
        return Err(LayerError::TooLarge(format!(
            "{} bytes for '{shown}'",
            limits.max_file
        )));
    }
    let name_str = name.to_string_lossy();
    let whiteout = if name_str == WH_OPAQUE {
        Whiteout::Opaque
    } else if let Some(hidden) = name_str.strip_prefix(WH_PREFIX) {
        if matches!(hidden, "" | "." | "..") {
            return Err(hostile("a whiteout must name one entry of its directory"));
        }
        Whiteout::Of(hidden.to_string())
    } else {
        Whiteout::None
    };
    Ok(Some(Admitted {
        path,
        shown,
        name,
        whiteout,
    }))
}

/// Reads a whole (decompressed) layer tar and checks every entry as
/// [`unpack`](super::unpack) would, writing nothing: run when a layer
/// enters the store (import, load, pull), so that an image whose layer can
/// never unpack is refused then, not when a container first starts.
pub fn verify<R: Read>(reader: R, limits: Limits) -> Result<Stats, LayerError> {
    let mut stats = Stats::default();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let Some(a) = admit(&mut stats, &limits, &mut entry)? else {
            continue;
        };
        let hostile = |why| LayerError::Hostile {
            path: a.shown.clone(),
            why,
        };
        match entry.header().entry_type() {
            tar::EntryType::Symlink => {
                entry
                    .link_name()
                    .map_err(LayerError::Read)?
                    .ok_or_else(|| hostile("a symlink without a target"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(LayerError::Read)?
                    .ok_or_else(|| hostile("a hard link without a target"))?;
                let t = clean(&target).map_err(hostile)?;
                if t.file_name().is_none() {
                    return Err(hostile("a hard link to the root directory"));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // Read, not skipped: a sparse entry's apparent size is what
                // unpacking writes.
                let n = io::copy(&mut (&mut entry).take(limits.max_file + 1), &mut io::sink())
                    .map_err(LayerError::Read)?;
                if n > limits.max_file {
                    return Err(LayerError::TooLarge(format!(
                        "{} bytes for '{}'",
                        limits.max_file, a.shown
                    )));
                }
                stats.bytes += n;
                if stats.bytes > limits.max_total {
                    return Err(LayerError::TooLarge(format!(
                        "{} bytes in all",
                        limits.max_total
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(stats)
}
