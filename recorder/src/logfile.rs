//! A log directory on disk: `events.hsl` holds the framed record stream
//! (see `hotstandby_protocol::frame`), `data-start/` optionally holds a copy
//! of the program's data directory as it was when recording began.
//!
//! The writer only appends; a reader maps the file and sees every complete
//! frame written so far, so a log can be read while it is being written.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hotstandby_protocol::frame::{self, FrameError, FrameReader};
use hotstandby_protocol::record::{ArchivedRecord, Event, Identity, Record, Trailer};
use memmap2::Mmap;
use rkyv::rancor;
use thiserror::Error;

/// Name of the record stream inside a log directory.
pub const STREAM: &str = "events.hsl";
/// Name of the data-directory snapshot inside a log directory.
pub const DATA_START: &str = "data-start";

/// Errors of log files.
#[derive(Debug, Error)]
pub enum LogError {
    /// The log directory or its stream could not be opened or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The directory is not an empty or new log directory.
    #[error("{path} already holds a log; choose a new directory or remove it")]
    Exists { path: PathBuf },
    /// The bytes are not a sound log.
    #[error("{path}: {source}")]
    Corrupt { path: PathBuf, source: FrameError },
    /// The first record is not a header.
    #[error("{path}: the first record is not a program header")]
    NoHeader { path: PathBuf },
}

/// Backpressure shared between the recorder and the replication driver:
/// when a standby is connected and holds too little of the log, appending
/// waits, which stops the program at its next syscall.
pub struct Throttle {
    /// Log bytes the standby has acknowledged.
    pub acked: std::sync::atomic::AtomicU64,
    /// A standby is connected (without one, the program runs unthrottled).
    pub active: std::sync::atomic::AtomicBool,
    /// Unacknowledged bytes allowed.
    pub max_unacked: u64,
    /// Total time spent waiting, in microseconds.
    pub waited_us: std::sync::atomic::AtomicU64,
    /// Events written to the log file so far.
    pub events: std::sync::atomic::AtomicU64,
    /// Called after each flush: new log bytes are in the file (the
    /// replication driver sends them at once instead of polling).
    pub on_flush: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("acked", &self.acked)
            .field("active", &self.active)
            .field("max_unacked", &self.max_unacked)
            .field("waited_us", &self.waited_us)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub fn new(max_unacked: u64) -> Self {
        Throttle {
            acked: 0.into(),
            active: false.into(),
            max_unacked,
            waited_us: 0.into(),
            events: 0.into(),
            on_flush: std::sync::OnceLock::new(),
        }
    }
}

/// Appends records to a new log directory.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    seq: u64,
    written: u64,
    events: u64,
    throttle: Option<std::sync::Arc<Throttle>>,
    warned: bool,
}

impl LogWriter {
    /// Apply backpressure from a replication driver.
    pub fn set_throttle(&mut self, t: std::sync::Arc<Throttle>) {
        self.throttle = Some(t);
    }

