//! The supervisor's side of the in-process syscall buffer
//! (`preload/hsbuf.c`): the library itself (built by `build.rs`, embedded,
//! installed at a fixed path so the program's memory layout is the same on
//! both sides), the layout of a thread's buffer, and reading and writing
//! it in the tracee's memory.
//!
//! `HOTSTANDBY_BUFFER=0` turns the buffer off: the library is not
//! preloaded and every syscall is traced.

use std::path::PathBuf;

use crate::sys::{self, SysError};
use crate::task::Tid;

/// The page the library maps its untraced `syscall; ret` at; the seccomp
/// filter allows a syscall whose instruction pointer is right after it.
pub const PAGE: u64 = 0x7000_0000;
/// The instruction pointer of the untraced syscall (after the instruction).
pub const UNTRACED_IP: u64 = PAGE + 2;
/// Pseudo-syscalls of the library: register a thread's buffer; (replay
/// only) drain the outbox of bytes written to sockets.
pub const SYS_REGISTER: u32 = 1000;
pub const SYS_DRAIN: u32 = 1001;
pub const MAGIC: u32 = 0x3142_5348;
/// Bytes of a thread's buffer: header and records.
pub const BUF_SIZE: usize = 1 << 20;
pub const HDR: usize = 96;
pub const REC_HDR: usize = 32;
/// Entries of a process's fd table (fds above are always traced).
pub const FDTAB: usize = 4096;

/// Buffer modes (`hdr.mode`).
pub const MODE_OFF: u32 = 0;
pub const MODE_RECORD: u32 = 1;
pub const MODE_REPLAY: u32 = 2;
/// Record flags.
pub const F_FALLBACK: u8 = 1;
/// fd table bits.
pub const FD_SOCK: u8 = 1;
pub const FD_NONBLOCK: u8 = 2;

/// Offsets of the header's fields.
mod off {
    pub const MAGIC: u64 = 0;
    pub const MODE: u64 = 4;
    pub const LEN: u64 = 8;
    pub const LOCKED: u64 = 20;
    pub const FORCE: u64 = 24;
    pub const FAULT: u64 = 28;
    pub const GO_LIVE: u64 = 32;
    pub const OUTBOX: u64 = 40;
    pub const OUTBOX_LEN: u64 = 48;
    pub const EAGER: u64 = 64;
    pub const WROTE: u64 = 68;
}

/// Errors of the buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A thread registered memory that is not a buffer.
    #[error("thread {tid}: the syscall buffer at {addr:#x} has no valid header")]
    BadHeader { tid: Tid, addr: u64 },
    /// The records in a buffer do not parse.
    #[error("thread {tid}: the syscall buffer holds a malformed record at byte {at}")]
    BadRecord { tid: Tid, at: usize },
    /// The library could not be installed.
    #[error("installing the syscall-buffer library at {path}: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One buffered call as the library wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub nr: u16,
    pub flags: u8,
    pub extra: u8,
    pub fd: i32,
    pub ret: i64,
    pub hash: u64,
    pub data: Vec<u8>,
}

static LIB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libhsbuf.so"));

/// Whether the buffer is on (`HOTSTANDBY_BUFFER` is not `0`).
pub fn enabled() -> bool {
    !std::env::var("HOTSTANDBY_BUFFER").is_ok_and(|v| v == "0")
}

/// The library's path: fixed by its content, so the program's environment
/// (and with it its stack) is the same wherever it runs.
pub fn lib_path() -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(LIB);
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/tmp/hotstandby-preload-{hex}.so"))
}

