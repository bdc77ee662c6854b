//! `hotstandby run`, `standby` and `status`: the replication driver.
//!
//! Thin by design: the session logic is the sans-IO state machine in
//! `hotstandby_protocol::session`, the bytes move through
//! `hotstandby_transport` (QUIC, pinned mutual TLS), and recording, replay
//! and takeover are the engine crates. The recorder and the replayer run on
//! their own threads (a tracer must be one thread); the network runs on a
//! single-threaded tokio runtime.

use hotstandby_netguard::gate::Gate;
use hotstandby_netguard::nfqueue::Queue;
use hotstandby_netguard::rules::OutputRule;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hotstandby_protocol::frame::FrameReader;
use hotstandby_protocol::session::{
    Config, Primary, PrimaryState, Standby, StandbyState, Transmit,
};
use hotstandby_protocol::wire::{Message, Role};
use hotstandby_recorder::logfile::{self, EventCursor, LogWriter, Throttle, STREAM};
use hotstandby_replayer::{LiveFeed, ReplayOptions};
use hotstandby_transport::{self as transport, Connection, Endpoint, MsgStream, NodeKeys};

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
    fn load(&self) -> anyhow::Result<(NodeKeys, hotstandby_transport::CertificateDer<'static>)> {
        let keys = transport::load_keys(&self.cert, &self.key)?;
        let peer = transport::load_cert(&self.peer_cert)?;
        Ok((keys, peer))
    }
}

const STATUS: &str = "status";

/// How old the oldest byte not yet past a mark is: lag in milliseconds.
#[derive(Debug, Default)]
struct LagClock(std::collections::VecDeque<(u64, Instant)>);

impl LagClock {
    /// The log grew to `end` bytes at `now`.
    fn grew(&mut self, end: u64, now: Instant) {
        if self.0.back().map(|(e, _)| end > *e).unwrap_or(true) {
            self.0.push_back((end, now));
            if self.0.len() > 100_000 {
                self.0.pop_front();
            }
        }
    }

    /// Milliseconds since the oldest byte beyond `mark` arrived.
    fn ms(&mut self, mark: u64, now: Instant) -> u128 {
        while self.0.front().map(|(e, _)| *e <= mark).unwrap_or(false) {
            self.0.pop_front();
        }
        self.0
            .front()
            .map(|(_, t)| now.saturating_duration_since(*t).as_millis())
            .unwrap_or(0)
    }
}

/// A virtual IP address that belongs to whichever node is primary.
#[derive(Debug, Clone)]
pub struct Vip {
    /// `ADDR/PREFIX`.
    pub cidr: String,
    pub dev: String,
    /// NFQUEUE number of the output rule.
    pub queue: u16,
}

/// The output rule in force on this host: the queue thread and the
/// iptables rule that feeds it.
#[derive(Debug)]
pub struct Guard {
    pub gate: Arc<Gate>,
    rule: Option<OutputRule>,
    thread: Option<std::thread::JoinHandle<Result<(), hotstandby_netguard::NetError>>>,
}

impl Guard {
    /// Orderly end: let held packets go, remove the rule.
    pub fn finish(mut self) {
        self.gate.stop(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.rule.take());
    }

    /// A newer primary exists: drop what is held and keep the rule, so
    /// nothing of this program leaves the host any more (not even the FIN
    /// or RST of its sockets closing as it is killed).
    pub fn step_down(mut self) {
        self.gate.stop(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(r) = self.rule.take() {
            r.keep();
        }
    }
}

impl Vip {
    fn ip(&self) -> &str {
        self.cidr.split('/').next().unwrap_or(&self.cidr)
    }

    /// Hold the address (no-op when it is already here).
    pub fn add(&self) -> anyhow::Result<()> {
        let o = std::process::Command::new("ip")
            .args(["addr", "add", &self.cidr, "dev", &self.dev])
            .output()
            .context("running ip (iproute2)")?;
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() && !err.contains("File exists") {
            bail!(
                "adding the virtual IP {} on {}: {}",
                self.cidr,
                self.dev,
                err.trim()
            );
        }
        Ok(())
    }