    fn apply_throttle(&mut self) -> Result<(), LogError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(t) = self.throttle.clone() else {
            return Ok(());
        };
        if !t.active.load(Relaxed)
            || self.bytes().saturating_sub(t.acked.load(Relaxed)) <= t.max_unacked
        {
            return Ok(());
        }
        self.flush()?;
        if !self.warned {
            tracing::warn!(
                "the standby is more than {} bytes behind; slowing the program until it catches up",
                t.max_unacked
            );
            self.warned = true;
        }
        let start = std::time::Instant::now();
        while t.active.load(Relaxed)
            && self.bytes().saturating_sub(t.acked.load(Relaxed)) > t.max_unacked / 2
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        t.waited_us
            .fetch_add(start.elapsed().as_micros() as u64, Relaxed);
        Ok(())
    }

    /// Create `dir` (owner-only) and start its stream with `identity`.
    pub fn create(dir: &Path, identity: &Identity) -> Result<Self, LogError> {
        let io = |source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let path = dir.join(STREAM);
        if path.exists() {
            return Err(LogError::Exists {
                path: dir.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| LogError::Io {
                path: path.clone(),
                source,
            })?;
        let mut w = Self {
            path,
            file,
            buf: frame::file_header().to_vec(),
            seq: 0,
            written: 0,
            events: 0,
            throttle: None,
            warned: false,
        };
        w.append(&Record::Header(identity.clone()))?;
        w.flush()?;
        Ok(w)
    }

    /// Continue an existing log after its first `offset` bytes (the end of
    /// the last complete frame a replay consumed; anything after it, such as
    /// a torn frame, is cut). `next_seq` and `events` continue the counts.
    pub fn resume(dir: &Path, offset: u64, next_seq: u64, events: u64) -> Result<Self, LogError> {
        let path = dir.join(STREAM);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
        file.set_len(offset).map_err(io)?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
        Ok(Self {
            path: path.clone(),
            file,
            buf: Vec::new(),
            seq: next_seq,
            written: offset,
            events,
            throttle: None,
            warned: false,
        })
    }

    /// Append one record (buffered).
    pub fn append(&mut self, rec: &Record) -> Result<(), LogError> {
        // Frames must start 16-aligned relative to the stream start.
        debug_assert_eq!((self.written as usize + self.buf.len()) % frame::ALIGN, 0);
        frame::encode_frame(&mut self.buf, self.seq, rec);
        self.seq += 1;
        if matches!(rec, Record::Event(_)) {
            self.events += 1;
        }
        if self.buf.len() >= 256 * 1024 {
            self.flush()?;
        }
        self.apply_throttle()
    }

    /// Append one event.
    pub fn event(&mut self, ev: Event) -> Result<(), LogError> {
        self.append(&Record::Event(ev))
    }

    /// Write buffered frames to the file (so readers see them).
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        if let Some(t) = &self.throttle {
            t.events
                .store(self.events, std::sync::atomic::Ordering::Relaxed);
            if let Some(wake) = t.on_flush.get() {
                wake();
            }
        }
        Ok(())
    }

    /// Write the trailer, flush and sync.
    pub fn finish(mut self, exit_status: i32) -> Result<u64, LogError> {
        let events = self.events;
        self.append(&Record::Trailer(Trailer {
            events,
            exit_status,
            end_unix_ns: now_unix_ns(),
        }))?;
        self.flush()?;
        self.file.sync_all().map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(events)
    }

    /// Events appended so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes in the stream so far (flushed or not).
    pub fn bytes(&self) -> u64 {
        self.written + self.buf.len() as u64
    }
}

/// The file naming where a log's kept part starts once its beginning was
/// deleted after checkpoints (`offset seq index`, one line).
pub const RETAINED: &str = "retained";

/// Where the kept part of a log starts: the frame at byte `offset`, with
/// sequence number `seq`, holding event `index`. Bytes between the header
/// frame and `offset` are gone (a hole in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    pub offset: u64,
    pub seq: u64,
    pub index: u64,
}

/// The kept part's start, if the log's beginning was deleted.
pub fn retained(dir: &Path) -> Option<Retained> {
    let s = std::fs::read_to_string(dir.join(RETAINED)).ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some(Retained {
        offset: it.next()??,
        seq: it.next()??,
        index: it.next()??,
    })
}

/// Delete the log before `r` (a checkpoint's position): record where the
/// kept part starts, then punch the bytes between the header frame and it
/// out of the file (the file keeps its length; its blocks are freed).
/// Returns the bytes freed by this call.
pub fn delete_before(dir: &Path, r: Retained) -> Result<u64, LogError> {
    let path = dir.join(STREAM);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { path, source }
    };
    let old = retained(dir);
    if old.is_some_and(|o| o.offset >= r.offset) {
        return Ok(0);
    }
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let header_end = {
        let rd = LogReader::open(dir)?;
        let mut fr = FrameReader::new(rd.bytes()).map_err(|e| rd.corrupt(e))?;
        match fr.next() {
            Some(Ok(h)) => h.end as u64,
            _ => return Err(LogError::NoHeader { path: path.clone() }),
        }
    };
    if r.offset < header_end {
        return Ok(0);
    }
    let tmp = dir.join(".retained.tmp");
    std::fs::write(&tmp, format!("{} {} {}\n", r.offset, r.seq, r.index)).map_err(io_err(&tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, dir.join(RETAINED)).map_err(io_err(&tmp))?;
    let from = old.map_or(header_end, |o| o.offset).div_ceil(4096) * 4096;
    let to = r.offset / 4096 * 4096;
    if to <= from {
        return Ok(0);
    }
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate takes an fd we hold open and integers.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            from as libc::off_t,
            (to - from) as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(LogError::Io {
            path,
            source: io::Error::last_os_error(),
        });
    }
    Ok(to - from)
}

