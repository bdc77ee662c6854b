//! `hotstandby run`, `standby` and `status`: the replication driver.
//!
//! Thin by design: the session logic is the sans-IO state machine in
//! `hotstandby_protocol::session` (its timers and its epoch), the bytes
//! move through `hotstandby_transport` (QUIC, pinned mutual TLS), and
//! recording, replay and takeover are the engine crates. The recorder and
//! the replayer run on their own threads (a tracer must be one thread); the
//! network runs on a single-threaded tokio runtime, which never waits on
//! the disk for anything but the log itself (status files are written by a
//! thread of their own).
//!
//! - [`primary`]: `run` — record, serve standbys, step down when replaced;
//! - [`standby`]: `standby` — follow, replay, take over, serve as primary;
//! - [`vip`]: the virtual IP and the output rule;
//! - here: what both roles share (keys, status file, epoch file, lag).

pub mod arbiter;
pub mod ckxfer;
pub mod primary;
pub mod report;
pub mod standby;
pub mod vip;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hotstandby_transport::{self as transport, NodeKeys};

pub use primary::run;
pub use standby::standby;
pub use vip::Vip;

/// Exit status of a primary that found a newer primary and stepped down.
pub const EXIT_STEPPED_DOWN: u8 = 75;

/// Where the peer and our keys are.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub peer_cert: PathBuf,
}

impl Tls {
    fn load(
        &self,
    ) -> anyhow::Result<(NodeKeys, Vec<hotstandby_transport::CertificateDer<'static>>)> {
        let keys = transport::load_keys(&self.cert, &self.key)?;
        let peer = transport::load_certs(&self.peer_cert)?;
        Ok((keys, peer))
    }
}

const STATUS: &str = "status";
/// The same status as JSON (`report::Report`).
const STATUS_JSON: &str = "status.json";
const EPOCH: &str = "epoch";
const FORMER: &str = "former";
/// How often the status file is rewritten.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// How old the oldest byte not yet past a mark is: lag in milliseconds; and
/// how long the bytes that passed it recently waited (the standby's
/// acknowledgement latency, on the primary).
#[derive(Debug, Default)]
struct LagClock {
    grown: std::collections::VecDeque<(u64, Instant)>,
    /// Microseconds each recent log growth waited for the mark.
    waited: std::collections::VecDeque<u32>,
}

impl LagClock {
    /// The log grew to `end` bytes at `now`.
    fn grew(&mut self, end: u64, now: Instant) {
        if self.grown.back().map(|(e, _)| end > *e).unwrap_or(true) {
            self.grown.push_back((end, now));
            if self.grown.len() > 100_000 {
                self.grown.pop_front();
            }
        }
    }

    /// The mark moved to `mark` at `now`.
    fn passed(&mut self, mark: u64, now: Instant) {
        while let Some(&(e, t)) = self.grown.front() {
            if e > mark {
                break;
            }
            self.grown.pop_front();
            let us = now.saturating_duration_since(t).as_micros();
            self.waited.push_back(us.min(u32::MAX as u128) as u32);
            if self.waited.len() > 10_000 {
                self.waited.pop_front();
            }
        }
    }

    /// Milliseconds since the oldest byte beyond `mark` arrived.
    fn ms(&mut self, mark: u64, now: Instant) -> u128 {
        self.passed(mark, now);
        self.grown
            .front()
            .map(|(_, t)| now.saturating_duration_since(*t).as_millis())
            .unwrap_or(0)
    }

    /// p50 and p99 of the recent waits, in microseconds.
    fn recent(&self) -> (u32, u32) {
        let mut v: Vec<u32> = self.waited.iter().copied().collect();
        v.sort_unstable();
        let q = |f: f64| {
            v.get(((v.len().max(1) - 1) as f64 * f) as usize)
                .copied()
                .unwrap_or(0)
        };
        (q(0.5), q(0.99))
    }
}

/// The node's status file, written by a thread of its own: a rename in a
/// directory whose file is being fsync'd can wait on the journal for
/// hundreds of milliseconds (seen: 625 ms as the recorder synced the log at
/// exit), and the network loop must never wait that long.
#[derive(Debug, Clone)]
struct StatusFile {
    tx: mpsc::SyncSender<report::Report>,
    next: Instant,
    /// The log directory (its disk use and checkpoints go in each report).
    dir: PathBuf,
}

