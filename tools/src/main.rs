//! The `hotstandby` command.

mod config;
mod demo;
mod logcmd;
mod node;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hotstandby",
    version,
    about = "Keep a live copy of a Linux server process and fail over to it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run CMD under the supervisor and record it into a log directory.
    /// Exits with CMD's status (128+N when killed by signal N).
    Record {
        /// New log directory to create.
        #[arg(long)]
        log: PathBuf,
        /// Data directory whose starting state is saved in the log, so
        /// replay starts from the same files.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Re-run the recorded program, feeding it the log. Exit 0: replayed
    /// with no divergence; 3: divergence (first mismatch printed); 4: the
    /// log is corrupt.
    Replay {
        #[arg(long)]
        log: PathBuf,
        /// Write the program's external output (stdout/stderr) as replay re-creates it.
        #[arg(long)]
        show_output: bool,
        /// If the log was cut off (no trailer: the recorder died), let the
        /// program continue live from where the log ends, appending to the
        /// same log: what a standby does when its primary dies.
        #[arg(long)]
        go_live: bool,
        /// Take a checkpoint of the replayed program every this many log
        /// bytes (suffixes K, M, G) or this long (s, m, h: "30s"), at the
        /// next clean point.
        #[arg(long, value_parser = parse_every)]
        checkpoint_every: Option<hotstandby_replayer::checkpoint::Every>,
        /// Where checkpoints go (default: LOG/checkpoints); the last two are kept.
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// Start from this checkpoint (taken from this log) instead of the
        /// first event.
        #[arg(long)]
        from_checkpoint: Option<PathBuf>,
    },
    /// A whole network takeover on this machine (root): a lab of network
    /// namespaces, redis-server under `run` with a virtual IP, a standby,
    /// clients with open connections; the primary host dies and the same
    /// connections carry on with the standby.
    Demo,
    /// The built-in INCR/GET/PING server the demo protects where
    /// redis-server is not installed.
    #[command(hide = true)]
    DemoServer {
        #[arg(long, default_value_t = 6379)]
        port: u16,
    },
    /// Benchmarks only (benches/speed.sh): send TCP from VIP through the
    /// output queue and accept every packet at once, to measure what the
    /// queue itself costs apart from waiting for the standby. Protects
    /// nothing. Runs until killed.
    #[command(hide = true)]
    QueueAcceptAll {
        #[arg(long)]
        vip: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 7311)]
        queue_num: u16,
    },
    /// Write a node key (owner-only) and a self-signed certificate into DIR,
    /// for the mutual, pinned TLS between primary and standby.
    Keygen {
        /// Directory to create (0700); refuses to overwrite a key.
        #[arg(long)]
        out: PathBuf,
        /// Name in the certificate.
        #[arg(long, default_value = "hotstandby-node")]
        name: String,
    },
    /// Run CMD as a protected primary: record it into DIR and stream the log
    /// to a standby over QUIC (mutual TLS, pinned certificates).
    Run {
        /// Address to accept the standby on, e.g. 0.0.0.0:7600.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        node: NodeArgs,
        /// The program and its arguments (or `command` in `[run]` of the
        /// config file).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Follow a primary: receive its log, replay the program in lockstep,
    /// and take over when the primary's heartbeats stop.
    Standby {
        /// The primary's address.
        #[arg(long)]
        primary: Option<std::net::SocketAddr>,
        #[command(flatten)]
        node: NodeArgs,
        /// Where to accept a new standby after taking over (default:
        /// 0.0.0.0 and the primary's port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Checkpoint the replayed program every this many log bytes
        /// (suffixes K, M, G) or this long (s, m, h: "10m"), upload each to
        /// the primary and delete the log before the older of the two
        /// checkpoints kept; a restarted standby resumes from its newest
        /// checkpoint. Off by default (docs/design.md, "Checkpoints").
        #[arg(long, value_parser = parse_every)]
        checkpoint_every: Option<hotstandby_replayer::checkpoint::Every>,
    },
    /// Role, peer, lag, heartbeats of the node using log DIR.
    Status {
        #[arg(long)]
        log: PathBuf,
        /// The node's report as one JSON object (with `status_age_ms` and
        /// `stale`), for scripts and monitoring.
        #[arg(long)]
        json: bool,
    },
    /// One line per node (role, state, epoch, protection, lag), asked of
    /// each node's --metrics address (its /status).
    List {
        /// The nodes' --metrics addresses (HOST:PORT).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Inspect a log.
    Log {
        #[command(subcommand)]
        cmd: logcmd::LogCmd,
    },
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Read these settings from a TOML file (docs/operations.md); a flag
    /// given here wins over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log directory of this node.
    #[arg(long)]
    log: Option<PathBuf>,
    /// This node's certificate (from `keygen`).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This node's key (from `keygen`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The peer's certificate: the only one accepted.
    #[arg(long)]
    peer_cert: Option<PathBuf>,
    /// The program's data directory: on the primary, snapshotted into the
    /// log (as with `record`); on the standby, this host's copy, mounted
    /// over the recorded one for the program (default: the recorded path).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval [default: 50].
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Silence after which the peer is considered gone [default: 300].
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Unacknowledged log (MiB) above which the primary slows its program
    /// [default: 64].
    #[arg(long)]
    max_lag_mb: Option<u64>,
    /// Virtual IP (ADDR/PREFIX) held by the primary and taken, with
    /// gratuitous ARP, by the standby when it goes live. With it, the output
    /// rule holds the program's TCP packets from this address until the
    /// standby has their log, and the standby rebuilds open connections.
    #[arg(long)]
    vip: Option<String>,
    /// Interface for --vip.
    #[arg(long)]
    dev: Option<String>,
    /// NFQUEUE number used by the output rule (with --vip) [default: 7311].
    #[arg(long)]
    queue_num: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR/metrics (role, epoch, lag,
    /// events, output rule, failovers). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// An etcd cluster as arbiter (etcd://HOST:PORT[,HOST:PORT...]): only
    /// the holder of the service's leader key releases output; a standby
    /// goes live only once it holds the key.
    #[arg(long, value_name = "URL")]
    arbiter: Option<String>,
    /// The protected service's name in the arbiter [default: hotstandby].
    #[arg(long)]
    service: Option<String>,
    /// This node's name in the arbiter [default: HOSTNAME-PID].
    #[arg(long)]
    node_name: Option<String>,
    /// Speak TLS to etcd, verifying its members against the CA
    /// certificates in this PEM file.
    #[arg(long, value_name = "FILE")]
    arbiter_ca: Option<PathBuf>,
    /// Client certificate for etcd (mutual TLS, with --arbiter-key).
    #[arg(long, value_name = "FILE")]
    arbiter_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, value_name = "FILE")]
    arbiter_key: Option<PathBuf>,
    /// Standbys that must hold the log before the primary releases output
    /// [default: 1]; more than one needs --arbiter (which also lets a
    /// primary stream to several standbys).
    #[arg(long)]
    sync_standbys: Option<usize>,
    /// The leader key's lease [default: 5000; at least 2000; keep it above
    /// 3 × etcd's election timeout so an etcd leader change is ridden out].
    #[arg(long)]
    arbiter_ttl_ms: Option<u64>,
}

