//! Parsing and executing one virtio-blk request (virtio 1.2 section 5.2.6).
//!
//! A request is a readable 16-byte header, then data (readable for writes,
//! writable for reads), then one writable status byte. Everything the guest
//! hands over is checked: chain shape, lengths (whole sectors, bounded), and
//! the sector range against the disk's capacity.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, Le32, Le64};

use super::super::Mem;

pub const SECTOR_SIZE: u64 = 512;
/// Largest request accepted (Linux sends at most max_sectors_kb, 1280 KiB by default).
pub const MAX_REQUEST: usize = 16 << 20;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Length of the serial-number string answered to GET_ID.
pub const ID_BYTES: usize = 20;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Header {
    pub type_: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: Header is repr(C) of little-endian integers with no padding; any
// byte pattern is a valid value.
unsafe impl ByteValued for Header {}

/// The disk a request runs against.
pub struct Disk<'a> {
    pub file: &'a File,
    pub capacity: u64,
    pub read_only: bool,
    pub id: &'a [u8],
}

/// Runs the request in `chain`; returns the number of bytes written into the
/// guest's buffers (the used length), including the status byte.
pub fn handle(chain: &DescriptorChain<&Mem>, mem: &Mem, disk: &Disk, buf: &mut Vec<u8>) -> u32 {
    let Ok(mut writer) = chain.clone().writer::<()>(mem) else {
        return 0;
    };
    // Without a writable status byte there is nowhere to report anything.
    let Some(data_len) = writer.available_bytes().checked_sub(1) else {
        return 0;
    };
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        return 0;
    };
    let (status, written) = match chain.clone().reader::<()>(mem) {
        Ok(reader) => execute(reader, &mut writer, disk, buf),
        Err(_) => (S_IOERR, 0),
    };
    if status_writer.write_all(&[status]).is_err() {
        return written;
    }
    written + 1
}

fn execute(
    mut reader: Reader<'_>,
    writer: &mut Writer<'_>,
    disk: &Disk,
    buf: &mut Vec<u8>,
) -> (u8, u32) {
    let Ok(hdr) = reader.read_obj::<Header>() else {
        return (S_IOERR, 0);
    };
    let sector = hdr.sector.to_native();
    match hdr.type_.to_native() {
        T_IN => {
            let len = writer.available_bytes();
            let Some(offset) = check_range(sector, len, disk) else {
                return (S_IOERR, 0);
            };
            buf.resize(len, 0);
            if disk.file.read_exact_at(buf, offset).is_err() {
                return (S_IOERR, 0);
            }
            match writer.write_all(buf) {
                Ok(()) => (S_OK, len as u32),
                Err(_) => (S_IOERR, writer.bytes_written() as u32),
            }
        }
        T_OUT => {
            if disk.read_only {
                return (S_IOERR, 0);
            }
            let len = reader.available_bytes();
            let Some(offset) = check_range(sector, len, disk) else {
                return (S_IOERR, 0);
            };
            buf.resize(len, 0);
            if reader.read_exact(buf).is_err() || disk.file.write_all_at(buf, offset).is_err() {
                return (S_IOERR, 0);
            }
            (S_OK, 0)
        }
        T_FLUSH => match disk.read_only || disk.file.sync_data().is_ok() {
            true => (S_OK, 0),
            false => (S_IOERR, 0),
        },
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = disk.id.len().min(ID_BYTES);
            id[..n].copy_from_slice(&disk.id[..n]);
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&id[..n]) {
                Ok(()) => (S_OK, n as u32),
                Err(_) => (S_IOERR, 0),
            }
        }
        _ => (S_UNSUPP, 0),
    }
}

/// Byte offset of a transfer of `len` bytes at `sector`, if it is whole
/// sectors, bounded, and inside the disk.
fn check_range(sector: u64, len: usize, disk: &Disk) -> Option<u64> {
    if len as u64 % SECTOR_SIZE != 0 || len > MAX_REQUEST {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len as u64)?;
    (end <= disk.capacity).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(f: &File, ro: bool) -> Disk<'_> {
        Disk {
            file: f,
            capacity: 8 * SECTOR_SIZE,
            read_only: ro,
            id: b"vmc-test",
        }
    }

    #[test]
    fn ranges_must_be_whole_sectors_inside_the_disk() {
        let f = tempfile::tempfile().unwrap();
        let d = disk(&f, false);
        assert_eq!(check_range(0, 512, &d), Some(0));
        assert_eq!(check_range(7, 512, &d), Some(7 * 512));
        assert_eq!(check_range(7, 1024, &d), None);
        assert_eq!(check_range(0, 100, &d), None);
        assert_eq!(check_range(u64::MAX / 2, 512, &d), None);
        assert_eq!(check_range(u64::MAX, 0, &d), None);
    }
}
