//! The replication session as two sans-IO state machines, [`Primary`] and
//! [`Standby`]: inputs arrive through `handle_*` calls, outputs leave through
//! `poll_*` calls, and time is always passed in (`now`). No sockets, no
//! clocks, no threads: the QUIC driver around them is thin, and the tests
//! below run both sides on virtual time over a simulated lossy link.
//!
//! ```text
//!  primary                                   standby
//!     |  <======= QUIC handshake, mutual TLS, pinned certificates =======> |
//!     |  <------------------ Hello{standby, resume_offset} --------------  |
//!     |  -------------------- Hello{primary, epoch} -------------------->  |
//!     |  ------------- Log{offset, bytes} (stream, in order) ---------->  |  append to own log
//!     |  <-------------------- Ack{offset} (stream) --------------------  |  after the bytes are written
//!     |  <- - - - - Heartbeat{role, epoch, offset} (datagrams, both ways) - ->|
//!     |                                                                   |
//!     x  primary dies: no heartbeat for `timeout`                         |
//!                                                    PrimaryLost: epoch+1, go live
//! ```
//!
//! A primary that hears a heartbeat from a *primary* with a higher epoch has
//! been replaced and must step down.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::wire::{Message, Role, VERSION_MAX, VERSION_MIN};

/// Timing and memory limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Silence after which the peer is considered gone.
    pub timeout: Duration,
    /// Unacknowledged log bytes above which the primary slows its program.
    pub max_unacked: u64,
    /// Largest log chunk per message.
    pub chunk: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            max_unacked: 64 << 20,
            chunk: 256 << 10,
        }
    }
}

/// Protocol violations and refusals.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    /// No protocol version in common.
    #[error(
        "peer speaks protocol versions {min}..={max}, this build {VERSION_MIN}..={VERSION_MAX}"
    )]
    Version { min: u16, max: u16 },
    /// The standby's log directory holds another recording.
    #[error("the standby's log directory holds a different log (another program or another run); give the standby an empty log directory")]
    WrongProgram,
    /// The peer claims the same role as us.
    #[error("the peer is also a {0:?}")]
    SameRole(Role),
    /// Log bytes arrived out of order.
    #[error("log bytes at offset {got}, expected {expected}")]
    Gap { expected: u64, got: u64 },
    /// The standby acknowledged bytes that were never sent.
    #[error("acknowledgement of offset {acked} beyond the {sent} bytes sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    /// The standby asks to resume past the end of the log.
    #[error("standby asks to resume at offset {asked}, the log has {have} bytes")]
    ResumeBeyondEnd { asked: u64, have: u64 },
    /// A message that is not valid at this point of the session.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    /// The peer refused the session.
    #[error("peer refused: {0}")]
    Refused(String),
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A message on the reliable stream.
    Stream(Message),
    /// Log bytes `[offset, offset+len)` on the stream (the driver reads
    /// them from the log file and sends `Message::Log`).
    LogRange { offset: u64, len: u64 },
    /// An unreliable datagram (heartbeats).
    Datagram(Message),
}

/// Where the primary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// No standby connected: serving unprotected.
    Unprotected,
    /// A standby is connected and catching up from `resume_offset`.
    CatchingUp,
    /// A standby holds the log up to within `max_unacked`.
    Protected,
    /// A newer primary exists: this one must stop.
    SteppedDown,
}

/// A snapshot for `hotstandby status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    pub state: String,
    pub epoch: u64,
    /// Log bytes the standby has not acknowledged (primary) or that arrived
    /// but are not yet written (standby).
    pub lag_bytes: u64,
    /// Time since the peer was last heard from.
    pub last_heard: Option<Duration>,
    pub log_bytes: u64,
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    hello_done: bool,
}

/// The primary's side of the session.
#[derive(Debug)]
pub struct Primary {
    cfg: Config,
    epoch: u64,
    exe_sha256: [u8; 32],
    log_end: u64,
    sent: u64,
    acked: u64,
    peer: Option<Peer>,
    next_heartbeat: Option<Instant>,
    state: PrimaryState,
    /// The primaries of this log before this one (told to each standby).
    former: Vec<std::net::SocketAddr>,
    out: std::collections::VecDeque<Transmit>,
}