/// A node's settings: flags over the config file over the defaults.
struct NodeSettings {
    log: PathBuf,
    tls: node::Tls,
    cfg: hotstandby_protocol::session::Config,
    vip: Option<node::Vip>,
    data_dir: Option<PathBuf>,
}

/// A checkpoint interval: a byte count ("64M") or a time ("30s", "10m", "1h").
fn parse_every(s: &str) -> Result<hotstandby_replayer::checkpoint::Every, String> {
    use hotstandby_replayer::checkpoint::Every;
    let t = s.trim();
    let secs = |n: &str, mul: u64| -> Result<Every, String> {
        let v: u64 = n.parse().map_err(|_| {
            format!("{s:?} is not a time (like 30s or 10m) or a byte count (like 64M)")
        })?;
        if v == 0 {
            return Err(format!("{s:?}: a checkpoint interval must be more than 0"));
        }
        Ok(Every::Time(std::time::Duration::from_secs(v * mul)))
    };
    match t.chars().last() {
        Some('s') => secs(&t[..t.len() - 1], 1),
        Some('h') => secs(&t[..t.len() - 1], 3600),
        Some('m') if t.len() > 1 && t[..t.len() - 1].chars().all(|c| c.is_ascii_digit()) => {
            secs(&t[..t.len() - 1], 60)
        }
        _ => parse_bytes(t).map(Every::Bytes).map_err(|_| {
            format!("{s:?} is not a byte count (like 64M) or a time (like 30s, 10m, 1h)")
        }),
    }
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (like 64M)"))?;
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a usable byte count"))
}

