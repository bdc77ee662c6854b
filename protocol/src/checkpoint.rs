//! The byte format of a checkpoint: the state of a replayed program at a
//! log position, from which a standby continues replay without the log
//! before it.
//!
//! ```text
//! header  : magic "HSCKPT\0\0" (8) | version u32 LE | 0 u32 | state length u64 LE
//! state   : one rkyv-archived `State` (what the program and the replayer are)
//! padding : zero bytes up to a multiple of 16
//! items   : tag u8 | 7 zero bytes | then per tag:
//!           1 memory  : address u64 | length u64 | bytes (length, a multiple of 4096)
//!           2 file    : path length u32 | mode u32 | length u64 | path | bytes
//!           3 dir     : path length u32 | mode u32 | 0 u64 | path
//!           each item padded with zeros to a multiple of 16
//! trailer : tag 0xff | 7 zero bytes | item count u64 | xxh3-128 of every byte before the trailer (16)
//! ```
//!
//! Nothing of a checkpoint is used before the whole file has been checked:
//! magic, version, lengths, every item's bounds, the trailer and the hash.
//! This module owns no I/O beyond a `Write` for the encoder; the decoder
//! works on bytes (a mapped file).

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

use crate::record::TcpConn;

/// First eight bytes of every checkpoint.
pub const MAGIC: [u8; 8] = *b"HSCKPT\0\0";
/// Format version written by this build.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const ITEM_HEADER: usize = 8;
const TRAILER_LEN: usize = 8 + 8 + 16;
const TAG_MEM: u8 = 1;
const TAG_FILE: u8 = 2;
const TAG_DIR: u8 = 3;
const TAG_END: u8 = 0xff;
/// Page size the memory items are counted in.
pub const PAGE: usize = 4096;

/// Why bytes are not a usable checkpoint.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("not a hotstandby checkpoint (bad magic {found:02x?})")]
    BadMagic { found: Vec<u8> },
    #[error(
        "checkpoint format version {found} is not supported (this build reads version {VERSION})"
    )]
    Version { found: u32 },
    #[error("checkpoint is truncated: {what} needs {needed} bytes at offset {offset}, the file has {len}")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("checkpoint fails its checksum (stored {stored:032x}, computed {computed:032x}): the file is corrupt")]
    Checksum { stored: u128, computed: u128 },
    #[error("checkpoint item at offset {offset} is invalid: {reason}")]
    Item { offset: usize, reason: String },
    #[error("checkpoint state does not decode: {0}")]
    State(String),
    #[error("checkpoint ends without its trailer (cut off while written or sent?)")]
    NoTrailer,
    #[error("writing the checkpoint: {0}")]
    Io(String),
}

/// A memory area of the program as `/proc/PID/maps` shows it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub offset: u64,
    /// The file mapped, or `[heap]`, `[stack]`, `[vdso]`, ... or empty.
    pub path: Vec<u8>,
    /// For a file: its size and modification time (ns) then, so a restore
    /// refuses a file that changed since (a library upgraded).
    pub file_size: u64,
    pub file_mtime_ns: i64,
    /// A shared mapping of a file outside the data directory (the JVM's
    /// perf data in /tmp): its pages are saved, and the file is made again
    /// at that size if it is gone when the checkpoint is restored.
    pub contents_saved: bool,
}

impl Mapping {
    /// The kernel's own areas, which a new process already has in place.
    pub fn special(&self) -> bool {
        matches!(
            &self.path[..],
            b"[vdso]" | b"[vvar]" | b"[vvar_vclock]" | b"[vsyscall]"
        )
    }

    /// Anonymous memory (including the heap and stack).
    pub fn anonymous(&self) -> bool {
        self.path.is_empty() || self.path.starts_with(b"[")
    }
}

/// Where a thread stood when the checkpoint was taken.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadAt {
    /// Stopped at a syscall entry the replay has not handled yet.
    Entry,
    /// Logged as blocked in that syscall (stopped at its entry).
    Blocked,
    /// Between syscalls: it resumes user code with its registers.
    Ready,
}

/// One thread.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// Its id in the program's PID namespace (the log's id).
    pub tid: u32,
    pub at: ThreadAt,
    /// `user_regs_struct` as bytes (27 words on x86_64).
    pub regs: Vec<u8>,
    /// The `NT_X86_XSTATE` register set as the kernel gave it.
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// `set_robust_list` head and length.
    pub robust: (u64, u64),
    /// `set_tid_address` (the word cleared when the thread exits).
    pub clear_tid: u64,
    /// `sigaltstack`: sp, flags, size.
    pub altstack: (u64, i32, u64),
    /// Its syscall buffer's address, once registered.
    pub buffer: Option<u64>,
}