/// Install the library (once per content) and return its path.
pub fn install() -> Result<PathBuf, BufferError> {
    use std::os::unix::fs::PermissionsExt;
    let path = lib_path();
    let err = |source| BufferError::Install {
        path: path.clone(),
        source,
    };
    if std::fs::read(&path).is_ok_and(|b| b == LIB) {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, LIB).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// The `LD_PRELOAD=` entry that loads the library before the program's own.
pub fn preload_entry(path: &std::path::Path, env: &[Vec<u8>]) -> Vec<u8> {
    let mut e = b"LD_PRELOAD=".to_vec();
    e.extend_from_slice(path.to_string_lossy().as_bytes());
    if let Some(own) = env.iter().find_map(|v| v.strip_prefix(b"LD_PRELOAD=")) {
        if !own.is_empty() {
            e.push(b':');
            e.extend_from_slice(own);
        }
    }
    e
}

/// An environment with the library preloaded (any `LD_PRELOAD` of the
/// program's own is kept after it; the library restores it at start).
pub fn with_preload(path: &std::path::Path, env: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let entry = preload_entry(path, env);
    let mut out: Vec<Vec<u8>> = env
        .iter()
        .filter(|v| !v.starts_with(b"LD_PRELOAD="))
        .cloned()
        .collect();
    out.push(entry);
    out
}

fn u32_at(tid: Tid, addr: u64) -> Result<u32, SysError> {
    let b = sys::read_mem(tid, addr, 4)?;
    Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn put_u32(tid: Tid, addr: u64, v: u32) -> Result<(), SysError> {
    sys::write_mem(tid, addr, &v.to_le_bytes())
}

/// A registered buffer of thread `tid` at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
}

/// What the library reports about a replayed batch at a traced stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub len: u32,
    pub pos: u32,
    pub count: u32,
    /// 0, or why the batch did not match (1 other call, 2 other bytes,
    /// 3 a shorter buffer), with the call the program made.
    pub fault: u32,
    pub fault_nr: u32,
}

impl Buffer {
    /// Check the header of a buffer a thread registers, and set its mode.
    pub fn register(tid: Tid, addr: u64, mode: u32) -> Result<Self, BufferError> {
        if u32_at(tid, addr + off::MAGIC)? != MAGIC {
            return Err(BufferError::BadHeader { tid, addr });
        }
        put_u32(tid, addr + off::MODE, mode)?;
        let b = Buffer { addr };
        b.reset(tid)?;
        Ok(b)
    }

    fn reset(&self, tid: Tid) -> Result<(), SysError> {
        // len, pos, count, locked, force, fault: one write.
        sys::write_mem(tid, self.addr + off::LEN, &[0u8; 24])?;
        put_u32(tid, self.addr + off::WROTE, 0)
    }

    /// Record: log a batch that wrote to a socket at the thread's next
    /// epoll wait (the output rule holds replies until their log is on the
    /// standby).
    pub fn set_eager(&self, tid: Tid, on: bool) -> Result<(), SysError> {
        put_u32(tid, self.addr + off::EAGER, on as u32)
    }

    /// Record: take the calls appended since the last take. A buffer still
    /// in replay mode (a program taken over, at its first traced stop since)
    /// holds replayed calls, already in the log: it is switched to
    /// recording and nothing is taken.
    pub fn take(&self, tid: Tid) -> Result<Vec<Call>, BufferError> {
        if u32_at(tid, self.addr + off::MODE)? == MODE_REPLAY {
            put_u32(tid, self.addr + off::MODE, MODE_RECORD)?;
            put_u32(tid, self.addr + off::GO_LIVE, 0)?;
            self.reset(tid)?;
            return Ok(Vec::new());
        }
        let len = u32_at(tid, self.addr + off::LEN)? as usize;
        if len == 0 {
            // Still clear a request for a traced call: it has come.
            put_u32(tid, self.addr + off::FORCE, 0)?;
            return Ok(Vec::new());
        }
        let bytes = sys::read_mem(tid, self.addr + HDR as u64, len.min(BUF_SIZE - HDR))?;
        let calls = parse(tid, &bytes)?;
        self.reset(tid)?;
        Ok(calls)
    }

    /// Ask the thread to make its next buffered call traced (a signal is
    /// waiting, or another thread wants to run).
    pub fn force(&self, tid: Tid) -> Result<(), SysError> {
        put_u32(tid, self.addr + off::FORCE, 1)
    }

