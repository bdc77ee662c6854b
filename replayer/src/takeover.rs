//! Going live: the log ended (its recorder died) and the program goes on
//! for real on this host. Every thread's replay state becomes a live one,
//! sockets whose bind/listen replay only emulated are made real on the
//! program's own placeholder fds, connections are rebuilt in place with
//! TCP_REPAIR, and the program with its shadow state is handed to the
//! recorder (`hotstandby_recorder::live`), which continues the same log.

use hotstandby_protocol::shadow::Shadow;
use hotstandby_protocol::sysmodel;
use hotstandby_recorder::{Takeover, TakeoverState, TakeoverThread};
use hotstandby_tracer::{mem, sys};

use crate::engine::{Engine, ReplayError, St};

/// A program handed over to live execution at the end of its log.
#[derive(Debug)]
pub struct Handover {
    pub takeover: Takeover,
    /// Where the log's last complete frame ends, and the counts to continue.
    pub log_offset: u64,
    pub next_seq: u64,
    pub events: u64,
    /// Listening sockets made real on this host: (fd, what happened).
    pub listeners: Vec<(i32, String)>,
    /// Connections rebuilt with TCP_REPAIR: (fd, what happened).
    pub connections: Vec<(i32, String)>,
    /// The rebuilt connections, to announce once the virtual IP is here
    /// (see [`Handover::resend_tails`]).
    pub resend: Vec<Resend>,
}

/// One rebuilt connection (the supervisor's duplicate of its socket).
#[derive(Debug)]
pub struct Resend {
    pub fd: i32,
    pub sock: std::os::fd::OwnedFd,
}

impl Handover {
    /// Probe each rebuilt connection (after the virtual IP moved here): the
    /// client's answer trims the re-queued tail to what it lacks, which is
    /// then retransmitted. One line per failure.
    pub fn resend_tails(&mut self) -> Vec<String> {
        use std::os::fd::AsFd;
        let mut errs = Vec::new();
        for r in self.resend.drain(..) {
            if let Err(e) = hotstandby_netguard::tcp::announce(r.sock.as_fd()) {
                errs.push(format!("connection fd {}: {e}", r.fd));
            }
        }
        errs
    }
}

