//! The build context: the directory handed to `vmc build`, its
//! `.dockerignore`, and COPY/ADD turned into layer tarballs.
//!
//! Sources are resolved inside their root the way a chroot would: `..` never
//! climbs out and symlinks are followed relative to the root, so neither a
//! hostile Dockerfile nor a symlink in the context can read host files
//! outside it. Inside a copied directory symlinks are copied as symlinks,
//! never followed.

mod pattern;

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use pattern::{clean, has_meta, Ignore, Pattern};

/// Errors reading the context or writing a COPY layer.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context {0}: not a directory (give the directory holding your files, e.g. .)")]
    NotADirectory(String),
    #[error(".dockerignore:{0}: bad pattern '{1}'")]
    Ignore(usize, String),
    #[error("'{0}' is outside the build context (paths are relative to the context; '..' cannot leave it)")]
    Outside(String),
    #[error("'{0}' not found in the build context (or excluded by .dockerignore)")]
    NotFound(String),
    #[error("bad pattern '{0}'")]
    BadPattern(String),
    #[error("when copying more than one source the destination must be a directory ending in '/' (got '{0}')")]
    DestNotDir(String),
    #[error("ADD from a URL ('{0}') is not supported: download it into the build context and ADD the file")]
    Url(String),
    #[error(
        "'{0}': names starting with '.wh.' are reserved for layer whiteouts (rename the file)"
    )]
    Reserved(String),
    #[error("'{0}' in the build context is not a regular file (a FIFO, socket or device cannot be copied or read)")]
    NotRegular(String),
    #[error("'{0}' in the build context is larger than the {1} MiB allowed")]
    TooLarge(String, u64),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What one COPY or ADD copies, after variable expansion.
#[derive(Debug, Clone)]
pub struct CopySpec {
    /// Source paths or globs, relative to the context (or to `from_dir`).
    pub sources: Vec<String>,
    /// The destination; relative destinations are under `workdir`.
    pub dest: String,
    pub workdir: String,
    /// `--chown`: owner of every copied entry (default root).
    pub chown: Option<(u32, u32)>,
    /// `--chmod`: mode of every copied file and directory (default: as
    /// in the source; an archive ADD unpacks keeps its own modes).
    pub chmod: Option<u32>,
    /// `COPY --from`: the unpacked root to copy from instead of the context.
    pub from_dir: Option<PathBuf>,
    /// ADD: local tar archives (plain, gzip, zstd) are unpacked.
    pub add: bool,
}

/// The result of writing a COPY layer.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    /// sha256 over every copied entry's path, type, mode, owner, link target
    /// and content: the layer cache key part (modification times excluded,
    /// as in Docker, so a touched but unchanged file still hits the cache).
    pub content_hash: String,
    /// Entries written.
    pub entries: usize,
}

/// An opened build context.
#[derive(Debug)]
pub struct Context {
    root: PathBuf,
    ignore: Ignore,
}

/// Symlinks followed while resolving one path, as Linux's limit.
const MAX_LINKS: usize = 40;

/// The largest `Dockerfile` or `.dockerignore` read.
pub const MAX_CONTROL_FILE: u64 = 1 << 20;

/// Opens the context file at `path` for reading, refusing anything but a
/// regular file: a FIFO would block the build forever (opened non-blocking,
/// then checked), a device would read the host's. The last component is
/// not followed (callers resolve symlinks inside the context first).
fn open_regular(path: &Path, shown: &str) -> Result<File, ContextError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(io_at(path))?;
    let md = f.metadata().map_err(io_at(path))?;
    if !md.is_file() {
        return Err(ContextError::NotRegular(shown.to_string()));
    }
    Ok(f)
}

