//! The supervisor's shadow of the program's kernel state: what each fd of
//! each process is, the signal actions it set, and the TCP connections it
//! holds (with every fd alias). The recorder and the replayer keep the same
//! shadow and change it only through [`Shadow::apply`], with the
//! [`Change`]s that [`effects`] derives from the syscall model; so both
//! sides agree by construction on what an fd is, what a signal does and
//! when a connection ends.
//!
//! Processes are named by the thread-group id the program knows (the same
//! on both sides: the program runs in its own PID namespace).
//!
//! Pure data: reading the tracee's memory or /proc is left to the caller,
//! through [`Peek`].

use std::collections::{BTreeMap, HashMap};

use crate::record::TcpConn;
use crate::sysmodel::{Class, Family, Spec};

/// What an fd refers to, which decides whether replay executes syscalls on
/// it (an object the program owns) or emulates them (the outside world).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdKind {
    /// A regular file or directory: executed on replay, reads hashed.
    File,
    /// A pipe, socketpair, eventfd, epoll or null device created by the
    /// program itself: executed on replay.
    Internal,
    /// A network socket, inherited stdio, tty, /proc or /sys file, device,
    /// timerfd, signalfd, inotify: emulated on replay.
    External,
}

/// (thread-group id, fd).
pub type FdRef = (u32, i32);

/// Signal numbers are 1..=64.
pub const NSIG: usize = 65;

/// A signal action as the program set it with `rt_sigaction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigAct {
    /// `SIG_DFL` (0), `SIG_IGN` (1) or the handler's address.
    pub handler: u64,
    pub flags: u64,
}

/// What a signal does to a thread of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ignore,
    Fatal,
    Handler {
        /// `SA_RESTART`: an interrupted syscall is restarted.
        restart: bool,
    },
}

/// One process of the program.
#[derive(Debug, Clone)]
pub struct Process {
    pub fds: BTreeMap<i32, FdKind>,
    pub sigact: [SigAct; NSIG],
}

impl Process {
    fn new(inherited: impl IntoIterator<Item = i32>) -> Self {
        Process {
            fds: inherited
                .into_iter()
                .map(|fd| (fd, FdKind::External))
                .collect(),
            sigact: [SigAct::default(); NSIG],
        }
    }
}

/// One of the program's TCP connections.
#[derive(Debug, Clone)]
pub struct Conn<T> {
    /// The connection as the primary's kernel set it up at accept.
    pub tcp: TcpConn,
    /// Bytes the program has read from it and written to it.
    pub read: u64,
    pub written: u64,
    /// What one side keeps besides (the replayer: the tail of what was
    /// written, for the rebuild at takeover).
    pub extra: T,
}

/// Names one connection while its fds change.
pub type ConnId = u64;

/// The program's connections by fd, with aliases: `dup`, `dup2`, `dup3`,
/// `fcntl(F_DUPFD*)` and fork give one connection several fds. A connection
/// ends when its last fd is closed.
#[derive(Debug, Clone)]
pub struct ConnTable<T> {
    fds: HashMap<FdRef, ConnId>,
    items: HashMap<ConnId, T>,
    next: ConnId,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            fds: HashMap::new(),
            items: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> ConnTable<T> {
    /// A new connection on `fd` (an alias already there is closed first;
    /// what that ends is returned).
    pub fn insert(&mut self, fd: FdRef, item: T) -> Option<T> {
        let ended = self.close(fd);
        self.next += 1;
        self.items.insert(self.next, item);
        self.fds.insert(fd, self.next);
        ended
    }

    pub fn id(&self, fd: FdRef) -> Option<ConnId> {
        self.fds.get(&fd).copied()
    }

    pub fn get(&self, fd: FdRef) -> Option<&T> {
        self.items.get(self.fds.get(&fd)?)
    }

    pub fn get_mut(&mut self, fd: FdRef) -> Option<&mut T> {
        self.items.get_mut(self.fds.get(&fd)?)
    }

    pub fn by_id_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.items.get_mut(&id)
    }

