//! The network side of a takeover.
//!
//! - [`tcp`]: read the TCP state of a connection the program just accepted
//!   (primary) and rebuild it in place on the program's own socket with
//!   `TCP_REPAIR` (standby going live).
//! - [`nfqueue`]: a minimal netlink client for `NFQUEUE` (packets held in
//!   the kernel until the supervisor gives a verdict).
//! - [`gate`]: the output rule: a packet of the program's connections leaves
//!   only once the standby holds the log position that produced it.
//! - [`rules`]: the iptables rules that send those packets to the queue.
//! - [`arp`]: whether another host holds the virtual IP (partition test).
//! - [`observer`]: the recorder's network side (capture + gate).

pub mod arp;
pub mod gate;
pub mod nfqueue;
pub mod observer;
pub mod rules;
pub mod tcp;

/// Errors of the network side, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{step}: {source}")]
    Os {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("iptables {args}: {msg}")]
    Iptables { args: String, msg: String },
}

pub(crate) fn os(step: &'static str) -> NetError {
    NetError::Os {
        step,
        source: std::io::Error::last_os_error(),
    }
}