impl Engine<'_> {
    /// The log ended and the program goes on for real: turn every thread's
    /// replay state into a live one and make sockets real.
    pub(crate) fn take_over(&mut self) -> Result<Handover, ReplayError> {
        // A thread running through a batch of buffered calls from the log
        // finishes it first (to its next, unrecorded, syscall): the batch's
        // writes must be counted, and their bytes kept, before the
        // connections are rebuilt.
        let running: Vec<u32> = self.filled.keys().copied().collect();
        for tid in running {
            self.finish_batch(tid)?;
        }
        let tids: Vec<u32> = self.threads.keys().copied().collect();
        let mut threads = Vec::new();
        for ns in tids {
            let st = self.take(ns)?;
            let th = &self.threads[&ns];
            let (tid, tgid, ns_tgid) = (th.live, th.tgid, th.ns_tgid);
            let state = match st {
                St::Gone => continue,
                St::Reserved { entry, s, fd } => {
                    // Back at its entry: it makes the accept for real.
                    let _at_entry = self.unreserve(ns, entry, s, fd)?;
                    TakeoverState::AtEntry
                }
                St::Running(_) => TakeoverState::Running,
                St::AtEntry(_) => TakeoverState::AtEntry,
                St::Ready(_) => TakeoverState::Ready,
                St::Blocked(mut s) => {
                    let r = s.regs()?;
                    let nr = r.orig_rax as u32;
                    let args = mem::args_of(&r);
                    if nr as i64 == libc::SYS_futex && sysmodel::futex_may_wake_spuriously(args[1])
                    {
                        // Its wake may already have happened on the old
                        // primary: a spurious return is always allowed.
                        TakeoverState::Answer { nr, args, ret: 0 }
                    } else {
                        TakeoverState::AtEntry
                    }
                }
                St::InKernel(Some(r), _) => TakeoverState::InKernel {
                    nr: r.orig_rax as u32,
                    args: mem::args_of(&r),
                },
                St::InKernel(None, _) => TakeoverState::InKernel {
                    nr: libc::SYS_vfork as u32,
                    args: [0; 6],
                },
                // At the clone's exit, with the program's result (the same
                // child id in its PID namespace).
                St::AfterClone(_) => TakeoverState::Ready,
            };
            let buf = self.threads[&ns].buf;
            if let Some(b) = buf {
                // Once the batch in its buffer is used up, it records.
                b.go_live(tid)?;
            }
            threads.push(TakeoverThread {
                ns,
                tid,
                tgid,
                ns_tgid,
                state,
                buf,
            });
        }
        let mut listeners = Vec::new();
        let mut listening = Vec::new();
        let tgids: std::collections::HashMap<u32, i32> =
            self.threads.values().map(|t| (t.ns_tgid, t.tgid)).collect();
        for ((ns_tgid, fd), setup) in &self.sockets {
            if setup.backlog.is_some() && setup.addr.len() >= 4 {
                listening.push(u16::from_be_bytes([setup.addr[2], setup.addr[3]]));
            }
            if setup.addr.is_empty() && setup.backlog.is_none() {
                continue;
            }
            let Some(tgid) = tgids.get(ns_tgid) else {
                continue;
            };
            let what = match sys::dup_from(*tgid, *fd) {
                // Shared with a forked process whose entry came first (the
                // same socket: an nginx master and its workers).
                Ok(dup) if accepting(&dup) => {
                    "listening (the same socket as another process's)".to_string()
                }
                Ok(dup) => match make_listening(
                    &dup,
                    &setup.opts,
                    &setup.addr,
                    setup.backlog,
                    self.opts.vip,
                ) {
                    Ok(()) => "listening".to_string(),
                    Err(e) => format!("could not be made real: {e}"),
                },
                Err(e) => format!("could not be reached: {e}"),
            };
            listeners.push((*fd, what));
        }
        // Then connections (in repair mode a socket may share the port of
        // the listener). All before the virtual IP moves here: no client
        // packet can reach them earlier, and once one does they must exist
        // (a packet for an unknown connection is answered with a reset).
        let mut connections = Vec::new();
        let lost_ms = match &self.opts.live {
            Some(f) if f.lost_ms.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
                f.lost_ms.load(std::sync::atomic::Ordering::Relaxed)
            }
            _ => hotstandby_netguard::tcp::wall_ms(),
        };
        let mut resend = Vec::new();
        for (fds, c) in self.shadow.conns_mut() {
            let Some(&(ns_tgid, fd)) = fds.first() else {
                continue;
            };
            let what = if !c.extra.tail_ok {
                "NOT rebuilt: bytes it sent could not be read back for the standby's tail (sendfile without an offset?)".to_string()
            } else {
                let tail: &[u8] = c.extra.tail.make_contiguous();
                let tail = &tail[tail.len().saturating_sub(c.written as usize)..];
                match tgids.get(&ns_tgid).map(|t| sys::dup_from(*t, fd)) {
                    Some(Ok(dup)) => {
                        use std::os::fd::AsFd;
                        let p = hotstandby_netguard::tcp::Progress {
                            read: c.read,
                            written: c.written,
                            tail,
                            lost_ms,
                        };
                        match hotstandby_netguard::tcp::rebuild(dup.as_fd(), &c.tcp, p) {
                            Ok(()) => {
                                let what = format!(
                                    "rebuilt ({} bytes read, {} written, last {} queued again)",
                                    c.read,
                                    c.written,
                                    tail.len()
                                );
                                resend.push(Resend { fd, sock: dup });
                                what
                            }
                            Err(e) => format!("could not be rebuilt: {e}"),
                        }
                    }
                    Some(Err(e)) => format!("could not be reached: {e}"),
                    None => "its process is gone".to_string(),
                }
            };
            connections.push((fd, what));
        }
        let shadow: Shadow<()> = std::mem::take(&mut self.shadow).map(|_| ());
        Ok(Handover {
            takeover: Takeover {
                leader: self.leader_live,
                threads,
                shadow,
                listening,
                pin: self.pin.clone(),
                preload: self.preload.clone(),
                fdtabs: self.fdtabs.iter().map(|(k, v)| (*k, *v)).collect(),
            },
            connections,
            resend,
            log_offset: self.src.position(),
            next_seq: self.src.next_seq(),
            events: self.idx as u64,
            listeners,
        })
    }
}

