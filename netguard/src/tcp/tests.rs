use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let r = unsafe { libc::geteuid() } == 0;
    if !r {
        eprintln!("SKIPPED LOUDLY: TCP_REPAIR needs CAP_NET_ADMIN (run as root)");
    }
    r
}

/// A connection captured at accept, retired silently, and rebuilt on a new
/// socket carries on: the client sees the right bytes in both directions,
/// no reset, and the re-sent tail is deduplicated by its kernel.
#[test]
fn capture_then_rebuild_carries_on() {
    if !root() {
        panic!("this test must run as root (CI does)");
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    c.write_all(b"hello").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let conn = capture(s.as_fd(), 1, 5).unwrap();
    assert!(is_tcp(s.as_fd()));
    assert_eq!(conn.fd, 5);
    assert!(
        conn.options & TCPI_OPT_TIMESTAMPS != 0,
        "loopback negotiates timestamps"
    );
    let mut s = s;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    s.write_all(b"abcdef").unwrap();
    let mut got = [0u8; 3];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    drop(l);
    close_silently(OwnedFd::from(s)).unwrap();

    // SAFETY: plain socket(2) call; the fd is owned right away.
    let n = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(n >= 0);
    // SAFETY: n is a fresh descriptor owned by nobody else.
    let n = unsafe { OwnedFd::from_raw_fd(n) };
    rebuild(
        n.as_fd(),
        &conn,
        Progress {
            read: 5,
            written: 6,
            tail: b"abcdef",
            lost_ms: wall_ms(),
        },
    )
    .unwrap();
    announce(n.as_fd()).unwrap();
    let mut n = TcpStream::from(n);
    c.write_all(b"more").unwrap();
    let mut buf = [0u8; 4];
    n.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    n.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"more");
    n.write_all(b"xyz").unwrap();
    let mut rest = [0u8; 6];
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"defxyz");
}

/// Negative control: rebuilt with a wrong count of bytes read, the
/// connection does not carry the client's next bytes to the program.
#[test]
fn rebuild_with_wrong_read_count_loses_the_stream() {
    if !root() {
        panic!("this test must run as root (CI does)");
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let conn = capture(s.as_fd(), 1, 5).unwrap();
    drop(l);
    close_silently(OwnedFd::from(s)).unwrap();
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let n = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)) };
    rebuild(
        n.as_fd(),
        &conn,
        Progress {
            read: 1000,
            written: 0,
            tail: b"",
            lost_ms: wall_ms(),
        },
    )
    .unwrap();
    let mut n = TcpStream::from(n);
    c.write_all(b"more").unwrap();
    n.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4];
    assert!(
        n.read_exact(&mut buf).is_err(),
        "bytes before rcv_nxt must not be delivered"
    );
}

fn reuseaddr(fd: BorrowedFd<'_>) -> i32 {
    get(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR").unwrap()
}

/// Leaving repair mode clears the kernel's reuse flag; capture and the
/// window probe put it back, and a rebuilt socket takes the recorded one.
/// Without that, the TIME-WAIT of a connection the program closed first
/// keeps its port from being bound again for a minute.
#[test]
fn repair_keeps_the_address_reuse_flag() {
    if !root() {
        panic!("this test must run as root (CI does)");
    }
    // std's TcpListener sets SO_REUSEADDR; accepted sockets inherit it.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    assert_eq!(reuseaddr(s.as_fd()), 1);
    let conn = capture(s.as_fd(), 1, 5).unwrap();
    assert_eq!(conn.reuse, 1, "recorded");
    assert_eq!(reuseaddr(s.as_fd()), 1, "still set after capture");
    announce(s.as_fd()).unwrap();
    assert_eq!(reuseaddr(s.as_fd()), 1, "still set after the window probe");

    // The negative control: the bare kernel behaviour this works around.
    let ip = libc::IPPROTO_TCP;
    set(s.as_fd(), ip, TCP_REPAIR, &TCP_REPAIR_ON, "on").unwrap();
    set(s.as_fd(), ip, TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP, "off").unwrap();
    assert_eq!(reuseaddr(s.as_fd()), 0, "the kernel clears it");
}