/// An open file description the program holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// Left as a new process gets it (inherited stdio).
    Inherited,
    /// Another fd of the same open file description as `fd`.
    Dup {
        fd: i32,
    },
    /// A file or directory, opened again at this offset.
    File {
        path: Vec<u8>,
        flags: u32,
        pos: u64,
    },
    /// A pipe: `id` names the pipe, so both ends are made by one pipe2.
    PipeRead {
        id: u64,
        flags: u32,
        size: u32,
        contents: Vec<u8>,
    },
    PipeWrite {
        id: u64,
        flags: u32,
        size: u32,
    },
    EventFd {
        count: u64,
        flags: u32,
    },
    /// epoll set: (target fd, events, data).
    Epoll {
        flags: u32,
        entries: Vec<(i32, u32, u64)>,
    },
    /// timerfd: clock, flags, remaining value and interval (ns).
    TimerFd {
        clock: i32,
        flags: u32,
        value_ns: u64,
        interval_ns: u64,
    },
    SignalFd {
        mask: u64,
        flags: u32,
    },
    /// A socket replay holds unbound (a placeholder or one whose bind and
    /// listen were emulated).
    Socket {
        domain: i32,
        ty: i32,
        protocol: i32,
        flags: u32,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    pub object: Object,
}

/// A signal action as the kernel holds it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SigAction {
    pub sig: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// The memory map's bookkeeping (`prctl(PR_SET_MM_MAP)`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MmImage {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

/// A connection replay follows (shadow state), with the tail of what the
/// program wrote to it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConnImage {
    pub fds: Vec<(u32, i32)>,
    pub tcp: TcpConn,
    pub read: u64,
    pub written: u64,
    pub tail: Vec<u8>,
    pub tail_ok: bool,
}

/// One process of the shadow state: fd kinds (0 file, 1 internal, 2
/// external) and signal actions (handler, flags) by signal number.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcImage {
    pub tgid: u32,
    pub fds: Vec<(i32, u8)>,
    pub sigact: Vec<(u64, u64)>,
}

/// A socket whose bind/listen replay emulated, to be made real at takeover.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SockImage {
    pub tgid: u32,
    pub fd: i32,
    pub addr: Vec<u8>,
    pub backlog: Option<i32>,
    pub opts: Vec<(i32, i32, Vec<u8>)>,
}

/// Bytes a thread wrote to fd through its buffer, not yet matched.
pub type Outgoing = (i32, Vec<u8>);

/// The replayer's own state besides its threads.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineImage {
    pub procs: Vec<ProcImage>,
    pub conns: Vec<ConnImage>,
    pub next_conn: u64,
    pub sockets: Vec<SockImage>,
    /// Socket writes made through buffers, not yet matched, by thread.
    pub outbox: Vec<(u32, Vec<Outgoing>)>,
    /// Each process's fd table of the buffer library.
    pub fdtabs: Vec<(u32, u64)>,
}

/// Everything but the bulk bytes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The log this checkpoint continues (`logfile::log_id`).
    pub log_id: [u8; 32],
    /// The program's sha256 and the syscall model's fingerprint.
    pub exe_sha256: [u8; 32],
    pub model: [u8; 32],
    /// Log byte offset of the next frame to replay, its sequence number and
    /// the index of its event.
    pub position: u64,
    pub next_seq: u64,
    pub index: u64,
    pub created_unix_ns: u64,
    /// The program's main thread in its PID namespace, and the last id the
    /// namespace handed out.
    pub leader: u32,
    pub last_pid: u32,
    pub mm: MmImage,
    pub mappings: Vec<Mapping>,
    pub threads: Vec<Thread>,
    pub fds: Vec<Fd>,
    pub sigactions: Vec<SigAction>,
    pub engine: EngineImage,
}

/// A bulk item of a checkpoint, borrowed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// Memory at `addr` (whole pages).
    Mem {
        addr: u64,
        bytes: &'a [u8],
    },
    /// A file of the data directory (path relative to it).
    File {
        path: &'a [u8],
        mode: u32,
        bytes: &'a [u8],
    },
    Dir {
        path: &'a [u8],
        mode: u32,
    },
}

fn pad16(n: usize) -> usize {
    (16 - n % 16) % 16
}

