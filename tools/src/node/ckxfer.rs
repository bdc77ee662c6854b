//! Checkpoints between nodes, on QUIC streams of their own next to the
//! session's message stream: a standby uploads each checkpoint it takes to
//! its primary (which keeps two and deletes its log before the older), and
//! a primary sends a standby that needs deleted log the log's header frame
//! and its newest checkpoint instead (`Transmit::Checkpoint`; the session
//! decides, this module carries the bytes).
//!
//! A stream: magic (8) | header_end u64 | position u64 | length u64 |
//! header frame bytes (`header_end`) | checkpoint bytes (`length`). An
//! upload has `header_end` 0. Nothing received is used before the whole
//! checkpoint has been checked (`Checkpoint::parse`) and found to continue
//! this log.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hotstandby_protocol::session::Retention;
use hotstandby_recorder::logfile::{self, EventCursor, Retained};
use hotstandby_replayer::checkpoint as ck;
use hotstandby_transport::{Connection, RecvStream};

const MAGIC: [u8; 8] = *b"HSCKXFR1";
const CHUNK: usize = 1 << 20;
/// Larger is refused (a corrupt or hostile length).
const MAX_CHECKPOINT: u64 = 1 << 40;

/// The checkpoints directory of a log directory.
pub fn dir_of(log: &Path) -> PathBuf {
    log.join("checkpoints")
}

/// End of the log's header frame (0 without one).
pub fn header_end(log: &Path) -> u64 {
    logfile::header_end(log)
}

/// What the session must know of this node's kept log and checkpoints.
pub fn retention_of(log: &Path) -> Retention {
    let start = logfile::retained(log).map_or(0, |r| r.offset);
    let checkpoint = ck::list(&dir_of(log)).pop().and_then(|(pos, path)| {
        let len = std::fs::metadata(&path).ok()?.len();
        Some((pos, len))
    });
    Retention {
        start,
        header_end: header_end(log),
        checkpoint,
    }
}

/// Send the header frame and the checkpoint at `position` to a standby.
pub async fn send(
    conn: &Connection,
    log: &Path,
    header_end: u64,
    position: u64,
) -> anyhow::Result<()> {
    let path = dir_of(log).join(format!("ckpt-{position}.hsck"));
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut head = Vec::with_capacity(32);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&header_end.to_le_bytes());
    head.extend_from_slice(&position.to_le_bytes());
    head.extend_from_slice(&len.to_le_bytes());
    let mut s = conn.open_uni().await?;
    s.write_all(&head).await?;
    if header_end > 0 {
        let mut h = vec![0u8; header_end as usize];
        std::fs::File::open(log.join(logfile::STREAM))?.read_exact_at(&mut h, 0)?;
        s.write_all(&h).await?;
    }
    let mut off = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        s.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    s.finish()?;
    let _ = s.stopped().await;
    tracing::info!(position, bytes = len, "sent checkpoint to a standby");
    Ok(())
}

/// Upload a checkpoint this node took to its primary.
pub async fn upload(conn: &Connection, log: &Path, position: u64) -> anyhow::Result<()> {
    send(conn, log, 0, position).await
}

async fn read_head(r: &mut RecvStream) -> anyhow::Result<(u64, u64, u64)> {
    let mut head = [0u8; 32];
    r.read_exact(&mut head)
        .await
        .context("reading a checkpoint stream's header")?;
    if head[..8] != MAGIC {
        bail!("a stream that is not a checkpoint transfer (bad magic)");
    }
    let w = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let (header_end, position, len) = (w(8), w(16), w(24));
    if len > MAX_CHECKPOINT || header_end > 1 << 30 {
        bail!("a checkpoint transfer of {len} bytes (header {header_end}) is refused");
    }
    Ok((header_end, position, len))
}

async fn read_into(
    r: &mut RecvStream,
    f: &std::fs::File,
    len: u64,
    what: &str,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut last = std::time::Instant::now();
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        r.read_exact(&mut buf[..n])
            .await
            .with_context(|| format!("{what} ended at byte {off} of {len}"))?;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
        if last.elapsed().as_secs() >= 1 {
            tracing::info!("{what}: {} of {} MiB", off >> 20, len >> 20);
            last = std::time::Instant::now();
        }
    }
    f.sync_all()?;
    Ok(())
}

