//! `hotstandby log ...` and `hotstandby replay`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use hotstandby_protocol::record::Event;
use hotstandby_protocol::show::{event_line, mode_tag};
use hotstandby_protocol::sysmodel;
use hotstandby_recorder::logfile::{self, LogError};

/// Exit status for a corrupt or foreign log.
pub const EXIT_CORRUPT: u8 = 4;
/// Exit status for a divergence.
pub const EXIT_DIVERGED: u8 = 3;

#[derive(Subcommand, Debug)]
pub enum LogCmd {
    /// One strace-like line per event.
    Dump { dir: PathBuf },
    /// Events by kind and syscall, bytes, duration, threads.
    Stats { dir: PathBuf },
    /// Check structure and checksums: exit 0 when sound, 4 when corrupt.
    Verify { dir: PathBuf },
}

pub fn run(cmd: LogCmd) -> anyhow::Result<u8> {
    match cmd {
        LogCmd::Dump { dir } => with_log(&dir, dump),
        LogCmd::Stats { dir } => with_log(&dir, stats),
        LogCmd::Verify { dir } => with_log(&dir, verify),
    }
}

/// Run a log command, turning corruption into exit 4 with the message printed.
fn with_log(dir: &Path, f: impl FnOnce(&Path) -> Result<u8, LogError>) -> anyhow::Result<u8> {
    match f(dir) {
        Ok(code) => Ok(code),
        Err(e @ (LogError::Corrupt { .. } | LogError::NoHeader { .. })) => {
            eprintln!("hotstandby: corrupt log: {e}");
            Ok(EXIT_CORRUPT)
        }
        Err(e) => Err(e).with_context(|| format!("opening log {}", dir.display())),
    }
}

