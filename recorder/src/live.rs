//! A program taken over from a replay goes on for real: the replayer
//! (`hotstandby_replayer::takeover`) hands over its threads, where each
//! stands, and its shadow state; the recorder adopts them and continues the
//! same log.

use std::sync::Arc;

use hotstandby_protocol::decide::{HashOf, Plan};
use hotstandby_protocol::observe::NetObserver;
use hotstandby_protocol::record::Mode;
use hotstandby_protocol::shadow::Shadow;
use hotstandby_protocol::sysmodel;
use hotstandby_tracer::mem::EntryInfo;
use hotstandby_tracer::{Running, Stopped, Tid};

use crate::logfile::LogWriter;
use crate::record::{forward_signals, Pending, RecordError, RecordOutcome, Recorder, St, Th};

/// How a thread stands when a replay hands the program over.
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
    /// The id the program knows it by (the same on both sides).
    pub ns: u32,
    /// Our id of it, and of its process.
    pub tid: Tid,
    pub tgid: Tid,
    pub ns_tgid: u32,
    pub state: TakeoverState,
    /// Its syscall buffer (switching to recording once its replayed batch
    /// is used up).
    pub buf: Option<hotstandby_tracer::buffer::Buffer>,
}

/// What a replay hands over when it goes live.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// Our id of the main process.
    pub leader: Tid,
    pub threads: Vec<TakeoverThread>,
    /// The program's kernel state as replay tracked it (fds, signal
    /// actions, connections with what was read and written).
    pub shadow: Shadow<()>,
    /// Ports of the program's listening sockets (for the output rule).
    pub listening: Vec<u16>,
    /// The CPU the replay's thread (which goes on recording) shares with
    /// the program.
    pub pin: Option<hotstandby_tracer::pin::Pinning>,
    /// The syscall buffer library the program was started with, and each
    /// process's fd table of it.
    pub preload: Option<std::path::PathBuf>,
    pub fdtabs: Vec<(u32, u64)>,
}

fn pending(nr: u32, args: [u64; 6], mode: Mode) -> Pending {
    Pending {
        nr,
        args,
        plan: Plan {
            mode,
            blocking: false,
            hash: HashOf::Nothing,
            outs: None,
        },
        spec: sysmodel::spec(nr).unwrap_or_else(|| {
            sysmodel::spec(libc::SYS_getpid as u32).expect("getpid is in the model")
        }),
        entry: EntryInfo::default(),
        path: Vec::new(),
    }
}

/// Let a replayed program continue for real from where its log ends,
/// recording into `log` (the same log, continued). Blocks until it exits.
pub fn continue_live(
    t: Takeover,
    log: LogWriter,
    net: Option<Arc<dyn NetObserver>>,
) -> Result<RecordOutcome, RecordError> {
    forward_signals(t.leader);
    let mut r = Recorder::new(log, t.leader, t.shadow);
    if let Some(n) = &net {
        for p in &t.listening {
            n.listening_port(*p);
        }
        for (_, c) in r.shadow.conns_mut() {
            n.adopt(&c.tcp, c.written, c.read);
        }
    }
    r.net = net;
    r.pin = t.pin;
    r.buffering = t.preload.is_some();
    r.preload = t.preload.clone();
    r.fdtabs = t.fdtabs.iter().copied().collect();
    for th in &t.threads {
        r.ids.insert(th.ns, th.tid);
        let st = match &th.state {
            TakeoverState::Running => {
                r.current = Some(th.tid);
                St::Running(Running::from_tid(th.tid))
            }
            TakeoverState::AtEntry => {
                r.runq.push_back(th.tid);
                St::AtEntry(Stopped::from_tid(th.tid))
            }
            TakeoverState::Ready => {
                r.runq.push_back(th.tid);
                St::Ready(Stopped::from_tid(th.tid))
            }
            TakeoverState::InKernel { nr, args } => St::InKernel(
                pending(*nr, *args, Mode::Executed),
                Running::from_tid(th.tid),
            ),
            TakeoverState::Answer { nr, args, ret } => {
                let mut s = Stopped::from_tid(th.tid);
                let mut regs = s.regs()?;
                regs.orig_rax = u64::MAX;
                regs.rax = *ret as u64;
                s.set_regs(&regs)?;
                r.runq.push_back(th.tid);
                St::Done(pending(*nr, *args, Mode::Emulated), s)
            }
        };
        r.threads.insert(
            th.tid,
            Th {
                tgid: th.tgid,
                ns_tgid: th.ns_tgid,
                st,
                slice: 0,
                resumed_rip: None,
                buf: th.buf,
            },
        );
    }
    let status = r.run()?;
    r.finish(status)
}
