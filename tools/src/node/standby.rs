//! The standby's side: `hotstandby standby` follows a primary, appends its
//! log, replays it in lockstep and, when the session declares the primary
//! lost, goes live and serves as the primary of the next epoch.

use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hotstandby_netguard::gate::Gate;
use hotstandby_protocol::session::{Config, Standby, StandbyState, Transmit};
use hotstandby_protocol::wire::{Message, Role};
use hotstandby_recorder::logfile::{self, EventCursor, LogWriter, Throttle, STREAM};
use hotstandby_replayer::{LiveFeed, ReplayOptions};
use hotstandby_transport::{self as transport, Endpoint, MsgStream};

use super::report::{self, Report, StandbyPart};
use super::vip::Vip;
use super::{
    deadline, primary, read_epoch, read_former, runtime, save_epoch, save_former, valid_prefix,
    LagClock, StatusFile, Tls, EXIT_STEPPED_DOWN,
};

/// `hotstandby standby`.
#[allow(clippy::too_many_arguments)]
pub fn standby(
    primary: SocketAddr,
    log: PathBuf,
    tls: Tls,
    cfg: Config,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    vip: Option<Vip>,
    checkpoint_every: Option<hotstandby_replayer::checkpoint::Every>,
) -> anyhow::Result<u8> {
    use std::os::unix::fs::DirBuilderExt;
    let (keys, peer) = tls.load()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&log)
        .with_context(|| format!("creating {}", log.display()))?;
    let path = log.join(STREAM);
    let resume = valid_prefix(&path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    file.set_len(resume)?;
    let setup = ReplaySetup {
        data_dir,
        checkpoint_every,
    };
    let feed = Arc::new(LiveFeed::default());
    // Unknown until the replay first looks at the log (`cut_log` waits).
    feed.seen
        .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    let throttle = Arc::new(Throttle::new(cfg.max_unacked));
    let rt = runtime()?;
    let client = {
        let _g = rt.enter();
        transport::client("0.0.0.0:0".parse().expect("addr"), &keys, peer.clone())?
    };
    // The output rule is ready before this host can become primary (it
    // matches nothing until the virtual IP is here, and lets everything out
    // until a standby of this node is attached).
    let guard = match &vip {
        Some(v) => Some(v.guard()?),
        None => None,
    };
    let net = vip.clone().zip(guard.as_ref().map(|g| g.gate.clone()));
    let mut replayer: Option<std::thread::JoinHandle<anyhow::Result<i32>>> = None;
    // Where a new standby of this node connects once it is primary.
    let listen =
        listen.unwrap_or_else(|| SocketAddr::new("0.0.0.0".parse().expect("addr"), primary.port()));
    let first = primary;
    let mut primary = primary;
    let mut known = false;
    let lost_at_epoch = loop {
        let resume = file.metadata()?.len();
        let end = rt.block_on(follow(
            &client,
            primary,
            &log,
            &file,
            cfg,
            resume,
            known,
            &feed,
            &throttle,
            &setup,
            &mut replayer,
            &net,
        ))?;
        let Some(lost_epoch) = end else { break None };
        if replayer.is_none() {
            break None;
        }
        // With an arbiter: go live only holding the leader key (the old
        // primary's lease has ended, so it no longer releases anything);
        // follow whoever holds it otherwise.
        let held = file.metadata()?.len();
        let alive = || replayer.as_ref().is_some_and(|r| !r.is_finished());
        match super::arbiter::elect(held, primary, listen) {
            super::arbiter::Elected::Won => {
                // A torn last frame is not served to this node's standbys
                // (the live recorder rewrites from its start).
                cut_log(&path, &file, &feed, u64::MAX, "a torn last frame", &alive)?;
                break Some(lost(&log, lost_epoch, &feed)?);
            }
            super::arbiter::Elected::Follow { addr, upto } => {
                if addr != primary {
                    let why = format!("where the new primary {addr} continues it");
                    cut_log(&path, &file, &feed, upto, &why, &alive)?;
                }
                primary = addr;
                known = true;
            }
        }
    };
    let Some(rep) = replayer else {
        bail!("the primary at {first} was never reached with a log; nothing to take over");
    };
    let Some(epoch) = lost_at_epoch else {
        let code = rep
            .join()
            .map_err(|_| anyhow::anyhow!("the replay thread panicked"))??;
        tracing::info!(
            "the program exited on the primary (status {code}); the standby's replay completed"
        );
        return Ok(code.clamp(0, 255) as u8);
    };
    // Promoted: serve a new standby from the continued log, and tell the
    // old primary, should it come back, that it has been replaced.
    // The session took the next epoch when it declared the primary lost;
    // `serve` keeps it in the log directory.
    tracing::info!("this node is the primary of epoch {epoch}");
    report::FAILOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let gate = guard.as_ref().map(|g| g.gate.clone());
    super::arbiter::hold(
        Box::new(move || {
            if let Some(g) = &gate {
                g.stop(false);
            }
        }),
        EXIT_STEPPED_DOWN as i32,
    )?;
    let ep = {
        let _g = rt.enter();
        transport::server(listen, &keys, peer)?
    };
    // Every primary of this log before us is told, for as long as we serve:
    // one that was only paused steps down when it wakes, whatever its epoch.
    let mut former = read_former(&log);
    if !former.contains(&primary) {
        former.insert(0, primary);
    }
    let announce: Vec<_> = former
        .iter()
        .filter(|a| **a != listen)
        .map(|a| rt.spawn(announce_takeover(client.clone(), *a, epoch)))
        .collect();
    let finished = || rep.is_finished();
    let n = net.as_ref().map(|(v, g)| (v, g.clone()));
    let stepped_down = rt.block_on(primary::serve(
        ep, &log, cfg, epoch, former, throttle, &finished, n,
    ));
    announce.iter().for_each(|a| a.abort());
    if let Ok(true) = stepped_down {
        tracing::warn!("another host holds the virtual IP now: this primary steps down");
        if let Some(g) = guard {
            g.step_down();
        }
        std::process::exit(EXIT_STEPPED_DOWN as i32);
    }
    let code = rep
        .join()
        .map_err(|_| anyhow::anyhow!("the live program thread panicked"))??;
    if let Some(g) = guard {
        g.finish();
    }
    if let Some((v, _)) = &net {
        v.del();
    }
    Ok(code.clamp(0, 255) as u8)
}

