use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::*;
use crate::devices::virtio::testing::registry;

const CID: u64 = 3;

fn muxer() -> (tempfile::TempDir, Muxer, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut m = Muxer::new(CID, &path).unwrap();
    m.activate(registry()).unwrap();
    (dir, m, path)
}

#[allow(clippy::too_many_arguments)]
fn from_guest(
    m: &mut Muxer,
    local: u32,
    peer: u32,
    opcode: u16,
    flags: u32,
    data: &[u8],
    buf_alloc: u32,
    fwd: u32,
) {
    m.on_guest_packet(
        &Hdr {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: peer,
            dst_port: local,
            op: opcode,
            flags,
            buf_alloc,
            fwd_cnt: fwd,
        },
        data,
    );
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Connects from the host and completes the handshake; returns the stream,
/// the connection's event id and its host port.
fn host_connect(m: &mut Muxer, path: &Path, port: u32) -> (UnixStream, u64, u32) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    m.on_event(LISTENER_SUB, EventSet::IN);
    let (req, _) = m.next_rx(4096).expect("a REQUEST for the guest");
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, port);
    assert_eq!(req.dst_cid, CID);
    assert!(req.src_port >= 1 << 30);
    from_guest(m, req.src_port, port, op::RESPONSE, 0, &[], 4096, 0);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    let id = m
        .by_id
        .iter()
        .find(|(_, k)| k.peer == port)
        .map(|(i, _)| *i)
        .unwrap();
    (s, id, req.src_port)
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes() {
    let (_d, mut m, path) = muxer();
    let (mut s, id, local) = host_connect(&mut m, &path, 1024);
    s.write_all(b"hello").unwrap();
    m.on_event(id, EventSet::IN);
    let (h, data) = m.next_rx(4096).unwrap();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"hello"[..]));
    assert_eq!(h.buf_alloc, CONN_BUF);
    assert!(
        m.next_rx(4096).is_none(),
        "nothing more until the host writes"
    );

    from_guest(&mut m, local, 1024, op::RW, 0, b"world", 4096, 5);
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world");

    from_guest(
        &mut m,
        local,
        1024,
        op::SHUTDOWN,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        &[],
        4096,
        5,
    );
    let (h, _) = m.next_rx(4096).unwrap();
    assert_eq!(h.op, op::RST);
    assert_eq!(m.connection_count(), 0);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host sees end of stream");
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let (_d, mut m, path) = muxer();
    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    from_guest(&mut m, 5000, 7777, op::REQUEST, 0, &[], 4096, 0);
    let (h, _) = m.next_rx(4096).unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 5000, 7777));
    let (mut s, _) = listener.accept().unwrap();
    from_guest(&mut m, 5000, 7777, op::RW, 0, b"ping", 4096, 0);
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

#[test]
fn refused_and_unknown_connections_get_resets() {
    let (_d, mut m, _path) = muxer();
    from_guest(&mut m, 6000, 1, op::REQUEST, 0, &[], 4096, 0);
    let (h, _) = m.next_rx(4096).unwrap();
    assert_eq!((h.op, h.dst_port, h.src_port), (op::RST, 1, 6000));
    from_guest(&mut m, 6001, 2, op::RW, 0, b"x", 4096, 0);
    assert_eq!(m.next_rx(4096).unwrap().0.op, op::RST);
    from_guest(&mut m, 6002, 3, op::RST, 0, &[], 4096, 0);
    assert!(m.next_rx(4096).is_none(), "no reset answers a reset");
    // A packet claiming another source CID is dropped.
    m.on_guest_packet(
        &Hdr {
            src_cid: 99,
            dst_cid: HOST_CID,
            op: op::REQUEST,
            dst_port: 1,
            ..Default::default()
        },
        &[],
    );
    assert!(m.next_rx(4096).is_none());
}

#[test]
fn sending_to_the_guest_respects_its_credit() {
    let (_d, mut m, path) = muxer();
    let (mut s, id, local) = host_connect(&mut m, &path, 1024);
    from_guest(&mut m, local, 1024, op::CREDIT_UPDATE, 0, &[], 8, 0);
    s.write_all(&[7u8; 20]).unwrap();
    m.on_event(id, EventSet::IN);
    let (h, d) = m.next_rx(4096).unwrap();
    assert_eq!((h.op, d.len()), (op::RW, 8));
    assert!(m.next_rx(4096).is_none(), "no credit left");
    from_guest(&mut m, local, 1024, op::CREDIT_UPDATE, 0, &[], 8, 8);
    let (_, d) = m.next_rx(4096).unwrap();
    assert_eq!(d.len(), 8);
    from_guest(&mut m, local, 1024, op::CREDIT_UPDATE, 0, &[], 8, 16);
    assert_eq!(
        m.next_rx(2).unwrap().1.len(),
        2,
        "and the guest's buffer size"
    );
}

#[test]
fn a_guest_that_overruns_our_buffer_is_reset() {
    let (_d, mut m, path) = muxer();
    let (_s, _id, local) = host_connect(&mut m, &path, 1024);
    // The host never reads; the socket buffer fills, then our buffer.
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        from_guest(&mut m, local, 1024, op::RW, 0, &chunk, 4096, 0);
        if let Some((h, _)) = m.next_rx(4096) {
            if h.op == op::RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn half_close_from_the_host_keeps_the_other_direction() {
    let (_d, mut m, path) = muxer();
    let (mut s, id, local) = host_connect(&mut m, &path, 1024);
    s.write_all(b"last").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    m.on_event(id, EventSet::IN | EventSet::READ_HANG_UP);
    assert_eq!(m.next_rx(4096).unwrap().1, b"last");
    let (h, _) = m.next_rx(4096).unwrap();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    from_guest(&mut m, local, 1024, op::RW, 0, b"reply", 4096, 4);
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
    // Guest half-closes too: the host reads end of stream.
    from_guest(
        &mut m,
        local,
        1024,
        op::SHUTDOWN,
        SHUTDOWN_SEND,
        &[],
        4096,
        4,
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn malformed_handshakes_are_dropped() {
    let (_d, mut m, path) = muxer();
    for bad in [
        "CONNECT x\n",
        "HELLO 1\n",
        "CONNECT 1\nextra",
        "CONNECT 99999999999999999999\n",
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        m.on_event(LISTENER_SUB, EventSet::IN);
        assert!(m.next_rx(4096).is_none(), "{bad:?}");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "{bad:?} closed");
    }
    assert!(m.handshakes.is_empty());
    assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
}

#[test]
fn each_muxer_starts_its_host_ports_elsewhere() {
    // A restored VMM must not begin where its snapshot's template did: the
    // guest may still hold that connection's port.
    let starts: std::collections::HashSet<u32> = (0..8)
        .map(|_| {
            let (_d, mut m, path) = muxer();
            let (_s, _, port) = host_connect(&mut m, &path, 1024);
            assert!(port >= 1 << 30);
            port
        })
        .collect();
    assert!(starts.len() >= 7, "{starts:?}");
}
