//! The replay engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use hotstandby_protocol::record::{Event, Identity, Mode, SyscallEvent};
use hotstandby_protocol::sysmodel::{self, Class};
use hotstandby_recorder::logfile::{EventCursor, LogError, DATA_START};
use hotstandby_recorder::model;
use hotstandby_recorder::record::{copy_tree, rdtsc_len};
use hotstandby_recorder::sys::{self, Regs, SysError};
use hotstandby_recorder::tracee::{self, SpawnError};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use thiserror::Error;

use crate::Divergence;

/// Errors of a replay.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The program took a different path than the log.
    #[error("{0}")]
    Divergence(Divergence),
    /// The program to run is not the one recorded.
    #[error("refusing to replay: {0}")]
    Identity(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Sys(#[from] SysError),
    /// waitpid failed.
    #[error("waiting for the program: {0}")]
    Wait(nix::Error),
    /// The log could not be read (a corrupt frame met during replay).
    #[error(transparent)]
    Log(#[from] LogError),
    /// Preparing the data directory failed.
    #[error("preparing the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Write the program's stdout/stderr output as replay re-creates it.
    pub show_output: bool,
    /// When the log ends without a trailer (the recording was cut off),
    /// hand the program over to live execution instead of killing it.
    pub go_live: bool,
    /// Follow a log that is still being written (a standby): wait for more
    /// events instead of ending, until `lost` is set or a trailer arrives.
    pub live: Option<std::sync::Arc<LiveFeed>>,
    /// Bind this directory over the recorded data directory (a standby's
    /// own copy of the program's files) instead of a snapshot from the log.
    pub data_dir: Option<PathBuf>,
    /// The virtual IP this host takes when it goes live: a listening socket
    /// the program bound to it is bound to it again (IP_FREEBIND), although
    /// the address arrives only after the sockets are ready.
    pub vip: Option<std::net::IpAddr>,
}

/// Shared between a standby's network side and its replay.
#[derive(Debug, Default)]
pub struct LiveFeed {
    /// The primary is gone: replay what is held, then go live.
    pub lost: std::sync::atomic::AtomicBool,
    /// Events replayed so far.
    pub replayed: std::sync::atomic::AtomicU64,
    /// Log bytes replayed so far (end of the last frame read).
    pub position: std::sync::atomic::AtomicU64,
    /// Wall clock (ms since the epoch) when the primary was declared lost.
    pub lost_ms: std::sync::atomic::AtomicU64,
}

/// A program handed over to live execution at the end of its log.
#[derive(Debug)]
pub struct Handover {
    pub takeover: hotstandby_recorder::Takeover,
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

/// A replay that reached the end of its log.
#[derive(Debug)]
pub struct ReplayOutcome {
    pub events: u64,
    /// Exit status of the replayed program (or of the log, when the log
    /// ends before the program did).
    pub exit_status: i32,
    /// False when the log had no trailer (the recording was interrupted).
    pub complete: bool,
    /// With `go_live`, the program, still running, ready to continue live.
    pub handover: Option<Handover>,
}

/// How the program set up a socket it never really bound (replay emulates
/// bind and listen); made real when the standby goes live.
#[derive(Debug, Clone, Default)]
struct SockSetup {
    addr: Vec<u8>,
    backlog: Option<i32>,
    opts: Vec<(i32, i32, Vec<u8>)>,
}

#[derive(Debug, Clone)]
enum St {
    /// Running user code (the current thread).
    Running,
    /// Stopped at a syscall entry, not yet handled.
    AtEntry(Regs),
    /// Logged as blocked in a syscall (stopped at its entry).
    Blocked(Regs),
    /// Stopped after a handled syscall or new: resumes when scheduled.
    Ready,
    /// Clone executed at Spawn; its Syscall event sets the result.
    AfterClone(Regs, u32),
    /// Let into the kernel (a vfork parent, a blocked pipe write); its
    /// exit stop is collected at its Syscall event.
    InKernel(Option<Regs>),
    /// Blocked in accept: the kernel had already reserved the fd number the
    /// call will return (other threads' new fds skip it), so replay holds
    /// that number with the placeholder socket from the start. Stopped at
    /// the exit of that socket() call.
    Reserved {
        entry: Box<Regs>,
        exit: Box<Regs>,
        fd: i64,
    },
    /// Exited.
    Gone,
}

struct Th {
    live: i32,
    /// Live thread-group id of its process.
    tgid: i32,
    st: St,
}

struct Engine<'a> {
    src: EventCursor,
    _p: std::marker::PhantomData<&'a ()>,
    opts: &'a ReplayOptions,
    threads: HashMap<u32, Th>,
    leader_live: i32,
    exit_status: Option<i32>,
    idx: usize,
    /// Signal dispositions per live tgid, tracked from rt_sigaction.
    sigact: HashMap<i32, [(u64, u64); 65]>,
    /// Socket set-up per (live tgid, fd), for going live.
    sockets: HashMap<(i32, i32), SockSetup>,
    /// Reads of the program's own pipes in the kernel, being filled to the
    /// recorded byte count, by live tid.
    fills: HashMap<i32, Fill>,
    /// The program's TCP connections, by (live tgid, fd): what it read and
    /// wrote, and the tail of what it wrote, to rebuild them at takeover.
    conns: hotstandby_netguard::conns::ConnTable<Conn>,
    tail_max: usize,
}

/// A connection followed by replay.
#[derive(Debug)]
struct Conn {
    track: hotstandby_recorder::ConnTrack,
    tail: std::collections::VecDeque<u8>,
    /// False once a write's bytes could not be read back (sendfile): the
    /// connection cannot be rebuilt faithfully.
    tail_ok: bool,
}

/// The most bytes a primary's socket can hold unacknowledged: its send
/// buffer can grow to `tcp_wmem`'s maximum (4 MiB by default).
fn tail_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(4 << 20)
        .max(4 << 20)
}

/// A read asked for exactly its recorded byte count. A pipe read returns as
/// soon as some bytes are there, so the supervisor makes it again for the
/// rest as soon as it returns (while other threads go on), until it has
/// them all: the writer it is waiting for must not find the pipe full.
#[derive(Debug, Clone)]
struct Fill {
    entry: Regs,
    nr: u32,
    want: u64,
    total: u64,
    done: Option<Regs>,
}

/// Check that the program on this machine is the one recorded.
pub fn check_identity(id: &Identity) -> Result<(), ReplayError> {
    let exe = PathBuf::from(String::from_utf8_lossy(&id.exe).into_owned());
    let found = tracee::sha256_file(&exe).map_err(|e| {
        ReplayError::Identity(format!("the recorded program {}: {e}", exe.display()))
    })?;
    if found != id.exe_sha256 {
        return Err(ReplayError::Identity(format!(
            "{} is not the program that was recorded (sha256 recorded {}, found {})",
            exe.display(),
            hex(&id.exe_sha256),
            hex(&found)
        )));
    }
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if model != id.cpu_model {
        tracing::warn!(recorded = %id.cpu_model, here = %model, "CPU model differs from the recording");
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Kills the replayed program if replay stops early.
struct KillGuard(i32, bool);
impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.1 {
            kill_and_reap(self.0);
        }
    }
}

/// SIGKILL a traced program and collect its threads, bounded in time: a
/// thread caught in a ptrace stop on its way out is detached.
pub fn kill_and_reap(pid: i32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    for _ in 0..3000 {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {
                if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    for t in rd.flatten() {
                        if let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() {
                            let _ = nix::sys::ptrace::detach(Pid::from_raw(tid), None);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {}
            Ok(s) => {
                if let Some(p) = s.pid() {
                    let _ = sys::cont(p.as_raw(), 0);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
}

/// A scratch copy of the log's data-directory snapshot, removed on drop.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replay the log in `dir`. (Check the whole log first with
/// `logfile::scan` to refuse a corrupt one before anything runs.)
pub fn replay(dir: &Path, opts: &ReplayOptions) -> Result<ReplayOutcome, ReplayError> {
    let mut src = EventCursor::open(dir, opts.live.is_some())?;
    let identity = src.identity().clone();
    let log = &identity;
    check_identity(log)?;
    let mut _scratch = None;
    let data_dir = PathBuf::from(String::from_utf8_lossy(&log.data_dir).into_owned());
    let snapshot = dir.join(DATA_START);
    let bind = if let (Some(own), false) = (&opts.data_dir, log.data_dir.is_empty()) {
        Some((own.clone(), data_dir))
    } else if !log.data_dir.is_empty() && snapshot.is_dir() {
        let s = std::env::temp_dir().join(format!("hotstandby-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&s);
        copy_tree(&snapshot, &s).map_err(|source| ReplayError::DataDir {
            path: s.clone(),
            source,
        })?;
        _scratch = Some(Scratch(s.clone()));
        Some((s, data_dir))
    } else {
        None
    };
    let pid = tracee::spawn(log, bind.as_ref().map(|(a, b)| (a.as_path(), b.as_path())))?;
    let mut guard = KillGuard(pid, true);
    // The first event names the main thread by its recorded id; a log that
    // is still arriving may not hold it yet.
    let mut leader = src.get(0)?.map(|e| e.tid());
    if let Some(feed) = &opts.live {
        while leader.is_none()
            && !feed.lost.load(std::sync::atomic::Ordering::Relaxed)
            && src.trailer().is_none()
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
            src.refresh()?;
            leader = src.get(0)?.map(|e| e.tid());
        }
    }
    let leader = leader.unwrap_or(pid as u32);
    let mut e = Engine {
        src,
        _p: std::marker::PhantomData,
        sigact: HashMap::from([(pid, [(0, 0); 65])]),
        sockets: HashMap::new(),
        conns: Default::default(),
        tail_max: tail_max(),
        fills: HashMap::new(),
        opts,
        threads: HashMap::new(),
        leader_live: pid,
        exit_status: None,
        idx: 0,
    };
    e.threads.insert(
        leader,
        Th {
            live: pid,
            tgid: pid,
            st: St::Running,
        },
    );
    sys::cont(pid, 0)?;
    let out = e.run()?;
    guard.1 = false;
    if out.handover.is_some() {
        // The program goes on with its data directory: keep the copy.
        std::mem::forget(_scratch);
    }
    Ok(out)
}

fn wait_raw(live: i32) -> Result<WaitStatus, ReplayError> {
    loop {
        match waitpid(Pid::from_raw(live), Some(WaitPidFlag::__WALL)) {
            Ok(s) => return Ok(s),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ReplayError::Wait(e)),
        }
    }
}

/// Wait for a stop of `live`, passing over the SIGCHLD the kernel sends
/// when a replayed child process exits (the recorded one comes from the log).
fn wait_for(live: i32) -> Result<WaitStatus, ReplayError> {
    loop {
        match waitpid(Pid::from_raw(live), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGCHLD))
                if sys::get_siginfo(live)
                    .map(|i| sys::si_code(&i) > 0)
                    .unwrap_or(false) =>
            {
                sys::cont(live, 0)?;
            }
            Ok(s) => return Ok(s),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ReplayError::Wait(e)),
        }
    }
}

fn describe(s: &WaitStatus) -> String {
    match s {
        WaitStatus::Exited(_, c) => format!("the thread exited with status {c}"),
        WaitStatus::Signaled(_, sig, _) => format!("the thread was killed by {sig:?}"),
        WaitStatus::Stopped(_, sig) => format!("signal {sig:?}"),
        WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => "a syscall".into(),
        WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_EXIT) => "the thread exiting".into(),
        WaitStatus::PtraceEvent(_, _, ev) => format!("ptrace event {ev}"),
        WaitStatus::PtraceSyscall(_) => "a syscall exit".into(),
        other => format!("{other:?}"),
    }
}

fn call_str(nr: u32, args: &[u64; 6]) -> String {
    let n = sysmodel::spec(nr).map(|s| s.args.len()).unwrap_or(0);
    let a: Vec<String> = args[..n].iter().map(|a| format!("{a:#x}")).collect();
    format!("{}({})", sysmodel::name(nr), a.join(", "))
}

const SIGSUSPEND_LIKE: [i64; 4] = [
    libc::SYS_rt_sigsuspend,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    libc::SYS_pselect6,
];

impl Engine<'_> {
    fn diverge<T>(
        &self,
        tid: u32,
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Result<T, ReplayError> {
        Err(ReplayError::Divergence(Divergence {
            tid,
            index: self.idx,
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
        }))
    }

    fn th(&mut self, tid: u32) -> Result<&mut Th, ReplayError> {
        if !self.threads.contains_key(&tid) {
            return self.diverge(
                tid,
                "thread",
                format!("thread {tid} to exist"),
                "no such thread in the replay",
            );
        }
        Ok(self.threads.get_mut(&tid).expect("checked"))
    }

    /// Bring `tid` to a syscall entry and return its registers.
    fn entry(&mut self, tid: u32, expect: &str) -> Result<Regs, ReplayError> {
        let th = self.th(tid)?;
        let live = th.live;
        match th.st.clone() {
            St::AtEntry(r) | St::Blocked(r) => Ok(r),
            St::Running => {
                let s = wait_for(live)?;
                match s {
                    WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => {
                        let r = sys::get_regs(live)?;
                        self.th(tid)?.st = St::AtEntry(r);
                        Ok(r)
                    }
                    WaitStatus::Stopped(_, sig) => {
                        let rip = sys::get_regs(live).map(|r| r.rip).unwrap_or(0);
                        self.diverge(
                            tid,
                            expect,
                            expect,
                            format!(
                                "{} at rip {rip:#x}",
                                describe(&WaitStatus::Stopped(Pid::from_raw(live), sig))
                            ),
                        )
                    }
                    other => self.diverge(tid, expect, expect, describe(&other)),
                }
            }
            other => self.diverge(
                tid,
                expect,
                format!("{expect} from a running thread"),
                format!("thread state {other:?}"),
            ),
        }
    }

    fn run(&mut self) -> Result<ReplayOutcome, ReplayError> {
        while let Some(ev) = self.ev(self.idx)? {
            self.src.release_before(self.idx);
            if let Some(f) = &self.opts.live {
                f.replayed
                    .store(self.idx as u64, std::sync::atomic::Ordering::Relaxed);
                f.position
                    .store(self.src.position(), std::sync::atomic::Ordering::Relaxed);
            }
            let ev = &ev;
            tracing::trace!(idx = self.idx, ?ev, "replay");
            match ev {
                Event::Syscall(s) => self.on_syscall(s)?,
                Event::Enter {
                    tid,
                    nr,
                    args,
                    mode,
                } => self.on_enter(*tid, *nr, args, *mode)?,
                Event::Switch { tid } => {
                    let th = self.th(*tid)?;
                    match th.st {
                        St::Ready => {
                            let live = th.live;
                            th.st = St::Running;
                            sys::cont(live, 0)?;
                        }
                        ref other => {
                            let o = format!("{other:?}");
                            return self.diverge(*tid, "switch", "a thread ready to run", o);
                        }
                    }
                }
                Event::Spawn { tid, child, flags } => self.on_spawn(*tid, *child, *flags)?,
                Event::Signal {
                    tid,
                    signo,
                    siginfo,
                    at_entry,
                } => self.on_signal(*tid, *signo, siginfo, *at_entry)?,
                Event::Fault { tid, signo, rip } => {
                    let live = self.th(*tid)?.live;
                    let s = wait_for(live)?;
                    let r = sys::get_regs(live)?;
                    match s {
                        WaitStatus::Stopped(_, sig) if sig as i32 == *signo && r.rip == *rip => {
                            sys::cont(live, *signo)?
                        }
                        other => {
                            return self.diverge(
                                *tid,
                                "fault",
                                format!("signal {signo} at {rip:#x}"),
                                format!("{} at {:#x}", describe(&other), r.rip),
                            )
                        }
                    }
                }
                Event::Rdtsc {
                    tid,
                    rip,
                    value,
                    aux,
                    rdtscp,
                } => {
                    let live = self.th(*tid)?.live;
                    let s = wait_for(live)?;
                    let mut r = sys::get_regs(live)?;
                    let len = rdtsc_len(live, r.rip);
                    match s {
                        WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSEGV)
                            if r.rip == *rip && len.is_some() =>
                        {
                            r.rax = value & 0xffff_ffff;
                            r.rdx = value >> 32;
                            if *rdtscp {
                                r.rcx = *aux as u64;
                            }
                            r.rip += len.expect("checked");
                            sys::set_regs(live, &r)?;
                            sys::cont(live, 0)?;
                        }
                        other => {
                            return self.diverge(
                                *tid,
                                "rdtsc",
                                format!("rdtsc at {rip:#x}"),
                                format!("{} at {:#x}", describe(&other), r.rip),
                            )
                        }
                    }
                }
                Event::Exit { tid, code, group } => self.on_exit(*tid, *code, *group)?,
                Event::Tcp(c) => {
                    let tgid = self.th(c.tid)?.tgid;
                    self.conns.insert(
                        (tgid, c.fd),
                        Conn {
                            track: hotstandby_recorder::ConnTrack {
                                key: hotstandby_netguard::gate::key_of(&c.local, &c.remote),
                                conn: c.clone(),
                                written: 0,
                                read: 0,
                            },
                            tail: Default::default(),
                            tail_ok: true,
                        },
                    );
                }
            }
            self.idx += 1;
        }
        self.finish()
    }

    fn check_call(&self, tid: u32, nr: u32, args: &[u64; 6], r: &Regs) -> Result<(), ReplayError> {
        let anr = r.orig_rax as u32;
        let aargs = model::args_of(r);
        let n = sysmodel::spec(nr).map(|s| s.args.len()).unwrap_or(0);
        if anr != nr || args[..n] != aargs[..n] {
            return self.diverge(
                tid,
                sysmodel::name(nr),
                call_str(nr, args),
                call_str(anr, &aargs),
            );
        }
        Ok(())
    }

    /// After handling thread `tid`'s syscall: resume it if the log says it
    /// ran next, otherwise leave it stopped.
    fn after(&mut self, tid: u32) -> Result<(), ReplayError> {
        // What the thread does next (connection records are only notes).
        let mut i = self.idx + 1;
        let next = loop {
            match self.ev(i)? {
                Some(Event::Tcp(_)) => i += 1,
                other => break other,
            }
        };
        let next = next.as_ref();
        let th = self.th(tid)?;
        match next {
            Some(Event::Signal {
                tid: t,
                at_entry: false,
                ..
            }) if *t == tid => th.st = St::Ready,
            // A Switch to the same thread (first event after a takeover):
            // the Switch resumes it.
            Some(Event::Switch { tid: t }) if *t == tid => th.st = St::Ready,
            Some(e) if e.tid() == tid => {
                th.st = St::Running;
                let live = th.live;
                sys::cont(live, 0)?;
            }
            _ => th.st = St::Ready,
        }
        Ok(())
    }

    fn on_syscall(&mut self, s: &SyscallEvent) -> Result<(), ReplayError> {
        let tid = s.tid;
        let live = self.th(tid)?.live;
        if let St::Reserved { exit, fd, .. } = self.th(tid)?.st.clone() {
            if s.mode == Mode::PlaceholderFd && s.ret >= 0 {
                if fd != s.ret {
                    return self.diverge(
                        tid,
                        sysmodel::name(s.nr),
                        format!("accepted fd {}", s.ret),
                        format!("placeholder socket got fd {fd}"),
                    );
                }
                self.track(tid, live, s)?;
                let mut x = *exit;
                x.rax = s.ret as u64;
                sys::set_regs(live, &x)?;
                for w in &s.writes {
                    sys::write_mem(live, w.addr, &w.data)?;
                }
                return self.after(tid);
            }
            self.unreserve(tid)?;
        }
        if let St::AfterClone(mut r, _) = self.th(tid)?.st.clone() {
            r.rax = s.ret as u64;
            sys::set_regs(live, &r)?;
            return self.after(tid);
        }
        if matches!(self.th(tid)?.st, St::InKernel(None)) {
            let name = sysmodel::name(s.nr);
            let mut x = self.finish_exec(tid, live, &name)?;
            let clone = matches!(
                s.nr as i64,
                libc::SYS_clone | libc::SYS_fork | libc::SYS_vfork
            );
            if clone {
                x.rax = s.ret as u64;
                sys::set_regs(live, &x)?;
            } else if x.rax as i64 != s.ret {
                return self.diverge(
                    tid,
                    name,
                    format!("{} = {}", call_str(s.nr, &s.args), s.ret),
                    format!("= {}", x.rax as i64),
                );
            }
            return self.after(tid);
        }
        let (mut r, in_kernel) = match self.th(tid)?.st.clone() {
            St::InKernel(Some(entry)) => (entry, true),
            _ => {
                let r = self.entry(tid, &call_str(s.nr, &s.args))?;
                self.check_call(tid, s.nr, &s.args, &r)?;
                (r, false)
            }
        };
        if !s.path.is_empty() {
            if let Some(i) = sysmodel::spec(s.nr)
                .and_then(|sp| sp.args.iter().position(|a| *a == sysmodel::Arg::Path))
            {
                let p = sys::read_cstr(live, s.args[i], 4096).unwrap_or_default();
                if p != s.path {
                    return self.diverge(
                        tid,
                        sysmodel::name(s.nr),
                        format!("path \"{}\"", String::from_utf8_lossy(&s.path)),
                        format!("path \"{}\"", String::from_utf8_lossy(&p)),
                    );
                }
            }
        }
        self.track(tid, live, s)?;
        let class = sysmodel::spec(s.nr).map(|sp| sp.class);
        let name = sysmodel::name(s.nr);
        if class == Some(Class::FdWrite) && s.hash != 0 && s.mode != Mode::Executed {
            let data = model::written_bytes(live, s.nr, &s.args, s.ret)?;
            let h = model::hash(&data);
            if h != s.hash {
                return self.diverge(
                    tid,
                    name,
                    format!(
                        "{} bytes with hash {:016x} written to fd {}",
                        s.ret, s.hash, s.args[0] as i32
                    ),
                    format!(
                        "bytes with hash {h:016x}: \"{}\"",
                        String::from_utf8_lossy(&data[..data.len().min(80)]).escape_debug()
                    ),
                );
            }
            if self.opts.show_output {
                match s.args[0] {
                    1 => {
                        let _ = std::io::stdout().write_all(&data);
                        let _ = std::io::stdout().flush();
                    }
                    2 => {
                        let _ = std::io::stderr().write_all(&data);
                    }
                    _ => {}
                }
            }
        }
        match s.mode {
            Mode::Emulated | Mode::Refused => {
                if s.ret == -(libc::EINTR as i64) && SIGSUSPEND_LIKE.contains(&(s.nr as i64)) {
                    if let Some(Event::Signal {
                        tid: t,
                        signo,
                        siginfo,
                        at_entry: false,
                    }) = self.ev(self.idx + 1)?.as_ref()
                    {
                        if let Some(mask) = sigmask_arg(live, s.nr, &s.args) {
                            if *t == tid {
                                return self.suspend_deliver(tid, live, r, mask, *signo, siginfo);
                            }
                        }
                    }
                }
                r.orig_rax = u64::MAX;
                r.rax = s.ret as u64;
                sys::set_regs(live, &r)?;
                for w in &s.writes {
                    sys::write_mem(live, w.addr, &w.data)?;
                }
            }
            Mode::Restart => {
                r.orig_rax = u64::MAX;
                r.rax = s.nr as u64;
                r.rip -= 2;
                sys::set_regs(live, &r)?;
            }
            Mode::Executed | Mode::ExecutedInjected => {
                let mut x = self.run_executed(tid, live, r, s, in_kernel)?;
                let actual = x.rax as i64;
                if s.mode == Mode::Executed && actual != s.ret {
                    return self.diverge(
                        tid,
                        name.clone(),
                        format!("{} = {}", call_str(s.nr, &s.args), s.ret),
                        format!("= {actual}"),
                    );
                }
                if s.hash != 0 && class == Some(Class::FdRead) {
                    let h = model::hash(&model::read_bytes(live, s.nr, &s.args, actual)?);
                    if h != s.hash {
                        return self.diverge(
                            tid,
                            name.clone(),
                            format!("{} bytes read from fd {} with hash {:016x}", s.ret, s.args[0] as i32, s.hash),
                            format!("different bytes (hash {h:016x}): the file differs from the recording"),
                        );
                    }
                }
                if s.mode == Mode::ExecutedInjected {
                    x.rax = s.ret as u64;
                }
                sys::set_regs(live, &x)?;
                if s.mode == Mode::ExecutedInjected {
                    for w in &s.writes {
                        sys::write_mem(live, w.addr, &w.data)?;
                    }
                }
            }
            Mode::PlaceholderFd => {
                if s.ret >= 0 {
                    let orig = r;
                    let flags = if s.nr as i64 == libc::SYS_accept4 {
                        s.args[3] & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64
                    } else {
                        0
                    };
                    r.orig_rax = libc::SYS_socket as u64;
                    r.rdi = if s.aux == 0 {
                        libc::AF_INET as u64
                    } else {
                        s.aux
                    };
                    r.rsi = libc::SOCK_STREAM as u64 | flags;
                    r.rdx = 0;
                    sys::set_regs(live, &r)?;
                    let mut x = self.execute(tid, live, &name)?;
                    if x.rax as i64 != s.ret {
                        return self.diverge(
                            tid,
                            name,
                            format!("accepted fd {}", s.ret),
                            format!("placeholder socket got fd {}", x.rax as i64),
                        );
                    }
                    x.rdi = orig.rdi;
                    x.rsi = orig.rsi;
                    x.rdx = orig.rdx;
                    sys::set_regs(live, &x)?;
                } else {
                    r.orig_rax = u64::MAX;
                    r.rax = s.ret as u64;
                    sys::set_regs(live, &r)?;
                }
                for w in &s.writes {
                    sys::write_mem(live, w.addr, &w.data)?;
                }
            }
        }
        self.after(tid)
    }

    /// Run the syscall the thread is stopped at; return registers at exit.
    fn execute(&mut self, tid: u32, live: i32, name: &str) -> Result<Regs, ReplayError> {
        sys::syscall(live, 0)?;
        self.finish_exec(tid, live, name)
    }

    /// Run an executed syscall (or finish one already in the kernel) and
    /// return its exit registers with the program's argument registers.
    /// A read from the program's own pipe is asked for exactly the bytes it
    /// got when recording, and completed on the program's behalf if the
    /// data arrives in pieces: a pipe is a FIFO, so the bytes are the same.
    fn run_executed(
        &mut self,
        tid: u32,
        live: i32,
        entry: Regs,
        s: &SyscallEvent,
        in_kernel: bool,
    ) -> Result<Regs, ReplayError> {
        let name = sysmodel::name(s.nr);
        if !in_kernel {
            if let Some(w) = read_fill(s) {
                let mut q = entry;
                q.rdx = w;
                sys::set_regs(live, &q)?;
                self.fills.insert(
                    live,
                    Fill {
                        entry,
                        nr: s.nr,
                        want: w,
                        total: 0,
                        done: None,
                    },
                );
            }
            sys::syscall(live, 0)?;
        }
        if self.fills.contains_key(&live) {
            loop {
                if let Some(x) = self.fills.get(&live).and_then(|f| f.done) {
                    self.fills.remove(&live);
                    return Ok(x);
                }
                if !self.pump(tid, live)? {
                    self.pump_others(live)?;
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
        }
        self.finish_exec(tid, live, &name)
    }

    /// Move a filling read of `live` on without blocking; true when it
    /// made progress.
    fn pump(&mut self, tid: u32, live: i32) -> Result<bool, ReplayError> {
        let st = match waitpid(
            Pid::from_raw(live),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => return Ok(false),
            Ok(st) => st,
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => return Err(ReplayError::Wait(e)),
        };
        match st {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => sys::syscall(live, 0)?,
            WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGCHLD) => sys::syscall(live, 0)?,
            WaitStatus::PtraceSyscall(_) => {
                let mut x = sys::get_regs(live)?;
                let k = x.rax as i64;
                if hotstandby_recorder::record::is_restart(k) {
                    sys::syscall(live, 0)?;
                    return Ok(true);
                }
                let f = self.fills.get_mut(&live).expect("a fill");
                if k > 0 {
                    f.total += k as u64;
                }
                if k > 0 && f.total < f.want {
                    x.rip -= 2;
                    x.rax = x.orig_rax;
                    x.rsi = f.entry.rsi + f.total;
                    x.rdx = f.want - f.total;
                    if f.nr as i64 == libc::SYS_pread64 {
                        x.r10 = f.entry.r10 + f.total;
                    }
                    sys::set_regs(live, &x)?;
                    sys::cont(live, 0)?;
                } else {
                    if f.total > 0 {
                        x.rax = f.total;
                    }
                    x.rsi = f.entry.rsi;
                    x.rdx = f.entry.rdx;
                    x.r10 = f.entry.r10;
                    f.done = Some(x);
                }
            }
            other => return self.diverge(tid, "read", "the read to complete", describe(&other)),
        }
        Ok(true)
    }

    /// Move every other filling read on.
    fn pump_others(&mut self, except: i32) -> Result<(), ReplayError> {
        let pending: Vec<i32> = self
            .fills
            .iter()
            .filter(|(l, f)| **l != except && f.done.is_none())
            .map(|(l, _)| *l)
            .collect();
        for l in pending {
            let tid = self
                .threads
                .iter()
                .find(|(_, t)| t.live == l)
                .map(|(k, _)| *k)
                .unwrap_or(0);
            while self.pump(tid, l)? {}
        }
        Ok(())
    }

    /// Wait for the exit stop of a syscall already let into the kernel.
    fn finish_exec(&mut self, tid: u32, live: i32, name: &str) -> Result<Regs, ReplayError> {
        loop {
            let st = if self.fills.values().any(|f| f.done.is_none()) {
                // Keep pipe reads moving while this syscall waits, or it
                // may wait for them.
                match waitpid(
                    Pid::from_raw(live),
                    Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
                ) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {
                        self.pump_others(live)?;
                        std::thread::sleep(std::time::Duration::from_micros(20));
                        continue;
                    }
                    Ok(WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGCHLD))
                        if sys::get_siginfo(live)
                            .map(|i| sys::si_code(&i) > 0)
                            .unwrap_or(false) =>
                    {
                        sys::cont(live, 0)?;
                        continue;
                    }
                    Ok(st) => st,
                    Err(e) => return Err(ReplayError::Wait(e)),
                }
            } else {
                wait_for(live)?
            };
            match st {
                WaitStatus::PtraceSyscall(_)
                    if hotstandby_recorder::record::is_restart(sys::get_regs(live)?.rax as i64) =>
                {
                    // Interrupted by a signal replay passes over: the kernel restarts it.
                    sys::syscall(live, 0)?;
                }
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => sys::syscall(live, 0)?,
                WaitStatus::PtraceSyscall(_) => return Ok(sys::get_regs(live)?),
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_EXEC) => {
                    sys::hide_vdso(live)?;
                    sys::syscall(live, 0)?;
                }
                other => {
                    return self.diverge(tid, name, format!("{name} to complete"), describe(&other))
                }
            }
        }
    }

    /// Deliver `sig` the way a mask-changing wait (sigsuspend, ppoll,
    /// pselect, epoll_pwait) took it: queue it, then run rt_sigsuspend
    /// with the program's mask so the kernel delivers it under that mask.
    fn suspend_deliver(
        &mut self,
        tid: u32,
        live: i32,
        mut r: Regs,
        mask: u64,
        sig: i32,
        info: &[u8],
    ) -> Result<(), ReplayError> {
        let tgid = self.th(tid)?.tgid;
        sys::tgkill(tgid, live, sig)?;
        r.orig_rax = libc::SYS_rt_sigsuspend as u64;
        r.rdi = mask;
        r.rsi = 8;
        sys::set_regs(live, &r)?;
        sys::cont(live, 0)?;
        self.idx += 1; // the Signal event is consumed here
        self.take_signal(tid, live, sig, info)
    }

    fn take_signal(
        &mut self,
        tid: u32,
        live: i32,
        sig: i32,
        info: &[u8],
    ) -> Result<(), ReplayError> {
        match wait_raw(live)? {
            WaitStatus::Stopped(_, s) if s as i32 == sig => {
                sys::set_siginfo(live, info)?;
                sys::cont(live, sig)?;
                self.th(tid)?.st = St::Running;
                Ok(())
            }
            other => self.diverge(
                tid,
                "signal",
                format!("delivery of signal {sig}"),
                describe(&other),
            ),
        }
    }

    fn on_signal(
        &mut self,
        tid: u32,
        sig: i32,
        info: &[u8],
        at_entry: bool,
    ) -> Result<(), ReplayError> {
        let th = self.th(tid)?;
        let live = th.live;
        match th.st.clone() {
            St::Ready if !at_entry => {}
            St::Running | St::AtEntry(_) if at_entry => {
                let mut r = self.entry(tid, "a syscall (signal delivery point)")?;
                r.rax = r.orig_rax;
                r.orig_rax = u64::MAX;
                r.rip -= 2;
                sys::set_regs(live, &r)?;
            }
            other => {
                return self.diverge(
                    tid,
                    "signal",
                    "a thread at a syscall boundary",
                    format!("{other:?}"),
                )
            }
        }
        let tgid = self.th(tid)?.tgid;
        sys::tgkill(tgid, live, sig)?;
        sys::cont(live, 0)?;
        self.take_signal(tid, live, sig, info)
    }

    fn on_enter(
        &mut self,
        tid: u32,
        nr: u32,
        args: &[u64; 6],
        mode: Mode,
    ) -> Result<(), ReplayError> {
        if matches!(self.th(tid)?.st, St::InKernel(_)) {
            return Ok(()); // a vfork parent, already waiting in the kernel
        }
        let r = self.entry(tid, &call_str(nr, args))?;
        self.check_call(tid, nr, args, &r)?;
        // A write to the program's own pipe that blocked while recording
        // wrote part of its bytes before blocking; readers logged before it
        // completes may have read them. Let it into the kernel now, as it
        // was then. Everything else waits at its entry until its result.
        if mode == Mode::Executed {
            let live = self.th(tid)?.live;
            let mut q = r;
            // Only a read needs its result now (to ask for exactly the
            // recorded byte count); it looks ahead for its completion.
            if matches!(
                nr as i64,
                libc::SYS_read | libc::SYS_pread64 | libc::SYS_recvfrom
            ) {
                if let Some(want) = self.completion_of(tid)?.as_ref().and_then(read_fill) {
                    q.rdx = want;
                    sys::set_regs(live, &q)?;
                    self.fills.insert(
                        live,
                        Fill {
                            entry: r,
                            nr,
                            want,
                            total: 0,
                            done: None,
                        },
                    );
                }
            }
            sys::syscall(live, 0)?;
            self.th(tid)?.st = St::InKernel(Some(r));
        } else if mode == Mode::PlaceholderFd {
            self.reserve(tid, nr, args, r)?;
        } else {
            self.th(tid)?.st = St::Blocked(r);
        }
        Ok(())
    }

    /// A thread blocks in accept: take the fd number the kernel reserved
    /// then (the lowest free one) with the placeholder socket right away.
    fn reserve(&mut self, tid: u32, nr: u32, args: &[u64; 6], r: Regs) -> Result<(), ReplayError> {
        let live = self.th(tid)?.live;
        let tgid = self.th(tid)?.tgid;
        let family = match self.completion_of(tid)? {
            Some(c) if c.aux != 0 => c.aux,
            _ => sys::dup_from(tgid, args[0] as i32)
                .ok()
                .and_then(|d| {
                    use std::os::fd::AsRawFd;
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
                })
                .unwrap_or(libc::AF_INET as u64),
        };
        let flags = if nr as i64 == libc::SYS_accept4 {
            args[3] & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64
        } else {
            0
        };
        let mut q = r;
        q.orig_rax = libc::SYS_socket as u64;
        q.rdi = family;
        q.rsi = libc::SOCK_STREAM as u64 | flags;
        q.rdx = 0;
        sys::set_regs(live, &q)?;
        let mut x = self.execute(tid, live, "accept (placeholder)")?;
        let fd = x.rax as i64;
        x.rdi = r.rdi;
        x.rsi = r.rsi;
        x.rdx = r.rdx;
        sys::set_regs(live, &x)?;
        self.th(tid)?.st = St::Reserved {
            entry: Box::new(r),
            exit: Box::new(x),
            fd,
        };
        Ok(())
    }

    /// Give a reserved fd back (the accept failed, was interrupted, or the
    /// program goes live) and put the thread back at its accept's entry.
    fn unreserve(&mut self, tid: u32) -> Result<Regs, ReplayError> {
        let St::Reserved { entry, exit, fd } = self.th(tid)?.st.clone() else {
            return self.entry(tid, "accept");
        };
        let live = self.th(tid)?.live;
        let mut q = *exit;
        q.rip -= 2;
        q.rax = libc::SYS_close as u64;
        q.orig_rax = libc::SYS_close as u64;
        q.rdi = fd as u64;
        sys::set_regs(live, &q)?;
        sys::syscall(live, 0)?;
        match wait_for(live)? {
            WaitStatus::PtraceSyscall(_)
            | WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => {}
            other => {
                return self.diverge(tid, "accept", "closing its placeholder", describe(&other))
            }
        }
        sys::syscall(live, 0)?;
        self.finish_exec(tid, live, "close")?;
        // Back to the accept's entry: rewind over the syscall instruction and
        // stop again where the filter traps it.
        let mut e = *entry;
        e.rip -= 2;
        e.rax = entry.orig_rax;
        sys::set_regs(live, &e)?;
        sys::cont(live, 0)?;
        match wait_for(live)? {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_SECCOMP) => {}
            other => return self.diverge(tid, "accept", "its entry again", describe(&other)),
        }
        let r = sys::get_regs(live)?;
        self.th(tid)?.st = St::Blocked(r);
        Ok(r)
    }

    /// The Syscall event that completes the syscall `tid` entered.
    fn completion_of(&mut self, tid: u32) -> Result<Option<SyscallEvent>, ReplayError> {
        let mut j = self.idx + 1;
        while let Some(e) = self.ev(j)? {
            if let Event::Syscall(s) = e {
                if s.tid == tid {
                    return Ok(Some(s));
                }
            }
            j += 1;
        }
        Ok(None)
    }

    /// Event `i` of the log, if it has one. Following a live log, waits
    /// for it until the primary is declared lost or the log is complete.
    fn ev(&mut self, i: usize) -> Result<Option<Event>, ReplayError> {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            if let Some(e) = self.src.get(i)? {
                return Ok(Some(e.clone()));
            }
            let Some(feed) = &self.opts.live else {
                return Ok(None);
            };
            if self.src.trailer().is_some() {
                return Ok(None);
            }
            if feed.lost.load(Relaxed) {
                // Take in whatever arrived before the loss was declared.
                if self.src.refresh()? {
                    continue;
                }
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.src.refresh()?;
        }
    }

    fn on_spawn(&mut self, tid: u32, child: u32, flags: u64) -> Result<(), ReplayError> {
        let r = self.entry(tid, "clone")?;
        let nr = r.orig_rax as i64;
        if !matches!(nr, libc::SYS_clone | libc::SYS_fork | libc::SYS_vfork) {
            return self.diverge(
                tid,
                "clone",
                "clone, fork or vfork",
                call_str(r.orig_rax as u32, &model::args_of(&r)),
            );
        }
        let live = self.th(tid)?.live;
        let ptgid = self.th(tid)?.tgid;
        let vfork = flags & libc::CLONE_VFORK as u64 != 0;
        sys::syscall(live, 0)?;
        let mut new = None;
        let mut exit_regs = None;
        while new.is_none() || (!vfork && exit_regs.is_none()) {
            match wait_for(live)? {
                WaitStatus::PtraceEvent(
                    _,
                    _,
                    libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK,
                ) => {
                    new = Some(sys::event_msg(live)? as i32);
                    sys::syscall(live, 0)?;
                }
                WaitStatus::PtraceSyscall(_) => {
                    let x = sys::get_regs(live)?;
                    if new.is_none() {
                        return self.diverge(
                            tid,
                            "clone",
                            format!("a new thread or process {child}"),
                            format!("clone returned {}", x.rax as i64),
                        );
                    }
                    exit_regs = Some(x);
                }
                other => return self.diverge(tid, "clone", "clone to complete", describe(&other)),
            }
        }
        let nl = new.expect("loop ends with a child");
        match wait_raw(nl)? {
            WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSTOP) => {}
            other => return self.diverge(child, "new thread", "its first stop", describe(&other)),
        }
        // The program must see the recorded id wherever the kernel wrote the live one.
        let args = model::args_of(&r);
        if nr == libc::SYS_clone {
            if flags & libc::CLONE_PARENT_SETTID as u64 != 0 && args[2] != 0 {
                sys::write_mem(live, args[2], &child.to_le_bytes())?;
            }
            if flags & libc::CLONE_CHILD_SETTID as u64 != 0 && args[3] != 0 {
                sys::write_mem(nl, args[3], &child.to_le_bytes())?;
            }
        }
        let tgid = if flags & libc::CLONE_THREAD as u64 != 0 {
            ptgid
        } else {
            nl
        };
        if tgid != ptgid {
            let copy = self.sigact.get(&ptgid).copied().unwrap_or([(0, 0); 65]);
            self.sigact.insert(tgid, copy);
            let socks: Vec<_> = self
                .sockets
                .iter()
                .filter(|((g, _), _)| *g == ptgid)
                .map(|((_, f), v)| (*f, v.clone()))
                .collect();
            for (f, v) in socks {
                self.sockets.insert((tgid, f), v);
            }
        }
        self.threads.insert(
            child,
            Th {
                live: nl,
                tgid,
                st: St::Ready,
            },
        );
        self.th(tid)?.st = match exit_regs {
            Some(x) => St::AfterClone(x, child),
            None => St::InKernel(None),
        };
        Ok(())
    }

    fn on_exit(&mut self, tid: u32, code: i32, group: bool) -> Result<(), ReplayError> {
        let r = self.entry(tid, "exit")?;
        let want = if group {
            libc::SYS_exit_group
        } else {
            libc::SYS_exit
        };
        if r.orig_rax as i64 != want || r.rdi as i32 != code {
            return self.diverge(
                tid,
                "exit",
                format!("{}({code})", sysmodel::name(want as u32)),
                call_str(r.orig_rax as u32, &model::args_of(&r)),
            );
        }
        let live = self.th(tid)?.live;
        sys::cont(live, 0)?;
        self.th(tid)?.st = St::Gone;
        if group {
            let tgid = self.th(tid)?.tgid;
            let members: Vec<i32> = self
                .threads
                .values_mut()
                .filter(|t| t.tgid == tgid && !matches!(t.st, St::Gone))
                .map(|t| {
                    t.st = St::Gone;
                    t.live
                })
                .collect();
            members.iter().for_each(|m| sys::forget(*m));
            if self.threads.values().all(|t| matches!(t.st, St::Gone)) {
                self.reap_all()?;
            } else {
                // Wait until every thread of this process has exited; the
                // process leader reports last.
                let mut left: Vec<i32> = members.into_iter().filter(|m| *m != tgid).collect();
                left.push(tgid);
                for m in left {
                    loop {
                        match wait_raw(m) {
                            Ok(WaitStatus::Exited(_, c)) => {
                                if m == self.leader_live {
                                    self.exit_status = Some(c);
                                }
                                break;
                            }
                            Ok(WaitStatus::Signaled(_, sg, _)) => {
                                if m == self.leader_live {
                                    self.exit_status = Some(128 + sg as i32);
                                }
                                break;
                            }
                            Ok(_) => {
                                let _ = sys::cont(m, 0);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
        } else if live != self.leader_live {
            loop {
                match wait_for(live)? {
                    WaitStatus::Exited(..) | WaitStatus::Signaled(..) => break,
                    _ => sys::cont(live, 0)?,
                }
            }
        }
        Ok(())
    }

    /// Let every remaining thread exit and collect the process's status.
    fn reap_all(&mut self) -> Result<(), ReplayError> {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(p, c)) if p.as_raw() == self.leader_live => {
                    self.exit_status = Some(c)
                }
                Ok(WaitStatus::Signaled(p, s, _)) if p.as_raw() == self.leader_live => {
                    self.exit_status = Some(128 + s as i32)
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {}
                Ok(s) => {
                    if let Some(p) = s.pid() {
                        let _ = sys::cont(p.as_raw(), 0);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => return Ok(()),
            }
        }
    }

    /// Remember what going live will need: signal dispositions and the
    /// set-up of sockets whose bind/listen replay only emulated.
    fn track(&mut self, tid: u32, live: i32, s: &SyscallEvent) -> Result<(), ReplayError> {
        if s.ret < 0 {
            return Ok(());
        }
        let tgid = self.th(tid)?.tgid;
        let a = &s.args;
        match s.nr as i64 {
            libc::SYS_rt_sigaction if a[1] != 0 && (a[0] as usize) < 65 => {
                let act = sys::read_mem(live, a[1], 16)?;
                let h = u64::from_le_bytes(act[..8].try_into().expect("8"));
                let f = u64::from_le_bytes(act[8..].try_into().expect("8"));
                self.sigact.entry(tgid).or_insert([(0, 0); 65])[a[0] as usize] = (h, f);
            }
            libc::SYS_bind if s.mode == Mode::Emulated => {
                let addr = sys::read_mem(live, a[1], (a[2] as usize).min(128))?;
                self.sockets.entry((tgid, a[0] as i32)).or_default().addr = addr;
            }
            libc::SYS_listen if s.mode == Mode::Emulated => {
                self.sockets.entry((tgid, a[0] as i32)).or_default().backlog = Some(a[1] as i32);
            }
            libc::SYS_setsockopt if s.mode == Mode::Emulated => {
                let v = sys::read_mem(live, a[3], (a[4] as usize).min(256))?;
                self.sockets
                    .entry((tgid, a[0] as i32))
                    .or_default()
                    .opts
                    .push((a[1] as i32, a[2] as i32, v));
            }
            libc::SYS_close => {
                self.sockets.remove(&(tgid, a[0] as i32));
                self.conns.close((tgid, a[0] as i32));
            }
            _ => {
                if let Some((from, to)) = hotstandby_netguard::conns::dup_of(s.nr, a, s.ret) {
                    self.conns.dup((tgid, from), (tgid, to));
                }
                if let Some((fd, wrote, n)) = hotstandby_netguard::tcp::conn_io(s.nr, a, s.ret) {
                    if let Some(c) = self.conns.get_mut((tgid, fd)) {
                        if wrote {
                            c.track.written += n;
                            let data = if s.nr as i64 == libc::SYS_sendfile {
                                sendfile_bytes(live, tgid, a, n)
                            } else {
                                model::written_bytes(live, s.nr, a, s.ret)?
                            };
                            if data.len() as u64 != n {
                                c.tail_ok = false;
                            }
                            c.tail.extend(data);
                            let over = c.tail.len().saturating_sub(self.tail_max);
                            c.tail.drain(..over);
                        } else {
                            c.track.read += n;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The log ended and the program goes on for real: turn every thread's
    /// replay state into a live one and make listening sockets real.
    fn take_over(&mut self) -> Result<Handover, ReplayError> {
        use hotstandby_recorder::{Takeover, TakeoverState, TakeoverThread};
        let reserved: Vec<u32> = self
            .threads
            .iter()
            .filter(|(_, t)| matches!(t.st, St::Reserved { .. }))
            .map(|(k, _)| *k)
            .collect();
        for tid in reserved {
            self.unreserve(tid)?;
        }
        let mut threads = Vec::new();
        for (rec, th) in &self.threads {
            let state = match &th.st {
                St::Gone => continue,
                St::Running => TakeoverState::Running,
                St::AtEntry(_) | St::Reserved { .. } => TakeoverState::AtEntry,
                St::Ready => TakeoverState::Ready,
                St::Blocked(r) => {
                    let nr = r.orig_rax as u32;
                    let args = model::args_of(r);
                    let futex_wait =
                        nr as i64 == libc::SYS_futex && matches!(args[1] & 0x7f, 0 | 9);
                    if futex_wait {
                        // Its wake may already have happened on the old
                        // primary: a spurious return is always allowed.
                        TakeoverState::Answer { nr, args, ret: 0 }
                    } else {
                        TakeoverState::AtEntry
                    }
                }
                St::InKernel(Some(r)) => TakeoverState::InKernel {
                    nr: r.orig_rax as u32,
                    args: model::args_of(r),
                },
                St::InKernel(None) => TakeoverState::InKernel {
                    nr: libc::SYS_vfork as u32,
                    args: [0; 6],
                },
                St::AfterClone(r, child) => {
                    let mut r = *r;
                    r.rax = *child as u64;
                    sys::set_regs(th.live, &r)?;
                    TakeoverState::Ready
                }
            };
            threads.push(TakeoverThread {
                rec: *rec,
                live: th.live,
                tgid: th.tgid,
                state,
            });
        }
        let mut listeners = Vec::new();
        let mut listening = Vec::new();
        for ((tgid, fd), setup) in &self.sockets {
            if setup.backlog.is_some() && setup.addr.len() >= 4 {
                listening.push(u16::from_be_bytes([setup.addr[2], setup.addr[3]]));
            }
            if setup.addr.is_empty() && setup.backlog.is_none() {
                continue;
            }
            let what = match sys::dup_from(*tgid, *fd) {
                Ok(dup) => match sys::make_listening(
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
        let mut conns = Vec::new();
        let lost_ms = match &self.opts.live {
            Some(f) if f.lost_ms.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
                f.lost_ms.load(std::sync::atomic::Ordering::Relaxed)
            }
            _ => hotstandby_netguard::tcp::wall_ms(),
        };
        let mut resend = Vec::new();
        for (fds, c) in self.conns.iter_mut() {
            let Some(&(tgid, fd)) = fds.first() else {
                continue;
            };
            let (tgid, fd) = (&tgid, &fd);
            let what = if !c.tail_ok {
                "NOT rebuilt: bytes it sent could not be read back for the standby's tail (sendfile without an offset?)".to_string()
            } else {
                let tail: &[u8] = c.tail.make_contiguous();
                let tail = &tail[tail.len().saturating_sub(c.track.written as usize)..];
                match sys::dup_from(*tgid, *fd) {
                    Ok(dup) => {
                        use std::os::fd::AsFd;
                        let p = hotstandby_netguard::tcp::Progress {
                            read: c.track.read,
                            written: c.track.written,
                            tail,
                            lost_ms,
                        };
                        match hotstandby_netguard::tcp::rebuild(dup.as_fd(), &c.track.conn, p) {
                            Ok(()) => {
                                let what = format!(
                                    "rebuilt ({} bytes read, {} written, last {} queued again)",
                                    c.track.read,
                                    c.track.written,
                                    tail.len()
                                );
                                resend.push(Resend { fd: *fd, sock: dup });
                                what
                            }
                            Err(e) => format!("could not be rebuilt: {e}"),
                        }
                    }
                    Err(e) => format!("could not be reached: {e}"),
                }
            };
            connections.push((*fd, what));
            conns.push((fds, c.track.clone()));
        }
        let sigact = self.sigact.iter().map(|(k, v)| (*k, *v)).collect();
        Ok(Handover {
            takeover: Takeover {
                leader: self.leader_live,
                threads,
                sigact,
                conns,
                listening,
            },
            connections,
            resend,
            log_offset: self.src.position(),
            next_seq: self.src.next_seq(),
            events: self.idx as u64,
            listeners,
        })
    }

    fn finish(&mut self) -> Result<ReplayOutcome, ReplayError> {
        let events = self.idx as u64;
        match self.src.trailer().cloned() {
            Some(t) => {
                if self.exit_status.is_none() {
                    // The program ends without an exit call (a fatal signal
                    // was delivered, or it was killed from outside).
                    let alive = self.threads.values().any(|t| matches!(t.st, St::Running));
                    if !alive && t.exit_status >= 128 {
                        let _ = nix::sys::signal::kill(
                            Pid::from_raw(self.leader_live),
                            nix::sys::signal::Signal::try_from(t.exit_status - 128)
                                .unwrap_or(nix::sys::signal::Signal::SIGKILL),
                        );
                    }
                    for th in self.threads.values() {
                        if matches!(th.st, St::Running) {
                            let _ = sys::cont(th.live, 0);
                        }
                    }
                    self.reap_all()?;
                }
                let got = self.exit_status.unwrap_or(-1);
                if got != t.exit_status {
                    return self.diverge(
                        0,
                        "program exit",
                        format!("exit status {}", t.exit_status),
                        format!("exit status {got}"),
                    );
                }
                Ok(ReplayOutcome {
                    events,
                    exit_status: got,
                    complete: true,
                    handover: None,
                })
            }
            None if self.opts.go_live
                && !self.threads.values().all(|t| matches!(t.st, St::Gone)) =>
            {
                let h = self.take_over()?;
                Ok(ReplayOutcome {
                    events,
                    exit_status: -1,
                    complete: false,
                    handover: Some(h),
                })
            }
            None => {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(self.leader_live),
                    nix::sys::signal::Signal::SIGKILL,
                );
                self.reap_all()?;
                eprintln!("hotstandby: the log ends without a trailer (recording interrupted); replayed all {events} events");
                Ok(ReplayOutcome {
                    events,
                    exit_status: -1,
                    complete: false,
                    handover: None,
                })
            }
        }
    }
}

/// For a read of the program's own pipe or file that returned bytes: how
/// many to ask for on replay.
/// The bytes a replayed `sendfile(conn, file, &offset, n)` sent: read from
/// the standby's own copy of the file at the offset the program passed
/// (still in its memory: the call's outputs are written after this). A
/// NULL offset (the file position) or a read error gives nothing, and the
/// connection is then not rebuilt.
fn sendfile_bytes(live: i32, tgid: i32, a: &[u64; 6], n: u64) -> Vec<u8> {
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

fn read_fill(s: &SyscallEvent) -> Option<u64> {
    let fill = s.mode == Mode::Executed
        && s.ret > 0
        && matches!(
            s.nr as i64,
            libc::SYS_read | libc::SYS_pread64 | libc::SYS_recvfrom
        );
    fill.then_some(s.ret as u64)
}

/// The signal-mask pointer a mask-changing wait passed, if any.
fn sigmask_arg(live: i32, nr: u32, a: &[u64; 6]) -> Option<u64> {
    let p = match nr as i64 {
        libc::SYS_rt_sigsuspend => a[0],
        libc::SYS_ppoll => a[3],
        libc::SYS_epoll_pwait => a[4],
        libc::SYS_pselect6 => {
            if a[5] == 0 {
                return None;
            }
            let b = sys::read_mem(live, a[5], 8).ok()?;
            u64::from_le_bytes(b.try_into().ok()?)
        }
        _ => return None,
    };
    (p != 0).then_some(p)
}