/// End of the log's header frame (0 without a whole one).
pub fn header_end(dir: &Path) -> u64 {
    let Ok(rd) = LogReader::open(dir) else {
        return 0;
    };
    let Ok(mut fr) = FrameReader::new(rd.bytes()) else {
        return 0;
    };
    match fr.next() {
        Some(Ok(h)) => h.end as u64,
        _ => 0,
    }
}

/// Bytes of the log file that hold data (what retention bounds).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(STREAM))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The end of the last whole frame of `dir`'s log that ends at or before
/// `limit`, reading only the header and the kept part.
pub fn whole_frames(dir: &Path, limit: u64) -> u64 {
    let path = dir.join(STREAM);
    let Ok(f) = File::open(&path) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = retained(dir).map_or(0, |r| r.offset);
    let read = |from: u64, to: u64| {
        use std::os::unix::fs::FileExt;
        let mut b = rkyv::util::AlignedVec::<16>::new();
        b.resize((to - from) as usize, 0);
        f.read_exact_at(&mut b, from).map(|_| b)
    };
    if start == 0 {
        let Ok(b) = read(0, len) else { return 0 };
        let Ok(mut r) = FrameReader::new(&b) else {
            return 0;
        };
        let mut end = r.position();
        for fr in r.by_ref() {
            match fr {
                Ok(fr) if fr.end as u64 <= limit => end = fr.end,
                _ => break,
            }
        }
        return end as u64;
    }
    let seq = retained(dir).map_or(0, |r| r.seq);
    let Ok(b) = read(start, len.max(start)) else {
        return 0;
    };
    let mut end = start;
    for fr in FrameReader::resume(&b, 0, seq) {
        match fr {
            Ok(fr) if start + fr.end as u64 <= limit => end = start + fr.end as u64,
            _ => break,
        }
    }
    end
}

/// sha256 of the header record's bytes: identifies one recording (program,
/// arguments, environment, start time). `None` without a whole header.
pub fn log_id(dir: &Path) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let r = LogReader::open(dir).ok()?;
    let f = FrameReader::new(r.bytes()).ok()?.next()?.ok()?;
    Some(Sha256::digest(f.payload).into())
}

/// Map a log stream file. The one place logs are memory-mapped.
fn map_log(f: &File, path: &Path) -> Result<Mmap, LogError> {
    map_log_window(f, path, None)
}

/// Map `len` bytes of a log stream file (the whole file when `None`). A
/// window longer than the file is allowed; its pages past the end of the
/// file must not be read until the file has grown over them.
fn map_log_window(f: &File, path: &Path, len: Option<usize>) -> Result<Mmap, LogError> {
    let mut o = memmap2::MmapOptions::new();
    if let Some(len) = len {
        o.len(len);
    }
    // A log file is only ever appended to (never truncated or rewritten in
    // place, except by `LogWriter::resume`, which runs when no reader of
    // that file is alive), so the mapped prefix stays valid; every frame is
    // checksummed and validated before use. Readers of a window longer than
    // the file only look at the bytes the file's length covered when they
    // last looked (`EventCursor::refresh`).
    // SAFETY: see above: the mapped bytes do not change under the reader,
    // and no byte past the end of the file is read.
    let map = unsafe { o.map(f) };
    map.map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Virtual size of a live cursor's first window onto a growing log. A
/// remap (munmap of the old window) flushes the TLB of every CPU the
/// process runs on, which a standby following a busy primary paid a few
/// thousand times a second; one window, doubled when outgrown, makes that
/// rare. Only address space: pages are read in as the file covers them.
const LIVE_WINDOW: usize = 1 << 30;

/// Nanoseconds since the Unix epoch.
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A mapped log stream.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    map: Option<Mmap>,
}