/// `--FLAG` or `KEY` of the config file, or an error naming both.
fn need<T>(v: Option<T>, flag: &str, key: &str) -> anyhow::Result<T> {
    v.ok_or_else(|| anyhow::anyhow!("--{flag} is required (or `{key}` in the --config file)"))
}

impl NodeArgs {
    /// The config file (empty without `--config`).
    fn file(&self) -> anyhow::Result<config::File> {
        match &self.config {
            Some(p) => config::File::load(p),
            None => Ok(config::File::default()),
        }
    }

    fn settle(self, f: config::File) -> anyhow::Result<NodeSettings> {
        let vip = match (self.vip.or(f.vip), self.dev.or(f.dev)) {
            (None, None) => None,
            (Some(cidr), Some(dev)) => {
                let ok = cidr
                    .split_once('/')
                    .map(|(a, p)| a.parse::<std::net::IpAddr>().is_ok() && p.parse::<u8>().is_ok())
                    .unwrap_or(false);
                if !ok {
                    anyhow::bail!(
                        "--vip must be ADDRESS/PREFIX, e.g. 198.51.100.10/24 (got {cidr})"
                    );
                }
                Some(node::Vip {
                    cidr,
                    dev,
                    queue: self.queue_num.or(f.queue_num).unwrap_or(7311),
                })
            }
            _ => anyhow::bail!("--vip and --dev go together"),
        };
        let heartbeat_ms = self.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(50);
        let timeout_ms = self.timeout_ms.or(f.timeout_ms).unwrap_or(300);
        if timeout_ms < 2 * heartbeat_ms {
            anyhow::bail!(
                "--timeout-ms ({timeout_ms}) must be at least twice --heartbeat-ms ({heartbeat_ms})"
            );
        }
        let log = need(self.log.or(f.log), "log", "log")?;
        let tls = node::Tls {
            cert: need(self.cert.or(f.cert), "cert", "cert")?,
            key: need(self.key.or(f.key), "key", "key")?,
            peer_cert: need(self.peer_cert.or(f.peer_cert), "peer-cert", "peer_cert")?,
        };
        let sync_standbys = self.sync_standbys.or(f.sync_standbys).unwrap_or(1);
        let arbiter = self.arbiter.or(f.arbiter);
        if sync_standbys == 0 {
            anyhow::bail!("--sync-standbys must be at least 1");
        }
        if sync_standbys > 1 && arbiter.is_none() {
            anyhow::bail!("--sync-standbys {sync_standbys} needs --arbiter: without one a primary has a single standby");
        }
        if let Some(url) = arbiter {
            let ttl = self.arbiter_ttl_ms.or(f.arbiter_ttl_ms).unwrap_or(5000);
            if ttl < 2000 {
                anyhow::bail!("--arbiter-ttl-ms must be at least 2000 (etcd's shortest lease is about 1.5 s; got {ttl})");
            }
            let ttl = std::time::Duration::from_millis(ttl);
            let mut etcd = node::arbiter::Etcd::parse(
                &url,
                (ttl / 10).max(std::time::Duration::from_millis(200)),
            )?;
            let ca = self.arbiter_ca.or(f.arbiter_ca);
            let client = match (
                self.arbiter_cert.or(f.arbiter_cert),
                self.arbiter_key.or(f.arbiter_key),
            ) {
                (None, None) => None,
                (Some(c), Some(k)) => Some((c, k)),
                _ => anyhow::bail!("--arbiter-cert and --arbiter-key go together"),
            };
            match (ca, &client) {
                (Some(ca), _) => {
                    etcd = etcd.with_tls(
                        &ca,
                        client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                    )?;
                }
                (None, Some(_)) => anyhow::bail!(
                    "--arbiter-cert needs --arbiter-ca (the CA that signed etcd's certificate)"
                ),
                (None, None) => {}
            }
            let name = self.node_name.or(f.node_name).unwrap_or_else(|| {
                let h = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "node".into());
                format!("{h}-{}", std::process::id())
            });
            let service = self
                .service
                .or(f.service)
                .unwrap_or_else(|| "hotstandby".into());
            node::arbiter::install(node::arbiter::Leadership::new(etcd, &service, &name, ttl));
        }
        if let Some(addr) = self.metrics.or(f.metrics) {
            let at = node::report::serve_metrics(addr)?;
            tracing::info!("metrics at http://{at}/metrics");
        }
        let cfg = hotstandby_protocol::session::Config {
            heartbeat: std::time::Duration::from_millis(heartbeat_ms),
            timeout: std::time::Duration::from_millis(timeout_ms),
            max_unacked: self.max_lag_mb.or(f.max_lag_mb).unwrap_or(64) << 20,
            sync_standbys,
            ..Default::default()
        };
        Ok(NodeSettings {
            log,
            tls,
            cfg,
            vip,
            data_dir: self.data_dir.or(f.data_dir),
        })
    }
}

