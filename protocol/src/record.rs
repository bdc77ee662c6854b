//! The records of a log: one [`Record::Header`] with the program's identity,
//! then [`Record::Event`]s in the order the supervisor sequenced them, then
//! (when the recording ended cleanly) one [`Record::Trailer`].
//!
//! Records hold only what replay needs: results, the memory the kernel wrote
//! for emulated syscalls, and hashes of data for divergence checks. See
//! `docs/log-format.md` for the meaning of each field.

use rkyv::{Archive, Deserialize, Serialize};

/// Who the recorded program is; replay refuses a program that differs.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// argv as given to execve, argv[0] first.
    pub argv: Vec<Vec<u8>>,
    /// The environment the program started with (`KEY=VALUE`).
    pub env: Vec<Vec<u8>>,
    /// Working directory at start.
    pub cwd: Vec<u8>,
    /// Absolute path of the executable that was run.
    pub exe: Vec<u8>,
    /// sha256 of the executable's bytes.
    pub exe_sha256: [u8; 32],
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// `flags` from /proc/cpuinfo.
    pub cpu_flags: String,
    /// `uname -r` of the recording kernel.
    pub kernel_release: String,
    /// Host name of the recording machine (informational).
    pub hostname: String,
    /// umask at start.
    pub umask: u32,
    /// Fingerprint of the syscall model the recorder decided with
    /// (`sysmodel::fingerprint`): replay under another model is refused.
    pub model: [u8; 32],
    /// Wall-clock start, ns since the epoch (informational).
    pub start_unix_ns: u64,
    /// Data directory whose files replay reads for real (informational).
    pub data_dir: Vec<u8>,
    /// The `LD_PRELOAD=` entry that loaded the syscall buffer (its path
    /// names its content), empty when recorded without it. Replay preloads
    /// exactly the same, or refuses.
    pub preload: Vec<u8>,
}

/// How replay treats one syscall.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum Mode {
    /// Replay executes it for real and compares the result (local objects).
    Executed = 1,
    /// Replay skips it and injects the result and memory writes (outside world).
    Emulated = 2,
    /// Replay executes it (kernel state must exist) then overwrites the
    /// result and memory with the recorded values (e.g. wait4 rusage).
    ExecutedInjected = 3,
    /// Neither side ran it: the supervisor answered ENOSYS (fail closed).
    Refused = 4,
    /// Replay creates a placeholder socket in place of the recorded fd
    /// (accept): `aux` holds the address family.
    PlaceholderFd = 5,
    /// The syscall was interrupted by a signal and will be restarted after
    /// the handler returns (the next event is the signal).
    Restart = 6,
}

/// Bytes the kernel wrote into the tracee's memory.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemWrite {
    pub addr: u64,
    pub data: Vec<u8>,
}

/// A completed syscall: the thread resumes user code right after it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SyscallEvent {
    pub tid: u32,
    pub nr: u32,
    pub args: [u64; 6],
    pub ret: i64,
    pub mode: Mode,
    /// Memory the kernel wrote (emulated syscalls only).
    pub writes: Vec<MemWrite>,
    /// xxh3 of the bytes written to an external fd, or read from an
    /// internal file; 0 when not applicable.
    pub hash: u64,
    /// Mode-specific extra value (address family for `PlaceholderFd`).
    pub aux: u64,
    /// The path argument, for syscalls that take one (checked on replay).
    pub path: Vec<u8>,
}

/// A TCP connection the program accepted, as the primary's kernel set it
/// up: what a standby needs to rebuild it in place with TCP_REPAIR. Logged
/// right after the accept that returned `fd`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct TcpConn {
    pub tid: u32,
    pub fd: i32,
    /// sockaddr bytes of the local and the remote end.
    pub local: Vec<u8>,
    pub remote: Vec<u8>,
    /// Sequence number of the first byte the program writes / reads.
    pub snd_base: u32,
    pub rcv_base: u32,
    /// Negotiated options: MSS, window scales, `TCPI_OPT_*` bits.
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub options: u8,
    /// SO_REUSEADDR as the socket had it (from its listener): a rebuilt
    /// socket gets it too, so its TIME-WAIT does not block the port.
    pub reuse: u8,
    /// Send and receive windows at accept.
    pub snd_wnd: u32,
    pub rcv_wnd: u32,
    /// The connection's TCP timestamp clock (ms) and the wall clock (ms
    /// since the epoch) when it was read.
    pub tsval: u32,
    pub wall_ms: u64,
}

/// One syscall the program made through the in-process syscall buffer
/// (no ptrace stop): what the outside world answered. Stored packed
/// (`crate::packed`), not archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufCall {
    /// The call as the program made it (read, recvfrom, clock_gettime…).
    pub nr: u16,
    /// `1`: it would have blocked; the program then made it traced.
    pub flags: u8,
    /// Call-specific (`1`: `data` ends with a peer address).
    pub extra: u8,
    /// The fd it was made on (-1: none).
    pub fd: i32,
    pub ret: i64,
    /// Hash of the bytes written (writes), 0 otherwise.
    pub hash: u64,
    /// The bytes the kernel wrote for the program.
    pub data: Vec<u8>,
}