/// Writes a checkpoint to `W`, hashing as it goes.
pub struct Writer<W: std::io::Write> {
    out: W,
    hash: xxhash_rust::xxh3::Xxh3,
    items: u64,
    bytes: u64,
}

impl<W: std::io::Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("items", &self.items)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<W: std::io::Write> Writer<W> {
    /// Start a checkpoint with its state.
    pub fn new(out: W, state: &State) -> Result<Self, CheckpointError> {
        let s = rkyv::to_bytes::<rancor::Error>(state).expect("in-memory serialisation");
        let mut w = Writer {
            out,
            hash: xxhash_rust::xxh3::Xxh3::new(),
            items: 0,
            bytes: 0,
        };
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(s.len() as u64).to_le_bytes());
        w.put(&h)?;
        // The state starts 16-byte aligned after 8 padding bytes.
        w.put(&[0u8; 8])?;
        w.put(&s)?;
        w.put(&[0u8; 16][..pad16(s.len())])?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CheckpointError> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out
            .write_all(b)
            .map_err(|e| CheckpointError::Io(e.to_string()))
    }

    fn item_header(&mut self, tag: u8) -> Result<(), CheckpointError> {
        self.items += 1;
        self.put(&[tag, 0, 0, 0, 0, 0, 0, 0])
    }

    /// Memory at `addr`: whole pages.
    pub fn memory(&mut self, addr: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        assert!(bytes.len().is_multiple_of(PAGE) && addr.is_multiple_of(PAGE as u64));
        self.item_header(TAG_MEM)?;
        self.put(&addr.to_le_bytes())?;
        self.put(&(bytes.len() as u64).to_le_bytes())?;
        self.put(bytes)
    }

    /// A file of the data directory.
    pub fn file(&mut self, path: &[u8], mode: u32, bytes: &[u8]) -> Result<(), CheckpointError> {
        self.item_header(TAG_FILE)?;
        self.put(&(path.len() as u32).to_le_bytes())?;
        self.put(&mode.to_le_bytes())?;
        self.put(&(bytes.len() as u64).to_le_bytes())?;
        self.put(path)?;
        self.put(bytes)?;
        self.put(&[0u8; 16][..pad16(path.len() + bytes.len())])
    }

    /// A directory of the data directory.
    pub fn dir(&mut self, path: &[u8], mode: u32) -> Result<(), CheckpointError> {
        self.item_header(TAG_DIR)?;
        self.put(&(path.len() as u32).to_le_bytes())?;
        self.put(&mode.to_le_bytes())?;
        self.put(&0u64.to_le_bytes())?;
        self.put(path)?;
        self.put(&[0u8; 16][..pad16(path.len())])
    }

    /// Write the trailer; returns the output and the checkpoint's length.
    pub fn finish(mut self) -> Result<(W, u64), CheckpointError> {
        let items = self.items;
        self.put(&[TAG_END, 0, 0, 0, 0, 0, 0, 0])?;
        self.put(&items.to_le_bytes())?;
        let h = self.hash.digest128();
        self.out
            .write_all(&h.to_le_bytes())
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        self.out
            .flush()
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        Ok((self.out, self.bytes + 16))
    }
}

/// Rewrite the trailer's hash of checkpoint bytes to match their contents
/// (for the fuzzer and for tests that build bad checkpoints on purpose:
/// what it seals must still be refused by every other check).
pub fn reseal(b: &mut [u8]) {
    if b.len() >= HEADER_LEN + TRAILER_LEN {
        let tr = b.len() - TRAILER_LEN;
        let h = xxhash_rust::xxh3::xxh3_128(&b[..tr + 16]);
        b[tr + 16..].copy_from_slice(&h.to_le_bytes());
    }
}

/// A checked checkpoint over its bytes.
#[derive(Debug)]
pub struct Checkpoint<'a> {
    pub state: State,
    items: &'a [u8],
    /// Offset of `items` in the file (for messages).
    base: usize,
    pub count: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The state of a checkpoint without checking the whole file's hash (for
/// listing many checkpoints quickly); bounds and the state are checked.
pub fn peek_state(b: &[u8]) -> Result<State, CheckpointError> {
    let (state, _) = header(b)?;
    Ok(state)
}