impl StatusFile {
    fn new(dir: &Path) -> Self {
        let (tx, rx) = mpsc::sync_channel::<report::Report>(4);
        let dir_for_storage = dir.to_path_buf();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("status-file".into())
            .spawn(move || {
                while let Ok(mut r) = rx.recv() {
                    // Only the newest matters.
                    while let Ok(t) = rx.try_recv() {
                        r = t;
                    }
                    Self::put(&dir, &r);
                }
            })
            .expect("a thread for the status file");
        StatusFile {
            tx,
            next: Instant::now(),
            dir: dir_for_storage,
        }
    }

    /// Whether it is time to write again.
    fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// When the next write is due.
    fn deadline(&self) -> Instant {
        self.next
    }

    fn write(&mut self, mut r: report::Report, now: Instant) {
        r.failovers = report::FAILOVERS.load(std::sync::atomic::Ordering::Relaxed);
        r.storage = Some(report::StoragePart::of(&self.dir));
        report::publish(&r);
        let _ = self.tx.try_send(r);
        self.next = now + STATUS_EVERY;
    }

    /// Write now and wait until it is on disk (before the process exits).
    fn write_now(dir: &Path, mut r: report::Report) {
        r.failovers = report::FAILOVERS.load(std::sync::atomic::Ordering::Relaxed);
        r.storage = Some(report::StoragePart::of(dir));
        report::publish(&r);
        Self::put(dir, &r);
    }

    /// The text and the JSON, each written whole and renamed into place.
    fn put(dir: &Path, r: &report::Report) {
        let put = |name: &str, body: &[u8]| {
            let tmp = dir.join(format!(".{name}.tmp"));
            if std::fs::write(&tmp, body).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join(name));
            }
        };
        put(STATUS, r.text().as_bytes());
        if let Ok(j) = serde_json::to_vec(r) {
            put(STATUS_JSON, &j);
        }
    }
}

/// The newest epoch this node knew, kept in its log directory across
/// restarts (0: none).
fn read_epoch(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(EPOCH))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Keep `epoch` in the log directory (written whole, then renamed).
fn save_epoch(dir: &Path, epoch: u64) -> anyhow::Result<()> {
    let tmp = dir.join(".epoch.tmp");
    std::fs::write(&tmp, format!("{epoch}\n"))
        .and_then(|()| std::fs::rename(&tmp, dir.join(EPOCH)))
        .with_context(|| format!("saving the epoch in {}", dir.display()))
}

/// The primaries of this log before this node's, as this node learned them
/// (one address per line in its log directory).
fn read_former(dir: &Path) -> Vec<std::net::SocketAddr> {
    std::fs::read_to_string(dir.join(FORMER))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn save_former(dir: &Path, former: &[std::net::SocketAddr]) -> anyhow::Result<()> {
    let tmp = dir.join(".former.tmp");
    let text: String = former.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, dir.join(FORMER)))
        .with_context(|| format!("saving the former primaries in {}", dir.display()))
}

/// `hotstandby status --log DIR [--json]`.
pub fn status(dir: &Path, json: bool) -> anyhow::Result<u8> {
    let p = dir.join(if json { STATUS_JSON } else { STATUS });
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no status in {} (is run/standby running there?)",
            dir.display()
        )
    })?;
    let age = std::fs::metadata(&p)?
        .modified()?
        .elapsed()
        .unwrap_or_default();
    let stale = age > Duration::from_secs(2);
    if json {
        // The node's report, with how old it is.
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a status report", p.display()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("status_age_ms".into(), (age.as_millis() as u64).into());
            o.insert("stale".into(), stale.into());
        }
        println!("{v}");
        return Ok(0);
    }
    print!("{text}");
    println!(
        "status age:  {} ms{}",
        age.as_millis(),
        if stale {
            " (stale: the node is not running)"
        } else {
            ""
        }
    );
    Ok(0)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The length of the longest prefix of the file that is whole frames.
fn valid_prefix(path: &Path) -> u64 {
    frames_upto(path, u64::MAX)
}

/// The end of the last whole frame that ends at or before `limit`.
fn frames_upto(path: &Path, limit: u64) -> u64 {
    // Only the header and the part kept after checkpoints are read.
    path.parent()
        .map_or(0, |d| hotstandby_recorder::logfile::whole_frames(d, limit))
}

/// The earliest of the session's next timer and the next status write.
fn deadline(session: Option<Instant>, status: Instant) -> tokio::time::Instant {
    let d = session.map_or(status, |s| s.min(status));
    tokio::time::Instant::from_std(d)
}