/// What the node says when neither `RUST_LOG` nor `HOTSTANDBY_LOG` is set:
/// our own messages from `info` up, everybody else's warnings.
const DEFAULT_LOG: &str = "warn,hotstandby=info,hotstandby_recorder=info,hotstandby_replayer=info,\
hotstandby_netguard=info,hotstandby_tracer=info,hotstandby_transport=info,hotstandby_protocol=info";

/// The log on stderr: `RUST_LOG` (or `HOTSTANDBY_LOG`) filters it;
/// `HOTSTANDBY_LOG_FORMAT=json` makes it one JSON object per line
/// (timestamp, level, target, message, fields) for a log collector, the
/// default is a plain `hotstandby: message` per line.
fn init_log() -> Result<(), String> {
    let filter = ["RUST_LOG", "HOTSTANDBY_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_else(|| DEFAULT_LOG.into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("RUST_LOG/HOTSTANDBY_LOG {filter:?}: {e}"))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match std::env::var("HOTSTANDBY_LOG_FORMAT").as_deref() {
        Ok("json") => b.json().flatten_event(true).init(),
        Ok("text") | Err(_) => b.event_format(Plain).init(),
        Ok(other) => {
            return Err(format!(
                "HOTSTANDBY_LOG_FORMAT must be json or text (got {other:?})"
            ))
        }
    }
    Ok(())
}

/// `hotstandby: message field=value ...`, one line per event.
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        ev: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(w, "hotstandby: ")?;
        if *ev.metadata().level() == tracing::Level::ERROR {
            write!(w, "ERROR: ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), ev)?;
        writeln!(w)
    }
}