impl LogReader {
    /// Map `dir/events.hsl`.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let path = dir.join(STREAM);
        let f = File::open(&path).map_err(|source| LogError::Io {
            path: path.clone(),
            source,
        })?;
        let len = f
            .metadata()
            .map_err(|source| LogError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        let map = if len == 0 {
            None
        } else {
            Some(map_log(&f, &path)?)
        };
        Ok(Self { path, map })
    }

    /// The stream's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Path of the stream file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, source: FrameError) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            source,
        }
    }

    /// Validate the whole stream and return its parts (owned).
    pub fn load(&self) -> Result<LoadedLog, LogError> {
        let mut reader = FrameReader::new(self.bytes()).map_err(|e| self.corrupt(e))?;
        let first = match reader.next() {
            Some(f) => f.map_err(|e| self.corrupt(e))?,
            None => {
                return Err(LogError::NoHeader {
                    path: self.path.clone(),
                })
            }
        };
        let identity = match first.record().map_err(|e| self.corrupt(e))? {
            ArchivedRecord::Header(h) => {
                rkyv::deserialize::<Identity, rancor::Error>(h).expect("validated")
            }
            _ => {
                return Err(LogError::NoHeader {
                    path: self.path.clone(),
                })
            }
        };
        let mut events = Vec::new();
        let mut offsets = Vec::new();
        let mut trailer = None;
        for f in reader {
            let f = f.map_err(|e| self.corrupt(e))?;
            match f.record().map_err(|e| self.corrupt(e))? {
                ArchivedRecord::Event(e) => {
                    if trailer.is_some() {
                        return Err(self.corrupt(FrameError::Invalid {
                            seq: f.seq,
                            offset: f.offset,
                            reason: "event after the trailer".into(),
                        }));
                    }
                    events.push(rkyv::deserialize::<Event, rancor::Error>(e).expect("validated"));
                    offsets.push(f.offset as u64);
                }
                ArchivedRecord::Trailer(t) => {
                    trailer =
                        Some(rkyv::deserialize::<Trailer, rancor::Error>(t).expect("validated"));
                }
                ArchivedRecord::Header(_) => {
                    return Err(self.corrupt(FrameError::Invalid {
                        seq: f.seq,
                        offset: f.offset,
                        reason: "a second header".into(),
                    }))
                }
            }
        }
        Ok(LoadedLog {
            identity,
            events,
            offsets,
            trailer,
            bytes: self.bytes().len() as u64,
        })
    }
}

/// A whole log, validated and deserialised.
#[derive(Debug)]
pub struct LoadedLog {
    pub identity: Identity,
    pub events: Vec<Event>,
    /// Byte offset of each event's frame.
    pub offsets: Vec<u64>,
    pub trailer: Option<Trailer>,
    pub bytes: u64,
}

/// Load a log directory.
pub fn load(dir: &Path) -> Result<LoadedLog, LogError> {
    LogReader::open(dir)?.load()
}

/// Events of a log in order, decoded on demand from the mapped stream and
/// kept only while needed, so a log of any length replays in bounded
/// memory. A cursor in live mode treats a frame cut at the end as "not yet
/// written" and sees new frames after [`EventCursor::refresh`].
#[derive(Debug)]
pub struct EventCursor {
    path: PathBuf,
    file: File,
    map: Option<Mmap>,
    /// Bytes of `map` the file covered at the last refresh.
    len: usize,
    live: bool,
    pos: usize,
    next_seq: u64,
    base: usize,
    cache: std::collections::VecDeque<Event>,
    /// Byte offset and sequence number of each cached event's frame.
    starts: std::collections::VecDeque<(u64, u64)>,
    identity: Identity,
    trailer: Option<Trailer>,
}

