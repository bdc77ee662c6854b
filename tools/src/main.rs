//! The `hotstandby` command.

mod demo;
mod logcmd;

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
    },
    /// Record a real redis-server serving a client, replay it offline and
    /// show that the replay took exactly the recorded path.
    Demo,
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
    /// Inspect a log.
    Log {
        #[command(subcommand)]
        cmd: logcmd::LogCmd,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOTSTANDBY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
            })
            .with_context(|| format!("recording into {}", log.display()))?;
            tracing::info!(events = out.events, bytes = out.bytes, "recorded");
            Ok(out.exit_status.clamp(0, 255) as u8)
        }
        Cmd::Replay {
            log,
            show_output,
            go_live,
        } => logcmd::replay(&log, show_output, go_live),
        Cmd::Log { cmd } => logcmd::run(cmd),
        Cmd::Demo => demo::run(),
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