/// Reads the context's own `name` (`Dockerfile`, `.dockerignore`), its
/// symlinks resolved inside the context (a link to a host file reads
/// nothing of the host), bounded, regular files only. `None` if absent.
pub fn read_control_file(root: &Path, name: &str) -> Result<Option<String>, ContextError> {
    let segs = vec![name.to_string()];
    let path = match resolve_in(root, &segs, name) {
        Ok(p) => p,
        Err(ContextError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    read_bounded(open_regular(&path, name)?, &path, name).map(Some)
}

/// The text of `f`, refused when larger than [`MAX_CONTROL_FILE`] (checked
/// while reading).
/// Reads a Dockerfile from stdin (`-f -`), bounded like one in a file.
pub fn read_dockerfile_from(r: impl Read) -> Result<String, ContextError> {
    read_bounded(r, Path::new("-"), "the Dockerfile on stdin")
}

fn read_bounded(f: impl Read, path: &Path, shown: &str) -> Result<String, ContextError> {
    let mut text = String::new();
    f.take(MAX_CONTROL_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_at(path))?;
    if text.len() as u64 > MAX_CONTROL_FILE {
        return Err(ContextError::TooLarge(
            shown.to_string(),
            MAX_CONTROL_FILE >> 20,
        ));
    }
    Ok(text)
}

/// Reads a Dockerfile given by path (`-f FILE`: the user's own choice, so
/// it may be anywhere): a regular file (a FIFO is refused before it is
/// opened for reading, which would block), bounded.
pub fn read_dockerfile_at(path: &Path) -> Result<String, ContextError> {
    let shown = path.display().to_string();
    if !fs::metadata(path).map_err(io_at(path))?.is_file() {
        return Err(ContextError::NotRegular(shown));
    }
    let f = File::open(path).map_err(io_at(path))?;
    if !f.metadata().map_err(io_at(path))?.is_file() {
        return Err(ContextError::NotRegular(shown));
    }
    read_bounded(f, path, &shown)
}

/// A context-relative path's components, without empty ones and `.`.
fn rel_parts(rel: &str) -> Vec<&str> {
    rel.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect()
}

/// Parses `.dockerignore` text and asks it about `paths` (for the fuzz
/// target `dockerignore`).
#[doc(hidden)]
pub fn check_ignore<'a>(text: &str, paths: impl Iterator<Item = &'a str>) {
    if let Ok(ignore) = Ignore::parse(text) {
        for p in paths {
            let _ = ignore.is_ignored(&rel_parts(p));
        }
    }
}

impl Context {
    /// Opens `dir` and reads its `.dockerignore`.
    pub fn open(dir: &Path) -> Result<Context, ContextError> {
        let root = fs::canonicalize(dir)
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| ContextError::NotADirectory(dir.display().to_string()))?;
        let ignore = match read_control_file(&root, ".dockerignore")? {
            Some(text) => Ignore::parse(&text).map_err(|(n, l)| ContextError::Ignore(n, l))?,
            None => Ignore::default(),
        };
        Ok(Context { root, ignore })
    }

    /// Whether the context-relative path `rel` is excluded by `.dockerignore`.
    pub fn is_ignored(&self, rel: &str) -> bool {
        self.ignore.is_ignored(&rel_parts(rel))
    }

    /// Writes the layer for `spec` as an uncompressed tar to `out`.
    pub fn copy_layer(
        &self,
        spec: &CopySpec,
        out: &mut dyn Write,
    ) -> Result<CopyOutcome, ContextError> {
        let (base, ignore) = match &spec.from_dir {
            Some(d) => (d.as_path(), None),
            None => (self.root.as_path(), Some(&self.ignore)),
        };
        let mut found: Vec<(PathBuf, String)> = Vec::new(); // (host path, base name)
        for s in &spec.sources {
            if spec.add && (s.contains("://") || s.starts_with("git@")) {
                return Err(ContextError::Url(s.clone()));
            }
            let segs = clean(s).map_err(|_| ContextError::Outside(s.clone()))?;
            if has_meta(s) {
                let pat = Pattern::new(&segs.join("/"))
                    .map_err(|_| ContextError::BadPattern(s.clone()))?;
                let mut hits = Vec::new();
                glob_walk(base, &mut Vec::new(), &pat, ignore, &mut hits)?;
                if hits.is_empty() {
                    return Err(ContextError::NotFound(s.clone()));
                }
                for rel in hits {
                    let name = rel.last().cloned().unwrap_or_default();
                    found.push((resolve_in(base, &rel, s)?, name));
                }
            } else {
                let refs: Vec<&str> = segs.iter().map(String::as_str).collect();
                if ignore.is_some_and(|i| i.is_ignored(&refs)) {
                    return Err(ContextError::NotFound(s.clone()));
                }
                let name = segs.last().cloned().unwrap_or_default();
                found.push((resolve_in(base, &segs, s)?, name));
            }
        }
        let dest_is_dir = spec.dest.ends_with('/') || spec.dest.ends_with("/.") || spec.dest == ".";
        if found.len() > 1 && !dest_is_dir {
            return Err(ContextError::DestNotDir(spec.dest.clone()));
        }
        let dest_abs = if spec.dest.starts_with('/') {
            spec.dest.clone()
        } else {
            format!("{}/{}", spec.workdir, spec.dest)
        };
        let dest = clean(&dest_abs).map_err(|_| ContextError::Outside(spec.dest.clone()))?;

        let mut w = LayerWriter {
            tar: tar::Builder::new(out),
            hash: Sha256::new(),
            entries: 0,
            chown: spec.chown,
            chmod: spec.chmod,
        };
        for (path, name) in &found {
            let md = fs::metadata(path).map_err(io_at(path))?;
            if md.is_dir() {
                let rel_ignore = match (ignore, path.strip_prefix(base)) {
                    (Some(i), Ok(r)) => Some((i, r.to_path_buf())),
                    _ => None,
                };
                w.copy_dir(
                    path,
                    &dest,
                    rel_ignore.as_ref().map(|(i, r)| (*i, r.as_path())),
                )?;
            } else if spec.add && is_archive(path)? {
                w.unpack_archive(path, &dest)?;
            } else {
                let mut target = dest.clone();
                if dest_is_dir || target.is_empty() {
                    target.push(name.clone());
                }
                w.copy_file(path, &md, &target.join("/"))?;
            }
        }
        w.tar.finish().map_err(io_at(Path::new("layer")))?;
        Ok(CopyOutcome {
            content_hash: format!("{:x}", w.hash.finalize()),
            entries: w.entries,
        })
    }
}