fn main() -> ExitCode {
    if let Err(e) = init_log() {
        eprintln!("hotstandby: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hotstandby: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message
/// already ends with (our errors often show their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.ends_with(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Record { log, data_dir, cmd } => {
            let out = hotstandby_recorder::record(&hotstandby_recorder::RecordOptions {
                log_dir: log.clone(),
                argv: cmd,
                data_dir,
                throttle: None,
                net: Some(hotstandby_netguard::observer::Observer::new(None)),
            })
            .with_context(|| format!("recording into {}", log.display()))?;
            tracing::info!(
                "recorded {} events ({} bytes) into {}",
                out.events,
                out.bytes,
                log.display()
            );
            Ok(out.exit_status.clamp(0, 255) as u8)
        }
        Cmd::Replay {
            log,
            show_output,
            go_live,
            checkpoint_every,
            checkpoint_dir,
            from_checkpoint,
        } => logcmd::replay(
            &log,
            show_output,
            go_live,
            logcmd::Checkpoints {
                every: checkpoint_every,
                dir: checkpoint_dir,
                from: from_checkpoint,
            },
        ),
        Cmd::Log { cmd } => logcmd::run(cmd),
        Cmd::Demo => demo::run(),
        Cmd::DemoServer { port } => demo::server(port),
        Cmd::QueueAcceptAll { vip, queue_num } => {
            let mut q = hotstandby_netguard::nfqueue::Queue::open(queue_num)?;
            let _rule = hotstandby_netguard::rules::OutputRule::install(vip, queue_num)?;
            tracing::info!("accepting every packet from {vip} on queue {queue_num}");
            let (mut got, mut v) = (Vec::new(), Vec::new());
            loop {
                q.wait(1000)?;
                got.clear();
                q.recv(&mut got)?;
                v.clear();
                v.extend(got.iter().map(|p| (p.id, true)));
                if !v.is_empty() {
                    q.verdicts(&v)?;
                }
            }
        }
        Cmd::Run {
            listen,
            node: n,
            cmd,
        } => {
            let mut f = n.file()?;
            let listen = need(listen.or(f.run.listen), "listen", "listen in [run]")?;
            let cmd = if cmd.is_empty() {
                f.run.command.take().unwrap_or_default()
            } else {
                cmd
            };
            if cmd.is_empty() {
                anyhow::bail!(
                    "no program to run: give it after the options (or `command` in [run] of the --config file)"
                );
            }
            let s = n.settle(f)?;
            node::run(listen, s.log, s.tls, s.cfg, s.data_dir, s.vip, cmd)
        }
        Cmd::Standby {
            primary,
            node: n,
            listen,
            checkpoint_every,
        } => {
            let f = n.file()?;
            let primary = need(
                primary.or(f.standby.primary),
                "primary",
                "primary in [standby]",
            )?;
            let listen = listen.or(f.standby.listen);
            let every = match (checkpoint_every, &f.standby.checkpoint_every) {
                (Some(v), _) => Some(v),
                (None, Some(v)) => Some(
                    parse_every(v)
                        .map_err(|e| anyhow::anyhow!("checkpoint_every in [standby]: {e}"))?,
                ),
                (None, None) => None,
            };
            let s = n.settle(f)?;
            node::standby(
                primary, s.log, s.tls, s.cfg, s.data_dir, listen, s.vip, every,
            )
        }
        Cmd::Status { log, json } => node::status(&log, json),
        Cmd::List { nodes } => node::report::list(&nodes),
        Cmd::Keygen { out, name } => {
            let (cert, key) = hotstandby_transport::keygen(&out, &name)?;
            println!("key:         {} (keep it secret; mode 0600)", key.display());
            println!(
                "certificate: {} (give it to the peer as --peer-cert)",
                cert.display()
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotstandby_replayer::checkpoint::Every;
    use std::time::Duration;

    #[test]
    fn checkpoint_intervals_are_bytes_or_times() {
        assert_eq!(parse_every("64M"), Ok(Every::Bytes(64 << 20)));
        assert_eq!(parse_every("512K"), Ok(Every::Bytes(512 << 10)));
        assert_eq!(parse_every("1G"), Ok(Every::Bytes(1 << 30)));
        assert_eq!(parse_every("4096"), Ok(Every::Bytes(4096)));
        assert_eq!(parse_every("30s"), Ok(Every::Time(Duration::from_secs(30))));
        assert_eq!(
            parse_every("10m"),
            Ok(Every::Time(Duration::from_secs(600)))
        );
        assert_eq!(
            parse_every("2h"),
            Ok(Every::Time(Duration::from_secs(7200)))
        );
        for bad in ["0s", "0", "x", "1x", "m", "-5M", ""] {
            assert!(parse_every(bad).is_err(), "{bad:?} accepted");
        }
        let p = Every::Time(Duration::from_secs(5)).policy("d".into(), true);
        assert_eq!(
            (p.every_bytes, p.every),
            (u64::MAX, Some(Duration::from_secs(5)))
        );
    }
}