impl EventCursor {
    /// Open `dir/events.hsl` and read its header.
    pub fn open(dir: &Path, live: bool) -> Result<Self, LogError> {
        let path = dir.join(STREAM);
        let file = File::open(&path).map_err(|source| LogError::Io {
            path: path.clone(),
            source,
        })?;
        let mut c = EventCursor {
            path,
            file,
            map: None,
            len: 0,
            live,
            pos: 0,
            next_seq: 0,
            base: 0,
            cache: Default::default(),
            starts: Default::default(),
            identity: Identity {
                argv: vec![],
                env: vec![],
                cwd: vec![],
                exe: vec![],
                exe_sha256: [0; 32],
                cpu_model: String::new(),
                cpu_flags: String::new(),
                kernel_release: String::new(),
                hostname: String::new(),
                umask: 0,
                model: [0; 32],
                start_unix_ns: 0,
                data_dir: vec![],
                preload: vec![],
            },
            trailer: None,
        };
        c.refresh()?;
        let bytes = c.bytes();
        c.pos = frame::check_file_header(bytes).map_err(|e| c.corrupt(e))?;
        match c.next_record()? {
            Some(Record::Header(h)) => c.identity = h,
            _ => {
                return Err(LogError::NoHeader {
                    path: c.path.clone(),
                })
            }
        }
        if let Some(r) = retained(dir) {
            if r.offset as usize > c.pos {
                c.seek(r.offset, r.seq, r.index as usize)?;
            }
        }
        Ok(c)
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(m) => &m[..self.len],
            None => &[],
        }
    }

    fn corrupt(&self, source: FrameError) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            source,
        }
    }

    /// Map the file again if it grew; true when there are new bytes.
    pub fn refresh(&mut self) -> Result<bool, LogError> {
        self.refresh_capped(u64::MAX)
    }

    /// As [`Self::refresh`], looking at no more than `cap` bytes of the
    /// file: a standby that must cut its log (a new primary continues it
    /// from an earlier frame) first makes its reader stop short of the cut.
    pub fn refresh_capped(&mut self, cap: u64) -> Result<bool, LogError> {
        let len = self
            .file
            .metadata()
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })?
            .len()
            .min(cap) as usize;
        if len == self.len {
            return Ok(false);
        }
        let room = self.map.as_ref().map_or(0, |m| m.len());
        if len > room || len < self.len {
            let window = if self.live {
                len.checked_next_power_of_two()
                    .unwrap_or(len)
                    .max(LIVE_WINDOW)
            } else {
                len
            };
            self.map = Some(map_log_window(&self.file, &self.path, Some(window))?);
        }
        self.len = len;
        Ok(true)
    }

    /// Bytes of the file this cursor looks at (as of the last refresh).
    pub fn visible(&self) -> u64 {
        self.len as u64
    }

    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.pos >= self.bytes().len() {
            return Ok(None);
        }
        let mut r = FrameReader::resume(self.bytes(), self.pos, self.next_seq);
        let f = match r.next() {
            None => return Ok(None),
            Some(Err(FrameError::Truncated { .. })) if self.live => return Ok(None),
            Some(Err(e)) => return Err(self.corrupt(e)),
            Some(Ok(f)) => f,
        };
        let rec = f.record().map_err(|e| self.corrupt(e))?;
        let rec = rkyv::deserialize::<Record, rancor::Error>(rec).expect("validated");
        self.pos = f.end;
        self.next_seq += 1;
        Ok(Some(rec))
    }

    /// The program's identity from the header.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The trailer, once reached.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// Event `i`, decoding forward as needed; `None` when the log (as
    /// written so far) ends before it.
    pub fn get(&mut self, i: usize) -> Result<Option<&Event>, LogError> {
        assert!(i >= self.base, "event {i} was released");
        while self.base + self.cache.len() <= i {
            let at = (self.pos as u64, self.next_seq);
            match self.next_record()? {
                Some(Record::Event(e)) => {
                    if self.trailer.is_some() {
                        let (seq, off) = (self.next_seq - 1, self.pos);
                        return Err(self.corrupt(FrameError::Invalid {
                            seq,
                            offset: off,
                            reason: "event after the trailer".into(),
                        }));
                    }
                    self.cache.push_back(e);
                    self.starts.push_back(at);
                }
                Some(Record::Trailer(t)) => self.trailer = Some(t),
                Some(Record::Header(_)) => {
                    let (seq, off) = (self.next_seq - 1, self.pos);
                    return Err(self.corrupt(FrameError::Invalid {
                        seq,
                        offset: off,
                        reason: "a second header".into(),
                    }));
                }
                None => return Ok(None),
            }
        }
        Ok(self.cache.get(i - self.base))
    }

    /// The first event still held (earlier ones were released, or lie
    /// before the checkpoint the cursor started from).
    pub fn first_held(&self) -> usize {
        self.base
    }

    /// Forget events before `i` (they will not be asked for again).
    pub fn release_before(&mut self, i: usize) {
        while self.base < i && !self.cache.is_empty() {
            self.cache.pop_front();
            self.starts.pop_front();
            self.base += 1;
        }
    }

    /// Byte offset and sequence number of event `i`'s frame (an event
    /// already decoded and not released).
    pub fn start_of(&self, i: usize) -> Option<(u64, u64)> {
        self.starts.get(i.checked_sub(self.base)?).copied()
    }

    /// Go on from the frame at byte `offset` with sequence number `seq`,
    /// which holds event `index` (a checkpoint's position): nothing before
    /// it is read again (and may be gone from the file).
    pub fn seek(&mut self, offset: u64, seq: u64, index: usize) -> Result<(), LogError> {
        if (!self.live && offset as usize > self.bytes().len())
            || (offset as usize) < frame::FILE_HEADER_LEN
        {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                source: FrameError::Invalid {
                    seq,
                    offset: offset as usize,
                    reason: format!(
                        "a checkpoint continues the log at byte {offset}, the log holds {}",
                        self.bytes().len()
                    ),
                },
            });
        }
        self.pos = offset as usize;
        self.next_seq = seq;
        self.base = index;
        self.cache.clear();
        self.starts.clear();
        self.trailer = None;
        Ok(())
    }

    /// Bytes of the stream consumed so far (the end of the last frame read).
    pub fn position(&self) -> u64 {
        self.pos as u64
    }

    /// Sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// What a whole-log check found.
