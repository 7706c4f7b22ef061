//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz on nightly: `make
//! fuzz`) and for the test that replays their corpora and every crash found
//! so far on stable (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, as
//! a hostile image, build context or guest would hand them over, and must
//! return: no panic, no hang, no allocation beyond the bounds vmc enforces.

use std::io::Cursor;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The targets by name (the directory names under `fuzz/corpus` and
/// `fuzz/artifacts`, and the fuzz binaries' names).
pub const TARGETS: &[(&str, Target)] = &[
    ("dockerfile", dockerfile),
    ("dockerignore", dockerignore),
    ("host_frames", host_frames),
    ("guest_frames", guest_frames),
    ("layer", layer),
    ("archive", archive),
    ("vmm_control", vmm_control),
    ("virtio", virtio),
    ("registry", registry),
];

/// What a registry answers a pull (`vmc pull`): a manifest or image index,
/// a token reply, a `WWW-Authenticate` challenge, every parser fed the same
/// bytes.
pub fn registry(data: &[u8]) {
    crate::image::pull::fuzz_registry(data);
}

/// What the host decodes from a (compromised) jailed VMM process: one
/// control message, its texts made safe to print.
pub fn vmm_control(data: &[u8]) {
    crate::vmm::process::fuzz_from_vmm(data);
}

/// The Dockerfile front end: parsing and its checks.
pub fn dockerfile(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::build::dockerfile::parse(text);
    }
}

/// `.dockerignore`: the first part (up to a NUL byte) is the file, the
/// lines after it are context paths asked about.
pub fn dockerignore(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (file, paths) = text.split_once('\0').unwrap_or((&text, ""));
    crate::build::context::check_ignore(file, paths.lines());
}

/// What the host decodes from a guest agent: `GuestMsg` frames, through the
/// streaming decoder (attached runs) and the blocking reader.
pub fn host_frames(data: &[u8]) {
    frames::<vmc_proto::GuestMsg>(data);
}

/// What the guest agent decodes from the host: `HostMsg` frames.
pub fn guest_frames(data: &[u8]) {
    frames::<vmc_proto::HostMsg>(data);
}

fn frames<T: for<'de> serde::Deserialize<'de>>(data: &[u8]) {
    let mut d = vmc_proto::FrameDecoder::default();
    // Fed in two parts: a frame split across reads is the usual case.
    let (a, b) = data.split_at(data.len() / 2);
    d.feed(a);
    while let Ok(Some(_)) = d.next_frame::<T>() {}
    d.feed(b);
    while let Ok(Some(_)) = d.next_frame::<T>() {}
    let mut r = Cursor::new(data);
    while vmc_proto::read_frame::<_, T>(&mut r).is_ok() {}
}

/// A fresh directory under the temporary directory, removed by the caller.
fn scratch(what: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "vmc-fuzz-{what}-{}-{}",
        std::process::id(),
        crate::host::new_id()
    ));
    std::fs::create_dir(&dir).ok().map(|_| dir)
}

