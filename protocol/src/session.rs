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
    /// Standbys that must hold the log before output is released (the
    /// quorum; all that caught up, when fewer are connected).
    pub sync_standbys: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            max_unacked: 64 << 20,
            chunk: 256 << 10,
            sync_standbys: 1,
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
    /// A standby needs log the primary no longer keeps: send it, on a
    /// stream of its own, the log's header frame (`[0, header_end)`) and
    /// the checkpoint at log byte `position` (`len` bytes); the log follows
    /// from `position` once the standby acknowledges it.
    Checkpoint {
        header_end: u64,
        position: u64,
        len: u64,
    },
}

/// Where the primary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// No standby connected: serving unprotected.
    Unprotected,
    /// Standbys are connected but none has caught up yet.
    CatchingUp,
    /// The sync standbys (`Config::sync_standbys`, or all that caught up
    /// if fewer) hold the log up to within `max_unacked`.
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

/// A standby of the primary, as the driver names it (one per connection).
pub type PeerId = u64;

/// One standby as the primary sees it (`Primary::standbys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: PeerId,
    /// Bytes it acknowledged.
    pub acked: u64,
    /// It caught up once, and counts toward the sync quorum.
    pub caught_up: bool,
    pub last_heard: Duration,
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    hello_done: bool,
    sent: u64,
    acked: u64,
    caught_up: bool,
    next_heartbeat: Instant,
    /// Sent a checkpoint at this log position; no log until it is acked.
    installing: Option<u64>,
}

/// Where the primary's kept log starts and the checkpoint a standby that
/// needs older log gets instead (`Primary::set_retained`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// First byte of the kept log after the header frame (0: all kept).
    pub start: u64,
    /// End of the header frame.
    pub header_end: u64,
    /// The newest checkpoint: its log position and length.
    pub checkpoint: Option<(u64, u64)>,
}

/// The primary's side of the session: any number of standbys, each with
/// its own position in the log; output is released at the quorum mark.
#[derive(Debug)]
pub struct Primary {
    cfg: Config,
    epoch: u64,
    exe_sha256: [u8; 32],
    log_end: u64,
    peers: std::collections::BTreeMap<PeerId, Peer>,
    /// The quorum's acknowledged mark; never goes back.
    released: u64,
    state: PrimaryState,
    /// The primaries of this log before this one (told to each standby).
    former: Vec<std::net::SocketAddr>,
    retention: Retention,
    out: std::collections::VecDeque<(PeerId, Transmit)>,
}