/// Resolves `segs` inside `base`, following symlinks as if `base` were `/`.
fn resolve_in(base: &Path, segs: &[String], shown: &str) -> Result<PathBuf, ContextError> {
    let mut todo: Vec<String> = segs.iter().rev().cloned().collect();
    let mut cur: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(seg) = todo.pop() {
        match seg.as_str() {
            "" | "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let candidate = base.join(cur.join("/")).join(&seg);
        let md = fs::symlink_metadata(&candidate)
            .map_err(|_| ContextError::NotFound(shown.to_string()))?;
        if md.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(ContextError::NotFound(shown.to_string()));
            }
            let target = fs::read_link(&candidate).map_err(io_at(&candidate))?;
            let t = target.to_string_lossy().into_owned();
            if t.starts_with('/') {
                cur.clear();
            }
            for part in t.split('/').rev() {
                todo.push(part.to_string());
            }
        } else {
            cur.push(seg);
        }
    }
    Ok(base.join(cur.join("/")))
}

/// Collects every path under `base` (relative, as segments) that `pat`
/// matches, skipping ignored ones.
fn glob_walk(
    base: &Path,
    rel: &mut Vec<String>,
    pat: &Pattern,
    ignore: Option<&Ignore>,
    hits: &mut Vec<Vec<String>>,
) -> Result<(), ContextError> {
    let has_any = (0..pat.segment_count()).any(|i| pat.is_any(i));
    if rel.len() >= pat.segment_count() && !has_any {
        return Ok(());
    }
    let dir = base.join(rel.join("/"));
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map_err(io_at(&dir))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        rel.push(n);
        let refs: Vec<&str> = rel.iter().map(String::as_str).collect();
        let ignored = ignore.is_some_and(|i| i.is_ignored(&refs));
        if !ignored && pat.matches(&refs) {
            hits.push(rel.clone());
        }
        let is_dir = fs::symlink_metadata(base.join(rel.join("/"))).is_ok_and(|m| m.is_dir());
        // Without `**`, only directories matching the pattern so far can hold hits.
        let may_hold = has_any || pat.segment_matches(rel.len() - 1, &rel[rel.len() - 1]);
        if is_dir && may_hold && (!ignored || ignore.is_some_and(|i| i.has_exceptions())) {
            glob_walk(base, rel, pat, ignore, hits)?;
        }
        rel.pop();
    }
    Ok(())
}

/// Whether `path` holds a tar archive (possibly gzip or zstd compressed):
/// ADD unpacks those and copies anything else as a file.
/// xz's magic bytes.
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];