/// A docker-archive or OCI archive (`vmc load`) loaded into an empty store.
pub fn archive(data: &[u8]) {
    let Some(dir) = scratch("archive") else {
        return;
    };
    let tar = dir.join("in.tar");
    if std::fs::write(&tar, data).is_ok() {
        if let Ok(store) = crate::image::Store::open(&dir.join("store")) {
            let _ = crate::image::archive::load(&store, &tar);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layer tar (plain, gzip or zstd) unpacked both ways (whiteouts
/// applied, and as overlayfs whiteouts) into a fresh directory, with small
/// bounds.
pub fn layer(data: &[u8]) {
    use crate::image::layer::{decompress, unpack, Limits, Whiteouts};
    let limits = Limits {
        max_file: 1 << 20,
        max_total: 4 << 20,
        max_entries: 2_000,
    };
    for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
        let Some(dir) = scratch("layer") else {
            return;
        };
        if let Ok(r) = decompress(Cursor::new(data)) {
            let _ = unpack(r, &dir, mode, limits);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A guest driving one virtio device through its mmio transport, as a
/// hostile guest kernel would: register reads and writes in any order
/// (status, features, queue setup, notify, config space), its own bytes
/// anywhere in a 1 MiB guest memory (descriptor tables, rings, request
/// headers, packets), queue notifications, and for the devices with a host
/// side, what arrives there (frames from passt for virtio-net; host
/// connections for vsock). The first byte picks the device: virtio-blk
/// (requests on a 64 KiB disk file), virtio-rng, virtio-vsock (packets and
/// the muxer) or virtio-net (frames both ways).
pub fn virtio(data: &[u8]) {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::epoll::{Epoll, EventSet};
    use vmm_sys_util::eventfd::EventFd;

    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::{
        block::Block, mmio::MmioTransport, net::Net, rng::Rng, vsock::Vsock, EventRegistry,
        Interrupt, VirtioDevice,
    };

    let Some((&kind, mut ops)) = data.split_first() else {
        return;
    };
    let Some(dir) = scratch("virtio") else {
        return;
    };
    let mut peer = None;
    let dev: Arc<Mutex<dyn VirtioDevice>> = match kind % 4 {
        0 => {
            let disk = dir.join("disk");
            if std::fs::write(&disk, vec![0u8; 64 << 10]).is_err() {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            match Block::open(&disk, kind & 0x80 != 0, "fuzz") {
                Ok(b) => Arc::new(Mutex::new(b)),
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
            }
        }
        1 => Arc::new(Mutex::new(Rng::default())),
        2 => match Vsock::new(3, &dir.join("v.sock")) {
            Ok(v) => Arc::new(Mutex::new(v)),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        },
        _ => {
            let Ok((ours, theirs)) = std::os::unix::net::UnixStream::pair() else {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            };
            let _ = theirs.set_nonblocking(true);
            peer = Some(theirs);
            match Net::new([2, 0, 0, 0, 0, 1], ours) {
                Ok(n) => Arc::new(Mutex::new(n)),
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
            }
        }
    };
    let (Ok(mem), Ok(epoll), Ok(irq)) = (
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]),
        Epoll::new(),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let nqueues = dev
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .queue_max_sizes()
        .len();
    let evts: Vec<EventFd> = (0..nqueues)
        .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
        .collect();
    let mut t = MmioTransport::new(
        dev.clone(),
        mem.clone(),
        Arc::new(Interrupt::new(irq)),
        EventRegistry::new(Arc::new(epoll), 0),
        evts,
    );
    let mut host_conns = Vec::new();
    let take = |n: usize, ops: &mut &[u8]| -> Option<Vec<u8>> {
        if ops.len() < n {
            return None;
        }
        let (a, b) = ops.split_at(n);
        *ops = b;
        Some(a.to_vec())
    };
    // At most 256 operations: each is cheap, and a hang would show as one.
    for _ in 0..256 {
        let Some(op) = take(1, &mut ops) else { break };
        match op[0] % 7 {
            0 => {
                let Some(a) = take(7, &mut ops) else { break };
                let off = u64::from(u16::from_le_bytes([a[0], a[1]]) & 0x1ff);
                let len = [1, 2, 4, 4][usize::from(a[2] & 3)];
                t.write(off, &a[3..3 + len]);
            }
            1 => {
                let Some(a) = take(3, &mut ops) else { break };
                let off = u64::from(u16::from_le_bytes([a[0], a[1]]) & 0x1ff);
                let len = [1, 2, 4, 8][usize::from(a[2] & 3)];
                let mut buf = [0u8; 8];
                t.read(off, &mut buf[..len]);
            }
            2 => {
                let Some(a) = take(3, &mut ops) else { break };
                let addr = u64::from(u16::from_le_bytes([a[0], a[1]])) * 16;
                let Some(bytes) = take(usize::from(a[2]), &mut ops) else {
                    break;
                };
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            3 => {
                let Some(a) = take(1, &mut ops) else { break };
                if nqueues > 0 {
                    dev.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue_notify(usize::from(a[0]) % nqueues);
                }
            }
            4 => {
                // The host side: a frame from passt (net), a connection
                // with its CONNECT line and bytes (vsock).
                let Some(a) = take(1, &mut ops) else { break };
                let Some(bytes) = take(usize::from(a[0]), &mut ops) else {
                    break;
                };
                if let Some(p) = &mut peer {
                    let _ = p.write_all(&bytes);
                } else if kind % 4 == 2 && host_conns.len() < 4 {
                    if let Ok(mut c) = std::os::unix::net::UnixStream::connect(dir.join("v.sock")) {
                        let _ = c.set_nonblocking(true);
                        let _ = c.write_all(&bytes);
                        host_conns.push(c);
                    }
                }
            }
            5 => {
                let Some(a) = take(1, &mut ops) else { break };
                let events = [EventSet::IN, EventSet::OUT, EventSet::IN | EventSet::OUT]
                    [usize::from(a[0] >> 6) % 3];
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .backend_event(u64::from(a[0] & 0x3f), events);
            }
            _ => {
                // What the host reads of the device's state.
                let _ = t.snapshot();
                let _ = t.interrupt_pending();
            }
        }
    }
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}