    /// `to` becomes another fd of the connection on `from` (if any);
    /// returns what closing the old `to` ended.
    pub fn dup(&mut self, from: FdRef, to: FdRef) -> Option<T> {
        if from == to {
            return None;
        }
        let ended = self.close(to);
        if let Some(id) = self.fds.get(&from).copied() {
            self.fds.insert(to, id);
        }
        ended
    }

    /// Close `fd`; returns the connection if that was its last fd.
    pub fn close(&mut self, fd: FdRef) -> Option<T> {
        let id = self.fds.remove(&fd)?;
        if self.fds.values().any(|v| *v == id) {
            return None;
        }
        self.items.remove(&id)
    }

    /// The fds of process `tgid` that hold a connection.
    fn fds_of(&self, tgid: u32) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .fds
            .keys()
            .filter(|(g, _)| *g == tgid)
            .map(|(_, f)| *f)
            .collect();
        v.sort_unstable();
        v
    }

    /// Each connection with all its fds (sorted).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Vec<FdRef>, &mut T)> {
        let mut by: HashMap<ConnId, Vec<FdRef>> = HashMap::new();
        for (fd, id) in &self.fds {
            by.entry(*id).or_default().push(*fd);
        }
        self.items.iter_mut().map(move |(id, t)| {
            let mut v = by.remove(id).unwrap_or_default();
            v.sort_unstable();
            (v, t)
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// What a completed syscall (or a ptrace event) changed in the shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    NewFd {
        fd: i32,
        kind: FdKind,
    },
    Dup {
        from: i32,
        to: i32,
    },
    Close {
        fd: i32,
    },
    CloseRange {
        lo: u32,
        hi: u32,
    },
    SigAction {
        sig: i32,
        act: SigAct,
    },
    /// The process exec'd: handlers reset to the default (ignored stays
    /// ignored), and only the fds in `open` are left (close-on-exec ones
    /// are gone).
    Exec {
        open: Vec<i32>,
    },
    /// A new process `child`, with a copy of this one's state.
    Fork {
        child: u32,
    },
    /// The process is gone (its fds are closed).
    Gone,
    /// Bytes moved on `fd`.
    Io {
        fd: i32,
        wrote: bool,
        n: u64,
    },
    /// `shutdown` on `fd`.
    Shutdown {
        fd: i32,
    },
}

/// What a change did to a connection, for the output rule and the
/// standby's connection tails.
#[derive(Debug)]
pub enum Note<T> {
    /// The connection's last fd was closed: its FIN or RST may leave.
    Ended(Conn<T>),
    /// The program shut the connection down (FIN).
    Shutdown(ConnId),
    /// `n` bytes were read from or written to the connection.
    Io { id: ConnId, wrote: bool, n: u64 },
}

/// The shadow state of the whole program.
#[derive(Debug, Clone)]
pub struct Shadow<T> {
    procs: HashMap<u32, Process>,
    conns: ConnTable<Conn<T>>,
}

impl<T> Default for Shadow<T> {
    fn default() -> Self {
        Shadow {
            procs: HashMap::new(),
            conns: ConnTable::default(),
        }
    }
}

impl<T: Clone> Shadow<T> {
    /// The shadow as plain data for a checkpoint (`extra` gives each
    /// connection's tail and whether it is whole); with
    /// [`Shadow::from_image`] it comes back the same.
    pub fn image(
        &self,
        extra: impl Fn(&T) -> (Vec<u8>, bool),
    ) -> (
        Vec<crate::checkpoint::ProcImage>,
        Vec<crate::checkpoint::ConnImage>,
        u64,
    ) {
        let kind = |k: FdKind| match k {
            FdKind::File => 0u8,
            FdKind::Internal => 1,
            FdKind::External => 2,
        };
        let mut procs: Vec<_> = self
            .procs
            .iter()
            .map(|(g, p)| crate::checkpoint::ProcImage {
                tgid: *g,
                fds: p.fds.iter().map(|(f, k)| (*f, kind(*k))).collect(),
                sigact: p.sigact.iter().map(|a| (a.handler, a.flags)).collect(),
            })
            .collect();
        procs.sort_by_key(|p| p.tgid);
        let mut by: HashMap<ConnId, Vec<FdRef>> = HashMap::new();
        for (fd, id) in &self.conns.fds {
            by.entry(*id).or_default().push(*fd);
        }
        let mut ids: Vec<&ConnId> = self.conns.items.keys().collect();
        ids.sort_unstable();
        let conns = ids
            .into_iter()
            .map(|id| {
                let c = &self.conns.items[id];
                let mut fds = by.remove(id).unwrap_or_default();
                fds.sort_unstable();
                let (tail, tail_ok) = extra(&c.extra);
                crate::checkpoint::ConnImage {
                    fds,
                    tcp: c.tcp.clone(),
                    read: c.read,
                    written: c.written,
                    tail,
                    tail_ok,
                }
            })
            .collect();
        (procs, conns, self.conns.next)
    }

