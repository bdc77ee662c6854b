//! The replay engine: start the recorded program the same way, walk the log
//! and make each event happen, in the recorded order, over the tracer core.
//!
//! This module holds the event loop and the schedule; [`crate::syscall`]
//! what happens at a syscall, [`crate::signal`] signals, faults and rdtsc,
//! [`crate::net`] the program's connections and sockets, and
//! [`crate::takeover`] going live. The mirror image, module by module, is
//! `hotstandby-recorder`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hotstandby_protocol::record::{Event, Identity};
use hotstandby_protocol::shadow::Shadow;
use hotstandby_protocol::show::event_line;
use hotstandby_protocol::sysmodel;
use hotstandby_recorder::logfile::{EventCursor, LogError, DATA_START};
use hotstandby_recorder::record::copy_tree;
use hotstandby_tracer::spawn::{self, SpawnError};
use hotstandby_tracer::{
    fdclass, sys, task, Running, Stop, Stopped, SysError, TaskError, Tid, Waited,
};
use thiserror::Error;

use crate::divergence::{Divergence, Kind};
use crate::net::{Conn, SockSetup};
use crate::syscall::Fill;

/// Errors of a replay.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The program took a different path than the log.
    #[error("{0}")]
    Divergence(Box<Divergence>),
    /// The program to run is not the one recorded.
    #[error("refusing to replay: {0}")]
    Identity(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The log could not be read (a corrupt frame met during replay).
    #[error(transparent)]
    Log(#[from] LogError),
    /// A batch of buffered calls in the log does not decode.
    #[error("corrupt batch of buffered calls in the log: {0}")]
    Batch(#[from] hotstandby_protocol::packed::PackError),
    /// A thread's syscall buffer could not be read or written.
    #[error("syscall buffer: {0}")]
    Buffer(String),
    /// Taking a checkpoint or starting from one failed.
    #[error(transparent)]
    Checkpoint(Box<crate::checkpoint::CkError>),
    /// The log's beginning was deleted after checkpoints.
    #[error("the log before event {index} was deleted after checkpoints: replay it from a checkpoint (--from-checkpoint)")]
    Retained { index: u64 },
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
    /// Take checkpoints of the replayed program as it goes.
    pub checkpoints: Option<crate::checkpoint::Policy>,
    /// Start from this checkpoint instead of the log's first event.
    pub resume: Option<PathBuf>,
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
    /// Non-zero: read no further than this many bytes of the log (the
    /// standby is about to cut it there; see `cut_log` in the node).
    pub hold_at: std::sync::atomic::AtomicU64,
    /// Bytes of the log the replay looked at, as of its last refresh.
    pub seen: std::sync::atomic::AtomicU64,
    /// Held while the replay refreshes its view of the log and publishes
    /// `seen`: a standby that set `hold_at` and then reads `seen` under
    /// it knows every later refresh stops at `hold_at`.
    pub refresh_lock: std::sync::Mutex<()>,
    /// Log position of the last checkpoint taken (0: none yet).
    pub checkpoint: std::sync::atomic::AtomicU64,
}

impl LiveFeed {
    fn cap(&self) -> u64 {
        match self.hold_at.load(std::sync::atomic::Ordering::SeqCst) {
            0 => u64::MAX,
            n => n,
        }
    }

    /// Look at the log again, no further than `hold_at`, and say how far.
    fn refresh(&self, src: &mut EventCursor) -> Result<bool, LogError> {
        let _g = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = src.refresh_capped(self.cap());
        self.seen
            .store(src.visible(), std::sync::atomic::Ordering::SeqCst);
        r
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
    pub handover: Option<crate::takeover::Handover>,
}

/// Where a replayed thread stands.
#[derive(Debug)]
pub(crate) enum St {
    /// Running user code (the current thread).
    Running(Running),
    /// Stopped at a syscall entry, not yet handled.
    AtEntry(Stopped),
    /// Logged as blocked in a syscall (stopped at its entry).
    Blocked(Stopped),
    /// Stopped after a handled syscall or new: resumes when scheduled.
    Ready(Stopped),
    /// Clone executed at Spawn (at its exit stop); its Syscall event checks
    /// the result.
    AfterClone(Stopped),
    /// Let into the kernel (a vfork parent: no entry; a blocked pipe
    /// write); its exit stop is collected at its Syscall event.
    InKernel(Option<Box<hotstandby_tracer::Regs>>, Running),
    /// Blocked in accept: the kernel had already reserved the fd number the
    /// call will return (other threads' new fds skip it), so replay holds
    /// that number with the placeholder socket from the start. Stopped at
    /// the exit of that socket() call.
    Reserved {
        entry: Box<hotstandby_tracer::Regs>,
        s: Stopped,
        fd: i64,
    },
    /// Exited.
    Gone,
}

impl St {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            St::Running(_) => "running",
            St::AtEntry(_) => "at a syscall entry",
            St::Blocked(_) => "blocked in a syscall",
            St::Ready(_) => "stopped between syscalls",
            St::AfterClone(_) => "after a clone",
            St::InKernel(..) => "in the kernel",
            St::Reserved { .. } => "blocked in accept",
            St::Gone => "gone",
        }
    }
}

pub(crate) struct Th {
    /// Our id of the thread and of its process.
    pub live: Tid,
    pub tgid: Tid,
    /// Its process as the program knows it.
    pub ns_tgid: u32,
    pub st: St,
    /// Its syscall buffer, once registered.
    pub buf: Option<hotstandby_tracer::buffer::Buffer>,
}

pub(crate) struct Engine<'a> {
    pub src: EventCursor,
    pub opts: &'a ReplayOptions,
    /// By the id the program (and the log) knows them.
    pub threads: HashMap<u32, Th>,
    pub leader_live: Tid,
    pub exit_status: Option<i32>,
    pub idx: usize,
    /// The program's kernel state, as the recorder tracked it.
    pub shadow: Shadow<Conn>,
    /// Socket set-up per (tgid, fd), for going live.
    pub sockets: HashMap<(u32, i32), SockSetup>,
    /// Reads of the program's own pipes in the kernel, being filled to the
    /// recorded byte count, by live tid.
    pub fills: HashMap<Tid, Fill>,
    pub tail_max: usize,
    /// The CPU this thread shares with the program (handed on at a takeover).
    pub pin: Option<hotstandby_tracer::pin::Pinning>,
    /// Batches written into threads' buffers, not yet settled.
    pub filled: HashMap<u32, crate::buffer::Filled>,
    /// What threads wrote to sockets through their buffers, in order.
    pub outbox: HashMap<u32, std::collections::VecDeque<(i32, Vec<u8>)>>,
    /// Each process's fd table of the buffer library.
    pub fdtabs: HashMap<u32, u64>,
    /// The syscall buffer library the program runs with.
    pub preload: Option<PathBuf>,
    /// The log's id (checkpoints name the log they continue).
    pub log_id: [u8; 32],
    /// The log directory.
    pub log_dir: PathBuf,
    /// The data directory the program sees, on this machine's side.
    pub data_host: Option<PathBuf>,
    /// Where the current event's frame starts, and its sequence number.
    pub event_start: u64,
    pub event_seq: u64,
    pub ckpt: CkClock,
}

