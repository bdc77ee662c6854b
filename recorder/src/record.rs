//! Recording: run a program under the supervisor and write every
//! nondeterministic input and scheduling decision to a log.
//!
//! One thread runs user code at a time (the *current* thread). Threads switch
//! only at syscall boundaries. A thread that enters a syscall which may block
//! goes into the kernel and, if it does not come back at once while another
//! thread is runnable, is logged as `Enter` and another thread runs. A
//! completed syscall is logged when its thread is next allowed to run user
//! code, so the log order is the order in which user code observed results.
//! Asynchronous signals are held back and delivered at a syscall boundary,
//! which is logged as a `Signal` event.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use hotstandby_netguard::conns::{self, ConnTable};
use hotstandby_netguard::gate::{key_of, Gate, Key};
use hotstandby_netguard::tcp;
use hotstandby_protocol::record::{Event, Identity, MemWrite, Mode, SyscallEvent, TcpConn};
use hotstandby_protocol::sysmodel::{self, Class, Out, Spec};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use thiserror::Error;

use crate::fdtable::{FdKind, FdTable};
use crate::logfile::{LogError, LogWriter};
use crate::model::{self, EntryInfo};
use crate::sys::{self, Regs, SysError};
use crate::tracee::{self, SpawnError};

/// Errors of a recording.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Sys(#[from] SysError),
    /// waitpid failed.
    #[error("waiting for the program: {0}")]
    Wait(nix::Error),
    /// The data directory could not be copied into the log.
    #[error("copying the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub log_dir: PathBuf,
    pub argv: Vec<String>,
    /// A directory whose starting state is copied into the log, so replay
    /// can start from it.
    pub data_dir: Option<PathBuf>,
    /// Backpressure from a replication driver (`hotstandby run`).
    pub throttle: Option<std::sync::Arc<crate::logfile::Throttle>>,
    /// The output rule, told what the program does on its connections.
    pub gate: Option<std::sync::Arc<hotstandby_netguard::gate::Gate>>,
}

/// The result of a recording.
#[derive(Debug, Clone)]
pub struct RecordOutcome {
    /// Shell-style exit status of the program (128+N for signal N).
    pub exit_status: i32,
    pub events: u64,
    pub bytes: u64,
}

pub(crate) const ERESTARTSYS: i64 = -512;
pub(crate) const ERESTARTNOINTR: i64 = -513;
pub(crate) const ERESTARTNOHAND: i64 = -514;
pub(crate) const ERESTART_RESTARTBLOCK: i64 = -516;

pub fn is_restart(ret: i64) -> bool {
    matches!(
        ret,
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    )
}

/// Events a thread runs before it yields to a waiting runnable thread.
const SLICE: u32 = 64;

#[derive(Debug, Clone)]
struct Pending {
    nr: u32,
    args: [u64; 6],
    mode: Mode,
    spec: Option<&'static Spec>,
    entry: EntryInfo,
    path: Vec<u8>,
    /// The fd's kind for fd I/O (to hash file reads).
    fd_kind: Option<FdKind>,
    /// Emulated ioctl outputs.
    ioctl_out: &'static [Out],
}

#[derive(Debug)]
enum St {
    /// The current thread, running user code.
    Running,
    /// Stopped; resumes user code when scheduled.
    Ready,
    /// A new thread whose first stop has not been seen yet.
    Starting,
    /// In the kernel executing a syscall.
    InKernel(Pending),
    /// Its syscall was interrupted (ERESTART code); a signal stop follows.
    Restarting(Pending, i64),
    /// Syscall finished in the kernel, result not yet logged.
    Done(Pending, Regs),
    /// Syscall interrupted by `sig`, held at the signal-delivery-stop.
    Interrupted(Pending, i64, i32, Vec<u8>),
    /// Exiting.
    Exiting,
    /// Stopped at a syscall entry not yet handled (after a takeover).
    AtEntry,
}

#[derive(Debug)]
struct Th {
    tgid: i32,
    st: St,
    slice: u32,
    /// rip right after the last logged syscall, while no user code ran.
    resumed_rip: Option<u64>,
    /// A signal we queued to this thread ourselves, with its siginfo.
    expect: Option<(i32, Vec<u8>)>,
}

/// What the supervisor tracks per process.
#[derive(Debug, Clone)]
struct Proc {
    fds: FdTable,
    /// (handler, flags) per signal, as set with rt_sigaction.
    sigact: [(u64, u64); 65],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disp {
    Ignore,
    Fatal,
    Handler { restart: bool },
}

struct Recorder {
    log: LogWriter,
    threads: BTreeMap<i32, Th>,
    runq: VecDeque<i32>,
    current: Option<i32>,
    tentative: Option<i32>,
    pending_sigs: VecDeque<(i32, Vec<u8>)>,
    /// Per-process state, by tgid.
    procs: HashMap<i32, Proc>,
    leader: i32,
    exit_status: Option<i32>,
    early_stops: HashSet<i32>,
    warned: HashSet<u64>,
    /// The thread that last ran user code (for time slices).
    last_run: Option<i32>,
    /// After a takeover the program knows its threads by the ids they had
    /// on the old primary: recorded id → live id and back. Empty (identity)
    /// in a recording that started here.
    to_live: HashMap<u32, i32>,
    to_rec: HashMap<i32, u32>,
    /// The output rule, if any.
    gate: Option<std::sync::Arc<Gate>>,
    /// The program's TCP connections by (tgid, fd).
    conns: ConnTable<ConnTrack>,
}

/// What the supervisor knows of one of the program's TCP connections.
#[derive(Debug, Clone)]
pub struct ConnTrack {
    pub key: Option<Key>,
    pub conn: TcpConn,
    pub written: u64,
    pub read: u64,
}

/// Record a program into `opts.log_dir`. Blocks until it exits.
pub fn record(opts: &RecordOptions) -> Result<RecordOutcome, RecordError> {
    let cwd = std::env::current_dir().map_err(|source| RecordError::DataDir {
        path: ".".into(),
        source,
    })?;
    let data_dir = opts
        .data_dir
        .as_ref()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()));
    let id: Identity = tracee::identity(
        &opts.argv,
        tracee::recorded_env(),
        &cwd,
        data_dir.as_deref(),
    )?;
    let mut log = LogWriter::create(&opts.log_dir, &id)?;
    if let Some(t) = &opts.throttle {
        log.set_throttle(t.clone());
    }
    if let Some(d) = &data_dir {
        copy_tree(d, &opts.log_dir.join(crate::logfile::DATA_START)).map_err(|source| {
            RecordError::DataDir {
                path: d.clone(),
                source,
            }
        })?;
    }
    let pid = tracee::spawn(&id, None)?;
    forward_signals(pid);
    let mut r = Recorder::new(log, pid);
    r.gate = opts.gate.clone();
    r.procs.insert(
        pid,
        Proc {
            fds: FdTable::inherit(pid),
            sigact: [(0, 0); 65],
        },
    );
    r.last_run = Some(pid);
    r.threads.insert(
        pid,
        Th {
            tgid: pid,
            st: St::Running,
            slice: 0,
            resumed_rip: None,
            expect: None,
        },
    );
    r.current = Some(pid);
    sys::cont(pid, 0)?;
    let status = r.run()?;
    let bytes = r.log.bytes();
    let events = r.log.finish(status)?;
    Ok(RecordOutcome {
        exit_status: status,
        events,
        bytes,
    })
}