    /// The shadow a checkpoint saved with [`Shadow::image`].
    pub fn from_image(
        procs: &[crate::checkpoint::ProcImage],
        conns: &[crate::checkpoint::ConnImage],
        next: u64,
        extra: impl Fn(&crate::checkpoint::ConnImage) -> T,
    ) -> Self {
        let mut s = Shadow::default();
        for p in procs {
            let mut sigact = [SigAct::default(); NSIG];
            for (i, (h, f)) in p.sigact.iter().enumerate().take(NSIG) {
                sigact[i] = SigAct {
                    handler: *h,
                    flags: *f,
                };
            }
            let fds = p
                .fds
                .iter()
                .map(|(f, k)| {
                    let k = match k {
                        0 => FdKind::File,
                        1 => FdKind::Internal,
                        _ => FdKind::External,
                    };
                    (*f, k)
                })
                .collect();
            s.procs.insert(p.tgid, Process { fds, sigact });
        }
        let mut id = 0;
        for c in conns {
            id += 1;
            s.conns.items.insert(
                id,
                Conn {
                    tcp: c.tcp.clone(),
                    read: c.read,
                    written: c.written,
                    extra: extra(c),
                },
            );
            for fd in &c.fds {
                s.conns.fds.insert(*fd, id);
            }
        }
        s.conns.next = next.max(id);
        s
    }

    /// The first process, holding the fds it inherited (all external).
    pub fn new(tgid: u32, inherited: impl IntoIterator<Item = i32>) -> Self {
        let mut s = Shadow::default();
        s.procs.insert(tgid, Process::new(inherited));
        s
    }

    pub fn process(&self, tgid: u32) -> Option<&Process> {
        self.procs.get(&tgid)
    }

    fn proc_mut(&mut self, tgid: u32) -> &mut Process {
        self.procs
            .entry(tgid)
            .or_insert_with(|| Process::new(std::iter::empty()))
    }

    /// The kind of an fd the shadow knows.
    pub fn kind(&self, tgid: u32, fd: i32) -> Option<FdKind> {
        self.procs.get(&tgid)?.fds.get(&fd).copied()
    }

    /// What `sig` does to process `tgid` now.
    pub fn disposition(&self, tgid: u32, sig: i32) -> Disposition {
        let a = self
            .procs
            .get(&tgid)
            .and_then(|p| p.sigact.get(sig as usize).copied())
            .unwrap_or_default();
        match a.handler {
            0 => match sig {
                libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT => {
                    Disposition::Ignore
                }
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => {
                    Disposition::Ignore
                }
                _ => Disposition::Fatal,
            },
            1 => Disposition::Ignore,
            _ => Disposition::Handler {
                restart: a.flags & libc::SA_RESTART as u64 != 0,
            },
        }
    }

    /// Every process's signal actions (handed over at a takeover).
    pub fn processes(&self) -> impl Iterator<Item = (u32, &Process)> {
        self.procs.iter().map(|(k, v)| (*k, v))
    }

    /// A connection the program accepted on `fd`.
    pub fn accepted(&mut self, tgid: u32, fd: i32, tcp: TcpConn, extra: T) -> Option<Conn<T>> {
        self.conns.insert(
            (tgid, fd),
            Conn {
                tcp,
                read: 0,
                written: 0,
                extra,
            },
        )
    }

