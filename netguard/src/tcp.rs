//! TCP connection state: captured on the primary when the program accepts a
//! connection, rebuilt on the standby with `TCP_REPAIR` when it goes live.
//!
//! The order of the repair steps follows the kernel's rules (see CRIU's
//! soccr for the reference description): repair on, queue sequence numbers,
//! bind and connect (no handshake in repair mode), options, timestamp,
//! windows, repair off. The bytes the client may not have yet are written
//! after repair is off, so they leave at once instead of waiting for a
//! retransmission timer.

use crate::{os, NetError};
use hotstandby_protocol::TcpConn;
use std::os::fd::{AsRawFd, BorrowedFd};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// Added to the estimated timestamp clock of a rebuilt connection: the
/// clocks of primary and standby must agree within this (NTP does).
pub const TS_MARGIN_MS: u32 = 100;
/// `tcpi_options` bits.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;

/// The kernel's `struct tcp_repair_window`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

/// The kernel's `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RepairOpt {
    code: u32,
    val: u32,
}

fn set<T>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    v: &T,
    step: &'static str,
) -> Result<(), NetError> {
    // SAFETY: v is a live, initialised value of exactly the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(os(step));
    }
    Ok(())
}

fn set_slice<T>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    v: &[T],
    step: &'static str,
) -> Result<(), NetError> {
    // SAFETY: v is a live slice; the length passed is its size in bytes.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v.as_ptr() as *const libc::c_void,
            std::mem::size_of_val(v) as u32,
        )
    };
    if r != 0 {
        return Err(os(step));
    }
    Ok(())
}

fn get<T: Default>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    step: &'static str,
) -> Result<T, NetError> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as u32;
    // SAFETY: v is a writable value of `len` bytes; the kernel writes at
    // most `len` bytes and updates len.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &mut v as *mut T as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(os(step));
    }
    Ok(v)
}

/// bind(2) or connect(2) with sockaddr bytes.
fn with_addr(
    fd: BorrowedFd<'_>,
    addr: &[u8],
    call: unsafe extern "C" fn(i32, *const libc::sockaddr, libc::socklen_t) -> i32,
    step: &'static str,
) -> Result<(), NetError> {
    if addr.len() < 2 {
        return Err(NetError::Invalid(format!("{step}: no address recorded")));
    }
    // SAFETY: addr is a live buffer of sockaddr bytes of the length passed;
    // the kernel checks the family and length.
    if unsafe {
        call(
            fd.as_raw_fd(),
            addr.as_ptr() as *const libc::sockaddr,
            addr.len() as u32,
        )
    } != 0
    {
        return Err(os(step));
    }
    Ok(())
}

fn inq(fd: BorrowedFd<'_>) -> Result<u32, NetError> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(os("FIONREAD"));
    }
    Ok(n as u32)
}

fn sockaddr(fd: BorrowedFd<'_>, peer: bool) -> Result<Vec<u8>, NetError> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as u32;
    // SAFETY: buf is 128 writable bytes, len says so; the kernel truncates.
    let r = unsafe {
        if peer {
            libc::getpeername(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::sockaddr,
                &mut len,
            )
        } else {
            libc::getsockname(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::sockaddr,
                &mut len,
            )
        }
    };
    if r != 0 {
        return Err(os(if peer { "getpeername" } else { "getsockname" }));
    }
    Ok(buf[..(len as usize).min(128)].to_vec())
}

/// The local port of an IPv4 or IPv6 socket.
pub fn local_port(fd: BorrowedFd<'_>) -> Option<u16> {
    let a = sockaddr(fd, false).ok()?;
    (a.len() >= 4).then(|| u16::from_be_bytes([a[2], a[3]]))
}