#[derive(Debug, Clone)]
pub struct Summary {
    pub events: u64,
    pub bytes: u64,
    pub trailer: Option<Trailer>,
}

/// Validate a whole log in one streaming pass (bounded memory), calling
/// `each` for every event.
pub fn scan(dir: &Path, each: impl FnMut(usize, &Event)) -> Result<(Identity, Summary), LogError> {
    scan_with(dir, false, each)
}

/// As [`scan`], for a log still being written: a frame cut at the end is
/// where the log ends for now, not corruption.
pub fn scan_growing(
    dir: &Path,
    each: impl FnMut(usize, &Event),
) -> Result<(Identity, Summary), LogError> {
    scan_with(dir, true, each)
}

fn scan_with(
    dir: &Path,
    live: bool,
    mut each: impl FnMut(usize, &Event),
) -> Result<(Identity, Summary), LogError> {
    let mut c = EventCursor::open(dir, live)?;
    let mut i = c.first_held();
    while let Some(e) = c.get(i)? {
        each(i, e);
        c.release_before(i + 1);
        i += 1;
    }
    let bytes = if live {
        c.pos as u64
    } else {
        c.bytes().len() as u64
    };
    if c.pos as u64 != bytes {
        // Unreachable: get() errors on anything but a clean end.
        return Err(c.corrupt(FrameError::Truncated {
            seq: c.next_seq,
            offset: c.pos,
            needed: 16,
            available: 0,
        }));
    }
    let summary = Summary {
        events: i as u64,
        bytes,
        trailer: c.trailer.clone(),
    };
    Ok((c.identity.clone(), summary))
}
