//! The node's configuration file (`--config FILE`, TOML): everything the
//! flags of `run` and `standby` hold; a flag given on the command line wins
//! over the file. One file can serve a host in both roles:
//!
//! ```toml
//! log = "/var/lib/hotstandby/log"
//! cert = "/etc/hotstandby/node.crt"
//! key = "/etc/hotstandby/node.key"
//! peer_cert = "/etc/hotstandby/peer.crt"
//! data_dir = "/srv/redis"
//! vip = "198.51.100.10/24"
//! dev = "eth0"
//! metrics = "127.0.0.1:9464"
//!
//! [run]
//! listen = "0.0.0.0:7600"
//! command = ["redis-server", "/etc/redis/redis.conf"]
//!
//! [standby]
//! primary = "198.51.100.1:7600"
//! listen = "198.51.100.2:7600"
//! ```

use anyhow::Context;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole file. Unknown keys are errors (a misspelt key must not be
/// silently ignored by an HA tool).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub log: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub peer_cert: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub heartbeat_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_lag_mb: Option<u64>,
    pub vip: Option<String>,
    pub dev: Option<String>,
    pub queue_num: Option<u16>,
    pub metrics: Option<SocketAddr>,
    pub arbiter: Option<String>,
    pub service: Option<String>,
    pub node_name: Option<String>,
    pub arbiter_ttl_ms: Option<u64>,
    pub sync_standbys: Option<usize>,
    pub arbiter_ca: Option<PathBuf>,
    pub arbiter_cert: Option<PathBuf>,
    pub arbiter_key: Option<PathBuf>,
    #[serde(default)]
    pub run: Run,
    #[serde(default)]
    pub standby: Standby,
}

/// `[run]`: the primary's own keys.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub listen: Option<SocketAddr>,
    /// The program and its arguments.
    pub command: Option<Vec<String>>,
}

/// `[standby]`: the standby's own keys.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Standby {
    pub primary: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
    /// Log bytes between checkpoints, like "64M".
    pub checkpoint_every: Option<String>,
}

impl File {
    /// Read and check `path`; the error names the file, the key and the
    /// line.
    pub fn load(path: &Path) -> anyhow::Result<File> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<File> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let f = File::parse(&example).unwrap();
        assert_eq!(f.log.as_deref(), Some(Path::new("/var/lib/hotstandby/log")));
        assert_eq!(f.run.command.as_ref().unwrap()[0], "redis-server");
        assert_eq!(
            f.standby.primary,
            Some("198.51.100.1:7600".parse().unwrap())
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = File::parse("heartbeat_ms = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_ms"), "{e}");
        let e = File::parse("log = \"/l\"\nhearbeat_ms = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hearbeat_ms"), "{e}");
        let e = File::parse("[run]\nlisten = \"not an address\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = File::parse("[standby]\nprimray = \"198.51.100.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("primray"), "{e}");
    }
}
