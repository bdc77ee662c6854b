//! The primary's side: `hotstandby run` records the program and serves a
//! standby from the log; a standby that went live serves through the same
//! [`serve`]. A primary that hears of a newer epoch steps down.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hotstandby_netguard::gate::Gate;
use hotstandby_protocol::session::{Config, PeerId, Primary, PrimaryState, Transmit};
use hotstandby_protocol::wire::Message;
use hotstandby_recorder::logfile::{self, Throttle, STREAM};
use hotstandby_transport::{self as transport, Connection, Endpoint, MsgStream};

use super::report::{self, Protection, Report};
use super::vip::Vip;
use super::{deadline, runtime, save_epoch, LagClock, StatusFile, Tls, EXIT_STEPPED_DOWN};

/// What a standby's connection task tells the serving loop.
enum LinkEvent {
    /// The handshake and the stream are up: send to it through `tx`.
    Up {
        id: PeerId,
        conn: Connection,
        tx: tokio::sync::mpsc::UnboundedSender<Transmit>,
    },
    /// A message on the stream (`datagram` false) or in a datagram.
    Msg {
        id: PeerId,
        msg: Message,
        datagram: bool,
    },
    /// The connection ended (or never came up).
    Gone { id: PeerId, why: String },
    /// The standby uploaded a checkpoint, now kept here.
    Checkpoint { id: PeerId, position: u64 },
}

/// A standby's connection as the serving loop holds it.
struct Link {
    conn: Connection,
    tx: tokio::sync::mpsc::UnboundedSender<Transmit>,
}

/// One standby's connection: the handshake, then messages in, transmits
/// out (log ranges read from the file here, so a slow standby's flow
/// control stalls only its own task).
async fn link(
    id: PeerId,
    inc: transport::Incoming,
    file: Arc<std::fs::File>,
    log: PathBuf,
    ev: tokio::sync::mpsc::UnboundedSender<LinkEvent>,
) {
    let gone = |why: String| LinkEvent::Gone { id, why };
    let conn = match inc.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("refused a connection: {e}");
            let _ = ev.send(gone(String::new()));
            return;
        }
    };
    let mut stream =
        match tokio::time::timeout(Duration::from_secs(2), MsgStream::accept(&conn)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = ev.send(gone(format!("{e}")));
                return;
            }
            Err(_) => {
                conn.close(0u32.into(), b"no stream");
                let _ = ev.send(gone("the standby opened no stream".into()));
                return;
            }
        };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if ev
        .send(LinkEvent::Up {
            id,
            conn: conn.clone(),
            tx,
        })
        .is_err()
    {
        return;
    }
    let why = loop {
        tokio::select! {
            m = stream.recv() => match m {
                Ok(Some(msg)) => {
                    if ev.send(LinkEvent::Msg { id, msg, datagram: false }).is_err() {
                        return;
                    }
                }
                Ok(None) => break "the standby closed its stream".to_string(),
                Err(e) => break format!("{e}"),
            },
            d = conn.read_datagram() => match d {
                Ok(d) => {
                    if let Ok((msg, _)) = Message::decode(&d) {
                        let _ = ev.send(LinkEvent::Msg { id, msg, datagram: true });
                    }
                }
                Err(e) => break format!("{e}"),
            },
            t = rx.recv() => match t {
                Some(Transmit::Checkpoint { header_end, position, .. }) => {
                    // On a stream of its own, so this standby's messages
                    // and heartbeats go on meanwhile.
                    let (c, l) = (conn.clone(), log.clone());
                    tokio::spawn(async move {
                        if let Err(e) = super::ckxfer::send(&c, &l, header_end, position).await {
                            tracing::warn!("sending checkpoint {position} to {}: {e:#}", c.remote_address());
                            c.close(0u32.into(), b"checkpoint transfer failed");
                        }
                    });
                }
                Some(t) => {
                    if let Err(e) = send(&conn, &mut stream, &file, &log, t).await {
                        break format!("{e:#}");
                    }
                }
                None => break "closed by the primary".to_string(),
            },
            u = conn.accept_uni() => match u {
                Ok(r) => {
                    let (l, ev2) = (log.clone(), ev.clone());
                    let peer = conn.remote_address();
                    tokio::spawn(async move {
                        match super::ckxfer::receive_upload(r, l, id).await {
                            Ok(position) => {
                                let _ = ev2.send(LinkEvent::Checkpoint { id, position });
                            }
                            Err(e) => tracing::warn!("a checkpoint from {peer} was not kept: {e:#}"),
                        }
                    });
                }
                Err(e) => break format!("{e}"),
            },
        }
    };
    let _ = ev.send(gone(why));
}