/// One scheduling decision or observation of the supervisor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A syscall completed and its thread becomes the running thread.
    Syscall(SyscallEvent),
    /// A thread went into the kernel with a syscall that may block; another
    /// thread may run before it completes.
    Enter {
        tid: u32,
        nr: u32,
        args: [u64; 6],
        mode: Mode,
    },
    /// The supervisor lets `tid` run user code (preemption at a syscall
    /// boundary, or the first run of a new thread).
    Switch { tid: u32 },
    /// A new thread `child` was created by `tid` (clone with CLONE_THREAD).
    Spawn { tid: u32, child: u32, flags: u64 },
    /// A signal is delivered to `tid` at a syscall boundary. `siginfo` is
    /// the kernel's 128-byte siginfo_t. With `at_entry`, at the thread's
    /// next syscall entry, which is rewound and made again after the
    /// handler; without, on the return of its last logged syscall.
    Signal {
        tid: u32,
        signo: i32,
        siginfo: Vec<u8>,
        at_entry: bool,
    },
    /// A synchronous fault delivered where it happened (same on replay).
    Fault { tid: u32, signo: i32, rip: u64 },
    /// rdtsc (`rdtscp` true: rdtscp, `aux` is its ecx) trapped at `rip`.
    Rdtsc {
        tid: u32,
        rip: u64,
        value: u64,
        aux: u32,
        rdtscp: bool,
    },
    /// A thread (or with `group`, the whole process) exits with `code`.
    Exit { tid: u32, code: i32, group: bool },
    /// The TCP parameters of a connection just accepted.
    Tcp(TcpConn),
    /// Calls `tid` made through its syscall buffer since its last logged
    /// event, in order, packed (`crate::packed`); logged right before its
    /// next event. [`Event::batch`] makes one, [`Event::calls`] reads it.
    Batch { tid: u32, packed: Vec<u8> },
}

impl Event {
    /// A batch of buffered calls of `tid`.
    pub fn batch(tid: u32, calls: &[BufCall]) -> Event {
        Event::Batch {
            tid,
            packed: crate::packed::pack(calls),
        }
    }

    /// The calls of a batch (empty for other events). A log that passed
    /// frame validation holds only well-formed batches.
    pub fn calls(&self) -> Result<Vec<BufCall>, crate::packed::PackError> {
        match self {
            Event::Batch { packed, .. } => crate::packed::unpack(packed),
            _ => Ok(Vec::new()),
        }
    }

    /// The recorded thread id this event concerns.
    pub fn tid(&self) -> u32 {
        match self {
            Event::Syscall(s) => s.tid,
            Event::Enter { tid, .. }
            | Event::Switch { tid }
            | Event::Spawn { tid, .. }
            | Event::Signal { tid, .. }
            | Event::Fault { tid, .. }
            | Event::Rdtsc { tid, .. }
            | Event::Exit { tid, .. }
            | Event::Batch { tid, .. } => *tid,
            Event::Tcp(c) => c.tid,
        }
    }

    /// A short name of the event kind, for stats.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Syscall(_) => "syscall",
            Event::Enter { .. } => "enter",
            Event::Switch { .. } => "switch",
            Event::Spawn { .. } => "spawn",
            Event::Signal { .. } => "signal",
            Event::Fault { .. } => "fault",
            Event::Rdtsc { .. } => "rdtsc",
            Event::Exit { .. } => "exit",
            Event::Tcp(_) => "tcp",
            Event::Batch { .. } => "batch",
        }
    }
}

impl ArchivedEvent {
    /// The recorded thread id this event concerns.
    pub fn tid(&self) -> u32 {
        match self {
            ArchivedEvent::Syscall(s) => s.tid.to_native(),
            ArchivedEvent::Enter { tid, .. }
            | ArchivedEvent::Switch { tid }
            | ArchivedEvent::Spawn { tid, .. }
            | ArchivedEvent::Signal { tid, .. }
            | ArchivedEvent::Fault { tid, .. }
            | ArchivedEvent::Rdtsc { tid, .. }
            | ArchivedEvent::Exit { tid, .. }
            | ArchivedEvent::Batch { tid, .. } => tid.to_native(),
            ArchivedEvent::Tcp(c) => c.tid.to_native(),
        }
    }
}

/// Written once when the recording ends cleanly.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Number of events in the log.
    pub events: u64,
    /// The program's exit status as the shell reports it (128+N for signal N).
    pub exit_status: i32,
    /// Wall-clock end, ns since the epoch.
    pub end_unix_ns: u64,
}

/// One framed record of the log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Header(Identity),
    Event(Event),
    Trailer(Trailer),
}