impl Primary {
    pub fn new(cfg: Config, epoch: u64, exe_sha256: [u8; 32]) -> Self {
        Primary {
            cfg,
            epoch,
            exe_sha256,
            log_end: 0,
            sent: 0,
            acked: 0,
            peer: None,
            next_heartbeat: None,
            state: PrimaryState::Unprotected,
            former: Vec::new(),
            out: Default::default(),
        }
    }

    /// The primaries of this log before this one: a standby keeps them and
    /// warns them all if it takes over.
    pub fn set_former(&mut self, former: Vec<std::net::SocketAddr>) {
        self.former = former;
    }

    pub fn state(&self) -> PrimaryState {
        self.state
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes the standby has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The log now holds `end` bytes.
    pub fn log_appended(&mut self, end: u64) {
        self.log_end = self.log_end.max(end);
    }

    /// An authenticated standby connected.
    pub fn handle_connected(&mut self, now: Instant) {
        self.peer = Some(Peer {
            last_heard: now,
            hello_done: false,
        });
        self.out.clear();
        self.next_heartbeat = Some(now);
    }

    /// The standby's connection is gone.
    pub fn handle_disconnected(&mut self) {
        self.peer = None;
        self.out.clear();
        self.next_heartbeat = None;
        if self.state != PrimaryState::SteppedDown {
            self.state = PrimaryState::Unprotected;
        }
    }

    /// A message from the standby (stream or datagram).
    pub fn handle_message(&mut self, msg: Message, now: Instant) -> Result<(), SessionError> {
        let Some(peer) = self.peer.as_mut() else {
            return Err(SessionError::Unexpected("message without a connection"));
        };
        peer.last_heard = now;
        match msg {
            Message::Hello {
                role: Role::Primary,
                epoch,
                ..
            } if epoch > self.epoch => {
                // The former standby took over and tells us so.
                self.state = PrimaryState::SteppedDown;
                Ok(())
            }
            Message::Hello {
                version_min,
                version_max,
                role,
                resume_offset,
                exe_sha256,
                ..
            } => {
                if peer.hello_done {
                    return Err(SessionError::Unexpected("second hello"));
                }
                if version_max < VERSION_MIN || version_min > VERSION_MAX {
                    self.refuse("no common protocol version");
                    return Err(SessionError::Version {
                        min: version_min,
                        max: version_max,
                    });
                }
                if role != Role::Standby {
                    self.refuse("both nodes are primaries");
                    return Err(SessionError::SameRole(role));
                }
                // All zeros: the standby has no log yet and checks the
                // program identity in the log header itself.
                if exe_sha256 != [0; 32] && exe_sha256 != self.exe_sha256 {
                    self.refuse("the standby's log directory holds a different log (another program or another run); give the standby an empty log directory");
                    return Err(SessionError::WrongProgram);
                }
                if resume_offset > self.log_end {
                    self.refuse(
                        "the standby's log is longer than the primary's: it belongs to another run",
                    );
                    return Err(SessionError::ResumeBeyondEnd {
                        asked: resume_offset,
                        have: self.log_end,
                    });
                }
                peer.hello_done = true;
                self.sent = resume_offset;
                self.acked = resume_offset;
                self.state = PrimaryState::CatchingUp;
                self.out.push_back(Transmit::Stream(Message::Hello {
                    version_min: VERSION_MIN,
                    version_max: VERSION_MAX,
                    role: Role::Primary,
                    epoch: self.epoch,
                    resume_offset,
                    exe_sha256: self.exe_sha256,
                }));
                self.out.push_back(Transmit::Stream(Message::Former {
                    addrs: self.former.clone(),
                }));
                Ok(())
            }
            Message::Ack { offset } => {
                if offset > self.sent {
                    return Err(SessionError::AckBeyondSent {
                        acked: offset,
                        sent: self.sent,
                    });
                }
                self.acked = self.acked.max(offset);
                if self.state == PrimaryState::CatchingUp
                    && self.log_end - self.acked <= self.cfg.max_unacked / 2
                {
                    self.state = PrimaryState::Protected;
                }
                Ok(())
            }
            Message::Heartbeat { role, epoch, .. } => {
                if role == Role::Primary && epoch > self.epoch {
                    self.state = PrimaryState::SteppedDown;
                }
                Ok(())
            }
            Message::Refuse { reason } => Err(SessionError::Refused(reason)),
            Message::Log { .. } => Err(SessionError::Unexpected("log")),
            Message::Former { .. } => Err(SessionError::Unexpected("former")),
        }
    }

    fn refuse(&mut self, why: &str) {
        self.out
            .push_back(Transmit::Stream(Message::Refuse { reason: why.into() }));
    }

    /// Something to send now, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.out.pop_front() {
            return Some(t);
        }
        let peer = self.peer.as_ref()?;
        if let Some(hb) = self.next_heartbeat {
            if now >= hb {
                self.next_heartbeat = Some(now + self.cfg.heartbeat);
                return Some(Transmit::Datagram(Message::Heartbeat {
                    role: Role::Primary,
                    epoch: self.epoch,
                    sent_ms: 0,
                    offset: self.log_end,
                }));
            }
        }
        if peer.hello_done && self.sent < self.log_end && self.state != PrimaryState::SteppedDown {
            let len = (self.log_end - self.sent).min(self.cfg.chunk);
            let t = Transmit::LogRange {
                offset: self.sent,
                len,
            };
            self.sent += len;
            return Some(t);
        }
        None
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peer = self.peer.as_ref()?;
        let dead = peer.last_heard + self.cfg.timeout;
        Some(self.next_heartbeat.map_or(dead, |h| h.min(dead)))
    }

    /// Time passed; returns true when the standby was declared lost (the
    /// driver closes the connection; the primary goes on unprotected).
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        if let Some(p) = &self.peer {
            if now.saturating_duration_since(p.last_heard) >= self.cfg.timeout {
                self.handle_disconnected();
                return true;
            }
        }
        false
    }

    /// True when the program must be slowed: a standby is connected and
    /// holds too little of the log. With no standby the primary serves on.
    pub fn should_throttle(&self) -> bool {
        self.peer.is_some() && self.log_end.saturating_sub(self.acked) > self.cfg.max_unacked
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            role: Role::Primary,
            state: format!("{:?}", self.state),
            epoch: self.epoch,
            lag_bytes: if self.peer.is_some() {
                self.log_end - self.acked
            } else {
                0
            },
            last_heard: self
                .peer
                .as_ref()
                .map(|p| now.saturating_duration_since(p.last_heard)),
            log_bytes: self.log_end,
        }
    }
}

