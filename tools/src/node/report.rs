//! What a node says about itself: one typed report, written to the log
//! directory as JSON (`status.json`) and rendered as the text of
//! `hotstandby status`, as `status --json`, and as Prometheus metrics
//! (`--metrics ADDR`).

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Whether clients' output is protected by a standby (primary only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    Protected,
    CatchingUp,
    Unprotected,
    SteppedDown,
}

impl Protection {
    fn text(self) -> &'static str {
        match self {
            Protection::Protected => "PROTECTED",
            Protection::CatchingUp => "standby catching up (not yet protected)",
            Protection::SteppedDown => "stepped down",
            Protection::Unprotected => "UNPROTECTED",
        }
    }
}

/// The output rule's counters (primary with `--vip`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub held: u64,
    pub released: u64,
    pub hold_p50_us: u32,
    pub hold_p99_us: u32,
    /// Released packets by hold time: (upper bound in µs, count at or
    /// below it), cumulative, ending with `u64::MAX` for all.
    pub hold_buckets: Vec<(u64, u64)>,
    /// Sum of the hold times of released packets, µs.
    pub hold_sum_us: u64,
}

/// A primary's view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryPart {
    /// "connected", "unprotected", ...: the replication link.
    pub link: String,
    pub protection: Option<Protection>,
    /// Log bytes the standby has not acknowledged, and for how long the
    /// oldest of them has waited.
    pub unacked_bytes: u64,
    pub unacked_ms: u64,
    /// From a log flush to the standby's acknowledgement, recent flushes.
    pub ack_p50_us: u32,
    pub ack_p99_us: u32,
    /// Time the program was slowed because the standby was too far behind.
    pub throttled_ms: u64,
    /// Events recorded so far.
    pub events: u64,
    /// None: no `--vip`, no output rule.
    pub output_rule: Option<Rule>,
    /// Each connected standby.
    #[serde(default)]
    pub standbys: Vec<Link>,
    /// Standbys that must hold the log before output is released.
    #[serde(default)]
    pub sync_standbys: u64,
}

/// One standby of a primary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub addr: String,
    pub acked_bytes: u64,
    /// Log bytes it has not acknowledged.
    pub lag_bytes: u64,
    /// It caught up and counts toward the sync quorum.
    pub in_quorum: bool,
    pub last_heard_ms: u64,
}

/// A standby's view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StandbyPart {
    /// Log bytes held but not yet replayed, and how old the oldest is.
    pub replay_lag_bytes: u64,
    pub replay_lag_ms: u64,
    pub replayed_events: u64,
    /// False until the log's header has arrived and replay started.
    pub replaying: bool,
}

/// The log on disk and the checkpoints kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoragePart {
    /// Bytes of the log file holding data (the deleted part is a hole).
    pub log_on_disk_bytes: u64,
    /// The log before this byte was deleted after checkpoints.
    pub kept_from: Option<u64>,
    /// Newest first.
    pub checkpoints: Vec<CheckpointInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Log position it continues from.
    pub position: u64,
    pub bytes: u64,
    pub age_ms: u64,
}

impl StoragePart {
    /// Read from a log directory.
    pub fn of(dir: &std::path::Path) -> Self {
        let checkpoints = hotstandby_replayer::checkpoint::list(&dir.join("checkpoints"))
            .into_iter()
            .rev()
            .filter_map(|(position, path)| {
                let md = std::fs::metadata(&path).ok()?;
                let age_ms = md
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map_or(0, |d| d.as_millis() as u64);
                Some(CheckpointInfo {
                    position,
                    bytes: md.len(),
                    age_ms,
                })
            })
            .collect();
        StoragePart {
            log_on_disk_bytes: hotstandby_recorder::logfile::allocated_bytes(dir),
            kept_from: hotstandby_recorder::logfile::retained(dir).map(|r| r.offset),
            checkpoints,
        }
    }
}

/// One node's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// "primary" or "standby".
    pub role: String,
    /// A newer primary took over: this one stopped its program.
    pub stepped_down: bool,
    /// The epoch this node serves (primary) or follows (standby).
    pub epoch: u64,
    /// The replication session's state.
    pub state: String,
    pub peer: Option<String>,
    /// Log bytes in this node's log.
    pub log_bytes: u64,
    /// Since the peer was last heard from.
    pub last_heard_ms: Option<u64>,
    /// Takeovers this node's process made (standby → primary).
    pub failovers: u64,
    pub pid: u32,
    pub primary: Option<PrimaryPart>,
    pub standby: Option<StandbyPart>,
    /// The log on disk and the checkpoints (filled when the report is written).
    #[serde(default)]
    pub storage: Option<StoragePart>,
}