fn header(b: &[u8]) -> Result<(State, usize), CheckpointError> {
    let short = |what, offset, needed| CheckpointError::Truncated {
        what,
        offset,
        needed,
        len: b.len(),
    };
    if b.len() < 8 {
        return Err(short("the magic", 0, 8));
    }
    if b[..8] != MAGIC {
        return Err(CheckpointError::BadMagic {
            found: b[..8].to_vec(),
        });
    }
    if b.len() < HEADER_LEN + 8 {
        return Err(short("the header", 0, HEADER_LEN + 8));
    }
    let v = u32_at(b, 8);
    if v != VERSION {
        return Err(CheckpointError::Version { found: v });
    }
    let slen = u64_at(b, 16);
    let start = HEADER_LEN + 8;
    let slen = usize::try_from(slen)
        .ok()
        .filter(|n| n.checked_add(start).is_some_and(|e| e <= b.len()))
        .ok_or_else(|| short("the state", start, slen.min(usize::MAX as u64) as usize))?;
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(slen);
    aligned.extend_from_slice(&b[start..start + slen]);
    let state = rkyv::from_bytes::<State, rancor::Error>(&aligned)
        .map_err(|e| CheckpointError::State(e.to_string()))?;
    let end = start + slen + pad16(slen);
    if end > b.len() {
        return Err(short("the state's padding", start + slen, pad16(slen)));
    }
    Ok((state, end))
}

impl<'a> Checkpoint<'a> {
    /// Check a whole checkpoint: magic, version, the state, every item's
    /// bounds, the trailer and the hash over everything.
    pub fn parse(b: &'a [u8]) -> Result<Self, CheckpointError> {
        let (state, items_at) = header(b)?;
        if b.len() < items_at + TRAILER_LEN {
            return Err(CheckpointError::NoTrailer);
        }
        let tr = b.len() - TRAILER_LEN;
        if b[tr] != TAG_END || b[tr + 1..tr + 8] != [0; 7] {
            return Err(CheckpointError::NoTrailer);
        }
        let stored = u128::from_le_bytes(b[tr + 16..].try_into().expect("16 bytes"));
        let computed = xxhash_rust::xxh3::xxh3_128(&b[..tr + 16]);
        if stored != computed {
            return Err(CheckpointError::Checksum { stored, computed });
        }
        let c = Checkpoint {
            state,
            items: &b[items_at..tr],
            base: items_at,
            count: u64_at(b, tr + 8),
        };
        let mut n = 0u64;
        for it in c.items() {
            it?;
            n += 1;
        }
        if n != c.count {
            return Err(CheckpointError::Item {
                offset: tr,
                reason: format!("the trailer counts {} items, the file holds {n}", c.count),
            });
        }
        Ok(c)
    }

    /// The bulk items, in order.
    pub fn items(&self) -> Items<'a> {
        Items {
            b: self.items,
            at: 0,
            base: self.base,
        }
    }
}

/// Iterator over a checkpoint's items.
#[derive(Debug)]
pub struct Items<'a> {
    b: &'a [u8],
    at: usize,
    base: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Result<Item<'a>, CheckpointError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.b.len() {
            return None;
        }
        let r = self.item();
        if r.is_err() {
            self.at = self.b.len();
        }
        Some(r)
    }
}