/// How a thread stands when a replay hands the program over to live
/// execution.
#[derive(Debug, Clone)]
pub enum TakeoverState {
    /// Running user code (at most one thread).
    Running,
    /// Stopped at a syscall entry that was not recorded: it runs for real.
    AtEntry,
    /// Stopped between syscalls, ready to run user code.
    Ready,
    /// Inside a syscall the replay let into the kernel.
    InKernel { nr: u32, args: [u64; 6] },
    /// Stopped at the entry of a syscall that is answered without running
    /// it (a futex wait returns a spurious wakeup: glibc re-checks).
    Answer { nr: u32, args: [u64; 6], ret: i64 },
}

/// A thread handed over by a replay.
#[derive(Debug, Clone)]
pub struct TakeoverThread {
    /// The id the program knows it by (from the log).
    pub rec: u32,
    pub live: i32,
    /// Live thread-group id.
    pub tgid: i32,
    pub state: TakeoverState,
}

/// What a replay hands over when it goes live.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// Live pid of the main process.
    pub leader: i32,
    pub threads: Vec<TakeoverThread>,
    /// Per live tgid: signal dispositions (handler, flags) tracked by replay.
    pub sigact: Vec<(i32, [(u64, u64); 65])>,
    /// The program's TCP connections, rebuilt or not, with all their
    /// (live tgid, fd) aliases.
    pub conns: Vec<(Vec<(i32, i32)>, ConnTrack)>,
    /// Ports of the program's listening sockets (for the output rule).
    pub listening: Vec<u16>,
}

/// Let a replayed program continue for real from where its log ends,
/// recording into `log` (the same log, continued). Blocks until it exits.
pub fn continue_live(
    t: Takeover,
    log: LogWriter,
    gate: Option<std::sync::Arc<Gate>>,
) -> Result<RecordOutcome, RecordError> {
    forward_signals(t.leader);
    let mut r = Recorder::new(log, t.leader);
    if let Some(g) = &gate {
        for p in &t.listening {
            g.listening(*p);
        }
    }
    for (fds, c) in &t.conns {
        if let (Some(g), Some(key)) = (&gate, c.key) {
            g.adopt(key, c.conn.snd_base, c.conn.rcv_base, c.written, c.read);
        }
        if let Some((first, rest)) = fds.split_first() {
            r.conns.insert(*first, c.clone());
            for fd in rest {
                r.conns.dup(*first, *fd);
            }
        }
    }
    r.gate = gate;
    r.to_live = t.threads.iter().map(|th| (th.rec, th.live)).collect();
    r.to_rec = t.threads.iter().map(|th| (th.live, th.rec)).collect();
    for (tgid, sigact) in &t.sigact {
        r.procs.insert(
            *tgid,
            Proc {
                fds: FdTable::adopt(*tgid),
                sigact: *sigact,
            },
        );
    }
    for th in &t.threads {
        r.proc(th.tgid);
        let pending = |nr: u32, args: [u64; 6], mode: Mode| Pending {
            nr,
            args,
            mode,
            spec: sysmodel::spec(nr),
            entry: EntryInfo::default(),
            path: Vec::new(),
            fd_kind: None,
            ioctl_out: &[],
        };
        let st = match &th.state {
            TakeoverState::Running => {
                r.current = Some(th.live);
                St::Running
            }
            TakeoverState::AtEntry => {
                r.runq.push_back(th.live);
                St::AtEntry
            }
            TakeoverState::Ready => {
                r.runq.push_back(th.live);
                St::Ready
            }
            TakeoverState::InKernel { nr, args } => {
                St::InKernel(pending(*nr, *args, Mode::Executed))
            }
            TakeoverState::Answer { nr, args, ret } => {
                let mut regs = sys::get_regs(th.live)?;
                regs.orig_rax = u64::MAX;
                regs.rax = *ret as u64;
                sys::set_regs(th.live, &regs)?;
                r.runq.push_back(th.live);
                St::Done(pending(*nr, *args, Mode::Emulated), regs)
            }
        };
        r.threads.insert(
            th.live,
            Th {
                tgid: th.tgid,
                st,
                slice: 0,
                resumed_rip: None,
                expect: None,
            },
        );
    }
    if let Some(c) = r.current {
        sys::cont(c, 0)?;
    }
    let status = r.run()?;
    let bytes = r.log.bytes();
    let events = r.log.finish(status)?;
    Ok(RecordOutcome {
        exit_status: status,
        events,
        bytes,
    })
}