/// A writer that takes `left` more bytes, then fails: the bound on what an
/// xz archive may decompress to, enforced while it decompresses.
struct Bounded<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.left == 0 && !b.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the archive decompresses to more than allowed",
            ));
        }
        let n = b
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.write(&b[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An archive ADD unpacks, opened and decompressed as a stream: gzip and
/// zstd (as image layers are), bzip2, or plain; xz through `xz`.
fn archive_stream(path: &Path) -> Result<(Box<dyn Read>, bool), ContextError> {
    let f = open_regular(path, &path.display().to_string())?;
    let mut br = io::BufReader::with_capacity(1 << 16, f);
    let head = br.fill_buf().map_err(io_at(path))?;
    if head.starts_with(XZ_MAGIC) {
        return Ok((Box::new(br), true));
    }
    if head.starts_with(b"BZh") {
        return Ok((Box::new(bzip2::read::MultiBzDecoder::new(br)), false));
    }
    let r = crate::image::layer::decompress(br).map_err(io_at(path))?;
    Ok((r, false))
}

/// Decompresses the xz stream `r` into `out`, at most `limit` bytes.
/// (lzma-rs, pure Rust, decodes xz into a writer, not as a reader.)
fn xz(r: Box<dyn Read>, out: impl Write, limit: u64) -> io::Result<()> {
    let mut br = io::BufReader::new(r);
    let mut w = Bounded {
        inner: out,
        left: limit,
    };
    lzma_rs::xz_decompress(&mut br, &mut w).map_err(|e| match e {
        lzma_rs::error::Error::IoError(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, format!("xz: {e}")),
    })?;
    w.flush()
}

/// Whether ADD unpacks `path`: a tar archive, plain or compressed (gzip,
/// zstd, bzip2, xz), told by its content as Docker does. Anything else,
/// a broken archive included, is copied as a file.
fn is_archive(path: &Path) -> Result<bool, ContextError> {
    let (mut r, is_xz) = match archive_stream(path) {
        Ok(x) => x,
        Err(ContextError::NotRegular(p)) => return Err(ContextError::NotRegular(p)),
        Err(_) => return Ok(false),
    };
    let mut head = Vec::with_capacity(512);
    if is_xz {
        // Only the first block is wanted: the bound stops the rest.
        let _ = xz(r, &mut head, 512);
    } else {
        let _ = (&mut r).take(512).read_to_end(&mut head);
    }
    Ok(head.len() == 512 && &head[257..262] == b"ustar")
}

struct LayerWriter<'a> {
    tar: tar::Builder<&'a mut dyn Write>,
    hash: Sha256,
    entries: usize,
    chown: Option<(u32, u32)>,
    chmod: Option<u32>,
}

impl LayerWriter<'_> {
    /// Records an entry for the content hash. A name starting with `.wh.`
    /// is refused: in a layer it is a whiteout, and would delete what it
    /// names (or, as `.wh...`, the directory above) when unpacked.
    fn note(
        &mut self,
        kind: char,
        path: &str,
        mode: u32,
        owner: (u64, u64),
        link: &str,
    ) -> Result<(), ContextError> {
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if name.starts_with(".wh.") {
            return Err(ContextError::Reserved(path.to_string()));
        }
        self.hash.update(format!(
            "{kind}\0{path}\0{mode:o}\0{}:{}\0{link}\0",
            owner.0, owner.1
        ));
        self.entries += 1;
        Ok(())
    }

    fn header(&self, md: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(self.chmod.unwrap_or(md.permissions().mode() & 0o7777));
        let (uid, gid) = self.chown.unwrap_or((0, 0));
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        h
    }

    fn copy_file(
        &mut self,
        path: &Path,
        md: &fs::Metadata,
        target: &str,
    ) -> Result<(), ContextError> {
        let mut h = self.header(md, tar::EntryType::Regular);
        h.set_size(md.len());
        let f = open_regular(path, target)?;
        // Hash the content on its way into the tar.
        let mut content = Sha256::new();
        let reader = HashingReader {
            inner: f.take(md.len()),
            hash: &mut content,
        };
        self.tar
            .append_data(&mut h, target, reader)
            .map_err(io_at(path))?;
        let digest = format!("{:x}", content.finalize());
        self.note('f', target, h.mode().unwrap_or(0), owner(&h), &digest)?;
        Ok(())
    }

    /// Copies the contents of `dir` (not `dir` itself) under `dest`.
    fn copy_dir(
        &mut self,
        dir: &Path,
        dest: &[String],
        ignore: Option<(&Ignore, &Path)>,
    ) -> Result<(), ContextError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(io_at(dir))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        if names.is_empty() && !dest.is_empty() {
            let md = fs::metadata(dir).map_err(io_at(dir))?;
            self.dir_entry(&md, &dest.join("/"))?;
        }
        for name in names {
            let path = dir.join(&name);
            let name = name.to_string_lossy().into_owned();
            let rel = ignore.map(|(i, r)| (i, r.join(&name)));
            if let Some((i, r)) = &rel {
                let parts: Vec<String> =
                    r.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                if i.is_ignored(&refs) && !i.has_exceptions() {
                    continue;
                }
                if i.is_ignored(&refs) {
                    // An ignored directory may still hold re-included files.
                    if path.is_dir() && !path.is_symlink() {
                        let mut sub = dest.to_vec();
                        sub.push(name.clone());
                        self.copy_dir(&path, &sub, Some((i, r)))?;
                    }
                    continue;
                }
            }
            let md = fs::symlink_metadata(&path).map_err(io_at(&path))?;
            let mut target = dest.to_vec();
            target.push(name);
            let target_s = target.join("/");
            let ft = md.file_type();
            if ft.is_symlink() {
                let link = fs::read_link(&path).map_err(io_at(&path))?;
                let mut h = self.header(&md, tar::EntryType::Symlink);
                h.set_mode(0o777);
                self.tar
                    .append_link(&mut h, &target_s, &link)
                    .map_err(io_at(&path))?;
                self.note('l', &target_s, 0o777, owner(&h), &link.to_string_lossy())?;
            } else if ft.is_dir() {
                self.dir_entry(&md, &target_s)?;
                let sub_ignore = rel.as_ref().map(|(i, r)| (*i, r.as_path()));
                self.copy_dir(&path, &target, sub_ignore)?;
            } else if ft.is_file() {
                self.copy_file(&path, &md, &target_s)?;
            }
            // Sockets, fifos and device nodes are not copied (as in Docker).
        }
        Ok(())
    }

    fn dir_entry(&mut self, md: &fs::Metadata, target: &str) -> Result<(), ContextError> {
        let mut h = self.header(md, tar::EntryType::Directory);
        let path = format!("{target}/");
        self.tar
            .append_data(&mut h, &path, io::empty())
            .map_err(io_at(Path::new(target)))?;
        self.note('d', target, h.mode().unwrap_or(0), owner(&h), "")?;
        Ok(())
    }

    /// ADD of a local archive: its entries re-rooted under `dest`, with
    /// `..` entries dropped (the image unpacker checks links again).
    fn unpack_archive(&mut self, path: &Path, dest: &[String]) -> Result<(), ContextError> {
        let (mut r, is_xz) = archive_stream(path)?;
        if is_xz {
            // Into an unnamed temporary file, bounded as the entries are
            // below (plus room for their headers), then read from there.
            let limits = crate::image::layer::Limits::default();
            let mut tmp = tempfile::tempfile().map_err(io_at(path))?;
            xz(
                r,
                io::BufWriter::new(&mut tmp),
                limits.max_total + limits.max_entries * 1024,
            )
            .map_err(io_at(path))?;
            tmp.seek(io::SeekFrom::Start(0)).map_err(io_at(path))?;
            r = Box::new(tmp);
        }
        let mut a = tar::Archive::new(r);
        let prefix = dest.join("/");
        let under = |p: &str| -> Option<String> {
            let segs = clean(p).ok()?;
            if p.split('/').any(|s| s == "..") || segs.is_empty() {
                return None;
            }
            Some(if prefix.is_empty() {
                segs.join("/")
            } else {
                format!("{prefix}/{}", segs.join("/"))
            })
        };
        // The bounds of an image layer, counted as the archive is read (a
        // small compressed archive can expand a thousandfold).
        let limits = crate::image::layer::Limits::default();
        let (mut entries, mut bytes) = (0u64, 0u64);
        let too_large = |what: String| ContextError::Io {
            path: path.display().to_string(),
            source: io::Error::other(format!("the archive exceeds the limit of {what}")),
        };
        for entry in a.entries().map_err(io_at(path))? {
            let mut e = entry.map_err(io_at(path))?;
            entries += 1;
            bytes += e.size();
            if entries > limits.max_entries {
                return Err(too_large(format!("{} entries", limits.max_entries)));
            }
            if e.size() > limits.max_file || bytes > limits.max_total {
                return Err(too_large(format!(
                    "{} bytes in a file, {} in all",
                    limits.max_file, limits.max_total
                )));
            }
            let name = e
                .path()
                .map_err(io_at(path))?
                .to_string_lossy()
                .into_owned();
            let Some(target) = under(&name) else { continue };
            let mut h = e.header().clone();
            if let Some((u, g)) = self.chown {
                h.set_uid(u.into());
                h.set_gid(g.into());
            }
            let mode = h.mode().unwrap_or(0);
            match h.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut content = Sha256::new();
                    let size = e.size();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(size);
                    let reader = HashingReader {
                        inner: (&mut e).take(size),
                        hash: &mut content,
                    };
                    self.tar
                        .append_data(&mut h, &target, reader)
                        .map_err(io_at(path))?;
                    let d = format!("{:x}", content.finalize());
                    self.note('f', &target, mode, owner(&h), &d)?;
                }
                tar::EntryType::Directory => {
                    h.set_size(0);
                    self.tar
                        .append_data(&mut h, format!("{target}/"), io::empty())
                        .map_err(io_at(path))?;
                    self.note('d', &target, mode, owner(&h), "")?;
                }
                tar::EntryType::Symlink => {
                    let link = e.link_name().map_err(io_at(path))?.unwrap_or_default();
                    self.tar
                        .append_link(&mut h, &target, &link)
                        .map_err(io_at(path))?;
                    self.note('l', &target, mode, owner(&h), &link.to_string_lossy())?;
                }
                tar::EntryType::Link => {
                    let link = e.link_name().map_err(io_at(path))?.unwrap_or_default();
                    let Some(link) = under(&link.to_string_lossy()) else {
                        continue;
                    };
                    self.tar
                        .append_link(&mut h, &target, &link)
                        .map_err(io_at(path))?;
                    self.note('h', &target, mode, owner(&h), &link)?;
                }
                _ => {} // devices, fifos: dropped
            }
        }
        Ok(())
    }
}

