//! The program's sockets and connections on replay. Connections the log
//! names (`Tcp` events) are followed through the shared shadow state with
//! what the program read and wrote, and the tail of what it wrote, so a
//! takeover can rebuild them; the set-up of sockets whose bind/listen replay
//! only emulated is kept so a takeover can make them real. Mirror:
//! `hotstandby_recorder::net`.

use std::collections::VecDeque;

use hotstandby_protocol::record::{Mode, SyscallEvent, TcpConn};
use hotstandby_protocol::shadow::Note;
use hotstandby_protocol::sysmodel::{self, Family};
use hotstandby_tracer::{mem, sys, Tid};

use crate::engine::{Engine, ReplayError};

/// What replay keeps of a connection besides its counts.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The last bytes the program wrote (at most what its socket could
    /// hold unacknowledged).
    pub tail: VecDeque<u8>,
    /// False once a write's bytes could not be read back (sendfile without
    /// an offset): the connection cannot be rebuilt faithfully.
    pub tail_ok: bool,
}

/// How the program set up a socket it never really bound (replay emulates
/// bind and listen); made real when the standby goes live.
#[derive(Debug, Clone, Default)]
pub struct SockSetup {
    pub addr: Vec<u8>,
    pub backlog: Option<i32>,
    pub opts: Vec<(i32, i32, Vec<u8>)>,
}

/// SO_DOMAIN of the program's socket `fd`.
pub(crate) fn socket_domain(tgid: Tid, fd: i32) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let d = sys::dup_from(tgid, fd).ok()?;
    let mut v: i32 = 0;
    let mut len = 4u32;
    // SAFETY: v is a writable int and len says so.
    let rc = unsafe {
        libc::getsockopt(
            d.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut v as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(v as u64)
}

/// The bytes a replayed `sendfile(conn, file, &offset, n)` sent: read from
/// the standby's own copy of the file at the offset the program passed
/// (still in its memory: the call's outputs are written after this). A
/// NULL offset (the file position) or a read error gives nothing, and the
/// connection is then not rebuilt.
fn sendfile_bytes(live: Tid, tgid: Tid, a: &[u64; 6], n: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    if a[2] == 0 {
        return Vec::new();
    }
    let Ok(off) = sys::read_mem(live, a[2], 8) else {
        return Vec::new();
    };
    let off = u64::from_le_bytes(off[..8].try_into().expect("8 bytes"));
    let Ok(fd) = sys::dup_from(tgid, a[1] as i32) else {
        return Vec::new();
    };
    let f = std::fs::File::from(fd);
    let mut buf = vec![0u8; n as usize];
    match f.read_exact_at(&mut buf, off) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

impl Engine<'_> {
    /// A connection the program just accepted, as the primary captured it.
    pub(crate) fn on_tcp(&mut self, c: &TcpConn) -> Result<(), ReplayError> {
        let ns_tgid = self.th(c.tid)?.ns_tgid;
        self.shadow.accepted(
            ns_tgid,
            c.fd,
            c.clone(),
            Conn {
                tail: VecDeque::new(),
                tail_ok: true,
            },
        );
        Ok(())
    }

    /// The bytes a write on one of the program's connections sends, read
    /// before the call is replayed.
    pub(crate) fn tail_bytes(&mut self, tid: u32, live: Tid, ev: &SyscallEvent) -> Option<Vec<u8>> {
        if ev.ret <= 0 {
            return None;
        }
        let family = sysmodel::spec(ev.nr)?.family;
        if !matches!(family, Family::Write(_) | Family::SendFile) {
            return None;
        }
        let th = self.threads.get(&tid)?;
        let (tgid, ns_tgid) = (th.tgid, th.ns_tgid);
        self.shadow.conn(ns_tgid, ev.args[0] as i32)?;
        Some(if family == Family::SendFile {
            sendfile_bytes(live, tgid, &ev.args, ev.ret as u64)
        } else {
            mem::moved_bytes_nr(live, ev.nr, &ev.args, ev.ret).unwrap_or_default()
        })
    }

    /// Keep what a connection's change means for its rebuild.
    pub(crate) fn conn_notes(&mut self, notes: Vec<Note<Conn>>, tail: Option<&[u8]>) {
        for n in notes {
            if let Note::Io { id, wrote: true, n } = n {
                let max = self.tail_max;
                let Some(c) = self.shadow.conn_by_id_mut(id) else {
                    continue;
                };
                let data = tail.unwrap_or(&[]);
                if data.len() as u64 != n {
                    c.extra.tail_ok = false;
                }
                c.extra.tail.extend(data);
                let over = c.extra.tail.len().saturating_sub(max);
                c.extra.tail.drain(..over);
            }
        }
    }

    /// Remember the set-up of sockets replay only emulates (bind, listen,
    /// setsockopt), to make them real at a takeover.
    pub(crate) fn note_setup(
        &mut self,
        tid: u32,
        live: Tid,
        ev: &SyscallEvent,
    ) -> Result<(), ReplayError> {
        if ev.ret < 0 {
            return Ok(());
        }
        let Some(spec) = sysmodel::spec(ev.nr) else {
            return Ok(());
        };
        let ns_tgid = self.th(tid)?.ns_tgid;
        let a = &ev.args;
        let key = (ns_tgid, a[0] as i32);
        match spec.family {
            Family::Bind if ev.mode == Mode::Emulated => {
                let addr = sys::read_mem(live, a[1], (a[2] as usize).min(128))?;
                self.sockets.entry(key).or_default().addr = addr;
            }
            Family::Listen if ev.mode == Mode::Emulated => {
                self.sockets.entry(key).or_default().backlog = Some(a[1] as i32);
            }
            Family::SockOpt if ev.mode == Mode::Emulated => {
                let v = sys::read_mem(live, a[3], (a[4] as usize).min(256))?;
                self.sockets
                    .entry(key)
                    .or_default()
                    .opts
                    .push((a[1] as i32, a[2] as i32, v));
            }
            Family::Close => {
                self.sockets.remove(&key);
            }
            Family::CloseRange => {
                let (lo, hi) = (a[0] as u32, a[1] as u32);
                self.sockets
                    .retain(|(g, fd), _| *g != ns_tgid || (*fd as u32) < lo || (*fd as u32) > hi);
            }
            Family::Dup(_) | Family::Fcntl => {
                let to = match spec.family {
                    Family::Dup(Some(i)) => a[i] as i32,
                    Family::Dup(None) => ev.ret as i32,
                    _ if matches!(a[1] as i32, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => {
                        ev.ret as i32
                    }
                    _ => return Ok(()),
                };
                if let Some(v) = self.sockets.get(&key).cloned() {
                    self.sockets.insert((ns_tgid, to), v);
                } else {
                    self.sockets.remove(&(ns_tgid, to));
                }
            }
            _ => {}
        }
        Ok(())
    }
}