impl Report {
    /// A primary that a newer one replaced.
    pub fn stepped_down(epoch: u64) -> Self {
        Report {
            role: "primary".into(),
            stepped_down: true,
            epoch,
            state: "SteppedDown".into(),
            pid: std::process::id(),
            ..Report::default()
        }
    }

    /// The text of `hotstandby status`.
    pub fn text(&self) -> String {
        if self.stepped_down {
            return "role:        primary, STEPPED DOWN (a newer primary took over)\n".into();
        }
        let heard = match self.last_heard_ms {
            Some(ms) => format!("{ms} ms ago"),
            None => "never".into(),
        };
        let peer = self.peer.as_deref().unwrap_or("none");
        let mut t = String::new();
        if let Some(p) = &self.primary {
            let prot = p.protection.map_or("none", Protection::text);
            let _ = write!(
                t,
                "role:        primary (epoch {})\nstate:       {} ({})\nprotection:  {prot}\nprogram:     running under the recorder\npeer:        {peer}\nlag:         {} bytes not yet acknowledged (oldest {} ms)\nacked after: recent p50 {} us, p99 {} us\nlast heard:  {heard}\nthrottled:   {} ms in total\nlog:         {} bytes\nrecorded:    {} events\n",
                self.epoch,
                self.state,
                p.link,
                p.unacked_bytes,
                p.unacked_ms,
                p.ack_p50_us,
                p.ack_p99_us,
                p.throttled_ms,
                self.log_bytes,
                p.events,
            );
            match &p.output_rule {
                Some(r) => {
                    let _ = writeln!(
                        t,
                        "output rule: {} packets held now, {} released; recent hold p50 {} us, p99 {} us",
                        r.held, r.released, r.hold_p50_us, r.hold_p99_us
                    );
                }
                None => t.push_str("output rule: off (no --vip)\n"),
            }
            for l in &p.standbys {
                let _ = writeln!(
                    t,
                    "standby:     {} acknowledged {} bytes ({} behind, {}), heard {} ms ago",
                    l.addr,
                    l.acked_bytes,
                    l.lag_bytes,
                    if l.in_quorum {
                        "in the quorum"
                    } else {
                        "catching up"
                    },
                    l.last_heard_ms
                );
            }
        }
        if let Some(s) = &self.standby {
            let _ = write!(
                t,
                "role:        standby (following epoch {})\nstate:       {}\npeer:        {peer}\nlog:         {} bytes held\nreplay lag:  {} bytes not yet replayed (oldest {} ms)\nprogram:     {}\nreplayed:    {} events\nlast heard:  {heard}\n",
                self.epoch,
                self.state,
                self.log_bytes,
                s.replay_lag_bytes,
                s.replay_lag_ms,
                if s.replaying {
                    "replaying in lockstep"
                } else {
                    "not started (waiting for the log header)"
                },
                s.replayed_events,
            );
        }
        if let Some(st) = &self.storage {
            match st.kept_from {
                Some(k) => {
                    let _ = writeln!(
                        t,
                        "log on disk: {} bytes (kept from byte {k}; the log before was deleted after checkpoints)",
                        st.log_on_disk_bytes
                    );
                }
                None => {
                    let _ = writeln!(
                        t,
                        "log on disk: {} bytes (the whole log)",
                        st.log_on_disk_bytes
                    );
                }
            }
            if st.checkpoints.is_empty() {
                t.push_str("checkpoint:  none\n");
            }
            for c in &st.checkpoints {
                let _ = writeln!(
                    t,
                    "checkpoint:  at byte {}, {} bytes, {:.1} s old",
                    c.position,
                    c.bytes,
                    c.age_ms as f64 / 1e3
                );
            }
        }
        if self.failovers > 0 {
            let _ = writeln!(t, "failovers:   {} (this process)", self.failovers);
        }
        t
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn metrics(&self, age_ms: u64) -> String {
        let mut m = Metrics::default();
        let role = if self.stepped_down {
            "stepped-down"
        } else {
            &self.role
        };
        m.gauge(
            "hotstandby_role",
            "1 for the role this node has now",
            &[("role", role)],
            1.0,
        );
        if let Some(st) = &self.storage {
            m.gauge(
                "hotstandby_log_disk_bytes",
                "Bytes of this node's log on disk (the part deleted after checkpoints not counted)",
                &[],
                st.log_on_disk_bytes as f64,
            );
            if let Some(c) = st.checkpoints.first() {
                m.gauge(
                    "hotstandby_checkpoint_position_bytes",
                    "Log position of the newest checkpoint kept",
                    &[],
                    c.position as f64,
                );
                m.gauge(
                    "hotstandby_checkpoint_age_seconds",
                    "Age of the newest checkpoint kept",
                    &[],
                    c.age_ms as f64 / 1e3,
                );
            }
        }
        m.gauge(
            "hotstandby_epoch",
            "The epoch served or followed",
            &[],
            self.epoch as f64,
        );
        m.gauge(
            "hotstandby_log_bytes",
            "Bytes in this node's log",
            &[],
            self.log_bytes as f64,
        );
        if let Some(ms) = self.last_heard_ms {
            m.gauge(
                "hotstandby_peer_last_heard_seconds",
                "Since the peer was last heard from",
                &[],
                ms as f64 / 1e3,
            );
        }
        m.counter(
            "hotstandby_failovers_total",
            "Takeovers this process made (standby to primary)",
            self.failovers as f64,
        );
        m.gauge(
            "hotstandby_status_age_seconds",
            "Age of the status these values come from",
            &[],
            age_ms as f64 / 1e3,
        );
        if let Some(p) = &self.primary {
            m.gauge(
                "hotstandby_protected",
                "1 when a standby holds the log (the primary's output is protected)",
                &[],
                (p.protection == Some(Protection::Protected)) as u8 as f64,
            );
            m.gauge(
                "hotstandby_lag_bytes",
                "Log bytes the standby has not acknowledged",
                &[],
                p.unacked_bytes as f64,
            );
            m.gauge(
                "hotstandby_standbys",
                "Standbys connected to this primary",
                &[],
                p.standbys.len() as f64,
            );
            for l in &p.standbys {
                m.gauge(
                    "hotstandby_standby_lag_bytes",
                    "Log bytes one standby has not acknowledged",
                    &[("standby", &l.addr)],
                    l.lag_bytes as f64,
                );
            }
            m.gauge(
                "hotstandby_lag_seconds",
                "Age of the oldest unacknowledged log byte",
                &[],
                p.unacked_ms as f64 / 1e3,
            );
            for (q, v) in [("0.5", p.ack_p50_us), ("0.99", p.ack_p99_us)] {
                m.gauge(
                    "hotstandby_ack_latency_seconds",
                    "From a log flush to the standby's acknowledgement (recent flushes)",
                    &[("quantile", q)],
                    v as f64 / 1e6,
                );
            }
            m.counter(
                "hotstandby_events_recorded_total",
                "Events recorded",
                p.events as f64,
            );
            m.counter(
                "hotstandby_throttled_seconds_total",
                "Time the program was slowed for a standby too far behind",
                p.throttled_ms as f64 / 1e3,
            );
            if let Some(r) = &p.output_rule {
                m.gauge(
                    "hotstandby_output_rule_held_packets",
                    "Packets the output rule holds now",
                    &[],
                    r.held as f64,
                );
                m.counter(
                    "hotstandby_output_rule_released_packets_total",
                    "Packets the output rule released",
                    r.released as f64,
                );
                m.histogram(
                    "hotstandby_output_rule_hold_seconds",
                    "How long released packets were held",
                    &r.hold_buckets,
                    r.hold_sum_us as f64 / 1e6,
                );
            }
        }
        if let Some(s) = &self.standby {
            m.gauge(
                "hotstandby_replay_lag_bytes",
                "Log bytes held but not yet replayed",
                &[],
                s.replay_lag_bytes as f64,
            );
            m.gauge(
                "hotstandby_replay_lag_seconds",
                "Age of the oldest log byte not yet replayed",
                &[],
                s.replay_lag_ms as f64 / 1e3,
            );
            m.counter(
                "hotstandby_events_replayed_total",
                "Events replayed",
                s.replayed_events as f64,
            );
        }
        m.out
    }
}

/// The newest report of this process, and when it was made.
static LATEST: std::sync::Mutex<Option<(Report, std::time::Instant)>> = std::sync::Mutex::new(None);

/// Takeovers this process made.
pub static FAILOVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Make `r` the report the metrics endpoint serves.
pub fn publish(r: &Report) {
    *LATEST.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((r.clone(), std::time::Instant::now()));
}

/// Serve Prometheus metrics on `addr` (`GET /metrics`) from a thread of
/// its own, for the life of the process. Binds before returning, so a bad
/// or busy address is an error at start.
pub fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context as _;
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    let local = l.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = answer(&mut c);
            }
        })?;
    Ok(local)
}