/// Where the standby stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyState {
    /// Not connected to a primary (yet or any more).
    Disconnected,
    /// Connected; waiting for the primary's hello.
    Handshake,
    /// Receiving and replaying the log.
    Following,
    /// The primary fell silent: go live with everything received.
    PrimaryLost,
}

/// The standby's side of the session.
#[derive(Debug)]
pub struct Standby {
    cfg: Config,
    epoch: u64,
    exe_sha256: [u8; 32],
    received: u64,
    written: u64,
    acked_sent: u64,
    last_heard: Option<Instant>,
    next_heartbeat: Option<Instant>,
    state: StandbyState,
    /// A primary's hello was received: there is a primary to take over from.
    followed: bool,
    /// The primaries before the one followed, as it told.
    former: Vec<std::net::SocketAddr>,
    out: std::collections::VecDeque<Transmit>,
}

impl Standby {
    /// `resume_offset`: bytes of the log already held (0 for a new standby).
    pub fn new(cfg: Config, exe_sha256: [u8; 32], resume_offset: u64) -> Self {
        Standby {
            cfg,
            epoch: 0,
            exe_sha256,
            received: resume_offset,
            written: resume_offset,
            acked_sent: resume_offset,
            last_heard: None,
            next_heartbeat: None,
            state: StandbyState::Disconnected,
            followed: false,
            former: Vec::new(),
            out: Default::default(),
        }
    }

    /// The primaries before the one followed (as it said in `Former`).
    pub fn former(&self) -> &[std::net::SocketAddr] {
        &self.former
    }

    pub fn state(&self) -> StandbyState {
        self.state
    }