/// Whether `fd` is a connected TCP socket (IPv4 or IPv6).
pub fn is_tcp(fd: BorrowedFd<'_>) -> bool {
    let proto: Result<i32, _> = get(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL");
    let ty: Result<i32, _> = get(fd, libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE");
    matches!((proto, ty), (Ok(p), Ok(t)) if p == libc::IPPROTO_TCP && t == libc::SOCK_STREAM)
}

/// Wall clock in ms since the epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Read what a standby needs to rebuild the connection on `fd` (a
/// supervisor's duplicate of the program's freshly accepted socket). The
/// socket is put in repair mode for a few microseconds to read its queue
/// sequence numbers, and left without sending the window probe.
pub fn capture(fd: BorrowedFd<'_>, tid: u32, prog_fd: i32) -> Result<TcpConn, NetError> {
    let info = tcp_info(fd)?;
    let local = sockaddr(fd, false)?;
    let remote = sockaddr(fd, true)?;
    let mss: i32 = get(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let reuse: i32 = get(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
    set(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR,
        &TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )?;
    let r = (|| {
        set(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_QUEUE,
            &TCP_SEND_QUEUE,
            "TCP_REPAIR_QUEUE",
        )?;
        let snd: u32 = get(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (send)")?;
        set(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_QUEUE,
            &TCP_RECV_QUEUE,
            "TCP_REPAIR_QUEUE",
        )?;
        // rcv_nxt counts bytes that arrived but were not read yet: the
        // program reads from rcv_nxt - (bytes queued). Read until stable.
        let mut rcv_base = 0;
        for _ in 0..100 {
            let q1 = inq(fd)?;
            let nxt: u32 = get(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (recv)")?;
            let q2 = inq(fd)?;
            let nxt2: u32 = get(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (recv)")?;
            if q1 == q2 && nxt == nxt2 {
                rcv_base = nxt.wrapping_sub(q1);
                break;
            }
        }
        let w: RepairWindow = get(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            "TCP_REPAIR_WINDOW",
        )?;
        let ts: u32 = get(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
        Ok::<_, NetError>((snd, rcv_base, w, ts))
    })();
    let off = repair_off(fd, false, reuse);
    let (snd, rcv_base, w, ts) = r?;
    off?;
    Ok(TcpConn {
        tid,
        fd: prog_fd,
        local,
        remote,
        snd_base: snd,
        rcv_base,
        mss: mss as u32,
        snd_wscale: info.snd_wscale,
        rcv_wscale: info.rcv_wscale,
        options: info.options,
        reuse: (reuse != 0) as u8,
        snd_wnd: w.snd_wnd,
        rcv_wnd: w.rcv_wnd,
        tsval: ts,
        wall_ms: wall_ms(),
    })
}

/// The fields of `struct tcp_info` used here.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// Bytes sent and acknowledged by the peer (`tcpi_bytes_acked`).
    pub bytes_acked: u64,
    /// Bytes received from the peer (`tcpi_bytes_received`).
    pub bytes_received: u64,
}

/// `TCP_INFO`, decoded at the kernel's fixed offsets.
pub fn tcp_info(fd: BorrowedFd<'_>) -> Result<Info, NetError> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as u32;
    // SAFETY: buf is 256 writable bytes and len says so.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(os("TCP_INFO"));
    }
    if len < 136 {
        return Err(NetError::Invalid(format!(
            "TCP_INFO returned only {len} bytes"
        )));
    }
    let u64at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    Ok(Info {
        state: buf[0],
        options: buf[5],
        snd_wscale: buf[6] & 0xf,
        rcv_wscale: buf[6] >> 4,
        bytes_acked: u64at(120),
        bytes_received: u64at(128),
    })
}

/// What the standby knows of a connection when it goes live.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Bytes the program read / wrote on it (replayed from the log).
    pub read: u64,
    pub written: u64,
    /// The last bytes it wrote (the client may lack any of them).
    pub tail: &'a [u8],
    /// Wall clock (ms) by which the old primary had certainly stopped
    /// sending (when it was declared lost).
    pub lost_ms: u64,
}

/// Rebuild the connection `c` in place on `fd` (a duplicate of the
/// program's own placeholder socket, unconnected): afterwards the program's
/// fd is the established connection, at the sequence numbers the client
/// expects, and the tail of what the program wrote is on its way again.
pub fn rebuild(fd: BorrowedFd<'_>, c: &TcpConn, p: Progress<'_>) -> Result<(), NetError> {
    let tail = p.tail.len() as u64;
    if tail > p.written {
        return Err(NetError::Invalid(format!(
            "tail of {tail} bytes is longer than the {} bytes written",
            p.written
        )));
    }
    if c.local.len() < 8 || c.remote.len() < 8 {
        return Err(NetError::Invalid(format!(
            "connection on fd {}: the log holds no usable addresses",
            c.fd
        )));
    }
    let snd = c.snd_base.wrapping_add((p.written - tail) as u32);
    let rcv = c.rcv_base.wrapping_add(p.read as u32);
    let ip = libc::IPPROTO_TCP;
    set(fd, ip, TCP_REPAIR, &TCP_REPAIR_ON, "TCP_REPAIR on")?;
    set(
        fd,
        ip,
        TCP_REPAIR_QUEUE,
        &TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE send",
    )?;
    set(fd, ip, TCP_QUEUE_SEQ, &snd, "TCP_QUEUE_SEQ send")?;
    set(
        fd,
        ip,
        TCP_REPAIR_QUEUE,
        &TCP_RECV_QUEUE,
        "TCP_REPAIR_QUEUE recv",
    )?;
    set(fd, ip, TCP_QUEUE_SEQ, &rcv, "TCP_QUEUE_SEQ recv")?;
    // The local address (the virtual IP) is not on this host yet: it moves
    // here once every connection is ready. IP_TRANSPARENT lets the socket
    // bind and route from it meanwhile; it is cleared again below.
    let v4 = u16::from_le_bytes([c.local[0], c.local[1]]) == libc::AF_INET as u16;
    let (lvl, opt) = if v4 {
        (libc::IPPROTO_IP, libc::IP_TRANSPARENT)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT)
    };
    set(fd, lvl, opt, &1i32, "IP_TRANSPARENT")?;
    with_addr(fd, &c.local, libc::bind, "bind (repair)")?;
    // The MSS must be known at connect, which sizes segments from it.
    // (TCP_MAXSEG accepts at most 32767; the repair option below sets the
    // exact value.)
    set(
        fd,
        ip,
        libc::TCP_MAXSEG,
        &(c.mss.min(32767) as i32),
        "TCP_MAXSEG",
    )?;
    // In repair mode connect sends nothing and makes the socket established.
    with_addr(fd, &c.remote, libc::connect, "connect (repair)")?;
    set(fd, lvl, opt, &0i32, "IP_TRANSPARENT off")?;
    let mut opts = vec![RepairOpt {
        code: TCPOPT_MSS,
        val: c.mss,
    }];
    if c.options & TCPI_OPT_WSCALE != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16,
        });
    }
    if c.options & TCPI_OPT_SACK != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if c.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    set_slice(fd, ip, TCP_REPAIR_OPTIONS, &opts, "TCP_REPAIR_OPTIONS")?;
    if c.options & TCPI_OPT_TIMESTAMPS != 0 {
        // At or above the last value the old primary can have sent: its
        // clock when it was declared lost, plus a small margin for clock
        // differences between the hosts (the client only rejects values
        // that go backwards). Not more: the client's first
        // acknowledgements echo the old primary's last value, and the gap
        // becomes this socket's first RTT sample (a 10 s margin meant a
        // 30 s retransmission timeout; counting the replay and rebuild time
        // too made a slow takeover's connections slow to retransmit).
        let elapsed = p.lost_ms.saturating_sub(c.wall_ms);
        let ts = c
            .tsval
            .wrapping_add(elapsed as u32)
            .wrapping_add(TS_MARGIN_MS);
        set(fd, ip, TCP_TIMESTAMP, &ts, "TCP_TIMESTAMP")?;
    }
    // The bytes the client may lack go into the send queue as already
    // sent: the client's first acknowledgement then falls inside what this
    // socket has sent, drops what the client has, and what is left is
    // retransmitted. (Written as new data instead, bytes the client already
    // holds would make its acknowledgements point past everything sent.)
    if !p.tail.is_empty() {
        let cur: i32 = get(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")?;
        let want = (p.tail.len() as i64 * 2 + cur as i64).min(i32::MAX as i64) as i32;
        set(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &want,
            "SO_SNDBUFFORCE",
        )?;
        set(
            fd,
            ip,
            TCP_REPAIR_QUEUE,
            &TCP_SEND_QUEUE,
            "TCP_REPAIR_QUEUE send",
        )?;
        send_all(fd, p.tail)?;
    }
    let w = RepairWindow {
        snd_wl1: rcv,
        snd_wnd: c.snd_wnd.max(c.mss),
        max_window: c.snd_wnd.max(c.mss),
        rcv_wnd: c.rcv_wnd.max(c.mss),
        rcv_wup: rcv,
    };
    set(fd, ip, TCP_REPAIR_WINDOW, &w, "TCP_REPAIR_WINDOW")?;
    repair_off(fd, false, c.reuse as i32)
}

/// Leave repair mode (with a window probe when `probe`). The kernel resets
/// the socket's address-reuse flag as it leaves repair mode
/// (`sk_reuse = SK_NO_REUSE`); a TIME-WAIT left by such a socket would then
/// keep the program's port from being bound again for a minute. So the flag
/// the socket had (inherited from its listener) is put back.
fn repair_off(fd: BorrowedFd<'_>, probe: bool, reuse: i32) -> Result<(), NetError> {
    let ip = libc::IPPROTO_TCP;
    if probe {
        set(fd, ip, TCP_REPAIR, &0i32, "TCP_REPAIR off (window probe)")?;
    } else {
        set(fd, ip, TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP, "TCP_REPAIR off")?;
    }
    set(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &reuse,
        "SO_REUSEADDR after repair",
    )
}

/// Once the virtual IP is on this host: send a window probe, so that the
/// client answers with what it has received and the re-queued tail is
/// trimmed to what it lacks (and retransmitted) without waiting for a timer.
pub fn announce(fd: BorrowedFd<'_>) -> Result<(), NetError> {
    let ip = libc::IPPROTO_TCP;
    let reuse: i32 = get(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
    set(fd, ip, TCP_REPAIR, &TCP_REPAIR_ON, "TCP_REPAIR on")?;
    repair_off(fd, true, reuse)
}

/// Write `data` on a socket (in repair mode: into its send queue).
fn send_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> Result<(), NetError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !data.is_empty() {
        // SAFETY: data is a live slice of the given length.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::ENOBUFS) if std::time::Instant::now() < deadline => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            _ => {
                return Err(NetError::Os {
                    step: "resending the unacknowledged tail",
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Drop a connection without a trace on the wire: in repair mode, close
/// sends neither FIN nor RST. Used to retire a primary's socket in tests.
pub fn close_silently(fd: std::os::fd::OwnedFd) -> Result<(), NetError> {
    use std::os::fd::AsFd;
    set(
        fd.as_fd(),
        libc::IPPROTO_TCP,
        TCP_REPAIR,
        &TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )?;
    drop(fd);
    Ok(())
}

#[cfg(test)]
mod tests;
