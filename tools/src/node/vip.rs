//! The virtual IP that belongs to whichever node is primary, and the output
//! rule in force on the host that holds it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hotstandby_netguard::gate::Gate;
use hotstandby_netguard::nfqueue::Queue;
use hotstandby_netguard::rules::OutputRule;

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
    pub fn ip(&self) -> &str {
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
                    tracing::error!("OUTPUT RULE FAILED: {e}; the program's packets are now dropped (fail closed)");
                }
                r
            })?;
        let rule = OutputRule::install(ip, self.queue)?;
        tracing::info!(
            "output rule on: TCP from {ip} leaves only once the standby holds its log (NFQUEUE {})",
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
                tracing::warn!("cannot probe the virtual IP: {e}");
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
            Ok(_) => tracing::info!(
                "took the virtual IP {} on {} and announced it (gratuitous ARP)",
                self.cidr,
                self.dev
            ),
            Err(e) => tracing::warn!(
                "took the virtual IP {} but could not run arping to announce it: {e}",
                self.cidr
            ),
        }
    }
}
