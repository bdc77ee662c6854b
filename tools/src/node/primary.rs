//! The primary's side: `hotstandby run` records the program and serves a
//! standby from the log; a standby that went live serves through the same
//! [`serve`]. A primary that hears of a newer epoch steps down.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hotstandby_netguard::gate::Gate;
use hotstandby_protocol::session::{Config, Primary, PrimaryState, Transmit};
use hotstandby_protocol::wire::Message;
use hotstandby_recorder::logfile::{self, Throttle, STREAM};
use hotstandby_transport::{self as transport, Connection, Endpoint, MsgStream};

use super::report::{self, Protection, Report};
use super::vip::Vip;
use super::{deadline, runtime, save_epoch, LagClock, StatusFile, Tls, EXIT_STEPPED_DOWN};

/// How serving a standby ended.
enum Served {
    /// The standby went away; go on unprotected.
    StandbyGone,
    /// The program exited and the standby holds the whole log.
    Finished,
    /// A newer primary exists.
    SteppedDown,
}

/// Serve standbys from the log in `dir` until the program (watched by
/// `finished`) exits. Returns true when this primary stepped down.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    ep: Endpoint,
    dir: &Path,
    cfg: Config,
    epoch: u64,
    former: Vec<SocketAddr>,
    throttle: Arc<Throttle>,
    finished: &(dyn Fn() -> bool + Sync),
    net: Option<(&Vip, Arc<Gate>)>,
) -> anyhow::Result<bool> {
    let path = dir.join(STREAM);
    while !path.exists() {
        if finished() {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let file = std::fs::File::open(&path)?;
    let sha = loop {
        match logfile::log_id(dir) {
            Some(id) => break id,
            None if !finished() => tokio::time::sleep(Duration::from_millis(5)).await,
            None => bail!("the log in {} has no header", dir.display()),
        }
    };
    let mut session = Primary::new(cfg, epoch, sha);
    session.set_former(former);
    save_epoch(dir, epoch)?;
    let mut status = StatusFile::new(dir);
    let flushed = Arc::new(tokio::sync::Notify::new());
    {
        let f = flushed.clone();
        let _ = throttle.on_flush.set(Box::new(move || f.notify_one()));
    }
    tracing::info!(
        "primary (epoch {epoch}) listening on {}; unprotected until a standby joins",
        ep.local_addr()?
    );
    loop {
        let conn = loop {
            if finished() {
                return Ok(false);
            }
            let now = Instant::now();
            if status.due(now) {
                session.log_appended(file.metadata()?.len());
                let text = primary_status(
                    &session,
                    "unprotected",
                    None,
                    &throttle,
                    (0, (0, 0)),
                    net.as_ref().map(|(_, g)| g),
                );
                status.write(text, now);
            }
            tokio::select! {
                inc = ep.accept() => {
                    let Some(inc) = inc else { bail!("the QUIC endpoint closed") };
                    match inc.await {
                        Ok(c) => break c,
                        Err(e) => tracing::warn!("refused a connection: {e}"),
                    }
                }
                // Until the next status write; `finished` is checked then.
                _ = tokio::time::sleep_until(deadline(None, status.deadline())) => {}
            }
        };
        let gate = net.as_ref().map(|(_, g)| g.clone());
        let r = serve_one(
            &conn,
            &file,
            &mut session,
            &throttle,
            finished,
            gate.as_ref(),
            &flushed,
            &mut status,
        )
        .await;
        let lost = match r {
            Ok(Served::StandbyGone) => {
                throttle.active.store(false, Relaxed);
                tracing::warn!("the standby is gone");
                session.handle_disconnected();
                conn.close(0u32.into(), b"standby lost");
                true
            }
            Ok(Served::Finished) => {
                throttle.active.store(false, Relaxed);
                conn.close(0u32.into(), b"done");
                return Ok(false);
            }
            Ok(Served::SteppedDown) => {
                throttle.active.store(false, Relaxed);
                return Ok(true);
            }
            Err(e) => {
                throttle.active.store(false, Relaxed);
                tracing::warn!("standby connection failed: {e:#}");
                session.handle_disconnected();
                true
            }
        };
        if lost {
            if let Some((vip, gate)) = &net {
                // Dead standby, or a partition between us while it took
                // over? Its gratuitous ARP / an ARP probe tells: if another
                // host answers for the virtual IP, step down with nothing
                // released; if none does within the window, serve alone.
                let window = (cfg.timeout * 5).max(Duration::from_secs(2));
                tracing::warn!(
                    "holding client output while probing who holds {} (up to {} ms)",
                    vip.cidr,
                    window.as_millis()
                );
                let v = (*vip).clone();
                let elsewhere = tokio::task::spawn_blocking(move || v.held_elsewhere(window))
                    .await
                    .unwrap_or(false);
                if elsewhere {
                    tracing::warn!(
                        "another host answers for {}: the standby took over",
                        vip.cidr
                    );
                    return Ok(true);
                }
                // With an arbiter, serving alone needs the lease too (a
                // primary woken from a pause must not release on its own
                // word before its arbiter thread notices the lease is gone).
                if !super::arbiter::renew_now() {
                    tracing::warn!(
                        "the arbiter's lease is not ours any more: the standby may hold the key"
                    );
                    return Ok(true);
                }
                gate.set_protected(false);
            }
            tracing::warn!("serving UNPROTECTED until a standby joins again");
        }
    }
}

fn primary_status(
    s: &Primary,
    conn: &str,
    peer: Option<SocketAddr>,
    t: &Throttle,
    (lag_ms, (ack50, ack99)): (u128, (u32, u32)),
    gate: Option<&Arc<Gate>>,
) -> Report {
    let st = s.status(Instant::now());
    let output_rule = gate.map(|g| {
        let (released, p50, p99) = g.hold_stats();
        let (hold_buckets, hold_sum_us) = g.hold_histogram();
        report::Rule {
            held: g.held(),
            released,
            hold_p50_us: p50,
            hold_p99_us: p99,
            hold_buckets,
            hold_sum_us,
        }
    });
    let protection = match s.state() {
        PrimaryState::Protected => Protection::Protected,
        PrimaryState::CatchingUp => Protection::CatchingUp,
        PrimaryState::SteppedDown => Protection::SteppedDown,
        PrimaryState::Unprotected => Protection::Unprotected,
    };
    Report {
        role: "primary".into(),
        epoch: st.epoch,
        state: st.state,
        peer: peer.map(|p| p.to_string()),
        log_bytes: st.log_bytes,
        last_heard_ms: st.last_heard.map(|d| d.as_millis() as u64),
        pid: std::process::id(),
        primary: Some(report::PrimaryPart {
            link: conn.into(),
            protection: Some(protection),
            unacked_bytes: st.lag_bytes,
            unacked_ms: lag_ms as u64,
            ack_p50_us: ack50,
            ack_p99_us: ack99,
            throttled_ms: t.waited_us.load(Relaxed) / 1000,
            events: t.events.load(Relaxed),
            output_rule,
        }),
        ..Report::default()
    }
}

async fn send(
    conn: &Connection,
    stream: &mut MsgStream,
    file: &std::fs::File,
    t: Transmit,
) -> anyhow::Result<()> {
    match t {
        Transmit::Stream(m) => stream.send(&m).await?,
        Transmit::LogRange { offset, len } => {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset)?;
            stream.send(&Message::Log { offset, bytes }).await?;
        }
        Transmit::Datagram(m) => {
            let _ = transport::send_datagram(conn, &m);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve_one(
    conn: &Connection,
    file: &std::fs::File,
    session: &mut Primary,
    throttle: &Throttle,
    finished: &(dyn Fn() -> bool + Sync),
    gate: Option<&Arc<Gate>>,
    flushed: &tokio::sync::Notify,
    status: &mut StatusFile,
) -> anyhow::Result<Served> {
    let mut protected = false;
    let peer = conn.remote_address();
    session.handle_connected(Instant::now());
    let mut stream = tokio::time::timeout(Duration::from_secs(2), MsgStream::accept(conn))
        .await
        .context("standby opened no stream")??;
    tracing::info!("standby {peer} connected");
    throttle.active.store(true, Relaxed);
    let mut finished_at: Option<Instant> = None;
    let mut clock = LagClock::default();
    loop {
        let now = Instant::now();
        let len = file.metadata()?.len();
        clock.grew(len, now);
        session.log_appended(len);
        while let Some(t) = session.poll_transmit(now) {
            send(conn, &mut stream, file, t).await?;
        }
        tokio::select! {
            m = stream.recv() => match m {
                Ok(Some(msg)) => {
                    if let Message::Refuse { reason } = &msg {
                        tracing::warn!("the standby refused: {reason}");
                        return Ok(Served::StandbyGone);
                    }
                    if let Err(e) = session.handle_message(msg, Instant::now()) {
                        tracing::warn!("refusing the standby: {e}");
                        // The reason travels in the close frame (code 2).
                        conn.close(2u32.into(), e.to_string().as_bytes());
                        return Ok(Served::StandbyGone);
                    }
                }
                Ok(None) | Err(_) => return Ok(Served::StandbyGone),
            },
            d = conn.read_datagram() => {
                if let Ok(d) = d {
                    if let Ok((m, _)) = Message::decode(&d) {
                        let _ = session.handle_message(m, Instant::now());
                    }
                }
            }
            _ = flushed.notified() => {}
            // The session's next heartbeat or timeout, or a status write.
            _ = tokio::time::sleep_until(deadline(session.poll_timeout(), status.deadline())) => {}
        }
        let now = Instant::now();
        if session.handle_timeout(now) {
            return Ok(Served::StandbyGone);
        }
        throttle.acked.store(session.acked(), Relaxed);
        clock.passed(session.acked(), now);
        if let Some(g) = gate {
            g.acked(session.acked());
            let p = session.state() == PrimaryState::Protected;
            if p != protected {
                g.set_protected(p);
                protected = p;
            }
        }
        if session.state() == PrimaryState::SteppedDown {
            return Ok(Served::SteppedDown);
        }
        if finished() {
            let t0 = *finished_at.get_or_insert(now);
            let end = file.metadata()?.len();
            if session.acked() >= end || now - t0 > Duration::from_secs(5) {
                return Ok(Served::Finished);
            }
        }
        if status.due(now) {
            let lag = (clock.ms(session.acked(), now), clock.recent());
            let text = primary_status(session, "connected", Some(peer), throttle, lag, gate);
            status.write(text, now);
        }
    }
}

/// `hotstandby run`.
pub fn run(
    listen: SocketAddr,
    log: PathBuf,
    tls: Tls,
    cfg: Config,
    data_dir: Option<PathBuf>,
    vip: Option<Vip>,
    cmd: Vec<String>,
) -> anyhow::Result<u8> {
    let (keys, peer) = tls.load()?;
    super::arbiter::take_or_refuse()?;
    let guard = match &vip {
        Some(v) => Some(v.guard()?),
        None => None,
    };
    let gate = guard.as_ref().map(|g| g.gate.clone());
    super::arbiter::hold(
        Box::new(move || {
            if let Some(g) = &gate {
                g.stop(false);
            }
        }),
        EXIT_STEPPED_DOWN as i32,
    )?;
    if let Some(v) = &vip {
        v.add()?;
        tracing::info!("holding the virtual IP {} on {}", v.cidr, v.dev);
    }
    let rt = runtime()?;
    let ep = {
        let _g = rt.enter();
        transport::server(listen, &keys, peer)?
    };
    let throttle = Arc::new(Throttle::new(cfg.max_unacked));
    let opts = hotstandby_recorder::RecordOptions {
        log_dir: log.clone(),
        argv: cmd,
        data_dir,
        throttle: Some(throttle.clone()),
        net: Some(hotstandby_netguard::observer::Observer::new(
            guard.as_ref().map(|g| g.gate.clone()),
        )),
    };
    let rec = std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || hotstandby_recorder::record(&opts))?;
    let finished = || rec.is_finished();
    let net = vip.as_ref().zip(guard.as_ref().map(|g| g.gate.clone()));
    // The epoch: the newest this node knew, or the arbiter's.
    let epoch = super::arbiter::epoch(super::read_epoch(&log).max(1), false)?;
    let stepped_down = rt.block_on(serve(
        ep,
        &log,
        cfg,
        epoch,
        vec![],
        throttle,
        &finished,
        net,
    ))?;
    if stepped_down {
        if let Some(g) = guard {
            g.step_down();
        }
        tracing::warn!(
            "A NEWER PRIMARY HAS TAKEN OVER: this primary steps down and stops its program"
        );
        StatusFile::write_now(&log, Report::stepped_down(super::read_epoch(&log)));
        if let Some(v) = &vip {
            v.del();
        }
        // Exiting kills the program: the recorder traces it with
        // PTRACE_O_EXITKILL.
        std::process::exit(EXIT_STEPPED_DOWN as i32);
    }
    let out = rec
        .join()
        .map_err(|_| anyhow::anyhow!("the recorder thread panicked"))??;
    super::arbiter::resign();
    if let Some(g) = guard {
        g.finish();
    }
    if let Some(v) = &vip {
        v.del();
    }
    Ok(out.exit_status.clamp(0, 255) as u8)
}