impl Primary {
    pub fn new(cfg: Config, epoch: u64, exe_sha256: [u8; 32]) -> Self {
        Primary {
            cfg,
            epoch,
            exe_sha256,
            log_end: 0,
            peers: Default::default(),
            released: 0,
            state: PrimaryState::Unprotected,
            former: Vec::new(),
            retention: Retention::default(),
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

    /// The log position every byte below which the sync standbys hold: the
    /// `sync_standbys`-th highest acknowledgement among the standbys that
    /// caught up (all of them when fewer did). Never goes back.
    pub fn acked(&self) -> u64 {
        self.released
    }

    /// The mark the program is slowed against: the quorum's, or while no
    /// standby caught up yet, the most advanced connected one's.
    pub fn throttle_mark(&self) -> u64 {
        match self.quorum() {
            Some(q) => q,
            None => self
                .peers
                .values()
                .filter(|p| p.hello_done)
                .map(|p| p.acked)
                .max()
                .unwrap_or(self.log_end),
        }
    }

    /// Standbys past their hello.
    pub fn connected(&self) -> usize {
        self.peers.values().filter(|p| p.hello_done).count()
    }

    /// Each connected standby.
    pub fn standbys(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .filter(|(_, p)| p.hello_done)
            .map(|(id, p)| PeerStatus {
                id: *id,
                acked: p.acked,
                caught_up: p.caught_up,
                last_heard: now.saturating_duration_since(p.last_heard),
            })
            .collect()
    }

    fn quorum(&self) -> Option<u64> {
        let mut acks: Vec<u64> = self
            .peers
            .values()
            .filter(|p| p.caught_up)
            .map(|p| p.acked)
            .collect();
        if acks.is_empty() {
            return None;
        }
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let k = self.cfg.sync_standbys.clamp(1, acks.len());
        Some(acks[k - 1])
    }

    fn update(&mut self) {
        let q = self.quorum();
        if let Some(q) = q {
            self.released = self.released.max(q);
        }
        if self.state == PrimaryState::SteppedDown {
            return;
        }
        self.state = if q.is_some() {
            PrimaryState::Protected
        } else if self.connected() > 0 {
            PrimaryState::CatchingUp
        } else {
            PrimaryState::Unprotected
        };
    }

    /// The log now holds `end` bytes.
    pub fn log_appended(&mut self, end: u64) {
        self.log_end = self.log_end.max(end);
    }

    /// An authenticated standby connected as `id`.
    pub fn handle_connected(&mut self, id: PeerId, now: Instant) {
        self.out.retain(|(p, _)| *p != id);
        self.peers.insert(
            id,
            Peer {
                last_heard: now,
                hello_done: false,
                sent: 0,
                acked: 0,
                caught_up: false,
                next_heartbeat: now,
                installing: None,
            },
        );
    }

    /// The log before `r.start` is gone (checkpoints): a standby that needs
    /// it gets `r.checkpoint` instead.
    pub fn set_retained(&mut self, r: Retention) {
        self.retention = r;
    }

    /// The standby `id`'s connection is gone.
    pub fn handle_disconnected(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.out.retain(|(p, _)| *p != id);
        self.update();
    }

    /// A message from standby `id` (stream or datagram).
    pub fn handle_message(
        &mut self,
        id: PeerId,
        msg: Message,
        now: Instant,
    ) -> Result<(), SessionError> {
        let Some(peer) = self.peers.get_mut(&id) else {
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
                    self.refuse(id, "no common protocol version");
                    return Err(SessionError::Version {
                        min: version_min,
                        max: version_max,
                    });
                }
                if role != Role::Standby {
                    self.refuse(id, "both nodes are primaries");
                    return Err(SessionError::SameRole(role));
                }
                // All zeros: the standby has no log yet and checks the
                // program identity in the log header itself.
                if exe_sha256 != [0; 32] && exe_sha256 != self.exe_sha256 {
                    self.refuse(id, "the standby's log directory holds a different log (another program or another run); give the standby an empty log directory");
                    return Err(SessionError::WrongProgram);
                }
                if resume_offset > self.log_end {
                    self.refuse(
                        id,
                        "the standby's log is longer than the primary's: it belongs to another run",
                    );
                    return Err(SessionError::ResumeBeyondEnd {
                        asked: resume_offset,
                        have: self.log_end,
                    });
                }
                let r = self.retention;
                let needs_deleted = r.start > 0 && resume_offset < r.start;
                let ck = match r.checkpoint {
                    Some((pos, len)) if needs_deleted && pos >= r.start => Some((pos, len)),
                    Some(_) | None if needs_deleted => {
                        self.refuse(id, "this primary deleted the log the standby needs after checkpoints and holds no checkpoint to send");
                        return Err(SessionError::Unexpected("log deleted, no checkpoint"));
                    }
                    _ => None,
                };
                peer.hello_done = true;
                peer.sent = resume_offset;
                peer.acked = resume_offset;
                if let Some((pos, _)) = ck {
                    peer.sent = pos;
                    peer.acked = 0;
                    peer.installing = Some(pos);
                }
                self.out.push_back((
                    id,
                    Transmit::Stream(Message::Hello {
                        version_min: VERSION_MIN,
                        version_max: VERSION_MAX,
                        role: Role::Primary,
                        epoch: self.epoch,
                        resume_offset,
                        exe_sha256: self.exe_sha256,
                    }),
                ));
                self.out.push_back((
                    id,
                    Transmit::Stream(Message::Former {
                        addrs: self.former.clone(),
                    }),
                ));
                if let Some((position, len)) = ck {
                    self.out.push_back((
                        id,
                        Transmit::Checkpoint {
                            header_end: r.header_end,
                            position,
                            len,
                        },
                    ));
                }
                self.update();
                Ok(())
            }
            Message::Ack { offset } => {
                if offset > peer.sent {
                    return Err(SessionError::AckBeyondSent {
                        acked: offset,
                        sent: peer.sent,
                    });
                }
                peer.acked = peer.acked.max(offset);
                if peer.installing.is_some_and(|p| offset >= p) {
                    peer.installing = None;
                }
                if !peer.caught_up && self.log_end - peer.acked <= self.cfg.max_unacked / 2 {
                    peer.caught_up = true;
                }
                self.update();
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

    fn refuse(&mut self, id: PeerId, why: &str) {
        self.out
            .push_back((id, Transmit::Stream(Message::Refuse { reason: why.into() })));
    }

    /// Something to send now, and to which standby, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(PeerId, Transmit)> {
        if let Some(t) = self.out.pop_front() {
            return Some(t);
        }
        for (id, peer) in self.peers.iter_mut() {
            if now >= peer.next_heartbeat {
                peer.next_heartbeat = now + self.cfg.heartbeat;
                return Some((
                    *id,
                    Transmit::Datagram(Message::Heartbeat {
                        role: Role::Primary,
                        epoch: self.epoch,
                        sent_ms: 0,
                        offset: self.log_end,
                    }),
                ));
            }
        }
        if self.state == PrimaryState::SteppedDown {
            return None;
        }
        // The standbys that caught up first (output waits on them), then
        // the one furthest behind: a standby catching up on a long log
        // never delays the others' bytes.
        let (id, peer) = self
            .peers
            .iter_mut()
            .filter(|(_, p)| p.hello_done && p.installing.is_none() && p.sent < self.log_end)
            .min_by_key(|(_, p)| (!p.caught_up, p.sent))?;
        let len = (self.log_end - peer.sent).min(self.cfg.chunk);
        let t = Transmit::LogRange {
            offset: peer.sent,
            len,
        };
        peer.sent += len;
        Some((*id, t))
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .map(|p| (p.last_heard + self.cfg.timeout).min(p.next_heartbeat))
            .min()
    }

    /// Time passed; returns the standbys declared lost (the driver closes
    /// their connections; with none left the primary goes on unprotected).
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PeerId> {
        let lost: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) >= self.cfg.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            self.handle_disconnected(*id);
        }
        lost
    }

    /// True when the program must be slowed: a standby is connected and
    /// the quorum holds too little of the log. With no standby the primary
    /// serves on.
    pub fn should_throttle(&self) -> bool {
        self.connected() > 0
            && self.log_end.saturating_sub(self.throttle_mark()) > self.cfg.max_unacked
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            role: Role::Primary,
            state: format!("{:?}", self.state),
            epoch: self.epoch,
            lag_bytes: if self.connected() > 0 {
                self.log_end.saturating_sub(self.throttle_mark())
            } else {
                0
            },
            last_heard: self
                .peers
                .values()
                .map(|p| now.saturating_duration_since(p.last_heard))
                .max(),
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

    /// There is a primary to take over from (this node followed it or
    /// the arbiter named it) although no hello came yet: if it stays
    /// silent for the timeout from `now`, it is lost.
    pub fn expect_primary(&mut self, now: Instant) {
        self.followed = true;
        self.last_heard = Some(now);
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

    /// The primary's checkpoint at log byte `position` is installed (with
    /// the log's header frame): the log goes on from there, and the next
    /// acknowledgement says so.
    pub fn installed(&mut self, position: u64) {
        self.received = position;
        self.written = position;
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