fn owner(h: &tar::Header) -> (u64, u64) {
    (h.uid().unwrap_or(0), h.gid().unwrap_or(0))
}

struct HashingReader<'h, R> {
    inner: R,
    hash: &'h mut Sha256,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(ctx: &Context, spec: &CopySpec) -> Result<Vec<(String, String)>, ContextError> {
        let mut buf = Vec::new();
        ctx.copy_layer(spec, &mut buf)?;
        let mut a = tar::Archive::new(&buf[..]);
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let s = if e.header().entry_type().is_symlink() {
                e.link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            } else {
                let mut b = Vec::new();
                e.read_to_end(&mut b).unwrap();
                String::from_utf8_lossy(&b).into_owned()
            };
            out.push((p, s));
        }
        Ok(out)
    }

    fn spec(sources: &[&str], dest: &str) -> CopySpec {
        CopySpec {
            sources: sources.iter().map(|s| s.to_string()).collect(),
            dest: dest.into(),
            workdir: "/app".into(),
            chown: None,
            chmod: None,
            from_dir: None,
            add: false,
        }
    }

    fn context() -> (tempfile::TempDir, Context) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("src/lib")).unwrap();
        fs::create_dir_all(r.join("node_modules/x")).unwrap();
        fs::write(r.join("a.js"), "a").unwrap();
        fs::write(r.join("b.js"), "b").unwrap();
        fs::write(r.join("src/main.rs"), "main").unwrap();
        fs::write(r.join("src/lib/l.rs"), "lib").unwrap();
        fs::write(r.join("node_modules/x/i.js"), "dep").unwrap();
        fs::write(r.join("secret.env"), "pw").unwrap();
        std::os::unix::fs::symlink("/etc", r.join("etc-link")).unwrap();
        std::os::unix::fs::symlink("a.js", r.join("src/alias")).unwrap();
        fs::write(r.join(".dockerignore"), "node_modules\n*.env\n").unwrap();
        let c = Context::open(r).unwrap();
        (d, c)
    }

    #[test]
    fn files_globs_and_dirs_land_where_docker_puts_them() {
        let (_d, c) = context();
        assert_eq!(
            layer(&c, &spec(&["a.js"], "/x/y.js")).unwrap(),
            [("x/y.js".into(), "a".into())]
        );
        assert_eq!(
            layer(&c, &spec(&["a.js"], "lib/")).unwrap(),
            [("app/lib/a.js".into(), "a".into())]
        );
        let g = layer(&c, &spec(&["*.js"], "/out/")).unwrap();
        assert_eq!(
            g,
            [
                ("out/a.js".into(), "a".into()),
                ("out/b.js".into(), "b".into())
            ]
        );
        let dir = layer(&c, &spec(&["src"], "/s")).unwrap();
        let names: Vec<&str> = dir.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["s/alias", "s/lib/", "s/lib/l.rs", "s/main.rs"]);
        assert_eq!(
            dir[0].1, "a.js",
            "symlinks inside a directory stay symlinks"
        );
        // The whole context, minus .dockerignore'd paths.
        let all = layer(&c, &spec(&["."], ".")).unwrap();
        assert!(all.iter().any(|(p, _)| p == "app/src/lib/l.rs"));
        assert!(!all
            .iter()
            .any(|(p, _)| p.contains("node_modules") || p.contains("secret")));
    }

    #[test]
    fn escapes_ignored_and_missing_sources_are_refused() {
        let (_d, c) = context();
        assert!(matches!(
            layer(&c, &spec(&["../x"], "/")),
            Err(ContextError::Outside(_))
        ));
        // A symlink to /etc resolves inside the context, where there is no /etc.
        assert!(matches!(
            layer(&c, &spec(&["etc-link/passwd"], "/")),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            layer(&c, &spec(&["secret.env"], "/")),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            layer(&c, &spec(&["*.none"], "/")),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            layer(&c, &spec(&["a.js", "b.js"], "/x")),
            Err(ContextError::DestNotDir(_))
        ));
        let mut s = spec(&["https://example.com/x"], "/");
        s.add = true;
        assert!(matches!(layer(&c, &s), Err(ContextError::Url(_))));
    }

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    /// Issue 16, 11: a `Dockerfile` or `.dockerignore` symlinked out of the
    /// context was read (and its first line shown in an error); a FIFO hung
    /// the build.
    #[test]
    fn control_files_stay_in_the_context_and_fifos_are_refused() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        fs::write(&secret, "*.js\nFROM host-secret\n").unwrap();
        let (d, _) = context();
        let r = d.path();
        fs::remove_file(r.join(".dockerignore")).unwrap();
        std::os::unix::fs::symlink(&secret, r.join(".dockerignore")).unwrap();
        std::os::unix::fs::symlink(&secret, r.join("Dockerfile")).unwrap();
        // Both links resolve inside the context, where nothing is there.
        assert_eq!(read_control_file(r, "Dockerfile").unwrap(), None);
        let c = Context::open(r).unwrap();
        assert!(!c.is_ignored("a.js"), "the host file's rules were read");
        // A relative link inside the context is followed.
        fs::write(r.join("real.Dockerfile"), "FROM x\n").unwrap();
        fs::remove_file(r.join("Dockerfile")).unwrap();
        std::os::unix::fs::symlink("real.Dockerfile", r.join("Dockerfile")).unwrap();
        assert_eq!(
            read_control_file(r, "Dockerfile").unwrap().as_deref(),
            Some("FROM x\n")
        );
        // FIFOs are refused, not waited on: as control files, as -f, as
        // COPY and ADD sources.
        for name in ["Dockerfile", ".dockerignore", "pipe"] {
            let _ = fs::remove_file(r.join(name));
            mkfifo(&r.join(name));
        }
        assert!(matches!(
            read_control_file(r, "Dockerfile"),
            Err(ContextError::NotRegular(_))
        ));
        assert!(matches!(
            read_dockerfile_at(&r.join("Dockerfile")),
            Err(ContextError::NotRegular(_))
        ));
        assert!(matches!(Context::open(r), Err(ContextError::NotRegular(_))));
        fs::remove_file(r.join(".dockerignore")).unwrap();
        let c = Context::open(r).unwrap();
        for add in [false, true] {
            let mut s = spec(&["pipe"], "/x");
            s.add = add;
            let e = layer(&c, &s).expect_err("a FIFO source");
            assert!(matches!(e, ContextError::NotRegular(_)), "{e}");
        }
        // A FIFO inside a copied directory is left out, as in Docker.
        fs::create_dir(r.join("dir")).unwrap();
        mkfifo(&r.join("dir/p"));
        fs::write(r.join("dir/f"), "f").unwrap();
        let names: Vec<String> = layer(&c, &spec(&["dir"], "/d"))
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(names, ["d/f"]);
        // Control files are bounded while read.
        fs::write(r.join(".dockerignore"), "x\n".repeat(600_000)).unwrap();
        assert!(matches!(Context::open(r), Err(ContextError::TooLarge(..))));
    }

    /// Issue 16, 10: ADD of an archive had no size bound. Its entries are
    /// counted against a layer's bounds as they are read: a header that
    /// claims more than a file may hold is refused before its data.
    #[test]
    fn add_of_an_archive_is_bounded_while_read() {
        let (d, c) = context();
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_size(crate::image::layer::Limits::default().max_file + 1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend(std::iter::repeat_n(0u8, 4096));
        fs::write(d.path().join("bomb.tar"), data).unwrap();
        let mut s = spec(&["bomb.tar"], "/x/");
        s.add = true;
        let e = layer(&c, &s).expect_err("over the bound");
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }

    #[test]
    fn names_reserved_for_whiteouts_are_refused() {
        // A context file named `.wh...` became a layer entry whose whiteout
        // named `..`; `.wh.etc` would delete the image's /etc.
        let (d, c) = context();
        fs::create_dir(d.path().join("w")).unwrap();
        fs::write(d.path().join("w/.wh..."), "").unwrap();
        for (src, dest) in [("w/.wh...", "/x/"), ("w", "/x"), ("a.js", "/.wh.etc")] {
            let e = layer(&c, &spec(&[src], dest)).expect_err(src);
            assert!(matches!(e, ContextError::Reserved(_)), "{src}: {e}");
            assert!(e.to_string().contains("reserved"), "{e}");
        }
    }

    #[test]
    fn content_hash_follows_content_and_owner_not_mtime() {
        let (d, c) = context();
        let h = |s: &CopySpec| c.copy_layer(s, &mut Vec::new()).unwrap().content_hash;
        let base = h(&spec(&["src"], "/s"));
        filetime_touch(&d.path().join("src/main.rs"));
        assert_eq!(h(&spec(&["src"], "/s")), base);
        let mut owned = spec(&["src"], "/s");
        owned.chown = Some((1000, 1000));
        assert_ne!(h(&owned), base);
        fs::write(d.path().join("src/main.rs"), "changed").unwrap();
        assert_ne!(h(&spec(&["src"], "/s")), base);
    }

    #[test]
    fn content_hash_follows_a_mode_change_alone() {
        let (d, c) = context();
        let h = |s: &CopySpec| c.copy_layer(s, &mut Vec::new()).unwrap().content_hash;
        let file = d.path().join("src/main.rs");
        let mode = |m: u32| fs::set_permissions(&file, fs::Permissions::from_mode(m)).unwrap();
        mode(0o644);
        let base = h(&spec(&["src"], "/s"));
        let single = h(&spec(&["src/main.rs"], "/m"));
        mode(0o755);
        assert_ne!(h(&spec(&["src"], "/s")), base, "chmod +x in a directory");
        assert_ne!(
            h(&spec(&["src/main.rs"], "/m")),
            single,
            "chmod +x of the file"
        );
        mode(0o644);
        assert_eq!(h(&spec(&["src"], "/s")), base, "back to the old mode");
        // A directory's own mode counts too.
        let lib = d.path().join("src/lib");
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o700)).unwrap();
        assert_ne!(h(&spec(&["src"], "/s")), base, "chmod of a directory");
    }

    #[test]
    fn dockerignore_exceptions_bring_files_back() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in ["a.env", "secret.env", "keep.env", "app.js"] {
            fs::write(r.join(f), f).unwrap();
        }
        fs::write(r.join(".dockerignore"), "*.env\n!keep.env\n").unwrap();
        let c = Context::open(r).unwrap();
        let all = layer(&c, &spec(&["."], "/ctx/")).unwrap();
        let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["ctx/.dockerignore", "ctx/app.js", "ctx/keep.env"]);
        assert_eq!(all[2].1, "keep.env");
        let envs = layer(&c, &spec(&["*.env"], "/e/")).unwrap();
        assert_eq!(envs, [("e/keep.env".into(), "keep.env".into())]);
        assert!(matches!(
            layer(&c, &spec(&["a.env"], "/")),
            Err(ContextError::NotFound(_))
        ));
        assert!(c.is_ignored("secret.env") && !c.is_ignored("keep.env"));
    }

    fn filetime_touch(p: &Path) {
        let f = File::options().append(true).open(p).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    }

    #[test]
    fn add_unpacks_local_archives_and_drops_escaping_entries() {
        let (d, _) = context();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "in/ok.txt", &b"ok"[..]).unwrap();
        // tar's builder refuses '..' in names; write the name bytes directly.
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../evil.t");
        h.set_cksum();
        b.append(&h, &b"bad"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        // Plain, gzip and zstd (the README's list), named so that the name
        // tells nothing: the content decides.
        let archives = [
            ("bundle.tar", data.clone()),
            ("bundle.tar.gz", gz.finish().unwrap()),
            ("bundle.tar.zst", zstd::encode_all(&data[..], 3).unwrap()),
            ("bundle.bin", zstd::encode_all(&data[..], 3).unwrap()),
        ];
        for (name, bytes) in &archives {
            fs::write(d.path().join(name), bytes).unwrap();
        }
        let c2 = Context::open(d.path()).unwrap();
        for (name, _) in &archives {
            let mut s = spec(&[name], "/opt/");
            s.add = true;
            assert_eq!(
                layer(&c2, &s).unwrap(),
                [("opt/in/ok.txt".into(), "ok".into())],
                "ADD {name}"
            );
            // COPY keeps the archive as a file.
            assert_eq!(
                layer(&c2, &spec(&[name], "/opt/")).unwrap()[0].0,
                format!("opt/{name}")
            );
        }
        // What is not a tar archive, compressed or not, is copied as it is.
        fs::write(
            d.path().join("notes.zst"),
            zstd::encode_all(&b"notes"[..], 3).unwrap(),
        )
        .unwrap();
        fs::write(d.path().join("plain.txt"), "x".repeat(600)).unwrap();
        for name in ["notes.zst", "plain.txt"] {
            let mut s = spec(&[name], "/opt/");
            s.add = true;
            let got = layer(&Context::open(d.path()).unwrap(), &s).unwrap();
            assert_eq!(got.len(), 1, "ADD {name}: {got:?}");
            assert_eq!(got[0].0, format!("opt/{name}"));
        }
    }

    #[test]
    fn bad_dockerignore_names_the_line() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(".dockerignore"), "ok\n[bad\n").unwrap();
        let e = Context::open(d.path()).unwrap_err().to_string();
        assert_eq!(e, ".dockerignore:2: bad pattern '[bad'");
    }
}