    /// Start the output rule: bind the queue, serve it on a thread, then
    /// send TCP from the virtual IP to it.
    pub fn guard(&self) -> anyhow::Result<Guard> {
        let ip: std::net::Ipv4Addr = self.ip().parse().with_context(|| {
            format!(
                "the output rule needs an IPv4 virtual IP (got {})",
                self.cidr
            )
        })?;
        let gate = Gate::new()?;
        let q =
            Queue::open(self.queue).with_context(|| format!("binding NFQUEUE {}", self.queue))?;
        let g = gate.clone();
        let thread = std::thread::Builder::new()
            .name("output-rule".into())
            .spawn(move || {
                let r = g.serve(q);
                if let Err(e) = &r {
                    eprintln!("hotstandby: OUTPUT RULE FAILED: {e}; the program's packets are now dropped (fail closed)");
                }
                r
            })?;
        let rule = OutputRule::install(ip, self.queue)?;
        eprintln!(
            "hotstandby: output rule on: TCP from {ip} leaves only once the standby holds its log (NFQUEUE {})",
            self.queue
        );
        Ok(Guard {
            gate,
            rule: Some(rule),
            thread: Some(thread),
        })
    }

    /// Whether another host answers for the virtual IP (ARP probes, as in
    /// duplicate address detection), trying until `window` has passed.
    pub fn held_elsewhere(&self, window: Duration) -> bool {
        let ip = match self.ip().parse() {
            Ok(ip) => ip,
            Err(_) => return false,
        };
        match hotstandby_netguard::arp::held_elsewhere(&self.dev, ip, window) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("hotstandby: cannot probe the virtual IP: {e}");
                false
            }
        }
    }

    /// Give the address up.
    pub fn del(&self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &self.cidr, "dev", &self.dev])
            .output();
    }

    /// Tell the network the address moved: unsolicited ARP replies, three,
    /// a second apart, in the background (as keepalived does).
    pub fn announce(&self) {
        match std::process::Command::new("arping")
            .args(["-q", "-U", "-c", "3", "-I", &self.dev, self.ip()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => eprintln!(
                "hotstandby: took the virtual IP {} on {} and announced it (gratuitous ARP)",
                self.cidr, self.dev
            ),
            Err(e) => eprintln!(
                "hotstandby: took the virtual IP {} but could not run arping to announce it: {e}",
                self.cidr
            ),
        }
    }
}

fn write_status(dir: &Path, text: &str) {
    let tmp = dir.join(".status.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(STATUS));
    }
}