    /// A connection carried over from a replay (takeover), on all its fds.
    pub fn adopt_conn(&mut self, fds: &[FdRef], conn: Conn<T>) {
        if let Some((first, rest)) = fds.split_first() {
            self.conns.insert(*first, conn);
            for fd in rest {
                self.conns.dup(*first, *fd);
            }
        }
    }

    pub fn conn(&self, tgid: u32, fd: i32) -> Option<&Conn<T>> {
        self.conns.get((tgid, fd))
    }

    pub fn conn_id(&self, tgid: u32, fd: i32) -> Option<ConnId> {
        self.conns.id((tgid, fd))
    }

    pub fn conn_by_id_mut(&mut self, id: ConnId) -> Option<&mut Conn<T>> {
        self.conns.by_id_mut(id)
    }

    /// Each connection with all its fds.
    pub fn conns_mut(&mut self) -> impl Iterator<Item = (Vec<FdRef>, &mut Conn<T>)> {
        self.conns.iter_mut()
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// The same shadow with each connection's extra replaced.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Shadow<U> {
        let ConnTable { fds, items, next } = self.conns;
        Shadow {
            procs: self.procs,
            conns: ConnTable {
                fds,
                items: items
                    .into_iter()
                    .map(|(k, c)| {
                        (
                            k,
                            Conn {
                                tcp: c.tcp,
                                read: c.read,
                                written: c.written,
                                extra: f(c.extra),
                            },
                        )
                    })
                    .collect(),
                next,
            },
        }
    }

    /// Apply one change to process `tgid`.
    pub fn apply(&mut self, tgid: u32, change: Change) -> Vec<Note<T>> {
        let mut notes = Vec::new();
        let ended = |c: Option<Conn<T>>, notes: &mut Vec<Note<T>>| {
            if let Some(c) = c {
                notes.push(Note::Ended(c));
            }
        };
        match change {
            Change::NewFd { fd, kind } => {
                self.proc_mut(tgid).fds.insert(fd, kind);
                // A new fd number replaces whatever the shadow still had on it.
                if self.conns.id((tgid, fd)).is_some() {
                    ended(self.conns.close((tgid, fd)), &mut notes);
                }
            }
            Change::Dup { from, to } => {
                if from != to {
                    let p = self.proc_mut(tgid);
                    let k = p.fds.get(&from).copied().unwrap_or(FdKind::External);
                    p.fds.insert(to, k);
                    ended(self.conns.dup((tgid, from), (tgid, to)), &mut notes);
                }
            }
            Change::Close { fd } => {
                self.proc_mut(tgid).fds.remove(&fd);
                ended(self.conns.close((tgid, fd)), &mut notes);
            }
            Change::CloseRange { lo, hi } => {
                let in_range = |fd: i32| (fd as u32) >= lo && (fd as u32) <= hi;
                self.proc_mut(tgid).fds.retain(|fd, _| !in_range(*fd));
                for fd in self.conns.fds_of(tgid) {
                    if in_range(fd) {
                        ended(self.conns.close((tgid, fd)), &mut notes);
                    }
                }
            }
            Change::SigAction { sig, act } => {
                if let Some(slot) = self.proc_mut(tgid).sigact.get_mut(sig as usize) {
                    *slot = act;
                }
            }
            Change::Exec { open } => {
                let p = self.proc_mut(tgid);
                for a in p.sigact.iter_mut() {
                    if a.handler > 1 {
                        *a = SigAct::default();
                    }
                }
                p.fds.retain(|fd, _| open.contains(fd));
                for fd in self.conns.fds_of(tgid) {
                    if !open.contains(&fd) {
                        ended(self.conns.close((tgid, fd)), &mut notes);
                    }
                }
            }
            Change::Fork { child } => {
                let copy = self.proc_mut(tgid).clone();
                self.procs.insert(child, copy);
                for fd in self.conns.fds_of(tgid) {
                    self.conns.dup((tgid, fd), (child, fd));
                }
            }
            Change::Gone => {
                self.procs.remove(&tgid);
                for fd in self.conns.fds_of(tgid) {
                    ended(self.conns.close((tgid, fd)), &mut notes);
                }
            }
            Change::Io { fd, wrote, n } => {
                if let Some(id) = self.conns.id((tgid, fd)) {
                    let c = self.conns.by_id_mut(id).expect("id of a live fd");
                    if wrote {
                        c.written += n;
                    } else {
                        c.read += n;
                    }
                    notes.push(Note::Io { id, wrote, n });
                }
            }
            Change::Shutdown { fd } => {
                if let Some(id) = self.conns.id((tgid, fd)) {
                    notes.push(Note::Shutdown(id));
                }
            }
        }
        notes
    }
}

