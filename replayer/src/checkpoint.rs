//! Checkpoints of the replayed program: at a clean point (every thread
//! stopped at a syscall boundary the replay has fully applied) the state of
//! the program and of the replay is written to a file
//! (`hotstandby_protocol::checkpoint`), and a new replay can start from it
//! instead of from the first event: it spawns the program as usual, then
//! rebuilds memory, fds, signal actions and threads by injected syscalls and
//! continues with the log from the checkpoint's position.
//!
//! What a checkpoint holds and what it refuses is in `docs/design.md`
//! ("Checkpoints").

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hotstandby_protocol::checkpoint::{
    Checkpoint, CheckpointError, ConnImage, EngineImage, Fd, Item, Mapping, MmImage, Object,
    SigAction, SockImage, State, Thread, ThreadAt, Writer, PAGE,
};
use hotstandby_tracer::{sys, Regs, Stop, Stopped, TaskError, Tid, Waited};
use thiserror::Error;

use crate::engine::{wait_for, Engine, ReplayError, St, Th};
use crate::net::{Conn, SockSetup};

/// Why a checkpoint could not be taken or used.
#[derive(Debug, Error)]
pub enum CkError {
    #[error(transparent)]
    Format(#[from] CheckpointError),
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Something of the program a checkpoint cannot hold yet.
    #[error("cannot checkpoint the program: {0}")]
    Unsupported(String),
    /// The checkpoint is not one this log and this program can continue.
    #[error("refusing the checkpoint {path}: {why}")]
    Foreign { path: PathBuf, why: String },
    /// Rebuilding the program from the checkpoint failed.
    #[error("restoring from the checkpoint: {0}")]
    Restore(String),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Task(#[from] TaskError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkError + '_ {
    move |source| CkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When to take checkpoints during a replay, and where to keep them.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Directory of the checkpoint files (`ckpt-<position>.hsck`).
    pub dir: PathBuf,
    /// Log bytes between checkpoints.
    pub every_bytes: u64,
    /// And at most this long between them (when the log moves at all).
    pub every: Option<Duration>,
    /// Checkpoints to keep (older ones are deleted).
    pub keep: usize,
    /// Delete the log before the oldest checkpoint kept (a standby's own
    /// copy; an offline replay leaves the log alone).
    pub retain: bool,
}

/// How often to checkpoint: every so many log bytes, or every so long
/// (when the log moved at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    Bytes(u64),
    Time(Duration),
}

impl Every {
    /// The policy for checkpoints into `dir`, keeping two.
    pub fn policy(self, dir: PathBuf, retain: bool) -> Policy {
        let (every_bytes, every) = match self {
            Every::Bytes(b) => (b, None),
            Every::Time(d) => (u64::MAX, Some(d)),
        };
        Policy {
            dir,
            every_bytes,
            every,
            keep: 2,
            retain,
        }
    }
}

/// A checkpoint taken.
#[derive(Debug, Clone)]
pub struct Taken {
    pub path: PathBuf,
    pub position: u64,
    pub index: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Memory pages saved, in bytes.
    pub memory: u64,
    /// How long writing the file took (the program runs meanwhile; it is
    /// stopped only while its state is copied).
    pub write_time: Duration,
}

/// The checkpoint files in `dir`, oldest first, by log position.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let pos = n
                        .strip_prefix("ckpt-")?
                        .strip_suffix(".hsck")?
                        .parse()
                        .ok()?;
                    Some((pos, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A checkpoint file, mapped.
pub struct Mapped {
    map: memmap2::Mmap,
    pub path: PathBuf,
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("path", &self.path).finish()
    }
}

impl Mapped {
    pub fn open(path: &Path) -> Result<Self, CkError> {
        let f = File::open(path).map_err(io(path))?;
        // A checkpoint file is written once under a temporary name and
        // renamed into place; nothing writes it afterwards, and every byte
        // is hashed and bounds-checked before use (`Checkpoint::parse`).
        // SAFETY: see above: the mapped bytes do not change under us.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io(path))?;
        Ok(Mapped {
            map,
            path: path.to_path_buf(),
        })
    }

    /// Check the whole file and decode its state.
    pub fn parse(&self) -> Result<Checkpoint<'_>, CkError> {
        Ok(Checkpoint::parse(&self.map)?)
    }
}

/// Check that a checkpoint continues the log `log_id` of this program
/// under this build's syscall model.
pub fn check_fits(
    path: &Path,
    st: &State,
    log_id: Option<[u8; 32]>,
    exe_sha256: &[u8; 32],
) -> Result<(), CkError> {
    let why = if Some(st.log_id) != log_id {
        Some("it was taken from another log (another recording or another program)".to_string())
    } else if &st.exe_sha256 != exe_sha256 {
        Some("it was taken from another build of the program".to_string())
    } else if st.model != hotstandby_protocol::sysmodel::fingerprint() {
        Some("it was taken under another syscall model (another hotstandby version)".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(CkError::Foreign {
            path: path.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------
// Reading the program's state from /proc.

fn parse_maps(pid: Tid) -> Result<Vec<Mapping>, CkError> {
    let p = PathBuf::from(format!("/proc/{pid}/maps"));
    let s = std::fs::read_to_string(&p).map_err(io(&p))?;
    let mut out = Vec::new();
    for line in s.lines() {
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(_ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.next().unwrap_or("").trim_start();
        let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
        let pb = perms.as_bytes();
        let mut prot = 0;
        if pb.first() == Some(&b'r') {
            prot |= libc::PROT_READ as u32;
        }
        if pb.get(1) == Some(&b'w') {
            prot |= libc::PROT_WRITE as u32;
        }
        if pb.get(2) == Some(&b'x') {
            prot |= libc::PROT_EXEC as u32;
        }
        out.push(Mapping {
            start: u64::from_str_radix(a, 16).unwrap_or(0),
            end: u64::from_str_radix(b, 16).unwrap_or(0),
            prot,
            shared: pb.get(3) == Some(&b's'),
            offset: u64::from_str_radix(off, 16).unwrap_or(0),
            path: path.as_bytes().to_vec(),
            file_size: 0,
            file_mtime_ns: 0,
            contents_saved: false,
        });
    }
    Ok(out)
}

/// (size, mtime ns) of the file behind a mapping.
fn map_file_id(pid: Tid, m: &Mapping) -> Option<(u64, i64)> {
    let md = std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)).ok()?;
    Some((md.size(), md.mtime() * 1_000_000_000 + md.mtime_nsec()))
}

fn stat_fields(pid: Tid) -> Result<Vec<u64>, CkError> {
    let p = PathBuf::from(format!("/proc/{pid}/stat"));
    let s = std::fs::read_to_string(&p).map_err(io(&p))?;
    // After the command name in parentheses, field 3 on.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    Ok(rest
        .split_whitespace()
        .map(|v| v.parse::<i64>().map(|x| x as u64).unwrap_or(0))
        .collect())
}

fn read_auxv(pid: Tid) -> Result<Vec<u64>, CkError> {
    let p = PathBuf::from(format!("/proc/{pid}/auxv"));
    let b = std::fs::read(&p).map_err(io(&p))?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn fdinfo(pid: Tid, fd: i32) -> Result<HashMap<String, String>, CkError> {
    let p = PathBuf::from(format!("/proc/{pid}/fdinfo/{fd}"));
    let s = std::fs::read_to_string(&p).map_err(io(&p))?;
    let mut m = HashMap::new();
    let mut tfds = Vec::new();
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("tfd:") {
            tfds.push(rest.trim().to_string());
            continue;
        }
        if let Some((k, v)) = l.split_once(':') {
            m.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    m.insert("tfds".into(), tfds.join("\n"));
    Ok(m)
}

fn octal(m: &HashMap<String, String>, k: &str) -> u32 {
    m.get(k)
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0)
}

/// `(a, b)` pairs of a timerfd's fdinfo, in ns.
fn timespec_pair(v: &str) -> u64 {
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let mut it = v.split(',').map(|x| x.trim().parse::<u64>().unwrap_or(0));
    let s = it.next().unwrap_or(0);
    let ns = it.next().unwrap_or(0);
    s * 1_000_000_000 + ns
}

fn sockopt(fd: std::os::fd::BorrowedFd<'_>, opt: i32) -> i32 {
    use std::os::fd::AsRawFd;
    let mut v: i32 = 0;
    let mut len = 4u32;
    // SAFETY: v is a writable int and len says so.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    v
}

/// What each fd of `pid` is.
fn describe_fds(pid: Tid) -> Result<Vec<Fd>, CkError> {
    let me = std::process::id() as i32;
    let fds = hotstandby_tracer::fdclass::open_fds(pid);
    let mut out: Vec<Fd> = Vec::new();
    for &fd in &fds {
        let info = fdinfo(pid, fd)?;
        let flags = octal(&info, "flags");
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        let flags = flags & !(libc::O_CLOEXEC as u32);
        if let Some(first) = out
            .iter()
            .find(|o| !matches!(o.object, Object::Dup { .. }) && sys::same_file(pid, o.fd, pid, fd))
        {
            out.push(Fd {
                fd,
                cloexec,
                object: Object::Dup { fd: first.fd },
            });
            continue;
        }
        if sys::same_file(pid, fd, me, fd) {
            out.push(Fd {
                fd,
                cloexec,
                object: Object::Inherited,
            });
            continue;
        }
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|l| l.as_os_str().as_bytes().to_vec())
            .unwrap_or_default();
        let ls = String::from_utf8_lossy(&link).into_owned();
        let unsupported = |what: &str| CkError::Unsupported(format!("fd {fd} is {what} ({ls})"));
        let object = if let Some(ino) = ls.strip_prefix("pipe:[") {
            let id = ino.trim_end_matches(']').parse().unwrap_or(0);
            let dup = sys::dup_from(pid, fd)?;
            use std::os::fd::AsRawFd;
            // SAFETY: F_GETPIPE_SZ takes no pointer; dup is our open fd.
            let size = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(4096) as u32;
            if flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32 {
                let contents = sys::pipe_contents(dup.as_fd(), size as usize)
                    .map_err(|e| CkError::Unsupported(format!("reading pipe fd {fd}: {e}")))?;
                Object::PipeRead {
                    id,
                    flags,
                    size,
                    contents,
                }
            } else {
                Object::PipeWrite { id, flags, size }
            }
        } else if ls == "anon_inode:[eventfd]" {
            let count = info
                .get("eventfd-count")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0);
            let sem = info
                .get("eventfd-semaphore")
                .map(|v| v == "1")
                .unwrap_or(false);
            Object::EventFd {
                count,
                flags: flags | if sem { libc::EFD_SEMAPHORE as u32 } else { 0 },
            }
        } else if ls == "anon_inode:[eventpoll]" {
            let mut entries = Vec::new();
            for t in info.get("tfds").map(|s| s.as_str()).unwrap_or("").lines() {
                // "5 events: 19 data: 5 pos:0 ino:... sdev:..."
                let w: Vec<&str> = t.split_whitespace().collect();
                let tfd = w.first().and_then(|v| v.parse().ok()).unwrap_or(-1);
                let ev = w
                    .iter()
                    .position(|x| *x == "events:")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| u32::from_str_radix(v, 16).ok())
                    .unwrap_or(0);
                let data = w
                    .iter()
                    .position(|x| *x == "data:")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .unwrap_or(0);
                entries.push((tfd, ev, data));
            }
            Object::Epoll { flags, entries }
        } else if ls == "anon_inode:[timerfd]" {
            Object::TimerFd {
                clock: info
                    .get("clockid")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                flags,
                value_ns: info.get("it_value").map(|v| timespec_pair(v)).unwrap_or(0),
                interval_ns: info
                    .get("it_interval")
                    .map(|v| timespec_pair(v))
                    .unwrap_or(0),
            }
        } else if ls == "anon_inode:[signalfd]" {
            Object::SignalFd {
                mask: info
                    .get("sigmask")
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .unwrap_or(0),
                flags,
            }
        } else if ls.starts_with("socket:") {
            let dup = sys::dup_from(pid, fd)?;
            let domain = sockopt(dup.as_fd(), libc::SO_DOMAIN);
            if domain == libc::AF_UNIX {
                return Err(unsupported("a unix socket"));
            }
            // A socket replay holds never got an address (bind and listen
            // are emulated; accept gives a placeholder).
            let mut sa: libc::sockaddr_storage =
                // SAFETY: sockaddr_storage is plain data; zero is valid.
                unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            use std::os::fd::AsRawFd;
            // SAFETY: sa is writable for len bytes, as len says.
            unsafe {
                libc::getsockname(
                    dup.as_raw_fd(),
                    &mut sa as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            let port = u16::from_be_bytes(
                // SAFETY: for AF_INET/AF_INET6 the port is the 2 bytes after
                // the family in both layouts; sa is initialised.
                unsafe { *(&sa as *const _ as *const [u8; 4]) }[2..4]
                    .try_into()
                    .expect("2 bytes"),
            );
            if port != 0 {
                return Err(unsupported("a bound socket"));
            }
            Object::Socket {
                domain,
                ty: sockopt(dup.as_fd(), libc::SO_TYPE),
                protocol: sockopt(dup.as_fd(), libc::SO_PROTOCOL),
                flags,
            }
        } else if ls.starts_with('/') && !ls.ends_with(" (deleted)") && !ls.starts_with("/memfd:") {
            Object::File {
                path: link.clone(),
                flags,
                pos: info.get("pos").and_then(|v| v.parse().ok()).unwrap_or(0),
            }
        } else if ls.ends_with(" (deleted)") {
            return Err(unsupported("a deleted file"));
        } else {
            return Err(unsupported("of a kind checkpoints do not hold yet"));
        };
        out.push(Fd {
            fd,
            cloexec,
            object,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------
// Running syscalls in a stopped thread.

const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// A thread of the program borrowed for injected syscalls: its registers
/// and the way back to the stop it was in.
struct Borrowed {
    s: Option<Stopped>,
    regs: Regs,
    /// At a syscall entry the replay has not handled: go back there.
    at_entry: bool,
    touched: bool,
}

impl Borrowed {
    fn new(mut s: Stopped, at_entry: bool) -> Result<Self, CkError> {
        let regs = s.regs()?;
        Ok(Borrowed {
            s: Some(s),
            regs,
            at_entry,
            touched: false,
        })
    }

    fn call(&mut self, site: u64, nr: i64, args: [u64; 6]) -> Result<(i64, Option<Tid>), CkError> {
        let s = self.s.take().expect("a borrowed thread is stopped");
        self.touched = true;
        let (s, r, c) = s.call_at(site, nr, &args)?;
        self.s = Some(s);
        Ok((r, c))
    }

    /// Put the thread back as it was.
    fn give_back(mut self) -> Result<Stopped, CkError> {
        let mut s = self.s.take().expect("stopped");
        if !self.touched {
            return Ok(s);
        }
        if !self.at_entry {
            s.set_regs(&self.regs)?;
            return Ok(s);
        }
        reenter(s, &self.regs)
    }
}

/// Bring a thread back to the entry stop of the syscall whose entry
/// registers are `r`: rewind over its syscall instruction and let it make
/// the call again, up to the filter's stop.
fn reenter(mut s: Stopped, r: &Regs) -> Result<Stopped, CkError> {
    let mut q = *r;
    q.rip -= 2;
    q.rax = r.orig_rax;
    q.orig_rax = u64::MAX;
    s.set_regs(&q)?;
    let run = s.resume(0)?;
    match wait_for(run).map_err(|e| CkError::Restore(e.to_string()))? {
        Waited::Stopped(mut s, Stop::Entry) => {
            let got = s.regs()?.orig_rax;
            if got != r.orig_rax {
                return Err(CkError::Restore(format!(
                    "thread {} came back at syscall {got}, not {}",
                    s.tid(),
                    r.orig_rax
                )));
            }
            s.set_regs(r)?;
            Ok(s)
        }
        other => Err(CkError::Restore(format!(
            "thread {} did not come back to its syscall entry ({})",
            other.tid(),
            crate::engine::describe(&other)
        ))),
    }
}

fn read_word(tid: Tid, addr: u64) -> Result<u64, CkError> {
    let b = sys::read_mem(tid, addr, 8)?;
    Ok(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
}

fn check(what: &str, r: i64) -> Result<i64, CkError> {
    if r < 0 && r > -4096 {
        return Err(CkError::Restore(format!(
            "{what} failed: {}",
            std::io::Error::from_raw_os_error(-r as i32)
        )));
    }
    Ok(r)
}

// ---------------------------------------------------------------------
// Taking a checkpoint.

impl Engine<'_> {
    /// Before event `ev`: take a checkpoint if one is due and the program
    /// stands at a clean point. Returns what was taken.
    pub(crate) fn maybe_checkpoint(
        &mut self,
        ev: &hotstandby_protocol::record::Event,
    ) -> Result<Option<Taken>, ReplayError> {
        use hotstandby_protocol::record::Event;
        // Before every event of a replay with checkpoints: nothing is
        // cloned or allocated until one is due.
        let Some(p) = self.opts.checkpoints.as_ref() else {
            return Ok(None);
        };
        let pos = self.event_start;
        let due_bytes = pos.saturating_sub(self.ckpt.last_pos) >= p.every_bytes;
        let due_time = p
            .every
            .is_some_and(|d| self.ckpt.last_at.elapsed() >= d && pos > self.ckpt.last_pos);
        if !(due_bytes || due_time) {
            return Ok(None);
        }
        let p = p.clone();
        let tid = match ev {
            Event::Syscall(s) => s.tid,
            Event::Enter { tid, .. } => *tid,
            _ => return Ok(None),
        };
        if let Some(why) = self.unclean(tid) {
            if self.ckpt.deferred == 0 {
                tracing::debug!(why, "checkpoint due; waiting for a clean point");
            }
            self.ckpt.deferred += 1;
            if self.ckpt.deferred == 100_000 {
                tracing::warn!(
                    "a checkpoint has been due for 100000 events and none can be taken yet: {why}"
                );
            }
            return Ok(None);
        }
        if matches!(self.th(tid)?.st, St::Running(_)) {
            let s = self.entry(tid, "checkpoint")?;
            self.set(tid, St::AtEntry(s))?;
        }
        // One checkpoint is written at a time.
        if let Some(w) = self.ckpt.writer.take() {
            let _ = w.join();
        }
        let t0 = Instant::now();
        let r = self.take_checkpoint(&p, pos);
        self.ckpt.last_at = Instant::now();
        self.ckpt.deferred = 0;
        match r {
            Ok(pending) => {
                // The program was stopped only while its state was copied;
                // the file is written, synced and put in place meanwhile.
                let pause = t0.elapsed();
                self.ckpt.last_pos = pos;
                let (log_dir, feed) = (self.log_dir.clone(), self.opts.live.clone());
                let ck_dir = p.dir.clone();
                self.ckpt.writer = Some(
                    std::thread::Builder::new()
                        .name("checkpoint".into())
                        .spawn(move || match pending.write() {
                            Ok(t) => {
                                tracing::info!(
                                    path = %t.path.display(),
                                    position = t.position,
                                    bytes = t.bytes,
                                    memory = t.memory,
                                    pause_ms = pause.as_secs_f64() * 1e3,
                                    write_ms = t.write_time.as_secs_f64() * 1e3,
                                    "checkpoint taken"
                                );
                                for (_, old) in list(&p.dir).iter().rev().skip(p.keep.max(1)) {
                                    let _ = std::fs::remove_file(old);
                                }
                                if p.retain {
                                    retain_log(&log_dir, &p);
                                }
                                if let Some(f) = &feed {
                                    f.checkpoint
                                        .store(t.position, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            Err(e) => tracing::warn!("writing a checkpoint failed: {e}"),
                        })
                        .map_err(|source| {
                            ReplayError::Checkpoint(Box::new(CkError::Io {
                                path: ck_dir,
                                source,
                            }))
                        })?,
                );
                Ok(None)
            }
            Err(CkError::Unsupported(why)) => {
                // Not now, and not at every event either: at the next due time.
                self.ckpt.last_pos = pos;
                tracing::warn!("no checkpoint: {why}");
                Ok(None)
            }
            Err(e) => Err(ReplayError::Checkpoint(Box::new(e))),
        }
    }

    /// Wait for the checkpoint being written, if any.
    pub(crate) fn checkpoint_written(&mut self) {
        if let Some(w) = self.ckpt.writer.take() {
            let _ = w.join();
        }
    }
}

/// Delete the log before the oldest checkpoint kept.
fn retain_log(log_dir: &Path, p: &Policy) {
    {
        let Some((_, oldest)) = list(&p.dir).into_iter().next() else {
            return;
        };
        let Ok(m) = Mapped::open(&oldest) else { return };
        let Ok(st) = hotstandby_protocol::checkpoint::peek_state(&m.map) else {
            return;
        };
        let r = hotstandby_recorder::logfile::Retained {
            offset: st.position,
            seq: st.next_seq,
            index: st.index,
        };
        match hotstandby_recorder::logfile::delete_before(log_dir, r) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                freed = n,
                kept_from = r.offset,
                "deleted the log before the oldest checkpoint kept"
            ),
            Err(e) => tracing::warn!("could not delete old log: {e}"),
        }
    }
}

impl Engine<'_> {
    /// Why the program is not at a clean point now (`None`: it is).
    fn unclean(&self, tid: u32) -> Option<String> {
        if !self.fills.is_empty() {
            return Some("a pipe read is being filled".into());
        }
        if !self.filled.is_empty() {
            return Some("a buffered batch is not settled".into());
        }
        for (t, th) in &self.threads {
            if matches!(th.st, St::Gone) {
                continue;
            }
            if th.tgid != self.leader_live {
                return Some(format!("thread {t} is in a child process"));
            }
            let ok = match &th.st {
                St::AtEntry(_) | St::Blocked(_) | St::Ready(_) => true,
                St::Running(_) => *t == tid,
                _ => false,
            };
            if !ok {
                return Some(format!("thread {t} is {}", th.st.name()));
            }
        }
        None
    }

    fn take_checkpoint(&mut self, p: &Policy, pos: u64) -> Result<Pending, CkError> {
        std::fs::create_dir_all(&p.dir).map_err(io(&p.dir))?;
        let ids: Vec<u32> = {
            let mut v: Vec<u32> = self
                .threads
                .iter()
                .filter(|(_, t)| !matches!(t.st, St::Gone))
                .map(|(k, _)| *k)
                .collect();
            v.sort_unstable();
            v
        };
        // Borrow every thread.
        let mut borrowed: BTreeMap<u32, (Borrowed, ThreadAt)> = BTreeMap::new();
        for id in &ids {
            let st = std::mem::replace(&mut self.threads.get_mut(id).expect("listed").st, St::Gone);
            let (s, at) = match st {
                St::AtEntry(s) => (s, ThreadAt::Entry),
                St::Blocked(s) => (s, ThreadAt::Blocked),
                St::Ready(s) => (s, ThreadAt::Ready),
                other => {
                    self.threads.get_mut(id).expect("listed").st = other;
                    return Err(CkError::Unsupported("a thread is not stopped".into()));
                }
            };
            borrowed.insert(*id, (Borrowed::new(s, at != ThreadAt::Ready)?, at));
        }
        let res = self.dump(p, pos, &mut borrowed);
        // Give every thread back, whatever happened.
        let mut back_err = None;
        for (id, (b, at)) in borrowed {
            match b.give_back() {
                Ok(s) => {
                    self.threads.get_mut(&id).expect("listed").st = match at {
                        ThreadAt::Entry => St::AtEntry(s),
                        ThreadAt::Blocked => St::Blocked(s),
                        ThreadAt::Ready => St::Ready(s),
                    }
                }
                Err(e) => back_err = Some(e),
            }
        }
        if let Some(e) = back_err {
            return Err(e);
        }
        res
    }

    fn dump(
        &mut self,
        p: &Policy,
        pos: u64,
        threads: &mut BTreeMap<u32, (Borrowed, ThreadAt)>,
    ) -> Result<Pending, CkError> {
        let pid = self.leader_live;
        // A syscall instruction: the one a stopped thread's last (or next)
        // syscall used.
        let mut site = None;
        for (b, _) in threads.values() {
            let tid = b.s.as_ref().expect("stopped").tid();
            if sys::read_mem(tid, b.regs.rip.wrapping_sub(2), 2)
                .ok()
                .as_deref()
                == Some(&SYSCALL_INSN[..])
            {
                site = Some(b.regs.rip - 2);
                break;
            }
        }
        let site = site.ok_or_else(|| {
            CkError::Unsupported("no thread stands right after a syscall instruction".into())
        })?;
        let leader_ns = self
            .threads
            .iter()
            .find(|(_, t)| t.live == pid)
            .map(|(k, _)| *k)
            .ok_or_else(|| CkError::Unsupported("the main thread has exited".into()))?;
        let (lb, _) = threads
            .get_mut(&leader_ns)
            .ok_or_else(|| CkError::Unsupported("the main thread is not stopped".into()))?;
        let ltid = lb.s.as_ref().expect("stopped").tid();
        // A page of scratch memory in the program, unmapped again before
        // the memory map is read.
        let (scratch, _) = lb.call(
            site,
            libc::SYS_mmap,
            [
                0,
                PAGE as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        let scratch = check("mmap of scratch memory", scratch)? as u64;
        let mut sigactions = Vec::new();
        for sig in 1..=64i32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let (r, _) = lb.call(
                site,
                libc::SYS_rt_sigaction,
                [sig as u64, 0, scratch, 8, 0, 0],
            )?;
            check("rt_sigaction", r)?;
            let b = sys::read_mem(ltid, scratch, 32)?;
            let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
            if w(0) != 0 || w(1) != 0 || w(3) != 0 {
                sigactions.push(SigAction {
                    sig,
                    handler: w(0),
                    flags: w(1),
                    restorer: w(2),
                    mask: w(3),
                });
            }
        }
        let (brk, _) = lb.call(site, libc::SYS_brk, [0; 6])?;
        sys::write_mem(ltid, scratch, b"/proc/sys/kernel/ns_last_pid\0")?;
        let (fd, _) = lb.call(
            site,
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                scratch,
                libc::O_RDONLY as u64,
                0,
                0,
                0,
            ],
        )?;
        let fd = check("opening ns_last_pid", fd)?;
        let (n, _) = lb.call(site, libc::SYS_read, [fd as u64, scratch + 64, 32, 0, 0, 0])?;
        let n = check("reading ns_last_pid", n)?;
        lb.call(site, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        let last_pid: u32 =
            String::from_utf8_lossy(&sys::read_mem(ltid, scratch + 64, n as usize)?)
                .trim()
                .parse()
                .unwrap_or(0);
        let mut images = Vec::new();
        for (id, (b, at)) in threads.iter_mut() {
            let tid = b.s.as_ref().expect("stopped").tid();
            let (r, _) = b.call(site, libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])?;
            check("sigaltstack", r)?;
            let ss = sys::read_mem(tid, scratch, 24)?;
            let (r, _) = b.call(
                site,
                libc::SYS_prctl,
                [libc::PR_GET_TID_ADDRESS as u64, scratch + 32, 0, 0, 0, 0],
            )?;
            check("prctl(PR_GET_TID_ADDRESS)", r)?;
            let clear_tid = read_word(tid, scratch + 32)?;
            images.push(Thread {
                tid: *id,
                at: *at,
                regs: regs_bytes(&b.regs),
                xstate: sys::get_xstate(tid)?,
                sigmask: sys::get_sigmask(tid)?,
                robust: sys::get_robust_list(tid)?,
                clear_tid,
                altstack: (
                    u64::from_le_bytes(ss[0..8].try_into().expect("8")),
                    i32::from_le_bytes(ss[8..12].try_into().expect("4")),
                    u64::from_le_bytes(ss[16..24].try_into().expect("8")),
                ),
                buffer: self.threads.get(id).and_then(|t| t.buf).map(|b| b.addr),
            });
        }
        let (lb, _) = threads.get_mut(&leader_ns).expect("checked");
        let (r, _) = lb.call(site, libc::SYS_munmap, [scratch, PAGE as u64, 0, 0, 0, 0])?;
        check("munmap of scratch memory", r)?;

        let st = stat_fields(pid)?;
        // stat(5) fields from 3 on: index = field - 3.
        let f = |n: usize| st.get(n - 3).copied().unwrap_or(0);
        let mm = MmImage {
            start_code: f(26),
            end_code: f(27),
            start_stack: f(28),
            start_data: f(45),
            end_data: f(46),
            start_brk: f(47),
            brk: brk as u64,
            arg_start: f(48),
            arg_end: f(49),
            env_start: f(50),
            env_end: f(51),
            auxv: read_auxv(pid)?,
        };
        let mut mappings = parse_maps(pid)?;
        for m in &mut mappings {
            if !m.anonymous() && !m.special() {
                if m.path.ends_with(b" (deleted)") {
                    return Err(CkError::Unsupported(format!(
                        "memory at {:#x} maps a deleted file ({})",
                        m.start,
                        String::from_utf8_lossy(&m.path)
                    )));
                }
                let (size, mtime) = map_file_id(pid, m).unwrap_or((0, 0));
                m.file_size = size;
                m.file_mtime_ns = mtime;
                let data_dir = &self.src.identity().data_dir;
                let inside = !data_dir.is_empty()
                    && m.path.starts_with(data_dir)
                    && m.path.get(data_dir.len()) == Some(&b'/');
                m.contents_saved = m.shared
                    && m.prot & libc::PROT_WRITE as u32 != 0
                    && !inside
                    && !shared_anon(&m.path);
            }
        }
        let fds = describe_fds(pid)?;
        let state = State {
            log_id: self.log_id,
            exe_sha256: self.src.identity().exe_sha256,
            model: hotstandby_protocol::sysmodel::fingerprint(),
            position: pos,
            next_seq: self.event_seq,
            index: self.idx as u64,
            created_unix_ns: hotstandby_tracer::spawn::now_unix_ns(),
            leader: leader_ns,
            last_pid,
            mm,
            mappings: mappings.clone(),
            threads: images,
            fds,
            sigactions,
            engine: self.engine_image(),
        };
        // Copied now, written once the program runs again.
        let mut mem = Vec::new();
        let memory = write_memory(pid, &mappings, &mut |addr, bytes| {
            mem.push((addr, bytes.to_vec()));
            Ok(())
        })?;
        let mut files = Vec::new();
        if let Some(dd) = &self.data_host {
            write_tree(dd, dd, &mut |t| {
                files.push(t);
                Ok(())
            })?;
        }
        Ok(Pending {
            state,
            mem,
            files,
            memory,
            dir: p.dir.clone(),
        })
    }

    fn engine_image(&self) -> EngineImage {
        let (procs, conns, next_conn) = self
            .shadow
            .image(|c: &Conn| (c.tail.iter().copied().collect::<Vec<u8>>(), c.tail_ok));
        EngineImage {
            procs,
            conns,
            next_conn,
            sockets: self
                .sockets
                .iter()
                .map(|((g, f), s)| SockImage {
                    tgid: *g,
                    fd: *f,
                    addr: s.addr.clone(),
                    backlog: s.backlog,
                    opts: s.opts.clone(),
                })
                .collect(),
            outbox: self
                .outbox
                .iter()
                .map(|(t, q)| (*t, q.iter().cloned().collect()))
                .collect(),
            fdtabs: self.fdtabs.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }
}

fn regs_bytes(r: &Regs) -> Vec<u8> {
    let n = std::mem::size_of::<Regs>();
    let mut v = vec![0u8; n];
    // SAFETY: Regs is a plain struct of u64 words; we copy exactly its size.
    unsafe { std::ptr::copy_nonoverlapping(r as *const Regs as *const u8, v.as_mut_ptr(), n) };
    v
}

fn regs_from(b: &[u8]) -> Result<Regs, CkError> {
    let n = std::mem::size_of::<Regs>();
    if b.len() != n {
        return Err(CkError::Restore(format!(
            "saved registers are {} bytes, this machine's are {n}",
            b.len()
        )));
    }
    // SAFETY: any bytes are a valid Regs (plain u64 words); b holds n bytes.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    // SAFETY: r is n bytes long and b holds n bytes; they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut r as *mut Regs as *mut u8, n) };
    Ok(r)
}

/// The pages worth saving of each mapping: for anonymous memory those the
/// program touched and that are not zero; for a private file mapping those
/// it changed (a page that became the program's own: present and not a
/// page of the file, in /proc/PID/pagemap); nothing of shared file
/// mappings (their file is saved or reopened).
fn write_memory(pid: Tid, maps: &[Mapping], emit: &mut MemSink<'_>) -> Result<u64, CkError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let pm_path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let pm = File::open(&pm_path).map_err(io(&pm_path))?;
    let mut total = 0u64;
    let mut buf = Vec::new();
    for m in maps {
        if m.special() {
            continue;
        }
        let anon_shared = m.shared && (shared_anon(&m.path) || m.contents_saved);
        if m.shared && !anon_shared {
            continue;
        }
        let pages = ((m.end - m.start) as usize) / PAGE;
        let mut pmb = vec![0u8; pages * 8];
        pm.read_exact_at(&mut pmb, m.start / PAGE as u64 * 8)
            .map_err(io(&pm_path))?;
        let keep = |i: usize| {
            let e = u64::from_le_bytes(pmb[i * 8..i * 8 + 8].try_into().expect("8"));
            if m.anonymous() || anon_shared {
                e & (PRESENT | SWAPPED) != 0
            } else {
                e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE == 0)
            }
        };
        let mut i = 0;
        while i < pages {
            if !keep(i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < pages && keep(j) && j - i < 256 {
                j += 1;
            }
            let addr = m.start + (i * PAGE) as u64;
            buf.resize((j - i) * PAGE, 0);
            sys::read_mem_into(pid, addr, &mut buf)?;
            // Zero pages of anonymous memory are what a new mapping holds.
            let mut k = 0;
            while k < j - i {
                let page = &buf[k * PAGE..(k + 1) * PAGE];
                if (m.anonymous() || anon_shared)
                    && !m.contents_saved
                    && page.iter().all(|b| *b == 0)
                {
                    k += 1;
                    continue;
                }
                let mut l = k + 1;
                while l < j - i {
                    let pg = &buf[l * PAGE..(l + 1) * PAGE];
                    if (m.anonymous() || anon_shared)
                        && !m.contents_saved
                        && pg.iter().all(|b| *b == 0)
                    {
                        break;
                    }
                    l += 1;
                }
                emit(addr + (k * PAGE) as u64, &buf[k * PAGE..l * PAGE])?;
                total += ((l - k) * PAGE) as u64;
                k = l;
            }
            i = j;
        }
    }
    Ok(total)
}

fn shared_anon(path: &[u8]) -> bool {
    path.is_empty() || path.starts_with(b"/dev/zero") || path.starts_with(b"/SYSV")
}

/// Where saved memory goes: (address, whole pages).
type MemSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), CkError> + 'a;

/// A file or directory of the data directory, copied for a checkpoint.
enum TreeItem {
    Dir(Vec<u8>, u32),
    File(Vec<u8>, u32, Vec<u8>),
}

fn write_tree(
    root: &Path,
    dir: &Path,
    emit: &mut dyn FnMut(TreeItem) -> Result<(), CkError>,
) -> Result<(), CkError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io(dir))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        let rel = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .as_os_str()
            .as_bytes()
            .to_vec();
        let mode = md.permissions().mode() & 0o7777;
        if md.is_dir() {
            emit(TreeItem::Dir(rel, mode))?;
            write_tree(root, &p, emit)?;
        } else if md.is_file() {
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            emit(TreeItem::File(rel, mode, bytes))?;
        }
    }
    Ok(())
}

/// A checkpoint copied out of the stopped program, to be written.
pub(crate) struct Pending {
    state: State,
    mem: Vec<(u64, Vec<u8>)>,
    files: Vec<TreeItem>,
    memory: u64,
    dir: PathBuf,
}

impl Pending {
    /// Write the file (temporary name, synced, renamed into place).
    fn write(self) -> Result<Taken, CkError> {
        let t0 = Instant::now();
        let pos = self.state.position;
        let final_path = self.dir.join(format!("ckpt-{pos}.hsck"));
        let tmp = self.dir.join(format!(".ckpt-{pos}.tmp"));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = Writer::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            &self.state,
        )?;
        for (addr, bytes) in &self.mem {
            w.memory(*addr, bytes)?;
        }
        for t in &self.files {
            match t {
                TreeItem::Dir(p, m) => w.dir(p, *m)?,
                TreeItem::File(p, m, b) => w.file(p, *m, b)?,
            }
        }
        let (out, bytes) = w.finish()?;
        let file = out.into_inner().map_err(|e| CkError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(Taken {
            path: final_path,
            position: pos,
            index: self.state.index,
            bytes,
            memory: self.memory,
            write_time: t0.elapsed(),
        })
    }
}

/// Write the data directory a checkpoint holds into `dir` (emptied first).
pub fn unpack_files(ck: &Checkpoint<'_>, dir: &Path) -> Result<(), CkError> {
    if dir.exists() {
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let p = e.path();
            let r = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io(&p))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for it in ck.items() {
        match it? {
            Item::Dir { path, mode } => {
                let p = dir.join(std::ffi::OsStr::from_bytes(path));
                std::fs::create_dir_all(&p).map_err(io(&p))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
            }
            Item::File { path, mode, bytes } => {
                let p = dir.join(std::ffi::OsStr::from_bytes(path));
                std::fs::write(&p, bytes).map_err(io(&p))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
            }
            Item::Mem { .. } => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------
// Restoring.

/// The program rebuilt from a checkpoint, every thread stopped where it
/// stood, ready for the engine.
pub(crate) struct Restored {
    pub threads: HashMap<u32, Th>,
}

/// Rebuild the program in the freshly spawned `fresh` (stopped after its
/// execve) from checkpoint `ck`.
pub(crate) fn restore(
    ck: &Checkpoint<'_>,
    fresh: Stopped,
    ns_pid: u32,
) -> Result<Restored, CkError> {
    let st = &ck.state;
    let pid = fresh.tid();
    let mut tids: Vec<u32> = st.threads.iter().map(|t| t.tid).collect();
    tids.sort_unstable();
    tids.dedup();
    if tids.len() != st.threads.len() || !tids.contains(&st.leader) {
        return Err(CkError::Restore(format!(
            "the checkpoint's threads {tids:?} do not hold its main thread {} once",
            st.leader
        )));
    }
    if ns_pid != st.leader {
        return Err(CkError::Restore(format!(
            "the new program is {ns_pid} in its PID namespace, the checkpoint's was {}",
            st.leader
        )));
    }
    // From the exec event stop to the execve's exit, so the next syscall
    // is ours.
    let mut s = match fresh.syscall(0)?.wait()? {
        Waited::Stopped(s, Stop::Exit) => s,
        other => {
            return Err(CkError::Restore(format!(
                "the new program did not finish its execve ({})",
                crate::engine::describe(&other)
            )))
        }
    };
    let rip = s.regs()?.rip;
    // A syscall instruction at the new program's first instruction (its
    // memory is replaced anyway), then one on a scratch page of our own.
    let before = sys::read_mem(pid, rip, 2)?;
    sys::write_mem(pid, rip, &SYSCALL_INSN)?;
    let fresh_maps = parse_maps(pid)?;
    let scratch = pick_scratch(&st.mappings, &fresh_maps)?;
    let (s2, r, _) = s.call_at(
        rip,
        libc::SYS_mmap,
        &[
            scratch,
            2 * PAGE as u64,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;
    s = s2;
    if check("mmap of the scratch page", r)? as u64 != scratch {
        return Err(CkError::Restore("the scratch page landed elsewhere".into()));
    }
    sys::write_mem(pid, rip, &before)?;
    sys::write_mem(pid, scratch, &SYSCALL_INSN)?;
    let site = scratch;
    let data = scratch + PAGE as u64;
    let call =
        |s: Stopped, nr: i64, args: [u64; 6]| -> Result<(Stopped, i64, Option<Tid>), CkError> {
            Ok(s.call_at(site, nr, &args)?)
        };
    tracing::debug!("restore: scratch page ready");
    // The kernel's own areas must be where the checkpoint had them.
    for m in st.mappings.iter().filter(|m| m.special()) {
        if !fresh_maps
            .iter()
            .any(|f| f.path == m.path && f.start == m.start)
        {
            return Err(CkError::Restore(format!(
                "{} is not at {:#x} in the new program (another kernel?)",
                String::from_utf8_lossy(&m.path),
                m.start
            )));
        }
    }
    tracing::debug!("restore: checked special areas");
    // Empty the address space but for those and the scratch page.
    for m in &fresh_maps {
        if m.special() || m.start == scratch {
            continue;
        }
        let (s2, r, _) = call(s, libc::SYS_munmap, [m.start, m.end - m.start, 0, 0, 0, 0])?;
        s = s2;
        check("munmap", r)?;
    }
    tracing::debug!("restore: address space emptied");
    s = map_areas(s, pid, site, data, st)?;
    tracing::debug!("restore: areas mapped");
    write_pages(ck, pid)?;
    tracing::debug!("restore: memory written");
    s = set_mm(s, pid, site, data, &st.mm)?;
    tracing::debug!("restore: memory map set");
    // File descriptors.
    s = restore_fds(s, pid, site, data, &st.fds)?;
    tracing::debug!("restore: fds made");
    // Signal actions.
    for a in &st.sigactions {
        let mut b = Vec::new();
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        sys::write_mem(pid, data, &b)?;
        let (s2, r, _) = call(s, libc::SYS_rt_sigaction, [a.sig as u64, data, 0, 8, 0, 0])?;
        s = s2;
        check(&format!("rt_sigaction({})", a.sig), r)?;
    }
    tracing::debug!("restore: signal actions set");
    // The other threads, with their ids.
    let mut live: HashMap<u32, Stopped> = HashMap::new();
    for t in st.threads.iter().filter(|t| t.tid != st.leader) {
        let mut args = Vec::new();
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        for v in [flags, 0, 0, 0, 0, 0, 0, 0, data + 256, 1, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        sys::write_mem(pid, data, &args)?;
        sys::write_mem(pid, data + 256, &(t.tid as i32).to_le_bytes())?;
        let (s2, r, child) = call(s, libc::SYS_clone3, [data, args.len() as u64, 0, 0, 0, 0])?;
        s = s2;
        check(&format!("clone3 for thread {}", t.tid), r)?;
        let c = child.ok_or_else(|| CkError::Restore("clone3 reported no thread".into()))?;
        let first = match hotstandby_tracer::Running::from_tid(c).wait()? {
            Waited::Stopped(x, _) => x,
            other => {
                return Err(CkError::Restore(format!(
                    "new thread {}: {}",
                    t.tid,
                    crate::engine::describe(&other)
                )))
            }
        };
        let got = hotstandby_tracer::nsid::ns_tid(c).unwrap_or(0);
        if got != t.tid {
            return Err(CkError::Restore(format!(
                "thread {} came back as {got}",
                t.tid
            )));
        }
        live.insert(t.tid, first);
    }
    live.insert(st.leader, s);
    tracing::debug!("restore: threads made");
    // Each thread's own kernel state.
    for t in &st.threads {
        let mut x = live.remove(&t.tid).expect("made above");
        let tid = x.tid();
        let (x2, r, _) = x.call_at(
            site,
            libc::SYS_set_robust_list,
            &[t.robust.0, t.robust.1, 0, 0, 0, 0],
        )?;
        x = x2;
        check("set_robust_list", r)?;
        let (x2, _, _) = x.call_at(
            site,
            libc::SYS_set_tid_address,
            &[t.clear_tid, 0, 0, 0, 0, 0],
        )?;
        x = x2;
        let mut ss = Vec::new();
        ss.extend_from_slice(&t.altstack.0.to_le_bytes());
        ss.extend_from_slice(&(t.altstack.1 & !libc::SS_ONSTACK).to_le_bytes());
        ss.extend_from_slice(&[0; 4]);
        ss.extend_from_slice(&t.altstack.2.to_le_bytes());
        if t.altstack.1 & libc::SS_DISABLE == 0 {
            sys::write_mem(tid, data + 1024 + 32 * (t.tid as u64 % 64), &ss)?;
            let (x2, r, _) = x.call_at(
                site,
                libc::SYS_sigaltstack,
                &[data + 1024 + 32 * (t.tid as u64 % 64), 0, 0, 0, 0, 0],
            )?;
            x = x2;
            check("sigaltstack", r)?;
        }
        sys::set_sigmask(tid, t.sigmask)?;
        sys::set_xstate(tid, &t.xstate)?;
        live.insert(t.tid, x);
    }
    // The next id the PID namespace hands out, as it was.
    let mut s = live.remove(&st.leader).expect("leader");
    sys::write_mem(pid, data, b"/proc/sys/kernel/ns_last_pid\0")?;
    let v = format!("{}", st.last_pid);
    sys::write_mem(pid, data + 64, v.as_bytes())?;
    let (s2, fd, _) = s.call_at(
        site,
        libc::SYS_openat,
        &[libc::AT_FDCWD as u64, data, libc::O_WRONLY as u64, 0, 0, 0],
    )?;
    s = s2;
    let fd = check("opening ns_last_pid", fd)?;
    let (s2, r, _) = s.call_at(
        site,
        libc::SYS_write,
        &[fd as u64, data + 64, v.len() as u64, 0, 0, 0],
    )?;
    s = s2;
    check("writing ns_last_pid", r)?;
    let (s2, _, _) = s.call_at(site, libc::SYS_close, &[fd as u64, 0, 0, 0, 0, 0])?;
    s = s2;
    let (s2, r, _) = s.call_at(
        site,
        libc::SYS_munmap,
        &[scratch, 2 * PAGE as u64, 0, 0, 0, 0],
    )?;
    s = s2;
    check("munmap of the scratch page", r)?;
    live.insert(st.leader, s);
    tracing::debug!("restore: thread state set");
    // Registers, and back to where each thread stood.
    let mut threads = HashMap::new();
    for t in &st.threads {
        let mut x = live.remove(&t.tid).expect("made above");
        let regs = regs_from(&t.regs)?;
        let tid = x.tid();
        let st_ = match t.at {
            ThreadAt::Entry => St::AtEntry(reenter(x, &regs)?),
            ThreadAt::Blocked => St::Blocked(reenter(x, &regs)?),
            ThreadAt::Ready => {
                let mut q = regs;
                q.orig_rax = u64::MAX;
                x.set_regs(&q)?;
                St::Ready(x)
            }
        };
        threads.insert(
            t.tid,
            Th {
                live: tid,
                tgid: pid,
                ns_tgid: st.leader,
                st: st_,
                buf: t
                    .buffer
                    .map(|addr| hotstandby_tracer::buffer::Buffer { addr }),
            },
        );
    }
    Ok(Restored { threads })
}

/// Map each of the checkpoint's areas at its address (files reopened and
/// checked unchanged; a writable shared file outside the data directory
/// made again if gone).
fn map_areas(
    mut s: Stopped,
    pid: Tid,
    site: u64,
    data: u64,
    st: &State,
) -> Result<Stopped, CkError> {
    let call =
        |s: Stopped, nr: i64, args: [u64; 6]| -> Result<(Stopped, i64, Option<Tid>), CkError> {
            Ok(s.call_at(site, nr, &args)?)
        };
    // Map the checkpoint's areas.
    for m in st.mappings.iter().filter(|m| !m.special()) {
        let len = m.end - m.start;
        let mut flags = libc::MAP_FIXED_NOREPLACE as u64;
        let mut fd = u64::MAX;
        let path = &m.path[..];
        let id =
            (m.file_size != 0 || m.file_mtime_ns != 0).then_some((m.file_size, m.file_mtime_ns));
        let file_backed = !(m.anonymous() || m.shared && shared_anon(path));
        if file_backed {
            write_cstr(pid, data, path)?;
            let acc = if m.contents_saved {
                libc::O_RDWR | libc::O_CREAT
            } else if m.shared && m.prot & libc::PROT_WRITE as u32 != 0 {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let (s2, r, _) = call(
                s,
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, data, acc as u64, 0o600, 0, 0],
            )?;
            s = s2;
            fd = check(&format!("opening {}", String::from_utf8_lossy(path)), r)? as u64;
            if m.contents_saved {
                // Made again if it is gone (its saved pages, zeros
                // included, go in below); never shortened.
                let now =
                    std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).map_or(0, |md| md.len());
                if now < m.file_size {
                    let (s2, r, _) = call(s, libc::SYS_ftruncate, [fd, m.file_size, 0, 0, 0, 0])?;
                    s = s2;
                    check("ftruncate", r)?;
                }
            }
            flags |= if m.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            } as u64;
        } else {
            flags |= libc::MAP_ANONYMOUS as u64
                | if m.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
            if path == b"[stack]" {
                flags |= libc::MAP_GROWSDOWN as u64;
            }
        }
        let (s2, r, _) = call(
            s,
            libc::SYS_mmap,
            [
                m.start,
                len,
                m.prot as u64,
                flags,
                fd,
                if file_backed { m.offset } else { 0 },
            ],
        )?;
        s = s2;
        let got = check(
            &format!(
                "mapping {:#x}-{:#x} {}",
                m.start,
                m.end,
                String::from_utf8_lossy(path)
            ),
            r,
        )? as u64;
        if got != m.start {
            return Err(CkError::Restore(format!(
                "{:#x} was mapped at {got:#x}",
                m.start
            )));
        }
        if file_backed {
            let (s2, _, _) = call(s, libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
            s = s2;
            if let Some(want) = id.filter(|_| !m.contents_saved) {
                let now = map_file_id(pid, m);
                if now != Some(want) {
                    return Err(CkError::Restore(format!(
                        "{} changed since the checkpoint (size and time {want:?}, now {now:?})",
                        String::from_utf8_lossy(path)
                    )));
                }
            }
        }
    }
    Ok(s)
}

/// Write the checkpoint's saved pages into the new program.
fn write_pages(ck: &Checkpoint<'_>, pid: Tid) -> Result<(), CkError> {
    let st = &ck.state;
    // Their contents.
    let mem_path = PathBuf::from(format!("/proc/{pid}/mem"));
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mem_path)
        .map_err(io(&mem_path))?;
    for it in ck.items() {
        if let Item::Mem { addr, bytes } = it? {
            mem.write_all_at(bytes, addr).map_err(|e| {
                let m = st.mappings.iter().find(|m| m.start <= addr && addr < m.end);
                CkError::Restore(format!(
                    "writing {} bytes of memory at {addr:#x} ({}): {e}",
                    bytes.len(),
                    m.map_or("no mapping".into(), |m| format!(
                        "{:#x}-{:#x} {}",
                        m.start,
                        m.end,
                        String::from_utf8_lossy(&m.path)
                    ))
                ))
            })?;
        }
    }
    Ok(())
}

/// The memory map's bookkeeping (brk, stack, arguments, auxv) by
/// `prctl(PR_SET_MM_MAP)`.
fn set_mm(
    mut s: Stopped,
    pid: Tid,
    site: u64,
    data: u64,
    mm: &MmImage,
) -> Result<Stopped, CkError> {
    let call =
        |s: Stopped, nr: i64, args: [u64; 6]| -> Result<(Stopped, i64, Option<Tid>), CkError> {
            Ok(s.call_at(site, nr, &args)?)
        };
    // The memory map's bookkeeping (brk, stack, arguments, auxv).
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    sys::write_mem(pid, data + 512, &auxv)?;
    let mut map = Vec::new();
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        data + 512,
    ] {
        map.extend_from_slice(&v.to_le_bytes());
    }
    map.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    map.extend_from_slice(&u32::MAX.to_le_bytes());
    sys::write_mem(pid, data, &map)?;
    const PR_SET_MM_MAP: u64 = 14;
    let (s2, r, _) = call(
        s,
        libc::SYS_prctl,
        [
            libc::PR_SET_MM as u64,
            PR_SET_MM_MAP,
            data,
            map.len() as u64,
            0,
            0,
        ],
    )?;
    s = s2;
    check("prctl(PR_SET_MM_MAP)", r)?;
    Ok(s)
}

fn write_cstr(pid: Tid, at: u64, s: &[u8]) -> Result<(), CkError> {
    if s.len() >= 4000 {
        return Err(CkError::Restore("a path longer than 4000 bytes".into()));
    }
    let mut v = s.to_vec();
    v.push(0);
    sys::write_mem(pid, at, &v)?;
    Ok(())
}

/// Two pages no mapping of the checkpoint or of the new program uses.
fn pick_scratch(saved: &[Mapping], fresh: &[Mapping]) -> Result<u64, CkError> {
    let free = |a: u64| {
        let b = a + 2 * PAGE as u64;
        saved
            .iter()
            .chain(fresh)
            .all(|m| b <= m.start || a >= m.end)
    };
    let mut a = 0x10000u64;
    while a < 0x7f00_0000_0000 {
        if free(a) {
            return Ok(a);
        }
        a *= 2;
    }
    Err(CkError::Restore(
        "no free address for a scratch page".into(),
    ))
}

fn restore_fds(
    mut s: Stopped,
    pid: Tid,
    site: u64,
    data: u64,
    fds: &[Fd],
) -> Result<Stopped, CkError> {
    let call =
        |s: Stopped, what: &str, nr: i64, args: [u64; 6]| -> Result<(Stopped, i64), CkError> {
            let (s, r, _) = s.call_at(site, nr, &args)?;
            let r = check(what, r)?;
            Ok((s, r))
        };
    let keep: Vec<i32> = fds
        .iter()
        .filter(|f| matches!(f.object, Object::Inherited))
        .map(|f| f.fd)
        .collect();
    for fd in hotstandby_tracer::fdclass::open_fds(pid) {
        if !keep.contains(&fd) {
            (s, _) = call(s, "close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        }
    }
    for k in &keep {
        if !hotstandby_tracer::fdclass::open_fds(pid).contains(k) {
            return Err(CkError::Restore(format!(
                "fd {k} was inherited by the checkpointed program; this one has no fd {k}"
            )));
        }
    }
    let mut done: Vec<i32> = keep.clone();
    // Above every fd the program holds: where temporaries wait.
    let high = fds.iter().map(|f| f.fd).max().unwrap_or(2) as u64 + 1;
    // Place a new fd `tmp` at `target`.
    let place = |s: Stopped, tmp: i64, target: i32, cloexec: bool| -> Result<Stopped, CkError> {
        let (mut s, _) = (s, 0);
        if tmp != target as i64 {
            let fl = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            let (s2, r, _) = s.call_at(
                site,
                libc::SYS_dup3,
                &[tmp as u64, target as u64, fl, 0, 0, 0],
            )?;
            check("dup3", r)?;
            let (s3, _, _) = s2.call_at(site, libc::SYS_close, &[tmp as u64, 0, 0, 0, 0, 0])?;
            s = s3;
        } else if cloexec {
            let (s2, _, _) = s.call_at(
                site,
                libc::SYS_fcntl,
                &[
                    tmp as u64,
                    libc::F_SETFD as u64,
                    libc::FD_CLOEXEC as u64,
                    0,
                    0,
                    0,
                ],
            )?;
            s = s2;
        }
        Ok(s)
    };
    let setfl = |s: Stopped, fd: i32, flags: u32| -> Result<Stopped, CkError> {
        let (s, _, _) = s.call_at(
            site,
            libc::SYS_fcntl,
            &[
                fd as u64,
                libc::F_SETFL as u64,
                (flags & libc::O_NONBLOCK as u32) as u64,
                0,
                0,
                0,
            ],
        )?;
        Ok(s)
    };
    // Highest fd number first is not needed: objects are made at the
    // lowest free number and moved to theirs, in ascending order.
    for f in fds {
        if done.contains(&f.fd) {
            continue;
        }
        match &f.object {
            Object::Inherited | Object::Dup { .. } => continue,
            Object::File { path, flags, pos } => {
                write_cstr(pid, data, path)?;
                let fl = flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32);
                let (s2, t) = call(
                    s,
                    &format!("opening {}", String::from_utf8_lossy(path)),
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, data, fl as u64, 0, 0, 0],
                )?;
                let (s3, _) = call(
                    s2,
                    "lseek",
                    libc::SYS_lseek,
                    [t as u64, *pos, libc::SEEK_SET as u64, 0, 0, 0],
                )?;
                s = place(s3, t, f.fd, f.cloexec)?;
            }
            Object::PipeRead { id, .. } | Object::PipeWrite { id, .. } => {
                let (s2, _) = call(s, "pipe2", libc::SYS_pipe2, [data, 0, 0, 0, 0, 0])?;
                s = s2;
                let b = sys::read_mem(pid, data, 8)?;
                let rd = i32::from_le_bytes(b[0..4].try_into().expect("4")) as i64;
                let wr = i32::from_le_bytes(b[4..8].try_into().expect("4")) as i64;
                let ends: Vec<&Fd> = fds
                    .iter()
                    .filter(|g| match &g.object {
                        Object::PipeRead { id: i, .. } | Object::PipeWrite { id: i, .. } => i == id,
                        _ => false,
                    })
                    .collect();
                let size = ends
                    .iter()
                    .map(|g| match &g.object {
                        Object::PipeRead { size, .. } | Object::PipeWrite { size, .. } => *size,
                        _ => 0,
                    })
                    .max()
                    .unwrap_or(65536);
                let (s2, _) = call(
                    s,
                    "F_SETPIPE_SZ",
                    libc::SYS_fcntl,
                    [wr as u64, libc::F_SETPIPE_SZ as u64, size as u64, 0, 0, 0],
                )?;
                s = s2;
                let contents = ends.iter().find_map(|g| match &g.object {
                    Object::PipeRead { contents, .. } => Some(contents.clone()),
                    _ => None,
                });
                if let Some(c) = contents.filter(|c| !c.is_empty()) {
                    // Through the supervisor: a duplicate of the write end.
                    let w = sys::dup_from(pid, wr as i32)?;
                    File::from(w)
                        .write_all(&c)
                        .map_err(|e| CkError::Restore(format!("refilling a pipe: {e}")))?;
                }
                // Move both ends up out of the way, then to their numbers.
                // Targets may collide with the temporaries: dup to targets
                // after lifting the temporaries above every target.
                let (s2, hr) = call(
                    s,
                    "fcntl",
                    libc::SYS_fcntl,
                    [rd as u64, libc::F_DUPFD as u64, high, 0, 0, 0],
                )?;
                let (s3, hw) = call(
                    s2,
                    "fcntl",
                    libc::SYS_fcntl,
                    [wr as u64, libc::F_DUPFD as u64, high, 0, 0, 0],
                )?;
                let (s4, _) = call(s3, "close", libc::SYS_close, [rd as u64, 0, 0, 0, 0, 0])?;
                let (s5, _) = call(s4, "close", libc::SYS_close, [wr as u64, 0, 0, 0, 0, 0])?;
                s = s5;
                for g in &ends {
                    let (src, fl) = match &g.object {
                        Object::PipeRead { flags, .. } => (hr, *flags),
                        Object::PipeWrite { flags, .. } => (hw, *flags),
                        _ => unreachable!(),
                    };
                    let clo = if g.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                    let (s2, _) = call(
                        s,
                        "dup3",
                        libc::SYS_dup3,
                        [src as u64, g.fd as u64, clo, 0, 0, 0],
                    )?;
                    s = setfl(s2, g.fd, fl)?;
                    done.push(g.fd);
                }
                let (s2, _) = call(s, "close", libc::SYS_close, [hr as u64, 0, 0, 0, 0, 0])?;
                let (s3, _) = call(s2, "close", libc::SYS_close, [hw as u64, 0, 0, 0, 0, 0])?;
                s = s3;
                continue;
            }
            Object::EventFd { count, flags } => {
                let fl = (flags & (libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE) as u32) as u64;
                let (s2, t) = call(
                    s,
                    "eventfd2",
                    libc::SYS_eventfd2,
                    [(*count).min(u32::MAX as u64), fl, 0, 0, 0, 0],
                )?;
                s = place(s2, t, f.fd, f.cloexec)?;
            }
            Object::Epoll { .. } => {
                let (s2, t) = call(
                    s,
                    "epoll_create1",
                    libc::SYS_epoll_create1,
                    [0, 0, 0, 0, 0, 0],
                )?;
                s = place(s2, t, f.fd, f.cloexec)?;
            }
            Object::TimerFd {
                clock,
                flags,
                value_ns,
                interval_ns,
            } => {
                let fl = (flags & libc::O_NONBLOCK as u32) as u64;
                let (s2, t) = call(
                    s,
                    "timerfd_create",
                    libc::SYS_timerfd_create,
                    [*clock as u64, fl, 0, 0, 0, 0],
                )?;
                s = s2;
                if *value_ns != 0 {
                    let mut its = Vec::new();
                    for v in [
                        interval_ns / 1_000_000_000,
                        interval_ns % 1_000_000_000,
                        value_ns / 1_000_000_000,
                        value_ns % 1_000_000_000,
                    ] {
                        its.extend_from_slice(&v.to_le_bytes());
                    }
                    sys::write_mem(pid, data, &its)?;
                    let (s2, _) = call(
                        s,
                        "timerfd_settime",
                        libc::SYS_timerfd_settime,
                        [t as u64, 0, data, 0, 0, 0],
                    )?;
                    s = s2;
                }
                s = place(s, t, f.fd, f.cloexec)?;
            }
            Object::SignalFd { mask, flags } => {
                sys::write_mem(pid, data, &mask.to_le_bytes())?;
                let fl = (flags & libc::O_NONBLOCK as u32) as u64;
                let (s2, t) = call(
                    s,
                    "signalfd4",
                    libc::SYS_signalfd4,
                    [u64::MAX, data, 8, fl, 0, 0],
                )?;
                s = place(s2, t, f.fd, f.cloexec)?;
            }
            Object::Socket {
                domain,
                ty,
                protocol,
                flags,
            } => {
                let nb = if flags & libc::O_NONBLOCK as u32 != 0 {
                    libc::SOCK_NONBLOCK
                } else {
                    0
                };
                let (s2, t) = call(
                    s,
                    "socket",
                    libc::SYS_socket,
                    [*domain as u64, (*ty | nb) as u64, *protocol as u64, 0, 0, 0],
                )?;
                s = place(s2, t, f.fd, f.cloexec)?;
            }
        }
        done.push(f.fd);
    }
    // Other fds of the same open file descriptions.
    for f in fds {
        if let Object::Dup { fd } = f.object {
            let fl = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            let (s2, _) = call(
                s,
                "dup3",
                libc::SYS_dup3,
                [fd as u64, f.fd as u64, fl, 0, 0, 0],
            )?;
            s = s2;
        }
    }
    // epoll sets, once every fd they watch exists.
    for f in fds {
        if let Object::Epoll { entries, .. } = &f.object {
            for (tfd, events, d) in entries {
                let mut ev = Vec::new();
                ev.extend_from_slice(&events.to_le_bytes());
                ev.extend_from_slice(&d.to_le_bytes());
                sys::write_mem(pid, data, &ev)?;
                let (s2, _) = call(
                    s,
                    &format!("epoll_ctl(ADD {tfd})"),
                    libc::SYS_epoll_ctl,
                    [
                        f.fd as u64,
                        libc::EPOLL_CTL_ADD as u64,
                        *tfd as u64,
                        data,
                        0,
                        0,
                    ],
                )?;
                s = s2;
            }
        }
    }
    Ok(s)
}

/// The replayer's state besides its threads, as a checkpoint holds it.
pub(crate) struct EngineParts {
    pub shadow: hotstandby_protocol::shadow::Shadow<Conn>,
    pub sockets: HashMap<(u32, i32), SockSetup>,
    pub outbox: HashMap<u32, std::collections::VecDeque<(i32, Vec<u8>)>>,
    pub fdtabs: HashMap<u32, u64>,
}

/// Engine state from a checkpoint's image.
pub(crate) fn engine_parts(img: &EngineImage) -> EngineParts {
    let shadow = hotstandby_protocol::shadow::Shadow::from_image(
        &img.procs,
        &img.conns,
        img.next_conn,
        |c: &ConnImage| Conn {
            tail: c.tail.iter().copied().collect(),
            tail_ok: c.tail_ok,
        },
    );
    let sockets = img
        .sockets
        .iter()
        .map(|s| {
            (
                (s.tgid, s.fd),
                SockSetup {
                    addr: s.addr.clone(),
                    backlog: s.backlog,
                    opts: s.opts.clone(),
                },
            )
        })
        .collect();
    let outbox = img
        .outbox
        .iter()
        .map(|(t, q)| (*t, q.iter().cloned().collect()))
        .collect();
    let fdtabs = img.fdtabs.iter().copied().collect();
    EngineParts {
        shadow,
        sockets,
        outbox,
        fdtabs,
    }
}