static TRACEE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = TRACEE.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes plain integers.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to the supervisor go to the
/// program (which then records them like any other signal) instead of
/// ending the supervisor and losing the end of the log.
fn forward_signals(pid: i32) {
    TRACEE.store(pid, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installs an async-signal-safe handler (it only calls
        // kill); the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Copy a directory tree (regular files, directories, symlinks).
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let ft = e.file_type()?;
        let to = dst.join(e.file_name());
        if ft.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &to)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

fn wait_any() -> Result<Option<WaitStatus>, RecordError> {
    match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::ECHILD) => Ok(None),
        Err(Errno::EINTR) => wait_any(),
        Err(e) => Err(RecordError::Wait(e)),
    }
}

fn status_pid(s: &WaitStatus) -> Option<i32> {
    s.pid().map(|p| p.as_raw())
}

impl Recorder {
    fn new(log: LogWriter, leader: i32) -> Self {
        Recorder {
            log,
            threads: BTreeMap::new(),
            runq: VecDeque::new(),
            current: None,
            tentative: None,
            pending_sigs: VecDeque::new(),
            procs: HashMap::new(),
            leader,
            exit_status: None,
            early_stops: HashSet::new(),
            warned: HashSet::new(),
            last_run: None,
            to_live: HashMap::new(),
            to_rec: HashMap::new(),
            gate: None,
            conns: ConnTable::default(),
        }
    }

    fn run(&mut self) -> Result<i32, RecordError> {
        loop {
            if self.threads.is_empty() {
                break;
            }
            if self.current.is_none() {
                if let Some(t) = self.tentative {
                    if !self.runq.is_empty() {
                        self.enter_logged(t)?;
                    }
                }
                if let Some(t) = self.runq.pop_front() {
                    self.schedule(t)?;
                    continue;
                }
            }
            self.log.flush()?;
            match wait_any()? {
                Some(s) => self.handle(s)?,
                None => break,
            }
        }
        Ok(self.exit_status.unwrap_or(0))
    }

    fn enter_logged(&mut self, t: i32) -> Result<(), RecordError> {
        self.tentative = None;
        let (nr, args, mode) = match &self.threads.get(&t).map(|th| &th.st) {
            Some(St::InKernel(p)) | Some(St::Restarting(p, _)) => (p.nr, p.args, p.mode),
            _ => return Ok(()),
        };
        self.log.event(Event::Enter {
            tid: self.rt(t),
            nr,
            args,
            mode,
        })?;
        Ok(())
    }

    fn th(&mut self, t: i32) -> &mut Th {
        self.threads.get_mut(&t).expect("known thread")
    }

    fn remove_thread(&mut self, t: i32) {
        self.threads.remove(&t);
        self.runq.retain(|x| *x != t);
        if self.current == Some(t) {
            self.current = None;
        }
        if self.tentative == Some(t) {
            self.tentative = None;
        }
    }

    fn handle(&mut self, s: WaitStatus) -> Result<(), RecordError> {
        let Some(pid) = status_pid(&s) else {
            return Ok(());
        };
        if !self.threads.contains_key(&pid) {
            // The first stop of a thread whose clone has not completed yet.
            match s {
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {}
                _ => {
                    self.early_stops.insert(pid);
                }
            }
            return Ok(());
        }
        match s {
            WaitStatus::Exited(_, code) => {
                if pid == self.leader {
                    self.exit_status = Some(code);
                }
                self.remove_thread(pid);
            }
            WaitStatus::Signaled(_, sig, _) => {
                if pid == self.leader {
                    self.exit_status = Some(128 + sig as i32);
                }
                self.remove_thread(pid);
            }
            WaitStatus::PtraceEvent(_, _, ev) => self.on_event(pid, ev)?,
            WaitStatus::PtraceSyscall(_) => self.on_exit_stop(pid)?,
            WaitStatus::Stopped(_, sig) => self.on_signal(pid, sig as i32)?,
            _ => {}
        }
        Ok(())
    }