/// What the caller can look up for [`effects`]: the tracee's memory and
/// what a new fd is.
pub trait Peek {
    /// `len` bytes of the tracee's memory at `addr`.
    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// What the fd the program just opened refers to.
    fn classify(&mut self, fd: i32) -> FdKind;
}

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The changes a call made through the syscall buffer made (bytes moved on
/// its fd: buffered calls create and close nothing).
pub fn buffered_effects(call: &crate::record::BufCall) -> Vec<Change> {
    let Some(spec) = crate::sysmodel::spec(call.nr as u32) else {
        return Vec::new();
    };
    if call.flags & 1 != 0 || call.ret <= 0 {
        return Vec::new();
    }
    match spec.family {
        Family::Read { .. } => vec![Change::Io {
            fd: call.fd,
            wrote: false,
            n: call.ret as u64,
        }],
        Family::Write(_) => vec![Change::Io {
            fd: call.fd,
            wrote: true,
            n: call.ret as u64,
        }],
        _ => Vec::new(),
    }
}

/// The changes a completed syscall made, from its model entry alone.
pub fn effects(spec: &Spec, args: &[u64; 6], ret: i64, peek: &mut dyn Peek) -> Vec<Change> {
    if ret < 0 || spec.class == Class::Refuse {
        return Vec::new();
    }
    let fd0 = args[0] as i32;
    match spec.family {
        Family::Open => vec![Change::NewFd {
            fd: ret as i32,
            kind: peek.classify(ret as i32),
        }],
        Family::NewFd(kind) => vec![Change::NewFd {
            fd: ret as i32,
            kind,
        }],
        Family::Accept => vec![Change::NewFd {
            fd: ret as i32,
            kind: FdKind::External,
        }],
        Family::NewFdPair(i) => match peek.read(args[i], 8) {
            Some(b) => b
                .chunks_exact(4)
                .map(|c| Change::NewFd {
                    fd: i32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    kind: FdKind::Internal,
                })
                .collect(),
            None => Vec::new(),
        },
        Family::Dup(None) => vec![Change::Dup {
            from: fd0,
            to: ret as i32,
        }],
        Family::Dup(Some(i)) => vec![Change::Dup {
            from: fd0,
            to: args[i] as i32,
        }],
        Family::Fcntl if matches!(args[1] as i32, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => {
            vec![Change::Dup {
                from: fd0,
                to: ret as i32,
            }]
        }
        Family::Close => vec![Change::Close { fd: fd0 }],
        Family::CloseRange => vec![Change::CloseRange {
            lo: args[0] as u32,
            hi: args[1] as u32,
        }],
        Family::SigAction if args[1] != 0 && (args[0] as usize) < NSIG => {
            match peek.read(args[1], 16) {
                Some(b) => vec![Change::SigAction {
                    sig: args[0] as i32,
                    act: SigAct {
                        handler: word(&b, 0),
                        flags: word(&b, 8),
                    },
                }],
                None => Vec::new(),
            }
        }
        Family::Read { flags, .. } if ret > 0 => {
            let peeked = flags
                .map(|i| args[i] & libc::MSG_PEEK as u64 != 0)
                .unwrap_or(false);
            if peeked {
                Vec::new()
            } else {
                vec![Change::Io {
                    fd: fd0,
                    wrote: false,
                    n: ret as u64,
                }]
            }
        }
        Family::Write(_) | Family::SendFile if ret > 0 => vec![Change::Io {
            fd: fd0,
            wrote: true,
            n: ret as u64,
        }],
        Family::Shutdown => vec![Change::Shutdown { fd: fd0 }],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