async fn send(
    conn: &Connection,
    stream: &mut MsgStream,
    file: &std::fs::File,
    log: &Path,
    t: Transmit,
) -> anyhow::Result<()> {
    match t {
        Transmit::Stream(m) => stream.send(&m).await?,
        Transmit::LogRange { offset, len } => {
            if let Some(r) = logfile::retained(log).filter(|r| offset < r.offset) {
                bail!(
                        "this standby needs the log from byte {offset}, but this node deleted the log before byte {} after checkpoints; a standby cannot join from a checkpoint over the network yet: copy this node's checkpoints directory and the log into its log directory, or start it before the log is deleted",
                    r.offset
                );
            }
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset)?;
            stream.send(&Message::Log { offset, bytes }).await?;
        }
        Transmit::Datagram(m) => {
            let _ = transport::send_datagram(conn, &m);
        }
        Transmit::Checkpoint { .. } => unreachable!("sent by the link task itself"),
    }
    Ok(())
}

/// Serve standbys from the log in `dir` until the program (watched by
/// `finished`) exits. Returns true when this primary stepped down.
///
/// Any number of standbys when an arbiter is configured (it decides which
/// of them takes over); without one, a single standby: a second connection
/// is turned away while the first is alive (two standbys without an
/// arbiter would both go live).
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
    let file = Arc::new(std::fs::File::open(&path)?);
    let sha = loop {
        match logfile::log_id(dir) {
            Some(id) => break id,
            None if !finished() => tokio::time::sleep(Duration::from_millis(5)).await,
            None => bail!("the log in {} has no header", dir.display()),
        }
    };
    let multi = super::arbiter::configured();
    let mut session = Primary::new(cfg, epoch, sha);
    session.set_former(former);
    session.set_retained(super::ckxfer::retention_of(dir));
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
    let gate = net.as_ref().map(|(_, g)| g.clone());
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut links: std::collections::BTreeMap<PeerId, Link> = Default::default();
    let mut next_id: PeerId = 0;
    let mut protected = false;
    let mut finished_at: Option<Instant> = None;
    let mut clock = LagClock::default();
    loop {
        let now = Instant::now();
        let len = file.metadata()?.len();
        clock.grew(len, now);
        session.log_appended(len);
        while let Some((id, t)) = session.poll_transmit(now) {
            if let Some(l) = links.get(&id) {
                let _ = l.tx.send(t);
            }
        }
        let had = session.connected();
        let mut gone: Vec<(PeerId, String)> = vec![];
        tokio::select! {
            inc = ep.accept() => {
                let Some(inc) = inc else { bail!("the QUIC endpoint closed") };
                next_id += 1;
                tokio::spawn(link(next_id, inc, file.clone(), dir.to_path_buf(), ev_tx.clone()));
            }
            ev = ev_rx.recv() => match ev.expect("the loop holds a sender") {
                LinkEvent::Up { id, conn, tx } => {
                    let peer = conn.remote_address();
                    if !multi && !links.is_empty() {
                        // Code 3: busy, the standby retries (2 would be a
                        // refusal for good).
                        conn.close(3u32.into(), b"this primary already streams to a standby (more than one needs --arbiter)");
                        tracing::warn!("turned away a second standby {peer}: without --arbiter a primary has one standby");
                    } else {
                        tracing::info!("standby {peer} connected");
                        session.handle_connected(id, Instant::now());
                        links.insert(id, Link { conn, tx });
                    }
                }
                LinkEvent::Msg { id, msg, datagram } => {
                    if links.contains_key(&id) {
                        if let Message::Refuse { reason } = &msg {
                            gone.push((id, format!("the standby refused: {reason}")));
                        } else {
                            let r = session.handle_message(id, msg, Instant::now());
                            if let (Err(e), false) = (r, datagram) {
                                // Send the refusal queued for it, then
                                // close with the reason (code 2).
                                while let Some((to, t)) = session.poll_transmit(Instant::now()) {
                                    if let Some(l) = links.get(&to) {
                                        let _ = l.tx.send(t);
                                    }
                                }
                                if let Some(l) = links.get(&id) {
                                    l.conn.close(2u32.into(), e.to_string().as_bytes());
                                }
                                gone.push((id, format!("refused: {e}")));
                            }
                        }
                    }
                }
                LinkEvent::Checkpoint { id, position } => {
                    tracing::info!("kept checkpoint at byte {position} from standby {id}");
                    let min_acked = session
                        .standbys(Instant::now())
                        .iter()
                        .map(|s| s.acked)
                        .min()
                        .unwrap_or(0);
                    super::ckxfer::retain(dir, min_acked);
                    session.set_retained(super::ckxfer::retention_of(dir));
                }
                LinkEvent::Gone { id, why } => {
                    if links.contains_key(&id) {
                        gone.push((id, why));
                    } else if !why.is_empty() {
                        tracing::debug!("connection {id}: {why}");
                    }
                }
            },
            _ = flushed.notified() => {}
            // The session's next heartbeat or timeout, or a status write.
            _ = tokio::time::sleep_until(deadline(session.poll_timeout(), status.deadline())) => {}
        }
        let now = Instant::now();
        for id in session.handle_timeout(now) {
            gone.push((id, format!("silent for {} ms", cfg.timeout.as_millis())));
        }
        for (id, why) in gone {
            if let Some(l) = links.remove(&id) {
                tracing::warn!("standby {} is gone: {why}", l.conn.remote_address());
                l.conn.close(0u32.into(), b"standby lost");
            }
            session.handle_disconnected(id);
        }
        throttle.acked.store(session.throttle_mark(), Relaxed);
        throttle.active.store(session.connected() > 0, Relaxed);
        clock.passed(session.acked(), now);
        if let Some(g) = &gate {
            g.acked(session.acked());
            // Protection ends only through the probe below (all standbys
            // gone): output stays held until it is known who serves.
            if session.state() == PrimaryState::Protected && !protected {
                g.set_protected(true);
                protected = true;
            }
        }
        if session.state() == PrimaryState::SteppedDown {
            throttle.active.store(false, Relaxed);
            return Ok(true);
        }
        if finished() {
            let t0 = *finished_at.get_or_insert(now);
            let end = file.metadata()?.len();
            let all = session.standbys(now).iter().all(|s| s.acked >= end);
            if all || now - t0 > Duration::from_secs(5) {
                throttle.active.store(false, Relaxed);
                for l in links.values() {
                    l.conn.close(0u32.into(), b"done");
                }
                return Ok(false);
            }
        }
        if had > 0 && session.connected() == 0 {
            tracing::warn!("no standby left");
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
                protected = false;
            }
            tracing::warn!("serving UNPROTECTED until a standby joins again");
        }
        if status.due(now) {
            let lag = (clock.ms(session.acked(), now), clock.recent());
            let linked: Vec<report::Link> = session
                .standbys(now)
                .iter()
                .map(|s| report::Link {
                    addr: links
                        .get(&s.id)
                        .map(|l| l.conn.remote_address().to_string())
                        .unwrap_or_default(),
                    acked_bytes: s.acked,
                    lag_bytes: len.saturating_sub(s.acked),
                    in_quorum: s.caught_up,
                    last_heard_ms: s.last_heard.as_millis() as u64,
                })
                .collect();
            let text = primary_status(&session, linked, &throttle, lag, gate.as_ref(), cfg);
            status.write(text, now);
        }
    }
}

fn primary_status(
    s: &Primary,
    standbys: Vec<report::Link>,
    t: &Throttle,
    (lag_ms, (ack50, ack99)): (u128, (u32, u32)),
    gate: Option<&Arc<Gate>>,
    cfg: Config,
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
        peer: standbys.first().map(|l| l.addr.clone()),
        log_bytes: st.log_bytes,
        last_heard_ms: st.last_heard.map(|d| d.as_millis() as u64),
        pid: std::process::id(),
        primary: Some(report::PrimaryPart {
            link: if standbys.is_empty() {
                "unprotected".into()
            } else {
                "connected".into()
            },
            protection: Some(protection),
            unacked_bytes: st.lag_bytes,
            unacked_ms: lag_ms as u64,
            ack_p50_us: ack50,
            ack_p99_us: ack99,
            throttled_ms: t.waited_us.load(Relaxed) / 1000,
            events: t.events.load(Relaxed),
            output_rule,
            standbys,
            sync_standbys: cfg.sync_standbys as u64,
        }),
        ..Report::default()
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
    super::arbiter::take_or_refuse(listen)?;
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