    /// Replay: put a recorded batch in (`calls` empty: the next wrapped
    /// call goes traced, as it did).
    pub fn fill(&self, tid: Tid, calls: &[Call]) -> Result<(), SysError> {
        let bytes = encode(calls);
        if !bytes.is_empty() {
            sys::write_mem(tid, self.addr + HDR as u64, &bytes)?;
        }
        let mut h = Vec::with_capacity(20);
        h.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        h.extend_from_slice(&[0u8; 16]);
        sys::write_mem(tid, self.addr + off::LEN, &h)?;
        put_u32(tid, self.addr + off::FAULT, 0)
    }

    /// Replay: how far the thread got through its batch.
    pub fn progress(&self, tid: Tid) -> Result<Progress, SysError> {
        let b = sys::read_mem(tid, self.addr + off::LEN, 32)?;
        let w = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Ok(Progress {
            len: w(0),
            pos: w(4),
            count: w(8),
            fault: w(20),
            fault_nr: w(28),
        })
    }

    /// Replay: the program goes live; once the batch in the buffer is used
    /// up the library records for real.
    pub fn go_live(&self, tid: Tid) -> Result<(), SysError> {
        put_u32(tid, self.addr + off::GO_LIVE, 1)
    }

    /// Whether the library is inside a wrapper right now.
    pub fn locked(&self, tid: Tid) -> Result<bool, SysError> {
        Ok(u32_at(tid, self.addr + off::LOCKED)? != 0)
    }

    /// Replay: the bytes the program wrote to sockets since the last drain,
    /// as (fd, bytes); the outbox is emptied.
    pub fn drain(&self, tid: Tid) -> Result<Vec<(i32, Vec<u8>)>, SysError> {
        let b = sys::read_mem(tid, self.addr + off::OUTBOX, 16)?;
        let at = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(b[8..].try_into().expect("8 bytes")) as usize;
        if len == 0 || at == 0 {
            return Ok(Vec::new());
        }
        let raw = sys::read_mem(tid, at, len.min(64 << 20))?;
        sys::write_mem(tid, self.addr + off::OUTBOX_LEN, &0u64.to_le_bytes())?;
        let mut out = Vec::new();
        let mut i = 0;
        while i + 8 <= raw.len() {
            let fd = i32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
            let n = u32::from_le_bytes(raw[i + 4..i + 8].try_into().expect("4 bytes")) as usize;
            if i + 8 + n > raw.len() {
                break;
            }
            out.push((fd, raw[i + 8..i + 8 + n].to_vec()));
            i += (8 + n + 7) & !7;
        }
        Ok(out)
    }
}

/// Decode the records of a buffer.
pub fn parse(tid: Tid, bytes: &[u8]) -> Result<Vec<Call>, BufferError> {
    let mut calls = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if i + REC_HDR > bytes.len() {
            return Err(BufferError::BadRecord { tid, at: i });
        }
        let r = &bytes[i..];
        let nr = u16::from_le_bytes([r[0], r[1]]);
        let size = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as usize;
        let fd = i32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let data_len = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes")) as usize;
        let ret = i64::from_le_bytes(r[16..24].try_into().expect("8 bytes"));
        let hash = u64::from_le_bytes(r[24..32].try_into().expect("8 bytes"));
        if size < REC_HDR
            || !size.is_multiple_of(8)
            || i + size > bytes.len()
            || REC_HDR + data_len > size
        {
            return Err(BufferError::BadRecord { tid, at: i });
        }
        calls.push(Call {
            nr,
            flags: r[2],
            extra: r[3],
            fd,
            ret,
            hash,
            data: r[REC_HDR..REC_HDR + data_len].to_vec(),
        });
        i += size;
    }
    Ok(calls)
}