    fn on_event(&mut self, pid: i32, ev: i32) -> Result<(), RecordError> {
        match ev {
            libc::PTRACE_EVENT_SECCOMP => {
                let st = std::mem::replace(&mut self.th(pid).st, St::Running);
                match st {
                    St::Restarting(p, _) | St::InKernel(p) => {
                        // The kernel restarts an interrupted syscall.
                        self.th(pid).st = St::InKernel(p);
                        sys::syscall(pid, 0)?;
                    }
                    St::Running => self.on_entry(pid)?,
                    other => {
                        self.th(pid).st = other;
                        tracing::warn!(pid, "syscall entry from a thread that is not running");
                        sys::cont(pid, 0)?;
                    }
                }
            }
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                let child = sys::event_msg(pid)? as i32;
                let flags = match &self.th(pid).st {
                    St::InKernel(p) => clone_flags(p.nr, &p.args),
                    _ => 0,
                };
                self.spawned(pid, child, flags)?;
                sys::syscall(pid, 0)?;
            }
            libc::PTRACE_EVENT_EXEC => {
                sys::hide_vdso(pid)?;
                let tgid = self.th(pid).tgid;
                // Handlers reset to default at exec; ignored stays ignored.
                for a in self.proc(tgid).sigact.iter_mut() {
                    if a.0 > 1 {
                        *a = (0, 0);
                    }
                }
                sys::syscall(pid, 0)?;
            }
            libc::PTRACE_EVENT_EXIT => {
                self.th(pid).st = St::Exiting;
                self.runq.retain(|x| *x != pid);
                if self.current == Some(pid) {
                    self.current = None;
                }
                if self.tentative == Some(pid) {
                    self.tentative = None;
                }
                sys::cont(pid, 0)?;
            }
            _ => sys::cont(pid, 0)?,
        }
        Ok(())
    }

    fn on_exit_stop(&mut self, pid: i32) -> Result<(), RecordError> {
        let st = std::mem::replace(&mut self.th(pid).st, St::Ready);
        let St::InKernel(p) = st else {
            self.th(pid).st = st;
            return Ok(sys::cont(pid, 0)?);
        };
        let regs = sys::get_regs(pid)?;
        let ret = regs.rax as i64;
        if is_restart(ret) {
            self.th(pid).st = St::Restarting(p, ret);
            sys::syscall(pid, 0)?;
            return Ok(());
        }
        self.th(pid).st = St::Done(p, regs);
        self.became_runnable(pid)
    }

    fn became_runnable(&mut self, pid: i32) -> Result<(), RecordError> {
        if self.tentative == Some(pid) && self.current.is_none() {
            self.tentative = None;
            self.schedule(pid)
        } else {
            self.runq.push_back(pid);
            Ok(())
        }
    }

    /// The id the program knows a live thread by.
    fn rt(&self, live: i32) -> u32 {
        self.to_rec.get(&live).copied().unwrap_or(live as u32)
    }

    /// The live id of an id the program passed (pids, tids; 0 and negative
    /// values such as process groups pass through).
    fn lv(&self, rec: u64) -> u64 {
        let v = rec as i64 as i32;
        if v <= 0 {
            return rec;
        }
        match self.to_live.get(&(v as u32)) {
            Some(l) => *l as u64,
            None => rec,
        }
    }

    fn proc(&mut self, tgid: i32) -> &mut Proc {
        self.procs.entry(tgid).or_insert_with(|| Proc {
            fds: FdTable::default(),
            sigact: [(0, 0); 65],
        })
    }

    /// A new thread or process appeared (ptrace clone/fork/vfork event).
    fn spawned(&mut self, parent: i32, child: i32, flags: u64) -> Result<(), RecordError> {
        let ptgid = self.th(parent).tgid;
        let tgid = if flags & libc::CLONE_THREAD as u64 != 0 {
            ptgid
        } else {
            let copy = self.proc(ptgid).clone();
            self.procs.insert(child, copy);
            child
        };
        let started = self.early_stops.remove(&child);
        self.threads.insert(
            child,
            Th {
                tgid,
                st: if started { St::Ready } else { St::Starting },
                slice: 0,
                resumed_rip: None,
                expect: None,
            },
        );
        if started {
            self.runq.push_back(child);
        }
        self.log.event(Event::Spawn {
            tid: self.rt(parent),
            child: child as u32,
            flags,
        })?;
        Ok(())
    }

    fn disposition(&self, tgid: i32, sig: i32) -> Disp {
        let (h, flags) = self
            .procs
            .get(&tgid)
            .and_then(|p| p.sigact.get(sig as usize).copied())
            .unwrap_or((0, 0));
        match h {
            0 => match sig {
                libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT => Disp::Ignore,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => Disp::Ignore,
                _ => Disp::Fatal,
            },
            1 => Disp::Ignore,
            _ => Disp::Handler {
                restart: flags & libc::SA_RESTART as u64 != 0,
            },
        }
    }

    fn on_signal(&mut self, pid: i32, sig: i32) -> Result<(), RecordError> {
        let info = match sys::get_siginfo(pid) {
            Ok(i) => i.to_vec(),
            Err(_) => {
                // A group-stop, not a signal: let it go on.
                return Ok(sys::cont(pid, 0)?);
            }
        };
        if let Some((esig, einfo)) = self.th(pid).expect.take() {
            if esig == sig {
                sys::set_siginfo(pid, &einfo)?;
                return Ok(sys::cont(pid, sig)?);
            }
            self.th(pid).expect = Some((esig, einfo));
        }
        if sig == libc::SIGSTOP && matches!(self.th(pid).st, St::Starting) {
            self.th(pid).st = St::Ready;
            self.runq.push_back(pid);
            return Ok(());
        }
        let st = std::mem::replace(&mut self.th(pid).st, St::Running);
        match st {
            St::Restarting(p, code) => {
                if self.disposition(self.threads[&pid].tgid, sig) == Disp::Ignore {
                    self.th(pid).st = St::InKernel(p);
                    return Ok(sys::syscall(pid, 0)?);
                }
                self.th(pid).st = St::Interrupted(p, code, sig, info);
                self.became_runnable(pid)
            }
            St::Running => {
                let regs = sys::get_regs(pid)?;
                if sig == libc::SIGSEGV {
                    if let Some(len) = rdtsc_len(pid, regs.rip) {
                        return self.emulate_rdtsc(pid, regs, len);
                    }
                }
                let code = sys::si_code(&info);
                let sync = code > 0
                    && matches!(
                        sig,
                        libc::SIGSEGV
                            | libc::SIGBUS
                            | libc::SIGILL
                            | libc::SIGFPE
                            | libc::SIGTRAP
                            | libc::SIGSYS
                    );
                if sync {
                    self.th(pid).resumed_rip = None;
                    self.log.event(Event::Fault {
                        tid: self.rt(pid),
                        signo: sig,
                        rip: regs.rip,
                    })?;
                    return Ok(sys::cont(pid, sig)?);
                }
                if self.disposition(self.threads[&pid].tgid, sig) == Disp::Ignore {
                    return Ok(sys::cont(pid, 0)?);
                }
                if self.th(pid).resumed_rip == Some(regs.rip) {
                    // Right at the return of the syscall just logged: deliver here.
                    self.th(pid).resumed_rip = None;
                    self.log.event(Event::Signal {
                        tid: self.rt(pid),
                        signo: sig,
                        siginfo: info,
                        at_entry: false,
                    })?;
                    return Ok(sys::cont(pid, sig)?);
                }
                self.pending_sigs.push_back((sig, info));
                Ok(sys::cont(pid, 0)?)
            }
            St::Exiting => {
                self.th(pid).st = St::Exiting;
                Ok(sys::cont(pid, 0)?)
            }
            other => {
                // A stopped thread cannot take a signal; keep it for later.
                self.th(pid).st = other;
                self.pending_sigs.push_back((sig, info));
                Ok(())
            }
        }
    }

    fn emulate_rdtsc(&mut self, pid: i32, mut regs: Regs, len: u64) -> Result<(), RecordError> {
        let value = sys::rdtsc();
        regs.rax = value & 0xffff_ffff;
        regs.rdx = value >> 32;
        let rdtscp = len == 3;
        if rdtscp {
            regs.rcx = 0;
        }
        let rip = regs.rip;
        regs.rip += len;
        sys::set_regs(pid, &regs)?;
        self.th(pid).resumed_rip = None;
        self.log.event(Event::Rdtsc {
            tid: self.rt(pid),
            rip,
            value,
            aux: 0,
            rdtscp,
        })?;
        Ok(sys::cont(pid, 0)?)
    }

    /// A pending asynchronous signal the thread does not block.
    fn take_deliverable(&mut self, pid: i32) -> Option<(i32, Vec<u8>)> {
        if self.pending_sigs.is_empty() {
            return None;
        }
        let blocked = sys::blocked_mask(pid);
        let idx = self
            .pending_sigs
            .iter()
            .position(|(s, _)| blocked & (1u64 << (*s - 1)) == 0)?;
        self.pending_sigs.remove(idx)
    }

    fn on_entry(&mut self, pid: i32) -> Result<(), RecordError> {
        let mut regs = sys::get_regs(pid)?;
        let nr = regs.orig_rax as u32;
        let args = model::args_of(&regs);
        self.th(pid).resumed_rip = None;
        if let Some((sig, info)) = self.take_deliverable(pid) {
            // Deliver at this boundary: skip the syscall, rewind so it is
            // made again after the handler returns.
            self.log.event(Event::Signal {
                tid: self.rt(pid),
                signo: sig,
                siginfo: info.clone(),
                at_entry: true,
            })?;
            regs.orig_rax = u64::MAX;
            regs.rax = nr as u64;
            regs.rip -= 2;
            sys::set_regs(pid, &regs)?;
            let tgid = self.th(pid).tgid;
            sys::tgkill(tgid, pid, sig)?;
            self.th(pid).expect = Some((sig, info));
            return Ok(sys::cont(pid, 0)?);
        }
        let Some(spec) = sysmodel::spec(nr) else {
            return self.refuse(
                pid,
                regs,
                libc::ENOSYS,
                Some(format!("unknown syscall {} (nr {nr})", sysmodel::name(nr))),
            );
        };
        let tgid = self.th(pid).tgid;
        let mut p = Pending {
            nr,
            args,
            mode: Mode::Executed,
            spec: Some(spec),
            entry: EntryInfo::default(),
            path: Vec::new(),
            fd_kind: None,
            ioctl_out: &[],
        };
        let mut blocking = spec.blocking;
        match spec.class {
            Class::Allow | Class::Local => p.mode = Mode::Executed,
            Class::LocalInject => p.mode = Mode::ExecutedInjected,
            Class::External => p.mode = Mode::Emulated,
            Class::Refuse => return self.refuse(pid, regs, libc::ENOSYS, None),
            Class::FdLocal => {
                let k = self.proc(tgid).fds.kind(tgid, args[0] as i32);
                p.mode = if k == FdKind::External {
                    Mode::Emulated
                } else {
                    Mode::Executed
                };
            }
            Class::FdRead | Class::FdWrite => {
                let k = self.proc(tgid).fds.kind(tgid, args[0] as i32);
                p.fd_kind = Some(k);
                p.mode = if k == FdKind::External {
                    Mode::Emulated
                } else {
                    Mode::Executed
                };
                if k == FdKind::File {
                    blocking = false;
                }
            }
            Class::Special => match nr as i64 {
                libc::SYS_clone | libc::SYS_fork | libc::SYS_vfork => {
                    // Threads and child processes are followed; a vfork
                    // parent waits in the kernel until its child execs.
                    p.mode = Mode::Executed;
                    blocking = clone_flags(nr, &args) & libc::CLONE_VFORK as u64 != 0;
                }
                libc::SYS_execve | libc::SYS_execveat => {
                    if self.threads.values().filter(|t| t.tgid == tgid).count() > 1 {
                        return self.refuse(
                            pid,
                            regs,
                            libc::ENOSYS,
                            Some("execve from a multi-threaded program is not supported".into()),
                        );
                    }
                    p.mode = Mode::Executed;
                }
                libc::SYS_exit | libc::SYS_exit_group => return self.on_exit_call(pid, nr, args),
                libc::SYS_kill
                | libc::SYS_tkill
                | libc::SYS_tgkill
                | libc::SYS_rt_sigqueueinfo
                | libc::SYS_rt_tgsigqueueinfo => {
                    // Executed here; on replay the signal comes from the log.
                    p.mode = Mode::Emulated;
                }
                libc::SYS_accept | libc::SYS_accept4 => p.mode = Mode::PlaceholderFd,
                libc::SYS_rt_sigsuspend | libc::SYS_restart_syscall => p.mode = Mode::Emulated,
                libc::SYS_fcntl => {
                    let k = self.proc(tgid).fds.kind(tgid, args[0] as i32);
                    let cmd = args[1] as i32;
                    p.mode = if k != FdKind::External
                        || matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC)
                    {
                        Mode::Executed
                    } else if matches!(cmd, libc::F_SETFL | libc::F_SETFD) {
                        // The flags (O_NONBLOCK, FD_CLOEXEC) belong to the
                        // program's own fd, placeholder or not: set them on
                        // replay too, so a socket made real at takeover
                        // behaves as the program expects.
                        Mode::ExecutedInjected
                    } else {
                        Mode::Emulated
                    };
                }
                libc::SYS_ioctl => {
                    let k = self.proc(tgid).fds.kind(tgid, args[0] as i32);
                    match ioctl_policy(args[1], k) {
                        IoctlPolicy::Execute => p.mode = Mode::Executed,
                        IoctlPolicy::Emulate(out) => {
                            p.mode = Mode::Emulated;
                            p.ioctl_out = out;
                        }
                        IoctlPolicy::Refuse => {
                            return self.refuse(
                                pid,
                                regs,
                                libc::ENOTTY,
                                Some(format!("ioctl request {:#x} on an external fd is not in the model; answered ENOTTY", args[1])),
                            )
                        }
                    }
                }
                _ => p.mode = Mode::Executed,
            },
        }
        if nr as i64 == libc::SYS_futex {
            let op = args[1] & 0x7f;
            blocking = matches!(op, 0 | 6 | 9 | 11 | 13);
        }
        if let Some(i) = spec.args.iter().position(|a| *a == sysmodel::Arg::Path) {
            if args[i] != 0 {
                p.path = sys::read_cstr(pid, args[i], 4096).unwrap_or_default();
            }
        }
        p.entry = model::entry_info(pid, spec, &args);
        if !self.to_live.is_empty() {
            let idx: &[usize] = match nr as i64 {
                libc::SYS_kill
                | libc::SYS_tkill
                | libc::SYS_rt_sigqueueinfo
                | libc::SYS_getpgid
                | libc::SYS_getsid
                | libc::SYS_wait4
                | libc::SYS_sched_setaffinity
                | libc::SYS_sched_getaffinity
                | libc::SYS_prlimit64 => &[0],
                libc::SYS_tgkill | libc::SYS_rt_tgsigqueueinfo | libc::SYS_setpgid => &[0, 1],
                libc::SYS_waitid => &[1],
                _ => &[],
            };
            if !idx.is_empty() {
                let mut a = args;
                for i in idx {
                    a[*i] = self.lv(a[*i]);
                }
                regs.rdi = a[0];
                regs.rsi = a[1];
                sys::set_regs(pid, &regs)?;
            }
        }
        self.th(pid).st = St::InKernel(p);
        self.current = None;
        self.tentative = Some(pid);
        sys::syscall(pid, 0)?;
        if !blocking || self.runq.is_empty() {
            if !blocking {
                // Wait for this thread only; others' stops stay queued.
                while self.tentative == Some(pid) {
                    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL)) {
                        Ok(s) => self.handle(s)?,
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(RecordError::Wait(e)),
                    }
                }
            }
            return Ok(());
        }
        // Others are runnable: give the syscall a moment to complete.
        for _ in 0..50 {
            match waitpid(
                Pid::from_raw(pid),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::StillAlive) => std::thread::yield_now(),
                Ok(s) => {
                    self.handle(s)?;
                    if self.tentative != Some(pid) {
                        return Ok(());
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(RecordError::Wait(e)),
            }
        }
        Ok(())
    }

    fn refuse(
        &mut self,
        pid: i32,
        mut regs: Regs,
        errno: i32,
        why: Option<String>,
    ) -> Result<(), RecordError> {
        let nr = regs.orig_rax as u32;
        if let Some(msg) = why {
            if self.warned.insert(nr as u64 | (errno as u64) << 32) {
                eprintln!("hotstandby: {msg}");
            }
        }
        let args = model::args_of(&regs);
        regs.orig_rax = u64::MAX;
        regs.rax = (-(errno as i64)) as u64;
        sys::set_regs(pid, &regs)?;
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.rt(pid),
            nr,
            args,
            ret: -(errno as i64),
            mode: Mode::Refused,
            writes: vec![],
            hash: 0,
            aux: 0,
            path: vec![],
        }))?;
        self.resume_after_syscall(pid, regs.rip, nr)
    }

    fn on_exit_call(&mut self, pid: i32, nr: u32, args: [u64; 6]) -> Result<(), RecordError> {
        let group = nr as i64 == libc::SYS_exit_group;
        self.log.event(Event::Exit {
            tid: self.rt(pid),
            code: args[0] as i32,
            group,
        })?;
        self.th(pid).st = St::Exiting;
        self.current = None;
        if self.th(pid).tgid == self.leader
            && (group
                || self
                    .threads
                    .values()
                    .filter(|t| t.tgid == self.leader)
                    .count()
                    == 1)
        {
            if let Some(g) = &self.gate {
                g.closed(None, self.log.bytes());
            }
        }
        if group {
            let tgid = self.th(pid).tgid;
            let members: Vec<i32> = self
                .threads
                .iter()
                .filter(|(_, t)| t.tgid == tgid)
                .map(|(k, _)| *k)
                .collect();
            for m in members {
                // The whole process is going: a syscall of another thread
                // that completes now is never logged (its thread is killed).
                self.th(m).st = St::Exiting;
                self.runq.retain(|x| *x != m);
                if self.tentative == Some(m) {
                    self.tentative = None;
                }
            }
        }
        Ok(sys::cont(pid, 0)?)
    }

    /// Let `t` run user code, logging what it observes first.
    fn schedule(&mut self, t: i32) -> Result<(), RecordError> {
        let st = std::mem::replace(&mut self.th(t).st, St::Running);
        self.current = Some(t);
        if self.last_run != Some(t) {
            self.th(t).slice = 0;
            self.last_run = Some(t);
        }
        match st {
            St::AtEntry => {
                self.th(t).st = St::Running;
                self.on_entry(t)?;
            }
            St::Ready => {
                self.log.event(Event::Switch { tid: self.rt(t) })?;
                self.th(t).resumed_rip = None;
                sys::cont(t, 0)?;
            }
            St::Done(p, regs) => self.complete(t, p, regs)?,
            St::Interrupted(p, code, sig, info) => {
                let restart = match self.disposition(self.threads[&t].tgid, sig) {
                    Disp::Handler { restart } => match code {
                        ERESTARTSYS => restart,
                        ERESTARTNOINTR => true,
                        _ => false,
                    },
                    _ => true,
                };
                self.log.event(Event::Syscall(SyscallEvent {
                    tid: self.rt(t),
                    nr: p.nr,
                    args: p.args,
                    ret: if restart {
                        p.nr as i64
                    } else {
                        -(libc::EINTR as i64)
                    },
                    mode: if restart {
                        Mode::Restart
                    } else {
                        Mode::Emulated
                    },
                    writes: vec![],
                    hash: 0,
                    aux: 0,
                    path: p.path.clone(),
                }))?;
                self.log.event(Event::Signal {
                    tid: self.rt(t),
                    signo: sig,
                    siginfo: info,
                    at_entry: false,
                })?;
                self.th(t).resumed_rip = None;
                sys::cont(t, sig)?;
            }
            other => {
                // Not schedulable after all (it died meanwhile).
                self.th(t).st = other;
                self.current = None;
            }
        }
        Ok(())
    }

    fn complete(&mut self, t: i32, p: Pending, mut regs: Regs) -> Result<(), RecordError> {
        if !self.to_rec.is_empty() {
            let pid_result = matches!(
                p.nr as i64,
                libc::SYS_getpid
                    | libc::SYS_gettid
                    | libc::SYS_getppid
                    | libc::SYS_getpgrp
                    | libc::SYS_getpgid
                    | libc::SYS_getsid
                    | libc::SYS_setsid
                    | libc::SYS_set_tid_address
                    | libc::SYS_wait4
            );
            let r = regs.rax as i64;
            if pid_result && r > 0 {
                regs.rax = self.rt(r as i32) as u64;
            }
            // The program's own argument registers, as it passed them.
            regs.rdi = p.args[0];
            regs.rsi = p.args[1];
            sys::set_regs(t, &regs)?;
        }
        let ret = regs.rax as i64;
        let tgid = self.th(t).tgid;
        let spec = p.spec.expect("model entry");
        let mut writes: Vec<MemWrite> = Vec::new();
        let mut hash = 0;
        let mut aux = 0;
        match p.mode {
            Mode::Emulated | Mode::ExecutedInjected | Mode::PlaceholderFd => {
                if p.ioctl_out.is_empty() {
                    writes = model::collect_outputs(t, spec, &p.args, ret, &p.entry)?;
                } else {
                    let s = Spec {
                        out: p.ioctl_out,
                        ..*spec
                    };
                    writes = model::collect_outputs(t, &s, &p.args, ret, &p.entry)?;
                }
            }
            _ => {}
        }
        if spec.class == Class::FdWrite {
            hash = model::hash(&model::written_bytes(t, p.nr, &p.args, ret)?);
        } else if spec.class == Class::FdRead && p.fd_kind == Some(FdKind::File) {
            hash = model::hash(&model::read_bytes(t, p.nr, &p.args, ret)?);
        }
        if p.mode == Mode::PlaceholderFd {
            aux = writes
                .iter()
                .find(|w| w.addr == p.args[1] && w.data.len() >= 2)
                .map(|w| u16::from_le_bytes([w.data[0], w.data[1]]) as u64)
                .unwrap_or(libc::AF_INET as u64);
        }
        if ret >= 0 {
            self.track(t, tgid, &p, ret)?;
        }
        let nr = p.nr;
        let args = p.args;
        self.log.event(Event::Syscall(SyscallEvent {
            tid: self.rt(t),
            nr: p.nr,
            args: p.args,
            ret,
            mode: p.mode,
            writes,
            hash,
            aux,
            path: p.path,
        }))?;
        if ret >= 0 {
            self.net_after(t, tgid, nr, &args, ret)?;
        }
        self.resume_after_syscall(t, regs.rip, p.nr)
    }

    /// The program's TCP connections: log the parameters of each accepted
    /// one (for a standby to rebuild it) and tell the output rule what the
    /// program read, wrote and closed, at which log offset.
    fn net_after(
        &mut self,
        t: i32,
        tgid: i32,
        nr: u32,
        args: &[u64; 6],
        ret: i64,
    ) -> Result<(), RecordError> {
        match nr as i64 {
            libc::SYS_accept | libc::SYS_accept4 => {
                let fd = ret as i32;
                let Ok(dup) = sys::dup_from(tgid, fd) else {
                    return Ok(());
                };
                use std::os::fd::AsFd;
                if !tcp::is_tcp(dup.as_fd()) {
                    return Ok(());
                }
                match tcp::capture(dup.as_fd(), self.rt(t), fd) {
                    Ok(conn) => {
                        self.log.event(Event::Tcp(conn.clone()))?;
                        let key = key_of(&conn.local, &conn.remote);
                        if let (Some(g), Some(k)) = (&self.gate, key) {
                            g.accepted(k, conn.snd_base, conn.rcv_base);
                        }
                        let ended = self.conns.insert(
                            (tgid, fd),
                            ConnTrack {
                                key,
                                conn,
                                written: 0,
                                read: 0,
                            },
                        );
                        self.conn_ended(ended);
                    }
                    Err(e) => {
                        tracing::warn!("connection on fd {fd}: cannot read its TCP state ({e}); a takeover cannot keep it")
                    }
                }
            }
            libc::SYS_listen => {
                if let (Some(g), Ok(dup)) = (&self.gate, sys::dup_from(tgid, args[0] as i32)) {
                    use std::os::fd::AsFd;
                    if let Some(p) = tcp::local_port(dup.as_fd()) {
                        g.listening(p);
                    }
                }
            }
            libc::SYS_close => {
                let ended = self.conns.close((tgid, args[0] as i32));
                self.conn_ended(ended);
            }
            libc::SYS_shutdown => {
                let c = self.conns.get((tgid, args[0] as i32)).cloned();
                self.conn_ended(c);
            }
            _ => {
                if let Some((from, to)) = conns::dup_of(nr, args, ret) {
                    let ended = self.conns.dup((tgid, from), (tgid, to));
                    self.conn_ended(ended);
                }
                if let Some((fd, wrote, n)) = tcp::conn_io(nr, args, ret) {
                    if let Some(c) = self.conns.get_mut((tgid, fd)) {
                        if wrote {
                            c.written += n;
                        } else {
                            c.read += n;
                        }
                        if let (Some(g), Some(k)) = (&self.gate, c.key) {
                            g.io(k, wrote, n, self.log.bytes());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The program closed (or shut down) a connection: its FIN / RST may go.
    fn conn_ended(&self, c: Option<ConnTrack>) {
        if let (Some(g), Some(Some(k))) = (&self.gate, c.map(|c| c.key)) {
            g.closed(Some(k), self.log.bytes());
        }
    }

    fn resume_after_syscall(&mut self, t: i32, rip: u64, nr: u32) -> Result<(), RecordError> {
        let th = self.th(t);
        th.slice += 1;
        let yield_now = nr as i64 == libc::SYS_sched_yield || th.slice >= SLICE;
        if yield_now && !self.runq.is_empty() {
            self.th(t).st = St::Ready;
            self.runq.push_back(t);
            self.current = None;
            return Ok(());
        }
        self.th(t).st = St::Running;
        self.th(t).resumed_rip = Some(rip);
        self.current = Some(t);
        Ok(sys::cont(t, 0)?)
    }

    /// Keep the fd table and signal dispositions up to date.
    fn track(&mut self, t: i32, tgid: i32, p: &Pending, ret: i64) -> Result<(), RecordError> {
        let a = &p.args;
        match p.nr as i64 {
            libc::SYS_open | libc::SYS_openat | libc::SYS_creat | libc::SYS_memfd_create => {
                self.proc(tgid).fds.opened(tgid, ret as i32)
            }
            libc::SYS_socket
            | libc::SYS_accept
            | libc::SYS_accept4
            | libc::SYS_timerfd_create
            | libc::SYS_signalfd
            | libc::SYS_signalfd4
            | libc::SYS_inotify_init1 => self.proc(tgid).fds.set(ret as i32, FdKind::External),
            libc::SYS_eventfd
            | libc::SYS_eventfd2
            | libc::SYS_epoll_create
            | libc::SYS_epoll_create1 => self.proc(tgid).fds.set(ret as i32, FdKind::Internal),
            libc::SYS_pipe | libc::SYS_pipe2 | libc::SYS_socketpair => {
                let at = if p.nr as i64 == libc::SYS_socketpair {
                    a[3]
                } else {
                    a[0]
                };
                let b = sys::read_mem(t, at, 8)?;
                for c in b.chunks_exact(4) {
                    self.proc(tgid).fds.set(
                        i32::from_le_bytes(c.try_into().expect("4")),
                        FdKind::Internal,
                    );
                }
            }
            libc::SYS_dup => self.proc(tgid).fds.dup(tgid, a[0] as i32, ret as i32),
            libc::SYS_dup2 | libc::SYS_dup3 => {
                self.proc(tgid).fds.dup(tgid, a[0] as i32, a[1] as i32)
            }
            libc::SYS_fcntl if matches!(a[1] as i32, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => {
                self.proc(tgid).fds.dup(tgid, a[0] as i32, ret as i32)
            }
            libc::SYS_close => self.proc(tgid).fds.close(a[0] as i32),
            libc::SYS_close_range => self.proc(tgid).fds.close_range(a[0] as u32, a[1] as u32),
            libc::SYS_rt_sigaction if a[1] != 0 => {
                let tgid = self.th(t).tgid;
                let act = sys::read_mem(t, a[1], 16)?;
                let h = u64::from_le_bytes(act[..8].try_into().expect("8"));
                let f = u64::from_le_bytes(act[8..].try_into().expect("8"));
                if let Some(slot) = self.proc(tgid).sigact.get_mut(a[0] as usize) {
                    *slot = (h, f);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The clone flags a clone, fork or vfork syscall stands for.
pub fn clone_flags(nr: u32, args: &[u64; 6]) -> u64 {
    match nr as i64 {
        libc::SYS_fork => libc::SIGCHLD as u64,
        libc::SYS_vfork => (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
        _ => args[0],
    }
}

/// Length of the rdtsc (2) or rdtscp (3) instruction at `rip`, if any.
pub fn rdtsc_len(tid: i32, rip: u64) -> Option<u64> {
    let b = sys::read_mem(tid, rip, 3).ok()?;
    if b[0] == 0x0f && b[1] == 0x31 {
        Some(2)
    } else if b == [0x0f, 0x01, 0xf9] {
        Some(3)
    } else {
        None
    }
}

enum IoctlPolicy {
    Execute,
    Emulate(&'static [Out]),
    Refuse,
}

fn ioctl_policy(req: u64, kind: FdKind) -> IoctlPolicy {
    const FIONBIO: u64 = 0x5421;
    const FIOCLEX: u64 = 0x5451;
    const FIONCLEX: u64 = 0x5450;
    const FIOASYNC: u64 = 0x5452;
    const TCGETS: u64 = 0x5401;
    const TCSETS: u64 = 0x5402;
    const TCSETSW: u64 = 0x5403;
    const TCSETSF: u64 = 0x5404;
    const TIOCGPGRP: u64 = 0x540f;
    const TIOCSPGRP: u64 = 0x5410;
    const TIOCGWINSZ: u64 = 0x5413;
    const TIOCSWINSZ: u64 = 0x5414;
    const FIONREAD: u64 = 0x541b;
    const SIOCGIFCONF: u64 = 0x8912;
    const TCGETS_OUT: &[Out] = &[Out::Fixed(2, 60)];
    const WINSZ_OUT: &[Out] = &[Out::Fixed(2, 8)];
    const INT_OUT: &[Out] = &[Out::Fixed(2, 4)];
    match req & 0xffff_ffff {
        FIONBIO | FIOCLEX | FIONCLEX | FIOASYNC => IoctlPolicy::Execute,
        _ if kind != FdKind::External => IoctlPolicy::Execute,
        TCGETS => IoctlPolicy::Emulate(TCGETS_OUT),
        TIOCGWINSZ => IoctlPolicy::Emulate(WINSZ_OUT),
        FIONREAD | TIOCGPGRP => IoctlPolicy::Emulate(INT_OUT),
        TCSETS | TCSETSW | TCSETSF | TIOCSWINSZ | TIOCSPGRP => IoctlPolicy::Emulate(&[]),
        SIOCGIFCONF => IoctlPolicy::Refuse,
        _ => IoctlPolicy::Refuse,
    }
}