/// `hotstandby status --log DIR`.
pub fn status(dir: &Path) -> anyhow::Result<u8> {
    let p = dir.join(STATUS);
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
    print!("{text}");
    println!(
        "status age:  {} ms{}",
        age.as_millis(),
        if age > Duration::from_secs(2) {
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
async fn serve_primary(
    ep: Endpoint,
    dir: &Path,
    cfg: Config,
    epoch: u64,
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
    let flushed = Arc::new(tokio::sync::Notify::new());
    {
        let f = flushed.clone();
        let _ = throttle.on_flush.set(Box::new(move || f.notify_one()));
    }
    eprintln!(
        "hotstandby: primary (epoch {epoch}) listening on {}; unprotected until a standby joins",
        ep.local_addr()?
    );
    let mut last_status = Instant::now() - Duration::from_secs(1);
    loop {
        let conn = loop {
            if finished() {
                return Ok(false);
            }
            if last_status.elapsed() > Duration::from_millis(100) {
                session.log_appended(file.metadata()?.len());
                write_status(
                    dir,
                    &primary_status(
                        &session,
                        "unprotected",
                        None,
                        &throttle,
                        0,
                        net.as_ref().map(|(_, g)| g),
                    ),
                );
                last_status = Instant::now();
            }
            tokio::select! {
                inc = ep.accept() => {
                    let Some(inc) = inc else { bail!("the QUIC endpoint closed") };
                    match inc.await {
                        Ok(c) => break c,
                        Err(e) => eprintln!("hotstandby: refused a connection: {e}"),
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        let gate = net.as_ref().map(|(_, g)| g.clone());
        let r = serve_one(
            &conn,
            dir,
            &file,
            &mut session,
            &throttle,
            finished,
            gate.as_ref(),
            &flushed,
        )
        .await;
        let lost = match r {
            Ok(Served::StandbyGone) => {
                throttle.active.store(false, Relaxed);
                eprintln!("hotstandby: the standby is gone");
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
                eprintln!("hotstandby: standby connection failed: {e:#}");
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
                eprintln!(
                    "hotstandby: holding client output while probing who holds {} (up to {} ms)",
                    vip.cidr,
                    window.as_millis()
                );
                let v = (*vip).clone();
                let elsewhere = tokio::task::spawn_blocking(move || v.held_elsewhere(window))
                    .await
                    .unwrap_or(false);
                if elsewhere {
                    eprintln!(
                        "hotstandby: another host answers for {}: the standby took over",
                        vip.cidr
                    );
                    return Ok(true);
                }
                gate.set_protected(false);
            }
            eprintln!("hotstandby: serving UNPROTECTED until a standby joins again");
        }
    }
}

fn primary_status(
    s: &Primary,
    conn: &str,
    peer: Option<SocketAddr>,
    t: &Throttle,
    lag_ms: u128,
    gate: Option<&Arc<Gate>>,
) -> String {
    let st = s.status(Instant::now());
    let rule = match gate {
        Some(g) => {
            let (released, p50, p99) = g.hold_stats();
            format!(
                "output rule: {} packets held now, {released} released; recent hold p50 {p50} us, p99 {p99} us\n",
                g.held()
            )
        }
        None => "output rule: off (no --vip)\n".into(),
    };
    let protection = match s.state() {
        PrimaryState::Protected => "PROTECTED",
        PrimaryState::CatchingUp => "standby catching up (not yet protected)",
        PrimaryState::SteppedDown => "stepped down",
        PrimaryState::Unprotected => "UNPROTECTED",
    };
    format!(
        "role:        primary (epoch {})\nstate:       {} ({})\nprotection:  {protection}\nprogram:     running under the recorder\npeer:        {}\nlag:         {} bytes not yet acknowledged (oldest {lag_ms} ms)\nlast heard:  {}\nthrottled:   {} ms in total\nlog:         {} bytes\n",
        st.epoch,
        st.state,
        conn,
        peer.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
        st.lag_bytes,
        st.last_heard.map(|d| format!("{} ms ago", d.as_millis())).unwrap_or_else(|| "never".into()),
        t.waited_us.load(Relaxed) / 1000,
        st.log_bytes,
    ) + &rule
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
    dir: &Path,
    file: &std::fs::File,
    session: &mut Primary,
    throttle: &Throttle,
    finished: &(dyn Fn() -> bool + Sync),
    gate: Option<&Arc<Gate>>,
    flushed: &tokio::sync::Notify,
) -> anyhow::Result<Served> {
    let mut protected = false;
    let peer = conn.remote_address();
    session.handle_connected(Instant::now());
    let mut stream = tokio::time::timeout(Duration::from_secs(2), MsgStream::accept(conn))
        .await
        .context("standby opened no stream")??;
    eprintln!("hotstandby: standby {peer} connected");
    throttle.active.store(true, Relaxed);
    let mut last_status = Instant::now();
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
                        eprintln!("hotstandby: the standby refused: {reason}");
                        return Ok(Served::StandbyGone);
                    }
                    if let Err(e) = session.handle_message(msg, Instant::now()) {
                        eprintln!("hotstandby: refusing the standby: {e}");
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
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
        let now = Instant::now();
        if session.handle_timeout(now) {
            return Ok(Served::StandbyGone);
        }
        throttle.acked.store(session.acked(), Relaxed);
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
        if now - last_status > Duration::from_millis(100) {
            write_status(
                dir,
                &primary_status(
                    session,
                    "connected",
                    Some(peer),
                    throttle,
                    clock.ms(session.acked(), now),
                    gate,
                ),
            );
            last_status = now;
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
    let guard = match &vip {
        Some(v) => Some(v.guard()?),
        None => None,
    };
    if let Some(v) = &vip {
        v.add()?;
        eprintln!("hotstandby: holding the virtual IP {} on {}", v.cidr, v.dev);
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
        gate: guard.as_ref().map(|g| g.gate.clone()),
    };
    let rec = std::thread::spawn(move || hotstandby_recorder::record(&opts));
    let finished = || rec.is_finished();
    let net = vip.as_ref().zip(guard.as_ref().map(|g| g.gate.clone()));
    let stepped_down = rt.block_on(serve_primary(ep, &log, cfg, 1, throttle, &finished, net))?;
    if stepped_down {
        if let Some(g) = guard {
            g.step_down();
        }
        eprintln!("hotstandby: A NEWER PRIMARY HAS TAKEN OVER: this primary steps down and stops its program");
        write_status(
            &log,
            "role:        primary, STEPPED DOWN (a newer primary took over)\n",
        );
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
    if let Some(g) = guard {
        g.finish();
    }
    if let Some(v) = &vip {
        v.del();
    }
    Ok(out.exit_status.clamp(0, 255) as u8)
}

/// The length of the longest prefix of the file that is whole frames.
fn valid_prefix(path: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(&bytes);
    let Ok(mut r) = FrameReader::new(&aligned) else {
        return 0;
    };
    let mut end = r.position();
    for f in r.by_ref() {
        match f {
            Ok(f) => end = f.end,
            Err(_) => break,
        }
    }
    end as u64
}

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
    let feed = Arc::new(LiveFeed::default());
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
    let lost = rt.block_on(follow(
        &client,
        primary,
        &log,
        &file,
        cfg,
        resume,
        &feed,
        &throttle,
        &data_dir,
        &mut replayer,
        &net,
    ))?;
    let Some(rep) = replayer else {
        bail!("the primary at {primary} was never reached with a log; nothing to take over");
    };
    if !lost {
        let code = rep
            .join()
            .map_err(|_| anyhow::anyhow!("the replay thread panicked"))??;
        eprintln!("hotstandby: the program exited on the primary (status {code}); the standby's replay completed");
        return Ok(code.clamp(0, 255) as u8);
    }
    // Promoted: serve a new standby from the continued log, and tell the
    // old primary, should it come back, that it has been replaced.
    let listen =
        listen.unwrap_or_else(|| SocketAddr::new("0.0.0.0".parse().expect("addr"), primary.port()));
    let epoch = 2;
    let ep = {
        let _g = rt.enter();
        transport::server(listen, &keys, peer)?
    };
    let announce = rt.spawn(announce_takeover(client.clone(), primary, epoch));
    let finished = || rep.is_finished();
    let n = net.as_ref().map(|(v, g)| (v, g.clone()));
    let stepped_down = rt.block_on(serve_primary(ep, &log, cfg, epoch, throttle, &finished, n));
    announce.abort();
    if let Ok(true) = stepped_down {
        eprintln!("hotstandby: another host holds the virtual IP now: this primary steps down");
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

/// Tell the old primary, for a while, that a newer primary exists.
async fn announce_takeover(ep: Endpoint, old: SocketAddr, epoch: u64) {
    for _ in 0..600 {
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

fn start_replay(
    log: &Path,
    feed: &Arc<LiveFeed>,
    throttle: &Arc<Throttle>,
    data_dir: &Option<PathBuf>,
    net: &Option<(Vip, Arc<Gate>)>,
) -> std::thread::JoinHandle<anyhow::Result<i32>> {
    let (log, feed, throttle, data_dir, net) = (
        log.to_path_buf(),
        feed.clone(),
        throttle.clone(),
        data_dir.clone(),
        net.clone(),
    );
    std::thread::spawn(move || {
        let opts = ReplayOptions {
            show_output: false,
            go_live: true,
            live: Some(feed),
            data_dir,
            vip: net.as_ref().and_then(|(v, _)| v.ip().parse().ok()),
        };
        let out = hotstandby_replayer::replay(&log, &opts)?;
        let Some(h) = out.handover else {
            return Ok(out.exit_status);
        };
        eprintln!(
            "hotstandby: GOING LIVE after {} events: the program now runs for real on this host",
            h.events
        );
        for (fd, what) in &h.listeners {
            eprintln!("hotstandby: listening socket fd {fd}: {what}");
        }
        for (fd, what) in &h.connections {
            eprintln!("hotstandby: connection fd {fd}: {what}");
        }
        // The sockets are ready: now take the address clients use.
        if let Some((v, _)) = &net {
            v.add()?;
            v.announce();
        }
        let mut h = h;
        for e in h.resend_tails() {
            eprintln!("hotstandby: {e}");
        }
        let mut w = LogWriter::resume(&log, h.log_offset, h.next_seq, h.events)?;
        w.set_throttle(throttle);
        let o = hotstandby_recorder::continue_live(h.takeover, w, net.map(|(_, g)| g))?;
        Ok(o.exit_status)
    })
}

/// Follow the primary. Returns true when the primary was declared lost
/// (go live), false when the log completed.
#[allow(clippy::too_many_arguments)]
async fn follow(
    ep: &Endpoint,
    primary: SocketAddr,
    log: &Path,
    file: &std::fs::File,
    cfg: Config,
    resume: u64,
    feed: &Arc<LiveFeed>,
    throttle: &Arc<Throttle>,
    data_dir: &Option<PathBuf>,
    replayer: &mut Option<std::thread::JoinHandle<anyhow::Result<i32>>>,
    net: &Option<(Vip, Arc<Gate>)>,
) -> anyhow::Result<bool> {
    let mut session = Standby::new(
        cfg,
        logfile::log_id(log)
            .filter(|_| resume > 0)
            .unwrap_or([0; 32]),
        resume,
    );
    let mut backoff = Duration::from_millis(100);
    let mut last_heard: Option<Instant> = None;
    let mut written = resume;
    let mut last_status = Instant::now();
    let mut last_progress = Instant::now();
    let mut catching_up = false;
    let mut clock = LagClock::default();
    loop {
        if let Some(r) = replayer.as_ref() {
            if r.is_finished() {
                return Ok(false);
            }
        }
        let conn =
            match tokio::time::timeout(Duration::from_secs(2), transport::connect(ep, primary))
                .await
            {
                Ok(Ok(c)) => c,
                other => {
                    if let (Some(t), Some(_)) = (last_heard, replayer.as_ref()) {
                        if t.elapsed() >= cfg.timeout {
                            eprintln!(
                                "hotstandby: the primary at {primary} is gone (silent for {} ms)",
                                t.elapsed().as_millis()
                            );
                            feed.lost_ms
                                .store(hotstandby_netguard::tcp::wall_ms(), Relaxed);
                            feed.lost.store(true, Relaxed);
                            return Ok(true);
                        }
                    }
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    eprintln!(
                        "hotstandby: connecting to {primary}: {why}; retrying in {} ms",
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
        eprintln!("hotstandby: connected to primary {primary}; resuming the log at byte {written}");
        loop {
            let now = Instant::now();
            while let Some(t) = session.poll_transmit(now) {
                match t {
                    Transmit::Stream(m) => stream.send(&m).await?,
                    Transmit::Datagram(m) => {
                        let _ = transport::send_datagram(&conn, &m);
                    }
                    Transmit::LogRange { .. } => {}
                }
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
                                            *replayer = Some(start_replay(log, feed, throttle, data_dir, net));
                                        }
                                        Err(logfile::LogError::Corrupt { .. }) | Err(logfile::LogError::NoHeader { .. }) => {}
                                        Err(e) => return Err(e.into()),
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                eprintln!("hotstandby: primary session: {e}");
                                if matches!(e, hotstandby_protocol::session::SessionError::Refused(_)) {
                                    bail!("the primary refused this standby: {e}");
                                }
                                broken = true;
                            }
                        }
                    }
                    Ok(None) | Err(_) => broken = true,
                },
                d = conn.read_datagram() => {
                    if let Ok(d) = d {
                        if let Ok((m, _)) = Message::decode(&d) {
                            last_heard = Some(Instant::now());
                            let _ = session.handle_message(m, Instant::now());
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
            let now = Instant::now();
            if session.handle_timeout(now) && replayer.is_some() {
                eprintln!(
                    "hotstandby: no heartbeat from the primary for {} ms: taking over",
                    cfg.timeout.as_millis()
                );
                feed.lost_ms
                    .store(hotstandby_netguard::tcp::wall_ms(), Relaxed);
                feed.lost.store(true, Relaxed);
                conn.close(0u32.into(), b"primary lost");
                return Ok(true);
            }
            if let Some(r) = replayer.as_ref() {
                if r.is_finished() {
                    return Ok(false);
                }
            }
            if now - last_status > Duration::from_millis(100) {
                let st = session.status(now);
                let behind = written.saturating_sub(feed.position.load(Relaxed));
                // Progress of a standby catching up on a long log.
                if replayer.is_some() && now - last_progress > Duration::from_secs(1) {
                    if behind > 1 << 20 {
                        let pct =
                            100.0 * feed.position.load(Relaxed) as f64 / written.max(1) as f64;
                        eprintln!(
                            "hotstandby: catching up: {pct:5.1}% of {:.1} MB replayed ({} events)",
                            written as f64 / 1e6,
                            feed.replayed.load(Relaxed)
                        );
                        catching_up = true;
                    } else if catching_up {
                        eprintln!("hotstandby: caught up; following live");
                        catching_up = false;
                    }
                    last_progress = now;
                }
                write_status(
                    log,
                    &format!(
                        "role:        standby (following epoch {})\nstate:       {}\npeer:        {primary}\nlog:         {} bytes held\nreplay lag:  {behind} bytes not yet replayed (oldest {} ms)\nprogram:     {}\nreplayed:    {} events\nlast heard:  {}\n",
                        st.epoch,
                        st.state,
                        st.log_bytes,
                        clock.ms(feed.position.load(Relaxed), now),
                        if replayer.is_some() { "replaying in lockstep" } else { "not started (waiting for the log header)" },
                        feed.replayed.load(Relaxed),
                        st.last_heard.map(|d| format!("{} ms ago", d.as_millis())).unwrap_or_else(|| "never".into()),
                    ),
                );
                last_status = now;
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
                if let Some(why) = conn.close_reason() {
                    eprintln!("hotstandby: the connection to the primary ended: {why}");
                }
                session.handle_disconnected();
                break;
            }
        }
    }
}