    /// The epoch this node will hold as a primary after going live (once
    /// the primary is declared lost); before, the newest epoch it knows.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// An epoch this node already knew (persisted in its log directory):
    /// it never goes back below it.
    pub fn know_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    pub fn handle_connected(&mut self, now: Instant) {
        self.state = StandbyState::Handshake;
        self.last_heard = Some(now);
        self.next_heartbeat = Some(now);
        self.received = self.written;
        self.acked_sent = self.written;
        self.out.clear();
        self.out.push_back(Transmit::Stream(Message::Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            role: Role::Standby,
            epoch: self.epoch,
            resume_offset: self.written,
            exe_sha256: self.exe_sha256,
        }));
    }

    pub fn handle_disconnected(&mut self) {
        if self.state != StandbyState::PrimaryLost {
            self.state = StandbyState::Disconnected;
        }
        self.out.clear();
    }

    /// A message from the primary. For `Log`, the returned range is what the
    /// driver must append to its own log, then report with `handle_written`.
    pub fn handle_message(
        &mut self,
        msg: Message,
        now: Instant,
    ) -> Result<Option<(u64, usize)>, SessionError> {
        self.last_heard = Some(now);
        match msg {
            Message::Hello {
                version_min,
                version_max,
                role,
                epoch,
                ..
            } => {
                if self.state != StandbyState::Handshake {
                    return Err(SessionError::Unexpected("hello"));
                }
                if version_max < VERSION_MIN || version_min > VERSION_MAX {
                    return Err(SessionError::Version {
                        min: version_min,
                        max: version_max,
                    });
                }
                if role != Role::Primary {
                    return Err(SessionError::SameRole(role));
                }
                self.epoch = self.epoch.max(epoch);
                self.state = StandbyState::Following;
                self.followed = true;
                Ok(None)
            }
            Message::Log { offset, bytes } => {
                if self.state != StandbyState::Following {
                    return Err(SessionError::Unexpected("log before hello"));
                }
                if offset != self.received {
                    return Err(SessionError::Gap {
                        expected: self.received,
                        got: offset,
                    });
                }
                self.received += bytes.len() as u64;
                Ok(Some((offset, bytes.len())))
            }
            Message::Heartbeat { .. } => Ok(None),
            Message::Former { addrs } => {
                if self.state != StandbyState::Following {
                    return Err(SessionError::Unexpected("former before hello"));
                }
                self.former = addrs;
                Ok(None)
            }
            Message::Refuse { reason } => Err(SessionError::Refused(reason)),
            Message::Ack { .. } => Err(SessionError::Unexpected("ack")),
        }
    }

    /// The log now durably holds `end` bytes.
    pub fn handle_written(&mut self, end: u64) {
        self.written = self.written.max(end.min(self.received));
    }

    /// Bytes of the log held.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.out.pop_front() {
            return Some(t);
        }
        if matches!(
            self.state,
            StandbyState::Disconnected | StandbyState::PrimaryLost
        ) {
            return None;
        }
        if self.written > self.acked_sent && self.state == StandbyState::Following {
            self.acked_sent = self.written;
            return Some(Transmit::Stream(Message::Ack {
                offset: self.written,
            }));
        }
        if let Some(hb) = self.next_heartbeat {
            if now >= hb {
                self.next_heartbeat = Some(now + self.cfg.heartbeat);
                return Some(Transmit::Datagram(Message::Heartbeat {
                    role: Role::Standby,
                    epoch: self.epoch,
                    sent_ms: 0,
                    offset: self.written,
                }));
            }
        }
        None
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(
            self.state,
            StandbyState::Disconnected | StandbyState::PrimaryLost
        ) {
            return None;
        }
        let dead = self.last_heard? + self.cfg.timeout;
        Some(self.next_heartbeat.map_or(dead, |h| h.min(dead)))
    }

    /// Time passed; returns true when the primary is declared lost: the
    /// driver replays what it holds and goes live as primary of the next
    /// epoch. A primary this standby followed is lost when it has been
    /// silent for the timeout, connected or not (a reconnect that keeps
    /// failing is silence too).
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        let silent = self
            .last_heard
            .map(|t| now.saturating_duration_since(t) >= self.cfg.timeout)
            .unwrap_or(false);
        if !silent || self.state == StandbyState::PrimaryLost {
            return false;
        }
        if self.followed {
            self.state = StandbyState::PrimaryLost;
            self.epoch += 1;
            return true;
        }
        if self.state == StandbyState::Handshake {
            // Never got the primary's hello: nothing to take over from.
            self.state = StandbyState::Disconnected;
        }
        false
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            role: Role::Standby,
            state: format!("{:?}", self.state),
            epoch: self.epoch,
            lag_bytes: self.received - self.written,
            last_heard: self.last_heard.map(|t| now.saturating_duration_since(t)),
            log_bytes: self.written,
        }
    }
}

#[cfg(test)]
mod tests;