/// When the last checkpoint was taken.
#[derive(Debug)]
pub(crate) struct CkClock {
    pub last_pos: u64,
    pub last_at: std::time::Instant,
    /// Events passed over since one fell due (not at a clean point).
    pub deferred: u64,
    /// The checkpoint being written, if any.
    pub writer: Option<std::thread::JoinHandle<()>>,
}

/// Check that the program on this machine is the one recorded, under the
/// same syscall model.
pub fn check_identity(id: &Identity) -> Result<(), ReplayError> {
    let exe = PathBuf::from(String::from_utf8_lossy(&id.exe).into_owned());
    let found = spawn::sha256_file(&exe).map_err(|e| {
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
    if !id.preload.is_empty() {
        let path = hotstandby_tracer::buffer::install()
            .map_err(|e| ReplayError::Identity(e.to_string()))?;
        if hotstandby_tracer::buffer::preload_entry(&path, &id.env) != id.preload {
            return Err(ReplayError::Identity(format!(
                "the log was recorded with another build of the syscall buffer ({}); this build has {}",
                String::from_utf8_lossy(&id.preload),
                path.display()
            )));
        }
    }
    let model = sysmodel::fingerprint();
    if id.model != model {
        return Err(ReplayError::Identity(format!(
            "the log was written under another syscall model (fingerprint {}, this build {}): replay it with the hotstandby version that recorded it",
            hex(&id.model[..8]),
            hex(&model[..8])
        )));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if cpu != id.cpu_model {
        tracing::warn!(recorded = %id.cpu_model, here = %cpu, "CPU model differs from the recording");
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Kills the replayed program if replay stops early.
struct KillGuard(Tid, bool);
impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.1 {
            kill_and_reap(self.0);
        }
    }
}

/// SIGKILL a traced program and collect its threads, bounded in time: a
/// thread caught in a ptrace stop on its way out is detached.
pub fn kill_and_reap(pid: Tid) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..3000 {
        match task::try_wait() {
            Ok(None) => {
                if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    for t in rd.flatten() {
                        if let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() {
                            let _ = nix::sys::ptrace::detach(nix::unistd::Pid::from_raw(tid), None);
                        }
                    }
                } else {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(Some(Waited::Stopped(s, _))) => {
                let _ = s.resume(0);
            }
            Ok(Some(_)) => {}
            Err(_) => return,
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

/// More than a primary's socket can hold unacknowledged: its send buffer
/// can grow to `tcp_wmem`'s maximum (4 MiB by default), and the kernel
/// checks that limit against the memory it accounts, before it adds a
/// segment, so the payload in flight can pass it (seen: 2200 bytes over
/// 4 MiB on a sendfile download, which then stalled after the rebuild:
/// the client lacked bytes before the tail). Twice the maximum.
fn tail_max() -> usize {
    2 * std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(4 << 20)
        .max(4 << 20)
}

/// Replay the log in `dir`. (Check the whole log first with
/// `logfile::scan` to refuse a corrupt one before anything runs.)
pub fn replay(dir: &Path, opts: &ReplayOptions) -> Result<ReplayOutcome, ReplayError> {
    let mut src = EventCursor::open(dir, opts.live.is_some())?;
    let log = src.identity().clone();
    check_identity(&log)?;
    let mut scratch = None;
    let data_dir = PathBuf::from(String::from_utf8_lossy(&log.data_dir).into_owned());
    let snapshot = dir.join(DATA_START);
    let bind = if let (Some(own), false) = (&opts.data_dir, log.data_dir.is_empty()) {
        Some((own.clone(), data_dir))
    } else if !log.data_dir.is_empty() && snapshot.is_dir() {
        let s = std::env::temp_dir().join(format!("hotstandby-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&s);
        // Removed again whatever happens next.
        scratch = Some(Scratch(s.clone()));
        copy_tree(&snapshot, &s).map_err(|source| ReplayError::DataDir {
            path: s.clone(),
            source,
        })?;
        Some((s, data_dir))
    } else {
        None
    };
    let ck = match &opts.resume {
        Some(path) => Some(open_checkpoint(path, dir, &log)?),
        None => None,
    };
    if ck.is_none() && src.first_held() > 0 {
        return Err(ReplayError::Retained {
            index: src.first_held() as u64,
        });
    }
    let ckp = match &ck {
        Some(m) => Some(
            m.parse()
                .map_err(|e| ReplayError::Checkpoint(Box::new(e)))?,
        ),
        None => None,
    };
    if let (Some(c), Some((own, _))) = (&ckp, &bind) {
        crate::checkpoint::unpack_files(c, own)
            .map_err(|e| ReplayError::Checkpoint(Box::new(e)))?;
    }
    let pin = hotstandby_tracer::pin::pin_here();
    let started = spawn::spawn(&log, bind.as_ref().map(|(a, b)| (a.as_path(), b.as_path())))?;
    let pid = started.task.tid();
    let mut guard = KillGuard(pid, true);
    if let Some(c) = &ckp {
        let t0 = std::time::Instant::now();
        let restored = crate::checkpoint::restore(c, started.task, started.ns_pid)
            .map_err(|e| ReplayError::Checkpoint(Box::new(e)))?;
        let crate::checkpoint::EngineParts {
            shadow,
            sockets,
            outbox,
            fdtabs,
        } = crate::checkpoint::engine_parts(&c.state.engine);
        src.seek(c.state.position, c.state.next_seq, c.state.index as usize)?;
        tracing::info!(
            position = c.state.position,
            event = c.state.index,
            restore_ms = t0.elapsed().as_secs_f64() * 1e3,
            "restored from checkpoint"
        );
        let mut e = Engine {
            src,
            shadow,
            sockets,
            tail_max: tail_max(),
            fills: HashMap::new(),
            opts,
            threads: restored.threads,
            leader_live: pid,
            exit_status: None,
            idx: c.state.index as usize,
            pin,
            filled: HashMap::new(),
            outbox,
            fdtabs,
            preload: (!log.preload.is_empty()).then(hotstandby_tracer::buffer::lib_path),
            log_id: c.state.log_id,
            log_dir: dir.to_path_buf(),
            data_host: bind.as_ref().map(|(a, _)| a.clone()),
            event_start: c.state.position,
            event_seq: c.state.next_seq,
            ckpt: CkClock {
                last_pos: c.state.position,
                last_at: std::time::Instant::now(),
                deferred: 0,
                writer: None,
            },
        };
        let out = e.run()?;
        guard.1 = false;
        if out.handover.is_some() {
            std::mem::forget(scratch);
        }
        return Ok(out);
    }
    // The first event names the main thread; a log that is still arriving
    // may not hold it yet.
    let mut first = src.get(0)?.map(|e| e.tid());
    if let Some(feed) = &opts.live {
        feed.refresh(&mut src)?;
        while first.is_none()
            && !feed.lost.load(std::sync::atomic::Ordering::Relaxed)
            && src.trailer().is_none()
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
            feed.refresh(&mut src)?;
            first = src.get(0)?.map(|e| e.tid());
        }
    }
    let ns = started.ns_pid;
    let mut e = Engine {
        src,
        shadow: Shadow::new(ns, fdclass::open_fds(pid)),
        sockets: HashMap::new(),
        tail_max: tail_max(),
        fills: HashMap::new(),
        opts,
        threads: HashMap::new(),
        leader_live: pid,
        exit_status: None,
        idx: 0,
        pin,
        filled: HashMap::new(),
        outbox: HashMap::new(),
        fdtabs: HashMap::new(),
        preload: (!log.preload.is_empty()).then(hotstandby_tracer::buffer::lib_path),
        log_id: hotstandby_recorder::logfile::log_id(dir).unwrap_or([0; 32]),
        log_dir: dir.to_path_buf(),
        data_host: bind.as_ref().map(|(a, _)| a.clone()),
        event_start: 0,
        event_seq: 0,
        ckpt: CkClock {
            last_pos: 0,
            last_at: std::time::Instant::now(),
            deferred: 0,
            writer: None,
        },
    };
    if let Some(f) = first {
        if f != ns {
            return e.diverge(
                Kind::Spawn,
                f,
                "program start",
                format!("the program's main thread to be {f} in its PID namespace"),
                format!("it is {ns}"),
            );
        }
    }
    e.threads.insert(
        ns,
        Th {
            live: pid,
            tgid: pid,
            ns_tgid: ns,
            st: St::Running(started.task.resume(0)?),
            buf: None,
        },
    );
    let out = e.run()?;
    guard.1 = false;
    if out.handover.is_some() {
        // The program goes on with its data directory: keep the copy.
        std::mem::forget(scratch);
    }
    Ok(out)
}

/// Open a checkpoint to start from and check that it continues this log.
fn open_checkpoint(
    path: &Path,
    dir: &Path,
    log: &Identity,
) -> Result<crate::checkpoint::Mapped, ReplayError> {
    let wrap = |e| ReplayError::Checkpoint(Box::new(e));
    let m = crate::checkpoint::Mapped::open(path).map_err(wrap)?;
    let st = m.parse().map_err(wrap)?.state;
    crate::checkpoint::check_fits(
        path,
        &st,
        hotstandby_recorder::logfile::log_id(dir),
        &log.exe_sha256,
    )
    .map_err(wrap)?;
    Ok(m)
}

/// A stop as words, for divergence messages.
pub(crate) fn describe(w: &Waited) -> String {
    match w {
        Waited::Exited(_, c) => format!("the thread exited with status {c}"),
        Waited::Killed(_, sig) => format!("the thread was killed by signal {sig}"),
        Waited::Stopped(_, Stop::Signal { sig, .. }) => format!("signal {sig}"),
        Waited::Stopped(_, Stop::Group { sig }) => format!("group stop ({sig})"),
        Waited::Stopped(_, Stop::Entry) => "a syscall".into(),
        Waited::Stopped(_, Stop::Exiting) => "the thread exiting".into(),
        Waited::Stopped(_, Stop::Exit) => "a syscall exit".into(),
        Waited::Stopped(_, other) => format!("{other:?}"),
    }
}

pub(crate) fn call_str(nr: u32, args: &[u64; 6]) -> String {
    let n = sysmodel::spec(nr).map(|s| s.args.len()).unwrap_or(0);
    let a: Vec<String> = args[..n].iter().map(|a| format!("{a:#x}")).collect();
    format!("{}({})", sysmodel::name(nr), a.join(", "))
}

/// Whether a signal stop on replay is one of the standby's own: every
/// asynchronous signal the program gets here (a replayed child's SIGCHLD,
/// the SIGIO of a socketpair the program owns, an operator's kill) is
/// passed over; the recorded ones come from the log, at their recorded
/// points. Only a synchronous fault (and rdtsc's) belongs to the replay.
pub(crate) fn stray(stop: &Stop) -> bool {
    match stop {
        Stop::Signal { sig, info } => !hotstandby_recorder::is_fault(*sig, &info[..]),
        Stop::Group { .. } => true,
        _ => false,
    }
}

/// Wait for a stop of a running thread, passing over the standby's own
/// signals ([`stray`]).
pub(crate) fn wait_for(mut run: Running) -> Result<Waited, ReplayError> {
    loop {
        match run.wait()? {
            Waited::Stopped(s, stop) if stray(&stop) => run = s.resume(0)?,
            w => return Ok(w),
        }
    }
}

impl Engine<'_> {
    /// Stop with a divergence of `kind` at the current event.
    pub(crate) fn diverge<T>(
        &mut self,
        kind: Kind,
        tid: u32,
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Result<T, ReplayError> {
        let from = self.idx.saturating_sub(4).max(self.src.first_held());
        let mut context = Vec::new();
        for i in from..self.idx {
            if let Ok(Some(e)) = self.src.get(i) {
                context.push(event_line(i, e));
            }
        }
        Err(ReplayError::Divergence(Box::new(Divergence {
            kind,
            tid,
            index: self.idx as u64,
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
            context,
        })))
    }

    pub(crate) fn th(&mut self, tid: u32) -> Result<&mut Th, ReplayError> {
        if !self.threads.contains_key(&tid) {
            return self.diverge(
                Kind::Schedule,
                tid,
                "thread",
                format!("thread {tid} to exist"),
                "no such thread in the replay",
            );
        }
        Ok(self.threads.get_mut(&tid).expect("checked"))
    }

    /// Take the thread's state out (it must be put back).
    pub(crate) fn take(&mut self, tid: u32) -> Result<St, ReplayError> {
        Ok(std::mem::replace(&mut self.th(tid)?.st, St::Gone))
    }

    pub(crate) fn set(&mut self, tid: u32, st: St) -> Result<(), ReplayError> {
        self.th(tid)?.st = st;
        Ok(())
    }

    /// Bring `tid` to a syscall entry and return it stopped there (with
    /// its buffered batch, if any, settled).
    pub(crate) fn entry(&mut self, tid: u32, expect: &str) -> Result<Stopped, ReplayError> {
        match self.take(tid)? {
            St::AtEntry(s) | St::Blocked(s) => Ok(s),
            St::Running(mut run) => match loop {
                match wait_for(run)? {
                    Waited::Stopped(mut s, Stop::Entry) => {
                        if s.regs()?.orig_rax != hotstandby_tracer::buffer::SYS_DRAIN as u64 {
                            break Waited::Stopped(s, Stop::Entry);
                        }
                        // The library's outbox is full: not a logged call.
                        if let Some(b) = self.th(tid)?.buf {
                            self.drain(tid, s.tid(), b)?;
                        }
                        s.skip(0)?;
                        run = s.resume(0)?;
                    }
                    w => break w,
                }
            } {
                Waited::Stopped(s, Stop::Entry) => {
                    self.settle(tid, s.tid())?;
                    Ok(s)
                }
                Waited::Stopped(mut s, stop @ Stop::Signal { .. }) => {
                    let rip = s.regs().map(|r| r.rip).unwrap_or(0);
                    let what = describe(&Waited::Stopped(Stopped::from_tid(s.tid()), stop));
                    self.set(tid, St::Ready(s))?;
                    self.diverge(
                        Kind::Stop,
                        tid,
                        expect,
                        expect,
                        format!("{what} at rip {rip:#x}"),
                    )
                }
                other => {
                    let d = describe(&other);
                    if let Waited::Stopped(s, _) = other {
                        self.set(tid, St::Ready(s))?;
                    }
                    self.diverge(Kind::Stop, tid, expect, expect, d)
                }
            },
            other => {
                let name = other.name();
                self.set(tid, other)?;
                self.diverge(
                    Kind::Schedule,
                    tid,
                    expect,
                    format!("{expect} from a running thread"),
                    format!("the thread is {name}"),
                )
            }
        }
    }

    fn run(&mut self) -> Result<ReplayOutcome, ReplayError> {
        while let Some(ev) = self.ev(self.idx)? {
            self.src.release_before(self.idx.saturating_sub(4));
            if let Some(f) = &self.opts.live {
                f.replayed
                    .store(self.idx as u64, std::sync::atomic::Ordering::Relaxed);
                f.position
                    .store(self.src.position(), std::sync::atomic::Ordering::Relaxed);
            }
            tracing::trace!(idx = self.idx, ?ev, "replay");
            if let Some((at, seq)) = self.src.start_of(self.idx) {
                self.event_start = at;
                self.event_seq = seq;
            }
            if self.opts.checkpoints.is_some() {
                self.maybe_checkpoint(&ev)?;
            }
            match &ev {
                Event::Batch { tid, .. } => self.on_batch(*tid)?,
                Event::Syscall(s) => self.on_syscall(s)?,
                Event::Enter {
                    tid,
                    nr,
                    args,
                    mode,
                } => self.on_enter(*tid, *nr, args, *mode)?,
                Event::Switch { tid } => match self.take(*tid)? {
                    St::Ready(s) => {
                        self.prepare(*tid, self.idx + 1)?;
                        self.set(*tid, St::Running(s.resume(0)?))?
                    }
                    other => {
                        let name = other.name();
                        self.set(*tid, other)?;
                        return self.diverge(
                            Kind::Schedule,
                            *tid,
                            "switch",
                            "a thread ready to run",
                            format!("the thread is {name}"),
                        );
                    }
                },
                Event::Spawn { tid, child, flags } => self.on_spawn(*tid, *child, *flags)?,
                Event::Signal {
                    tid,
                    signo,
                    siginfo,
                    at_entry,
                } => self.on_signal(*tid, *signo, siginfo, *at_entry)?,
                Event::Fault { tid, signo, rip } => self.on_fault(*tid, *signo, *rip)?,
                Event::Rdtsc {
                    tid,
                    rip,
                    value,
                    aux,
                    rdtscp,
                } => self.on_rdtsc(*tid, *rip, *value, *aux, *rdtscp)?,
                Event::Exit { tid, code, group } => self.on_exit(*tid, *code, *group)?,
                Event::Tcp(c) => self.on_tcp(c)?,
            }
            self.idx += 1;
        }
        self.checkpoint_written();
        self.finish()
    }

    /// After handling thread `tid`'s syscall: resume it if the log says it
    /// runs next, otherwise leave it stopped.
    pub(crate) fn after(&mut self, tid: u32, s: Stopped) -> Result<(), ReplayError> {
        // What the thread does next (connection records are only notes).
        let mut i = self.idx + 1;
        let next = loop {
            match self.ev(i)? {
                Some(Event::Tcp(_)) => i += 1,
                other => break other,
            }
        };
        let st = match next.as_ref() {
            Some(Event::Signal {
                tid: t,
                at_entry: false,
                ..
            }) if *t == tid => St::Ready(s),
            // A Switch to the same thread (first event after a takeover):
            // the Switch resumes it.
            Some(Event::Switch { tid: t }) if *t == tid => St::Ready(s),
            Some(e) if e.tid() == tid => {
                self.prepare(tid, self.idx + 1)?;
                St::Running(s.resume(0)?)
            }
            _ => St::Ready(s),
        };
        self.set(tid, st)
    }

    /// Event `i` of the log, if it has one. Following a live log, waits
    /// for it until the primary is declared lost or the log is complete.
    pub(crate) fn ev(&mut self, i: usize) -> Result<Option<Event>, ReplayError> {
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
            feed.refresh(&mut self.src)?;
        }
    }

    /// The Syscall event that completes the syscall `tid` entered.
    pub(crate) fn completion_of(
        &mut self,
        tid: u32,
    ) -> Result<Option<hotstandby_protocol::record::SyscallEvent>, ReplayError> {
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

    fn on_spawn(&mut self, tid: u32, child: u32, flags: u64) -> Result<(), ReplayError> {
        let mut s = self.entry(tid, "clone")?;
        let r = s.regs()?;
        let nr = r.orig_rax as i64;
        if !matches!(nr, libc::SYS_clone | libc::SYS_fork | libc::SYS_vfork) {
            let a = hotstandby_tracer::mem::args_of(&r);
            self.set(tid, St::AtEntry(s))?;
            return self.diverge(
                Kind::Call,
                tid,
                "clone",
                "clone, fork or vfork",
                call_str(nr as u32, &a),
            );
        }
        let ns_tgid = self.th(tid)?.ns_tgid;
        let ptgid = self.th(tid)?.tgid;
        let vfork = flags & libc::CLONE_VFORK as u64 != 0;
        let mut run = Some(s.syscall(0)?);
        let mut new = None;
        let mut exit_stop = None;
        // A vfork parent stays in the kernel until its child execs: only
        // the child's creation is waited for.
        while let Some(r) = run.take() {
            match wait_for(r)? {
                Waited::Stopped(s, Stop::Spawned { child: c, .. }) => {
                    new = Some(c);
                    let r = s.syscall(0)?;
                    if vfork {
                        run = Some(r);
                        break;
                    }
                    run = Some(r);
                }
                Waited::Stopped(mut s, Stop::Exit) => {
                    if new.is_none() {
                        let got = s.regs()?.rax as i64;
                        self.set(tid, St::Ready(s))?;
                        return self.diverge(
                            Kind::Spawn,
                            tid,
                            "clone",
                            format!("a new thread or process {child}"),
                            format!("clone returned {got}"),
                        );
                    }
                    exit_stop = Some(s);
                }
                other => {
                    let d = describe(&other);
                    return self.diverge(Kind::Stop, tid, "clone", "clone to complete", d);
                }
            }
        }
        let nl = new.expect("the loop ends with a child");
        let first = match Running::from_tid(nl).wait()? {
            Waited::Stopped(
                s,
                Stop::Signal {
                    sig: libc::SIGSTOP, ..
                },
            ) => s,
            other => {
                let d = describe(&other);
                return self.diverge(Kind::Spawn, child, "new thread", "its first stop", d);
            }
        };
        // In its own PID namespace the program gets the same ids again, in
        // the recorded order.
        let got = hotstandby_tracer::nsid::ns_tid(nl).unwrap_or(0);
        if got != child {
            return self.diverge(
                Kind::Spawn,
                tid,
                "clone",
                format!("new thread or process {child}"),
                format!("it got id {got}"),
            );
        }
        let thread = flags & libc::CLONE_THREAD as u64 != 0;
        // A new process (or a vfork child) goes on with its parent thread's
        // buffer, at the same address; a new thread registers its own.
        let buf = if thread { None } else { self.th(tid)?.buf };
        if !thread {
            if let Some(tab) = self.fdtabs.get(&ns_tgid).copied() {
                self.fdtabs.insert(child, tab);
            }
        }
        let (tgid, child_tgid) = if thread {
            (ptgid, ns_tgid)
        } else {
            self.shadow
                .apply(ns_tgid, hotstandby_protocol::shadow::Change::Fork { child });
            let socks: Vec<_> = self
                .sockets
                .iter()
                .filter(|((g, _), _)| *g == ns_tgid)
                .map(|((_, f), v)| (*f, v.clone()))
                .collect();
            for (f, v) in socks {
                self.sockets.insert((child, f), v);
            }
            (nl, child)
        };
        self.threads.insert(
            child,
            Th {
                live: nl,
                tgid,
                ns_tgid: child_tgid,
                st: St::Ready(first),
                buf,
            },
        );
        let st = match (exit_stop, run) {
            (Some(x), _) => St::AfterClone(x),
            (None, Some(run)) => St::InKernel(None, run),
            (None, None) => unreachable!("the clone either returned or is in the kernel"),
        };
        self.set(tid, st)
    }

    fn on_exit(&mut self, tid: u32, code: i32, group: bool) -> Result<(), ReplayError> {
        let mut s = self.entry(tid, "exit")?;
        let r = s.regs()?;
        let want = if group {
            libc::SYS_exit_group
        } else {
            libc::SYS_exit
        };
        if r.orig_rax as i64 != want || r.rdi as i32 != code {
            let a = hotstandby_tracer::mem::args_of(&r);
            self.set(tid, St::AtEntry(s))?;
            return self.diverge(
                Kind::Exit,
                tid,
                "exit",
                format!("{}({code})", sysmodel::name(want as u32)),
                call_str(r.orig_rax as u32, &a),
            );
        }
        let live = s.tid();
        let ns_tgid = self.th(tid)?.ns_tgid;
        // (This thread's state is out of the table while it is handled.)
        let last = !self
            .threads
            .iter()
            .any(|(k, t)| *k != tid && t.ns_tgid == ns_tgid && !matches!(t.st, St::Gone));
        if group || last {
            let notes = self
                .shadow
                .apply(ns_tgid, hotstandby_protocol::shadow::Change::Gone);
            drop(notes);
        }
        let run = s.resume(0)?;
        self.set(tid, St::Gone)?;
        if group {
            let tgid = self.th(tid)?.tgid;
            let members: Vec<Tid> = self
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
                drop(run);
                self.reap_all()?;
            } else {
                // Wait until every thread of this process has exited; the
                // process leader reports last.
                let mut left: Vec<Tid> = members.into_iter().filter(|m| *m != tgid).collect();
                if live != tgid {
                    left.push(live);
                }
                left.push(tgid);
                drop(run);
                for m in left {
                    self.reap_thread(m)?;
                }
            }
        } else if live != self.th(tid)?.tgid {
            // Until its exit is complete (the kernel has cleared its
            // CLONE_CHILD_CLEARTID word), as when recording. A process's
            // leader is reported only when all its threads are gone.
            drop(run);
            self.reap_thread(live)?;
        } else {
            drop(run);
        }
        Ok(())
    }

    /// Follow thread `m` until it has exited.
    fn reap_thread(&mut self, m: Tid) -> Result<(), ReplayError> {
        loop {
            match Running::from_tid(m).wait() {
                Ok(Waited::Exited(_, c)) => {
                    if m == self.leader_live {
                        self.exit_status = Some(c);
                    }
                    return Ok(());
                }
                Ok(Waited::Killed(_, sg)) => {
                    if m == self.leader_live {
                        self.exit_status = Some(128 + sg);
                    }
                    return Ok(());
                }
                Ok(Waited::Stopped(s, _)) => {
                    let _ = s.resume(0);
                }
                Err(_) => return Ok(()),
            }
        }
    }

    /// Let every remaining thread exit and collect the process's status.
    pub(crate) fn reap_all(&mut self) -> Result<(), ReplayError> {
        loop {
            match task::wait() {
                Ok(Some(Waited::Exited(p, c))) if p == self.leader_live => {
                    self.exit_status = Some(c)
                }
                Ok(Some(Waited::Killed(p, s))) if p == self.leader_live => {
                    self.exit_status = Some(128 + s)
                }
                Ok(Some(Waited::Stopped(s, _))) => {
                    let _ = s.resume(0);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(()),
            }
        }
    }

    fn finish(&mut self) -> Result<ReplayOutcome, ReplayError> {
        let events = self.idx as u64;
        match self.src.trailer().cloned() {
            Some(t) => {
                if self.exit_status.is_none() {
                    // The program ends without an exit call (a fatal signal
                    // was delivered, or it was killed from outside).
                    let alive = self
                        .threads
                        .values()
                        .any(|t| matches!(t.st, St::Running(_)));
                    if !alive && t.exit_status >= 128 {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(self.leader_live),
                            nix::sys::signal::Signal::try_from(t.exit_status - 128)
                                .unwrap_or(nix::sys::signal::Signal::SIGKILL),
                        );
                    }
                    let tids: Vec<u32> = self.threads.keys().copied().collect();
                    for tid in tids {
                        if let St::Ready(s) | St::AtEntry(s) = self.take(tid)? {
                            let _ = s.resume(0);
                        }
                    }
                    self.reap_all()?;
                }
                let got = self.exit_status.unwrap_or(-1);
                if got != t.exit_status {
                    return self.diverge(
                        Kind::Exit,
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
                    nix::unistd::Pid::from_raw(self.leader_live),
                    nix::sys::signal::Signal::SIGKILL,
                );
                self.reap_all()?;
                tracing::info!("the log ends without a trailer (recording interrupted); replayed all {events} events");
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