/// One HTTP/1.x exchange: the request line decides, the rest is ignored.
fn answer(c: &mut std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let t = Some(std::time::Duration::from_secs(2));
    c.set_read_timeout(t)?;
    c.set_write_timeout(t)?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line =
        String::from_utf8_lossy(req.split(|&b| b == b'\n').next().unwrap_or(&[])).into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let latest = LATEST.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (code, ctype, body) = match (method, path, latest) {
        ("GET", "/metrics" | "/" | "/status", None) => (
            "503 Service Unavailable",
            "text/plain",
            "no status yet\n".to_string(),
        ),
        ("GET", "/metrics" | "/", Some((r, at))) => (
            "200 OK",
            "text/plain; version=0.0.4",
            r.metrics(at.elapsed().as_millis() as u64),
        ),
        ("GET", "/status", Some((r, at))) => (
            "200 OK",
            "application/json",
            serde_json::to_string(&Listed {
                report: r,
                status_age_ms: at.elapsed().as_millis() as u64,
            })
            .unwrap_or_default(),
        ),
        ("GET", _, _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    write!(
        c,
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A node's report as `/status` serves it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Listed {
    #[serde(flatten)]
    pub report: Report,
    pub status_age_ms: u64,
}

/// Fetch `http://addr/status` (a node's `--metrics` address).
pub fn fetch(addr: &str) -> anyhow::Result<Listed> {
    use anyhow::Context as _;
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let sa = addr
        .to_socket_addrs()
        .with_context(|| format!("{addr}: not HOST:PORT"))?
        .next()
        .with_context(|| format!("{addr}: no address"))?;
    let t = std::time::Duration::from_secs(2);
    let mut c = std::net::TcpStream::connect_timeout(&sa, t)?;
    c.set_read_timeout(Some(t))?;
    c.set_write_timeout(Some(t))?;
    write!(c, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = Vec::new();
    c.take(1 << 20).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP answer (is this a --metrics address?)")?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        anyhow::bail!("answered {status:?}");
    }
    serde_json::from_str(body).context("not a hotstandby status")
}

/// `hotstandby list ADDR...`: one line per node, as `patronictl list`.
/// Exit status 1 when a node did not answer.
pub fn list(addrs: &[String]) -> anyhow::Result<u8> {
    println!(
        "{:<24} {:<9} {:<14} {:>5} {:<12} {:>12} {:>10}",
        "NODE", "ROLE", "STATE", "EPOCH", "PROTECTION", "LAG", "HEARD"
    );
    let mut bad = 0;
    for a in addrs {
        match fetch(a) {
            Ok(l) => {
                let r = &l.report;
                let role = if r.stepped_down { "stepped" } else { &r.role };
                let (prot, lag) = match (&r.primary, &r.standby) {
                    (Some(p), _) => (
                        p.protection.map_or("-", |p| match p {
                            Protection::Protected => "protected",
                            Protection::CatchingUp => "catching-up",
                            Protection::Unprotected => "UNPROTECTED",
                            Protection::SteppedDown => "stepped-down",
                        }),
                        format!("{} B", p.unacked_bytes),
                    ),
                    (None, Some(s)) => ("-", format!("{} B", s.replay_lag_bytes)),
                    _ => ("-", "-".into()),
                };
                let heard = r
                    .last_heard_ms
                    .map_or("never".into(), |ms| format!("{ms} ms"));
                let stale = if l.status_age_ms > 2000 {
                    " (stale)"
                } else {
                    ""
                };
                println!(
                    "{a:<24} {role:<9} {:<14} {:>5} {prot:<12} {lag:>12} {heard:>10}{stale}",
                    r.state, r.epoch
                );
            }
            Err(e) => {
                bad += 1;
                println!("{a:<24} unreachable: {e:#}");
            }
        }
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

#[derive(Default)]
struct Metrics {
    out: String,
    seen: std::collections::HashSet<&'static str>,
}

impl Metrics {
    fn head(&mut self, name: &'static str, help: &str, kind: &str) {
        if self.seen.insert(name) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
    }

    fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.head(name, help, "gauge");
        let _ = writeln!(self.out, "{name}{} {v}", labels_text(labels));
    }

    fn counter(&mut self, name: &'static str, help: &str, v: f64) {
        self.head(name, help, "counter");
        let _ = writeln!(self.out, "{name} {v}");
    }

    fn histogram(&mut self, name: &'static str, help: &str, buckets: &[(u64, u64)], sum: f64) {
        self.head(name, help, "histogram");
        let mut total = 0;
        for &(le_us, n) in buckets {
            let le = if le_us == u64::MAX {
                "+Inf".to_string()
            } else {
                format!("{}", le_us as f64 / 1e6)
            };
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {n}");
            total = n;
        }
        let _ = writeln!(self.out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> Report {
        Report {
            role: "primary".into(),
            epoch: 3,
            state: "Protected".into(),
            peer: Some("198.51.100.2:7600".into()),
            log_bytes: 1000,
            last_heard_ms: Some(12),
            pid: 42,
            primary: Some(PrimaryPart {
                link: "connected".into(),
                protection: Some(Protection::Protected),
                unacked_bytes: 10,
                unacked_ms: 1,
                ack_p50_us: 100,
                ack_p99_us: 900,
                throttled_ms: 0,
                events: 77,
                output_rule: Some(Rule {
                    held: 2,
                    released: 50,
                    hold_p50_us: 300,
                    hold_p99_us: 800,
                    hold_buckets: vec![(100, 5), (1000, 49), (u64::MAX, 50)],
                    hold_sum_us: 20_000,
                }),
                standbys: vec![Link {
                    addr: "198.51.100.2:40000".into(),
                    acked_bytes: 990,
                    lag_bytes: 10,
                    in_quorum: true,
                    last_heard_ms: 12,
                }],
                sync_standbys: 1,
            }),
            ..Report::default()
        }
    }

    #[test]
    fn text_keeps_the_status_lines() {
        let t = primary().text();
        assert!(t.contains("role:        primary (epoch 3)\n"), "{t}");
        assert!(t.contains("protection:  PROTECTED\n"), "{t}");
        assert!(t.contains("state:       Protected (connected)\n"), "{t}");
        assert!(t.contains("recent hold p50 300 us, p99 800 us"), "{t}");
        let mut r = primary();
        r.primary.as_mut().unwrap().output_rule = None;
        assert!(r.text().contains("output rule: off (no --vip)"));
        assert!(Report::stepped_down(4).text().contains("STEPPED DOWN"));
    }

    #[test]
    fn json_round_trips() {
        let r = primary();
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"protection\":\"protected\""), "{j}");
        let back: Report = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let m = primary().metrics(250);
        assert!(m.contains("hotstandby_role{role=\"primary\"} 1\n"), "{m}");
        assert!(m.contains("hotstandby_protected 1\n"), "{m}");
        assert!(m.contains("hotstandby_epoch 3\n"), "{m}");
        assert!(m.contains("hotstandby_standbys 1\n"), "{m}");
        assert!(
            m.contains("hotstandby_standby_lag_bytes{standby=\"198.51.100.2:40000\"} 10\n"),
            "{m}"
        );
        assert!(m.contains("hotstandby_output_rule_hold_seconds_bucket{le=\"0.0001\"} 5\n"));
        assert!(m.contains("hotstandby_output_rule_hold_seconds_bucket{le=\"+Inf\"} 50\n"));
        assert!(m.contains("hotstandby_output_rule_hold_seconds_count 50\n"));
        assert!(
            m.contains("hotstandby_output_rule_hold_seconds_sum 0.02\n"),
            "{m}"
        );
        assert!(m.contains("hotstandby_status_age_seconds 0.25\n"));
        // One HELP/TYPE per family, also for labelled series.
        assert_eq!(
            m.matches("# TYPE hotstandby_ack_latency_seconds").count(),
            1
        );
        // Every sample line is "name{labels} value".
        for l in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, v) = l.rsplit_once(' ').unwrap();
            assert!(name.starts_with("hotstandby_"), "{l}");
            v.parse::<f64>().unwrap();
        }
    }
}