/// Check a received checkpoint file, then put it in place and keep two.
fn store(log: &Path, tmp: &Path, position: u64) -> anyhow::Result<PathBuf> {
    let m = ck::Mapped::open(tmp)?;
    let st = m.parse()?.state;
    if st.position != position {
        bail!(
            "the checkpoint says byte {}, its sender said {position}",
            st.position
        );
    }
    let exe = EventCursor::open(log, true)?.identity().exe_sha256;
    ck::check_fits(tmp, &st, logfile::log_id(log), &exe)?;
    drop(m);
    let dst = dir_of(log).join(format!("ckpt-{position}.hsck"));
    std::fs::rename(tmp, &dst)?;
    for (_, old) in ck::list(&dir_of(log)).iter().rev().skip(2) {
        let _ = std::fs::remove_file(old);
    }
    Ok(dst)
}

/// A primary receives a standby's checkpoint: checked, kept (with one
/// older), and its position returned.
pub async fn receive_upload(mut r: RecvStream, log: PathBuf, tag: u64) -> anyhow::Result<u64> {
    let (header_end, position, len) = read_head(&mut r).await?;
    if header_end != 0 {
        bail!("an upload with a log header");
    }
    std::fs::create_dir_all(dir_of(&log))?;
    let tmp = dir_of(&log).join(format!(".upload-{tag}.tmp"));
    let f = std::fs::File::create(&tmp)?;
    let r2 = read_into(&mut r, &f, len, "receiving a checkpoint").await;
    if let Err(e) = r2.and_then(|_| store(&log, &tmp, position).map(|_| ())) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(position)
}

/// A new standby installs the checkpoint its primary sent: the log's
/// header frame goes into its (empty) log, the checkpoint into its
/// checkpoints directory, and the log is marked as kept from the
/// checkpoint's position. Returns that position.
pub async fn install(mut r: RecvStream, log: &Path, file: &std::fs::File) -> anyhow::Result<u64> {
    let (header_end, position, len) = read_head(&mut r).await?;
    if header_end == 0 || header_end > position {
        bail!("a checkpoint for a new standby without the log's header");
    }
    let mut h = vec![0u8; header_end as usize];
    r.read_exact(&mut h)
        .await
        .context("reading the log's header frame")?;
    file.set_len(0)?;
    file.write_all_at(&h, 0)?;
    file.sync_all()?;
    std::fs::create_dir_all(dir_of(log))?;
    let tmp = dir_of(log).join(".install.tmp");
    let f = std::fs::File::create(&tmp)?;
    tracing::info!(position, bytes = len, "receiving the primary's checkpoint");
    read_into(&mut r, &f, len, "receiving the primary's checkpoint").await?;
    let path = store(log, &tmp, position)?;
    let st = ck::Mapped::open(&path)?.parse()?.state;
    logfile::delete_before(
        log,
        Retained {
            offset: st.position,
            seq: st.next_seq,
            index: st.index,
        },
    )?;
    tracing::info!(
        position,
        "installed the primary's checkpoint; the log follows from there"
    );
    Ok(position)
}

/// On a primary: delete its log before the older checkpoint it keeps, as
/// long as every standby holds the log past it (`min_acked`).
pub fn retain(log: &Path, min_acked: u64) {
    let Some((pos, path)) = ck::list(&dir_of(log)).into_iter().next() else {
        return;
    };
    if pos > min_acked {
        return;
    }
    let Ok(st) = ck::Mapped::open(&path).and_then(|m| Ok(m.parse()?.state)) else {
        return;
    };
    match logfile::delete_before(
        log,
        Retained {
            offset: st.position,
            seq: st.next_seq,
            index: st.index,
        },
    ) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            freed = n,
            kept_from = st.position,
            "deleted the log before the older checkpoint"
        ),
        Err(e) => tracing::warn!("could not delete old log: {e}"),
    }
}