/// Tell an old primary that a newer primary exists, every half second for
/// ten minutes, then every ten seconds (until this node stops serving).
async fn announce_takeover(ep: Endpoint, old: SocketAddr, epoch: u64) {
    for round in 0u64.. {
        if round >= 600 {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(500), transport::connect(&ep, old)).await
        {
            if let Ok(mut s) = MsgStream::open(&conn).await {
                let hello = Message::Hello {
                    version_min: hotstandby_protocol::wire::VERSION_MIN,
                    version_max: hotstandby_protocol::wire::VERSION_MAX,
                    role: Role::Primary,
                    epoch,
                    resume_offset: 0,
                    exe_sha256: [0; 32],
                };
                let _ = s.send(&hello).await;
                let _ = transport::send_datagram(
                    &conn,
                    &Message::Heartbeat {
                        role: Role::Primary,
                        epoch,
                        sent_ms: 0,
                        offset: 0,
                    },
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How the standby's replay runs besides the log.
#[derive(Debug, Clone)]
struct ReplaySetup {
    /// The standby's own copy of the program's data directory.
    data_dir: Option<PathBuf>,
    /// Log bytes between checkpoints (none: no checkpoints).
    checkpoint_every: Option<hotstandby_replayer::checkpoint::Every>,
}

/// The newest checkpoint in `dir` that is whole and continues this log
/// (older ones are tried when a newer one is refused; each refusal is
/// logged with its reason).
fn newest_checkpoint(log: &Path, dir: &Path) -> Option<PathBuf> {
    use hotstandby_replayer::checkpoint as ck;
    let id = logfile::log_id(log);
    let exe = EventCursor::open(log, true).ok()?.identity().exe_sha256;
    for (_, path) in ck::list(dir).into_iter().rev() {
        let r = ck::Mapped::open(&path).and_then(|m| {
            let st = m.parse()?.state;
            ck::check_fits(&path, &st, id, &exe)
        });
        match r {
            Ok(()) => return Some(path),
            Err(e) => tracing::warn!("not resuming from {}: {e}", path.display()),
        }
    }
    None
}

fn start_replay(
    log: &Path,
    feed: &Arc<LiveFeed>,
    throttle: &Arc<Throttle>,
    setup: &ReplaySetup,
    net: &Option<(Vip, Arc<Gate>)>,
) -> std::thread::JoinHandle<anyhow::Result<i32>> {
    let (log, feed, throttle, setup, net) = (
        log.to_path_buf(),
        feed.clone(),
        throttle.clone(),
        setup.clone(),
        net.clone(),
    );
    let ckdir = log.join("checkpoints");
    // Its own newest checkpoint, or the one its primary sent.
    let resume = newest_checkpoint(&log, &ckdir);
    if let Some(p) = &resume {
        tracing::info!("resuming the replay from checkpoint {}", p.display());
    }
    let data_dir = setup.data_dir.clone();
    let checkpoints = setup
        .checkpoint_every
        .map(|every| every.policy(ckdir, true));
    std::thread::Builder::new()
        .name("replay".into())
        .spawn(move || {
            let opts = ReplayOptions {
                show_output: false,
                go_live: true,
                live: Some(feed),
                data_dir,
                vip: net.as_ref().and_then(|(v, _)| v.ip().parse().ok()),
                checkpoints,
                resume,
            };
            let out = hotstandby_replayer::replay(&log, &opts)?;
            let Some(h) = out.handover else {
                return Ok(out.exit_status);
            };
            tracing::warn!(
                "GOING LIVE after {} events: the program now runs for real on this host",
                h.events
            );
            for (fd, what) in &h.listeners {
                tracing::info!("listening socket fd {fd}: {what}");
            }
            for (fd, what) in &h.connections {
                tracing::info!("connection fd {fd}: {what}");
            }
            // The sockets are ready: now take the address clients use.
            if let Some((v, _)) = &net {
                v.add()?;
                v.announce();
            }
            let mut h = h;
            for e in h.resend_tails() {
                tracing::warn!("{e}");
            }
            let mut w = LogWriter::resume(&log, h.log_offset, h.next_seq, h.events)?;
            w.set_throttle(throttle);
            let obs: Arc<dyn hotstandby_protocol::observe::NetObserver> =
                hotstandby_netguard::observer::Observer::new(net.map(|(_, g)| g));
            let o = hotstandby_recorder::continue_live(h.takeover, w, Some(obs))?;
            Ok(o.exit_status)
        })
        .expect("a thread for the replay")
}

/// Follow the primary from byte `resume` of the log (`known`: a primary
/// this node followed before or the arbiter named, lost if it stays
/// silent). Returns the epoch this node would hold as primary when the
/// primary was declared lost, `None` when the log completed.
#[allow(clippy::too_many_arguments)]
async fn follow(
    ep: &Endpoint,
    primary: SocketAddr,
    log: &Path,
    file: &std::fs::File,
    cfg: Config,
    resume: u64,
    known: bool,
    feed: &Arc<LiveFeed>,
    throttle: &Arc<Throttle>,
    setup: &ReplaySetup,
    replayer: &mut Option<std::thread::JoinHandle<anyhow::Result<i32>>>,
    net: &Option<(Vip, Arc<Gate>)>,
) -> anyhow::Result<Option<u64>> {
    let mut session = Standby::new(
        cfg,
        logfile::log_id(log)
            .filter(|_| resume > 0)
            .unwrap_or([0; 32]),
        resume,
    );
    // Never below an epoch this node already knew.
    let mut saved_epoch = read_epoch(log);
    session.know_epoch(saved_epoch);
    let mut saved_former = read_former(log);
    let mut status = StatusFile::new(log);
    let mut backoff = Duration::from_millis(100);
    let mut last_heard: Option<Instant> = None;
    if known {
        session.expect_primary(Instant::now());
        last_heard = Some(Instant::now());
    }
    let mut written = resume;
    let mut last_progress = Instant::now();
    let mut catching_up = false;
    let mut clock = LagClock::default();
    loop {
        if let Some(r) = replayer.as_ref() {
            if r.is_finished() {
                return Ok(None);
            }
        }
        let conn =
            match tokio::time::timeout(Duration::from_secs(2), transport::connect(ep, primary))
                .await
            {
                Ok(Ok(c)) => c,
                other => {
                    if let (Some(t), Some(_)) = (last_heard, replayer.as_ref()) {
                        if session.handle_timeout(Instant::now()) {
                            tracing::warn!(
                                "the primary at {primary} is gone (silent for {} ms)",
                                t.elapsed().as_millis()
                            );
                            return Ok(Some(session.epoch()));
                        }
                    }
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(
                        "connecting to {primary}: {why}; retrying in {} ms",
                        backoff.as_millis()
                    );
                    tokio::time::sleep(if last_heard.is_some() {
                        Duration::from_millis(20)
                    } else {
                        backoff
                    })
                    .await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
        backoff = Duration::from_millis(100);
        session.handle_connected(Instant::now());
        let mut stream = MsgStream::open(&conn).await?;
        tracing::info!("connected to primary {primary}; resuming the log at byte {written}");
        // A checkpoint the primary sends instead of log it deleted, being
        // received; and this node's own checkpoints, uploaded to it.
        let mut installing: Option<tokio::task::JoinHandle<anyhow::Result<u64>>> = None;
        let mut uploading: Option<tokio::task::JoinHandle<()>> = None;
        let mut uploaded = feed.checkpoint.load(Relaxed);
        loop {
            let now = Instant::now();
            while let Some(t) = session.poll_transmit(now) {
                match t {
                    Transmit::Stream(m) => stream.send(&m).await?,
                    Transmit::Datagram(m) => {
                        let _ = transport::send_datagram(&conn, &m);
                    }
                    Transmit::LogRange { .. } | Transmit::Checkpoint { .. } => {}
                }
            }
            let taken = feed.checkpoint.load(Relaxed);
            if taken > uploaded && uploading.as_ref().is_none_or(|u| u.is_finished()) {
                uploaded = taken;
                let (c, l) = (conn.clone(), log.to_path_buf());
                uploading = Some(tokio::spawn(async move {
                    match super::ckxfer::upload(&c, &l, taken).await {
                        Ok(()) => tracing::info!("uploaded checkpoint {taken} to the primary"),
                        Err(e) => tracing::warn!("uploading checkpoint {taken}: {e:#}"),
                    }
                }));
            }
            let mut broken = false;
            tokio::select! {
                m = stream.recv() => match m {
                    Ok(Some(msg)) => {
                        last_heard = Some(Instant::now());
                        let bytes = match &msg { Message::Log { bytes, .. } => Some(bytes.clone()), _ => None };
                        match session.handle_message(msg, Instant::now()) {
                            Ok(Some((off, len))) => {
                                let bytes = bytes.expect("a log message");
                                file.write_all_at(&bytes, off).with_context(|| format!("writing the standby's log in {}", log.display()))?;
                                written = off + len as u64;
                                clock.grew(written, Instant::now());
                                session.handle_written(written);
                                if replayer.is_none() {
                                    match EventCursor::open(log, true) {
                                        Ok(c) => {
                                            if let Err(e) = hotstandby_replayer::check_identity(c.identity()) {
                                                let reason = e.to_string();
                                                let _ = stream.send(&Message::Refuse { reason: reason.clone() }).await;
                                                conn.close(1u32.into(), b"wrong program");
                                                bail!("{reason}");
                                            }
                                            *replayer = Some(start_replay(log, feed, throttle, setup, net));
                                        }
                                        Err(logfile::LogError::Corrupt { .. }) | Err(logfile::LogError::NoHeader { .. }) => {}
                                        Err(e) => return Err(e.into()),
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!("primary session: {e}");
                                if matches!(e, hotstandby_protocol::session::SessionError::Refused(_)) {
                                    bail!("the primary refused this standby: {e}");
                                }
                                broken = true;
                            }
                        }
                    }
                    Ok(None) | Err(_) => broken = true,
                },
                u = conn.accept_uni() => match u {
                    Ok(r) => {
                        if replayer.is_some() || installing.is_some() {
                            bail!("the primary sent a checkpoint while this standby replays its own log: this standby fell behind the log the primary keeps; restart it with an empty log directory");
                        }
                        let (l, f) = (log.to_path_buf(), file.try_clone()?);
                        installing = Some(tokio::spawn(async move { super::ckxfer::install(r, &l, &f).await }));
                    }
                    Err(_) => broken = true,
                },
                done = async { installing.as_mut().expect("guarded").await }, if installing.is_some() => {
                    installing = None;
                    let position = done.map_err(|e| anyhow::anyhow!("installing: {e}"))??;
                    session.installed(position);
                    written = position;
                    clock.grew(written, Instant::now());
                }
                d = conn.read_datagram() => {
                    if let Ok(d) = d {
                        if let Ok((m, _)) = Message::decode(&d) {
                            last_heard = Some(Instant::now());
                            let _ = session.handle_message(m, Instant::now());
                        }
                    }
                }
                // The session's next heartbeat or timeout, or a status write.
                _ = tokio::time::sleep_until(deadline(session.poll_timeout(), status.deadline())) => {}
            }
            let now = Instant::now();
            if session.epoch() != saved_epoch {
                save_epoch(log, session.epoch())?;
                saved_epoch = session.epoch();
            }
            if session.state() == StandbyState::Following {
                let mut f = vec![primary];
                f.extend(session.former().iter().filter(|a| **a != primary));
                if f != saved_former {
                    save_former(log, &f)?;
                    saved_former = f;
                }
            }
            if replayer.is_some() && session.handle_timeout(now) {
                tracing::warn!(
                    "no heartbeat from the primary for {} ms: taking over",
                    cfg.timeout.as_millis()
                );
                conn.close(0u32.into(), b"primary lost");
                return Ok(Some(session.epoch()));
            }
            if let Some(r) = replayer.as_ref() {
                if r.is_finished() {
                    return Ok(None);
                }
            }
            if status.due(now) {
                let st = session.status(now);
                let behind = written.saturating_sub(feed.position.load(Relaxed));
                // Progress of a standby catching up on a long log.
                if replayer.is_some() && now - last_progress > Duration::from_secs(1) {
                    if behind > 1 << 20 {
                        let pct =
                            100.0 * feed.position.load(Relaxed) as f64 / written.max(1) as f64;
                        tracing::info!(
                            "catching up: {pct:5.1}% of {:.1} MB replayed ({} events)",
                            written as f64 / 1e6,
                            feed.replayed.load(Relaxed)
                        );
                        catching_up = true;
                    } else if catching_up {
                        tracing::info!("caught up; following live");
                        catching_up = false;
                    }
                    last_progress = now;
                }
                status.write(
                    Report {
                        role: "standby".into(),
                        epoch: st.epoch,
                        state: st.state,
                        peer: Some(primary.to_string()),
                        log_bytes: st.log_bytes,
                        last_heard_ms: st.last_heard.map(|d| d.as_millis() as u64),
                        pid: std::process::id(),
                        standby: Some(StandbyPart {
                            replay_lag_bytes: behind,
                            replay_lag_ms: clock.ms(feed.position.load(Relaxed), now) as u64,
                            replayed_events: feed.replayed.load(Relaxed),
                            replaying: replayer.is_some(),
                        }),
                        ..Report::default()
                    },
                    now,
                );
            }
            if let Some(quinn_closed) = conn.close_reason() {
                let text = quinn_closed.to_string();
                if let hotstandby_transport::ConnectionError::ApplicationClosed(ac) = &quinn_closed
                {
                    if u64::from(ac.error_code) == 2 {
                        bail!(
                            "the primary refused this standby: {}",
                            String::from_utf8_lossy(&ac.reason)
                        );
                    }
                }
                let _ = text;
                broken = true;
            }
            if broken || session.state() == StandbyState::Disconnected {
                let busy = match conn.close_reason() {
                    Some(why) => {
                        tracing::warn!("the connection to the primary ended: {why}");
                        matches!(&why, hotstandby_transport::ConnectionError::ApplicationClosed(ac) if u64::from(ac.error_code) == 3)
                    }
                    None => false,
                };
                session.handle_disconnected();
                if busy {
                    // The primary still holds a standby (this node's former
                    // self, until its session times out): ask again after a
                    // while, not in a storm of handshakes (which once left a
                    // connection stuck half-open after hundreds of them).
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                break;
            }
        }
    }
}

/// The primary is declared lost and this node holds the arbiter's key (or
/// has no arbiter): keep the new epoch, tell the replay to go live with
/// what it holds.
fn lost(log: &Path, epoch: u64, feed: &LiveFeed) -> anyhow::Result<u64> {
    // With an arbiter, the epoch is the one it hands out (above any it saw).
    let epoch = super::arbiter::epoch(epoch, true)?;
    save_epoch(log, epoch)?;
    feed.lost_ms
        .store(hotstandby_netguard::tcp::wall_ms(), Relaxed);
    feed.lost.store(true, Relaxed);
    Ok(epoch)
}

/// Another standby took over and continues the log from byte `upto` (the
/// end of the whole frames it held): cut this node's copy to the last
/// whole frame at or before it, so the new primary's bytes follow on.
/// The replay is first made to look no further than the cut (its reader
/// maps the file); a replay already past it cannot follow the new log.
fn cut_log(
    path: &Path,
    file: &std::fs::File,
    feed: &LiveFeed,
    upto: u64,
    why: &str,
    replay_alive: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let cut = super::frames_upto(path, upto);
    let len = file.metadata()?.len();
    if cut >= len {
        return Ok(());
    }
    feed.hold_at.store(cut.max(1), SeqCst);
    // Every refresh after this look stops at the cut; the replay's view
    // shrinks to it once it has used what it saw (it is waiting for the
    // log, or catching up on it, which taking over waits for anyway).
    let t0 = Instant::now();
    let mut told = t0;
    loop {
        let seen = {
            let _g = feed.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
            feed.seen.load(SeqCst)
        };
        if seen <= cut || feed.position.load(SeqCst) > cut {
            break;
        }
        if !replay_alive() {
            // It ended (the program exited, or replay failed): nothing
            // reads the log any more, and joining it reports why.
            feed.hold_at.store(0, SeqCst);
            return Ok(());
        }
        if told.elapsed() > Duration::from_secs(5) {
            tracing::info!(
                "waiting for the replay to reach byte {cut} of the log before cutting it ({} s)",
                t0.elapsed().as_secs()
            );
            told = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let at = feed.position.load(SeqCst);
    if at > cut {
        bail!(
            "this standby replayed {at} bytes of the log, past byte {cut} ({why}; its copy held less than this one): restart this standby with an empty log directory"
        );
    }
    file.set_len(cut)
        .with_context(|| format!("cutting {} to {cut} bytes", path.display()))?;
    feed.hold_at.store(0, SeqCst);
    tracing::warn!("the log is cut from {len} to {cut} bytes ({why})");
    Ok(())
}