/// Encode records as the library lays them out.
pub fn encode(calls: &[Call]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in calls {
        let size = (REC_HDR + c.data.len() + 7) & !7;
        out.extend_from_slice(&c.nr.to_le_bytes());
        out.push(c.flags);
        out.push(c.extra);
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out.extend_from_slice(&c.fd.to_le_bytes());
        out.extend_from_slice(&(c.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&c.ret.to_le_bytes());
        out.extend_from_slice(&c.hash.to_le_bytes());
        out.extend_from_slice(&c.data);
        out.resize(out.len() + (size - REC_HDR - c.data.len()), 0);
    }
    out
}

/// The fd-table entry of a process's fd: a socket of the outside world,
/// non-blocking or not; 0 for anything else.
pub fn fd_entry(pid: Tid, fd: i32, external: bool) -> u8 {
    if !external {
        return 0;
    }
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
    if !link.to_string_lossy().starts_with("socket:") {
        return 0;
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0);
    FD_SOCK
        | if flags & libc::O_NONBLOCK as u32 != 0 {
            FD_NONBLOCK
        } else {
            0
        }
}

/// Write fd-table entries of a process (its table at `tab`).
pub fn set_fd(pid: Tid, tab: u64, fd: i32, entry: u8) -> Result<(), SysError> {
    if fd < 0 || fd as usize >= FDTAB {
        return Ok(());
    }
    sys::write_mem(pid, tab + fd as u64, &[entry])
}

/// At an execve (or execveat) entry: make the new program load the library
/// too. A new environment array — the program's, with `entry` in place of
/// any `LD_PRELOAD` it had (`entry` keeps that one's value after ours) —
/// is written below the thread's stack pointer (scratch: the address space
/// is replaced by the exec) and the call's envp register pointed at it.
pub fn inject_preload(
    s: &mut crate::task::Stopped,
    envp_arg: usize,
    ours: &std::path::Path,
) -> Result<(), SysError> {
    let mut r = s.regs()?;
    let args = crate::mem::args_of(&r);
    let envp = args[envp_arg];
    let mut ptrs = Vec::new();
    let mut env = Vec::new();
    if envp != 0 {
        for i in 0..8192u64 {
            let p = u64::from_le_bytes(s.read(envp + i * 8, 8)?.try_into().expect("8 bytes"));
            if p == 0 {
                break;
            }
            ptrs.push(p);
            env.push(s.read_cstr(p, 1 << 16)?);
        }
    }
    let entry = preload_entry(ours, &env);
    if env.contains(&entry) {
        return Ok(());
    }
    let keep: Vec<u64> = ptrs
        .iter()
        .zip(&env)
        .filter(|(_, e)| !e.starts_with(b"LD_PRELOAD="))
        .map(|(p, _)| *p)
        .collect();
    // Below the red zone: the string, then the array, 16-aligned.
    let mut at = (r.rsp - 4096 - entry.len() as u64 - 1) & !15;
    let mut text = entry.clone();
    text.push(0);
    s.write(at, &text)?;
    let str_at = at;
    let n = keep.len() + 2;
    at = (at - n as u64 * 8) & !15;
    let mut arr = Vec::with_capacity(n * 8);
    for p in keep.iter().chain(std::iter::once(&str_at)) {
        arr.extend_from_slice(&p.to_le_bytes());
    }
    arr.extend_from_slice(&0u64.to_le_bytes());
    s.write(at, &arr)?;
    match envp_arg {
        2 => r.rdx = at,
        3 => r.r10 = at,
        _ => return Ok(()),
    }
    s.set_regs(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let calls = vec![
            Call {
                nr: 228,
                flags: 0,
                extra: 0,
                fd: -1,
                ret: 0,
                hash: 0,
                data: vec![1; 16],
            },
            Call {
                nr: 0,
                flags: F_FALLBACK,
                extra: 1,
                fd: 7,
                ret: -11,
                hash: 9,
                data: vec![],
            },
        ];
        let b = encode(&calls);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(parse(1, &b).unwrap(), calls);
        assert!(
            parse(1, &b[..b.len() - 8]).is_err(),
            "a cut record is refused"
        );
    }

    #[test]
    fn the_library_is_embedded_and_installs() {
        assert!(LIB.starts_with(b"\x7fELF"));
        let p = install().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), LIB);
        let env = vec![b"A=1".to_vec(), b"LD_PRELOAD=/x.so".to_vec()];
        let e = with_preload(&p, &env);
        assert_eq!(e.len(), 2);
        assert!(e[1].ends_with(b":/x.so"));
    }
}