impl Engine<'_> {
    /// Let a thread run through the rest of its batch to its next syscall
    /// (bounded: 2 s; a thread that makes none by then goes on as it is,
    /// and the batch's writes are not in its connections' tails).
    fn finish_batch(&mut self, tid: u32) -> Result<(), ReplayError> {
        let St::Running(mut run) = self.take(tid)? else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match run.try_wait()? {
                Err(still) => {
                    if std::time::Instant::now() > deadline {
                        tracing::warn!("thread {tid} made no syscall within 2 s of the takeover; its last buffered writes may be missing from its connections' tails");
                        self.filled.remove(&tid);
                        return self.set(tid, St::Running(still));
                    }
                    run = still;
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Ok(hotstandby_tracer::Waited::Stopped(mut s, hotstandby_tracer::Stop::Entry)) => {
                    if s.regs()?.orig_rax == hotstandby_tracer::buffer::SYS_DRAIN as u64 {
                        if let Some(b) = self.th(tid)?.buf {
                            self.drain(tid, s.tid(), b)?;
                        }
                        s.skip(0)?;
                        run = s.resume(0)?;
                        continue;
                    }
                    self.settle(tid, s.tid())?;
                    return self.set(tid, St::AtEntry(s));
                }
                Ok(hotstandby_tracer::Waited::Stopped(s, stop)) => {
                    if crate::engine::stray(&stop) {
                        run = s.resume(0)?;
                        continue;
                    }
                    // A fault or rdtsc: the live recorder handles it.
                    self.settle(tid, s.tid())?;
                    let _ = stop;
                    return self.set(tid, St::Ready(s));
                }
                Ok(other) => {
                    self.filled.remove(&tid);
                    let _ = other;
                    return self.set(tid, St::Gone);
                }
            }
        }
    }
}

/// Whether a socket listens already.
fn accepting(sock: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut v: i32 = 0;
    let mut len = 4u32;
    // SAFETY: v is a writable int and len says so.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut v as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && v == 1
}

/// Re-create a recorded listening socket on the supervisor's duplicate of
/// the program's placeholder: socket options, bind (to the virtual IP even
/// before it is here, when that is the recorded address; to the same port
/// on any address when the recorded address is not on this host), listen.
pub fn make_listening(
    sock: &std::os::fd::OwnedFd,
    opts: &[(i32, i32, Vec<u8>)],
    addr: &[u8],
    backlog: Option<i32>,
    freebind_on: Option<std::net::IpAddr>,
) -> Result<(), std::io::Error> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let family = if addr.len() >= 2 {
        u16::from_le_bytes([addr[0], addr[1]]) as i32
    } else {
        0
    };
    let bound_ip: Option<std::net::IpAddr> = match family {
        libc::AF_INET if addr.len() >= 8 => {
            Some(std::net::Ipv4Addr::new(addr[4], addr[5], addr[6], addr[7]).into())
        }
        libc::AF_INET6 if addr.len() >= 24 => {
            let a: [u8; 16] = addr[8..24].try_into().expect("16 bytes");
            Some(std::net::Ipv6Addr::from(a).into())
        }
        _ => None,
    };
    if bound_ip.is_some() && bound_ip == freebind_on {
        // The virtual IP: bind to it before it is on this host.
        let one: i32 = 1;
        // SAFETY: one is a live int of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_FREEBIND,
                &one as *const i32 as *const libc::c_void,
                4,
            );
        }
    }
    for (level, name, val) in opts {
        // SAFETY: val is a live buffer of the given length.
        unsafe {
            libc::setsockopt(
                fd,
                *level,
                *name,
                val.as_ptr() as *const libc::c_void,
                val.len() as u32,
            );
        }
    }
    if !addr.is_empty() {
        // SAFETY: addr holds the sockaddr bytes the program passed to bind.
        let mut r = unsafe {
            libc::bind(
                fd,
                addr.as_ptr() as *const libc::sockaddr,
                addr.len() as u32,
            )
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            // Same port, any address of this host.
            let mut any = addr.to_vec();
            let family = u16::from_le_bytes([any[0], any[1]]) as i32;
            if family == libc::AF_INET && any.len() >= 8 {
                any[4..8].fill(0);
            } else if family == libc::AF_INET6 && any.len() >= 24 {
                any[8..24].fill(0);
            }
            // SAFETY: as above, with the address part zeroed.
            r = unsafe { libc::bind(fd, any.as_ptr() as *const libc::sockaddr, any.len() as u32) };
        }
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(b) = backlog {
        // SAFETY: plain integers.
        if unsafe { libc::listen(fd, b) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