impl<'a> Items<'a> {
    fn item(&mut self) -> Result<Item<'a>, CheckpointError> {
        let b = self.b;
        let at = self.at;
        let bad = |reason: String| CheckpointError::Item {
            offset: self.base + at,
            reason,
        };
        let need = |n: usize| -> Result<(), CheckpointError> {
            if at.checked_add(n).is_none_or(|e| e > b.len()) {
                return Err(bad(format!("runs past the end ({n} bytes)")));
            }
            Ok(())
        };
        need(ITEM_HEADER + 16)?;
        let tag = b[at];
        if b[at + 1..at + 8] != [0; 7] {
            return Err(bad("non-zero header bytes".into()));
        }
        let h = at + ITEM_HEADER;
        match tag {
            TAG_MEM => {
                let addr = u64_at(b, h);
                let len = u64_at(b, h + 8);
                let len = usize::try_from(len).map_err(|_| bad(format!("length {len}")))?;
                if len == 0 || !len.is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE as u64) {
                    return Err(bad(format!(
                        "memory at {addr:#x}, {len} bytes: not whole pages"
                    )));
                }
                if addr.checked_add(len as u64).is_none() {
                    return Err(bad(format!("memory at {addr:#x} wraps around")));
                }
                let total = ITEM_HEADER + 16 + len;
                need(total)?;
                self.at += total;
                Ok(Item::Mem {
                    addr,
                    bytes: &b[h + 16..h + 16 + len],
                })
            }
            TAG_FILE | TAG_DIR => {
                let plen = u32_at(b, h) as usize;
                let mode = u32_at(b, h + 4);
                let len = u64_at(b, h + 8);
                let len = usize::try_from(len).map_err(|_| bad(format!("length {len}")))?;
                if tag == TAG_DIR && len != 0 {
                    return Err(bad("a directory with contents".into()));
                }
                let body = plen
                    .checked_add(len)
                    .ok_or_else(|| bad("length overflows".into()))?;
                let total = (ITEM_HEADER + 16)
                    .checked_add(body)
                    .and_then(|t| t.checked_add(pad16(body)))
                    .ok_or_else(|| bad("length overflows".into()))?;
                need(total)?;
                let path = &b[h + 16..h + 16 + plen];
                if path.is_empty()
                    || path.starts_with(b"/")
                    || path
                        .split(|c| *c == b'/')
                        .any(|p| p == b".." || p.is_empty())
                    || path.contains(&0)
                {
                    return Err(bad(format!(
                        "path {:?} is not a plain relative path",
                        String::from_utf8_lossy(path)
                    )));
                }
                self.at += total;
                if tag == TAG_DIR {
                    Ok(Item::Dir { path, mode })
                } else {
                    Ok(Item::File {
                        path,
                        mode,
                        bytes: &b[h + 16 + plen..h + 16 + plen + len],
                    })
                }
            }
            other => Err(bad(format!("unknown item tag {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let state = State {
            position: 4096,
            index: 17,
            leader: 2,
            mappings: vec![Mapping {
                start: 0x1000,
                end: 0x3000,
                prot: 3,
                shared: false,
                offset: 0,
                path: vec![],
                file_size: 0,
                file_mtime_ns: 0,
                contents_saved: false,
            }],
            fds: vec![Fd {
                fd: 3,
                cloexec: true,
                object: Object::PipeRead {
                    id: 9,
                    flags: 0,
                    size: 65536,
                    contents: b"queued".to_vec(),
                },
            }],
            ..State::default()
        };
        let mut w = Writer::new(Vec::new(), &state).unwrap();
        w.memory(0x1000, &[7u8; PAGE * 2]).unwrap();
        w.dir(b"sub", 0o755).unwrap();
        w.file(b"sub/a.aof", 0o644, b"*3\r\n").unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let c = Checkpoint::parse(&b).unwrap();
        assert_eq!(c.state.index, 17);
        assert_eq!(c.state.fds.len(), 1);
        let items: Vec<Item> = c.items().map(|i| i.unwrap()).collect();
        assert_eq!(items.len(), 3);
        assert!(matches!(items[0], Item::Mem { addr: 0x1000, bytes } if bytes.len() == 2 * PAGE));
        assert_eq!(
            items[2],
            Item::File {
                path: b"sub/a.aof",
                mode: 0o644,
                bytes: b"*3\r\n"
            }
        );
        assert_eq!(peek_state(&b).unwrap().position, 4096);
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let b = sample();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Checkpoint::parse(&c).is_err(), "flip at {i} accepted");
        }
        for n in 0..b.len() {
            assert!(Checkpoint::parse(&b[..n]).is_err(), "cut at {n} accepted");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let b = sample();
        let mut c = b.clone();
        c[0] = b'X';
        assert!(Checkpoint::parse(&c)
            .unwrap_err()
            .to_string()
            .contains("not a hotstandby checkpoint"));
        let mut c = b.clone();
        c[8] = 9;
        assert!(Checkpoint::parse(&c)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let mut c = b.clone();
        let n = c.len();
        c[n - 40] ^= 1;
        assert!(matches!(
            Checkpoint::parse(&c),
            Err(CheckpointError::Checksum { .. })
        ));
        assert_eq!(
            Checkpoint::parse(&b[..b.len() - 3]).unwrap_err(),
            CheckpointError::NoTrailer
        );
    }

    #[test]
    fn paths_that_leave_the_data_directory_are_refused() {
        for p in [&b"/etc/passwd"[..], b"../x", b"a//b", b"a/../../b"] {
            let mut w = Writer::new(Vec::new(), &State::default()).unwrap();
            w.file(p, 0o644, b"x").unwrap();
            let b = w.finish().unwrap().0;
            let e = Checkpoint::parse(&b).unwrap_err().to_string();
            assert!(e.contains("not a plain relative path"), "{e}");
        }
    }
}
