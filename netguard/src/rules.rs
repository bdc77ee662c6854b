//! The iptables rule that sends the program's packets to the output queue.
//!
//! One rule in the OUTPUT chain of the `filter` table: TCP from the virtual
//! IP goes to NFQUEUE `num`, without `--queue-bypass`, so that when no
//! supervisor reads the queue (it died) the kernel drops those packets
//! instead of sending them. The rule stays after a crash on purpose; a
//! clean exit removes it.

use crate::NetError;
use std::net::Ipv4Addr;
use std::process::Command;

/// An installed rule, removed on drop.
#[derive(Debug)]
pub struct OutputRule {
    spec: Vec<String>,
    installed: bool,
}

fn iptables(args: &[String]) -> Result<(), NetError> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| NetError::Iptables {
            args: args.join(" "),
            msg: format!("cannot run iptables: {e} (is the iptables package installed?)"),
        })?;
    if !out.status.success() {
        return Err(NetError::Iptables {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl OutputRule {
    /// Send TCP from `vip` to NFQUEUE `num` (kept if already there).
    pub fn install(vip: Ipv4Addr, num: u16) -> Result<Self, NetError> {
        let spec: Vec<String> = [
            "OUTPUT",
            "-s",
            &vip.to_string(),
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            &format!("hotstandby-output-rule-{num}"),
            "-j",
            "NFQUEUE",
            "--queue-num",
            &num.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut check = vec!["-C".to_string()];
        check.extend(spec.iter().cloned());
        if iptables(&check).is_err() {
            let mut add = vec!["-I".to_string()];
            add.extend(spec.iter().cloned());
            iptables(&add)?;
        }
        Ok(OutputRule {
            spec,
            installed: true,
        })
    }

    /// Leave the rule in place (the process steps down or dies: nothing of
    /// the old program may leave this host).
    pub fn keep(mut self) {
        self.installed = false;
    }
}

impl Drop for OutputRule {
    fn drop(&mut self) {
        if self.installed {
            let mut del = vec!["-D".to_string()];
            del.extend(self.spec.iter().cloned());
            if let Err(e) = iptables(&del) {
                tracing::warn!("removing the output rule: {e}");
            }
        }
    }
}