fn dump(dir: &Path) -> Result<u8, LogError> {
    use std::io::Write;
    let mut c = logfile::EventCursor::open(dir, false)?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let id = c.identity().clone();
    let argv: Vec<String> = id
        .argv
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let _ = writeln!(out, "# program: {}", argv.join(" "));
    let _ = writeln!(
        out,
        "# exe: {} sha256 {}",
        String::from_utf8_lossy(&id.exe),
        hex(&id.exe_sha256)
    );
    let _ = writeln!(
        out,
        "# cwd: {}  host: {}  kernel: {}",
        String::from_utf8_lossy(&id.cwd),
        id.hostname,
        id.kernel_release
    );
    let mut i = c.first_held();
    if i > 0 {
        let _ = writeln!(out, "# events before #{i} were deleted after checkpoints");
    }
    loop {
        let e = match c.get(i) {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                let _ = out.flush();
                return Err(e);
            }
        };
        if writeln!(out, "{}", event_line(i, e)).is_err() {
            return Ok(0); // reader went away (e.g. `| head`)
        }
        c.release_before(i + 1);
        i += 1;
    }
    let _ = match c.trailer() {
        Some(t) => writeln!(
            out,
            "# end: {} events, exit status {}",
            t.events, t.exit_status
        ),
        None => writeln!(
            out,
            "# end: no trailer (recording still running or interrupted)"
        ),
    };
    Ok(0)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Print to stdout, ignoring a closed pipe (`| head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn stats(dir: &Path) -> Result<u8, LogError> {
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sys: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut modes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut threads = BTreeSet::new();
    let mut data = 0u64;
    let mut buffered: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut packed_bytes = 0u64;
    // A node's log may be growing: stats count the whole frames so far.
    let (identity, summary) = logfile::scan_growing(dir, |_, e| {
        *kinds.entry(e.kind()).or_default() += 1;
        threads.insert(e.tid());
        if let Event::Spawn { child, .. } = e {
            threads.insert(*child);
        }
        if let Event::Syscall(s) = e {
            let b: u64 = s.writes.iter().map(|w| w.data.len() as u64).sum();
            data += b;
            let ent = sys.entry(sysmodel::name(s.nr)).or_default();
            ent.0 += 1;
            ent.1 += b;
            *modes.entry(mode_tag(s.mode)).or_default() += 1;
        }
        if let Event::Batch { packed, .. } = e {
            packed_bytes += packed.len() as u64;
            for c in e.calls().unwrap_or_default() {
                let ent = buffered.entry(sysmodel::name(c.nr as u32)).or_default();
                ent.0 += 1;
                ent.1 += c.data.len() as u64;
            }
        }
    })?;
    let argv: Vec<String> = identity
        .argv
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    out!("program:   {}", argv.join(" "));
    out!("events:    {}", summary.events);
    out!(
        "log bytes: {} ({:.1} per event)",
        summary.bytes,
        summary.bytes as f64 / summary.events.max(1) as f64
    );
    out!("recorded memory: {data} bytes");
    out!("threads:   {}", threads.len());
    match logfile::retained(dir) {
        Some(r) => out!(
            "retained:  from byte {} (event {}); {} bytes on disk (the log before was deleted after checkpoints)",
            r.offset,
            r.index,
            logfile::allocated_bytes(dir)
        ),
        None => out!("retained:  the whole log ({} bytes on disk)", logfile::allocated_bytes(dir)),
    }
    let cks = hotstandby_replayer::checkpoint::list(&dir.join("checkpoints"));
    if cks.is_empty() {
        out!("checkpoints: none");
    }
    for (pos, path) in cks {
        let st = hotstandby_replayer::checkpoint::Mapped::open(&path)
            .ok()
            .and_then(|m| m.parse().ok().map(|c| c.state));
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match st {
            Some(st) => {
                let age = logfile::now_unix_ns().saturating_sub(st.created_unix_ns) as f64 / 1e9;
                out!(
                    "checkpoint: at byte {pos} (event {}), {size} bytes, {} threads, {} fds, taken {age:.0} s ago",
                    st.index,
                    st.threads.len(),
                    st.fds.len()
                );
            }
            None => out!("checkpoint: {} is not a usable checkpoint", path.display()),
        }
    }
    match &summary.trailer {
        Some(t) => {
            let d = t.end_unix_ns.saturating_sub(identity.start_unix_ns) as f64 / 1e9;
            out!("duration:  {d:.3} s");
            out!("exit status: {}", t.exit_status);
        }
        None => out!("duration:  unknown (no trailer: recording running or interrupted)"),
    }
    out!("events by kind:");
    for (k, n) in &kinds {
        out!("  {k:<10} {n}");
    }
    out!("syscalls by replay mode:");
    for (k, n) in &modes {
        out!("  {k:<12} {n}");
    }
    out!("syscalls (count, recorded bytes):");
    let mut v: Vec<_> = sys.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
    for (name, (n, b)) in v {
        out!("  {name:<20} {n:>8} {b:>10}");
    }
    if !buffered.is_empty() {
        let n: u64 = buffered.values().map(|v| v.0).sum();
        out!(
            "buffered calls: {n} in {} packed bytes ({:.1} per call)",
            packed_bytes,
            packed_bytes as f64 / n.max(1) as f64
        );
        out!("buffered calls (count, recorded bytes):");
        let mut v: Vec<_> = buffered.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
        for (name, (n, b)) in v {
            out!("  {name:<20} {n:>8} {b:>10}");
        }
    }
    Ok(0)
}

fn verify(dir: &Path) -> Result<u8, LogError> {
    let (_, summary) = logfile::scan(dir, |_, _| {})?;
    match &summary.trailer {
        Some(t) if t.events != summary.events => {
            eprintln!(
                "hotstandby: corrupt log: trailer counts {} events but the log holds {}",
                t.events, summary.events
            );
            return Ok(EXIT_CORRUPT);
        }
        Some(_) => out!(
            "ok: {} events, {} bytes, complete",
            summary.events,
            summary.bytes
        ),
        None => out!(
            "ok: {} events, {} bytes, no trailer (recording running or interrupted)",
            summary.events,
            summary.bytes
        ),
    }
    Ok(0)
}

/// Checkpoints asked of `hotstandby replay`.
#[derive(Debug, Default)]
pub struct Checkpoints {
    pub every: Option<hotstandby_replayer::checkpoint::Every>,
    pub dir: Option<PathBuf>,
    pub from: Option<PathBuf>,
}

/// Exit status when a checkpoint is refused (corrupt, foreign) or cannot be used.
pub const EXIT_CHECKPOINT: u8 = 6;

pub fn replay(dir: &Path, show: bool, go_live: bool, ck: Checkpoints) -> anyhow::Result<u8> {
    use hotstandby_replayer::{ReplayError, ReplayOptions, ReplayOutcome};
    // Refuse a corrupt log before anything runs (same message as verify).
    let code = with_log(dir, |d| logfile::scan(d, |_, _| {}).map(|_| 0))?;
    if code != 0 {
        return Ok(code);
    }
    match hotstandby_replayer::replay(
        dir,
        &ReplayOptions {
            show_output: show,
            go_live,
            checkpoints: ck.every.map(|every| {
                every.policy(
                    ck.dir.clone().unwrap_or_else(|| dir.join("checkpoints")),
                    false,
                )
            }),
            resume: ck.from.clone(),
            ..Default::default()
        },
    ) {
        Ok(ReplayOutcome {
            handover: Some(h),
            events,
            ..
        }) => {
            eprintln!("hotstandby: replayed all {events} events; the log ends here and the program goes on live");
            for (fd, what) in &h.listeners {
                eprintln!("hotstandby: listening socket fd {fd}: {what}");
            }
            for (fd, what) in &h.connections {
                eprintln!("hotstandby: connection fd {fd}: {what}");
            }
            let mut h = h;
            for e in h.resend_tails() {
                eprintln!("hotstandby: {e}");
            }
            let writer = logfile::LogWriter::resume(dir, h.log_offset, h.next_seq, h.events)
                .with_context(|| format!("continuing the log in {}", dir.display()))?;
            let out = hotstandby_recorder::continue_live(h.takeover, writer, None)
                .context("running live")?;
            eprintln!(
                "hotstandby: the program exited with status {} ({} events in the log)",
                out.exit_status, out.events
            );
            Ok(out.exit_status.clamp(0, 255) as u8)
        }
        Ok(out) if out.complete => {
            eprintln!(
                "hotstandby: replayed {} events, no divergence (exit status {})",
                out.events, out.exit_status
            );
            Ok(0)
        }
        Ok(out) => {
            eprintln!("hotstandby: replayed {} events, no divergence", out.events);
            Ok(0)
        }
        Err(e @ (ReplayError::Divergence(_) | ReplayError::Identity(_))) => {
            eprintln!("hotstandby: {e}");
            Ok(EXIT_DIVERGED)
        }
        Err(ReplayError::Log(e)) => {
            eprintln!("hotstandby: corrupt log: {e}");
            Ok(EXIT_CORRUPT)
        }
        Err(ReplayError::Checkpoint(e)) => {
            eprintln!("hotstandby: {e}");
            Ok(EXIT_CHECKPOINT)
        }
        Err(e) => Err(e).context("replay failed"),
    }
}
