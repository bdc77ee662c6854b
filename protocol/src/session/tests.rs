//! Both sides of a session on virtual time over a simulated link: datagrams
//! are lost, delayed and reordered; the stream is reliable and ordered (as a
//! QUIC stream is) but can be cut by a partition or a dead host.

use std::time::{Duration, Instant};

use super::*;
use crate::wire::Message;

const SHA: [u8; 32] = [5; 32];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
    fn range(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { self.next() % span })
    }
}

struct Link {
    loss: f64,
    min_delay: Duration,
    max_delay: Duration,
    stream_delay: Duration,
}

struct Pair {
    now: Instant,
    start: Instant,
    p: Primary,
    s: Standby,
    link: Link,
    rng: Rng,
    to_s: Vec<(Instant, Message)>,
    to_p: Vec<(Instant, Message)>,
    p_alive: bool,
    s_alive: bool,
    partitioned: bool,
    connected: bool,
    /// Log growth per step (bytes).
    rate: u64,
    log_end: u64,
    /// Standby's disk writes lag by this many steps (slow disk).
    write_backlog: Vec<u64>,
    disk_delay_steps: usize,
    lost_at: Option<Duration>,
}

const STEP: Duration = Duration::from_millis(1);

impl Pair {
    fn new(link: Link, seed: u64) -> Self {
        let now = Instant::now();
        let cfg = Config {
            max_unacked: 1 << 20,
            chunk: 64 << 10,
            ..Config::default()
        };
        let mut pair = Pair {
            now,
            start: now,
            p: Primary::new(cfg, 1, SHA),
            s: Standby::new(cfg, SHA, 0),
            link,
            rng: Rng(seed | 1),
            to_s: vec![],
            to_p: vec![],
            p_alive: true,
            s_alive: true,
            partitioned: false,
            connected: false,
            rate: 2000,
            log_end: 16,
            write_backlog: vec![],
            disk_delay_steps: 0,
            lost_at: None,
        };
        pair.connect();
        pair
    }

    fn connect(&mut self) {
        self.connected = true;
        self.to_s.clear();
        self.to_p.clear();
        self.p.handle_connected(0, self.now);
        self.s.handle_connected(self.now);
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn send(&mut self, to_standby: bool, t: Transmit) {
        let (msg, datagram) = match t {
            Transmit::Stream(m) => (m, false),
            Transmit::LogRange { offset, len } => (
                Message::Log {
                    offset,
                    bytes: vec![0xab; len as usize],
                },
                false,
            ),
            Transmit::Datagram(m) => (m, true),
            Transmit::Checkpoint { .. } => {
                unreachable!("the simulated primary keeps its whole log")
            }
        };
        if datagram && (self.partitioned || self.rng.chance(self.link.loss)) {
            return;
        }
        let q = if to_standby {
            &mut self.to_s
        } else {
            &mut self.to_p
        };
        let at = if datagram {
            self.now + self.rng.range(self.link.min_delay, self.link.max_delay)
        } else {
            // In order: never before the last stream message queued.
            let last = q.iter().map(|(t, _)| *t).max().unwrap_or(self.now);
            (self.now + self.link.stream_delay).max(last)
        };
        q.push((at, msg));
    }

    fn step(&mut self) {
        self.now += STEP;
        if self.p_alive {
            self.log_end += self.rate;
            self.p.log_appended(self.log_end);
            if self.connected {
                while let Some((_, t)) = self.p.poll_transmit(self.now) {
                    self.send(true, t);
                }
            }
        }
        if self.s_alive && self.connected {
            while let Some(t) = self.s.poll_transmit(self.now) {
                self.send(false, t);
            }
        }
        // Slow disk: writes become durable `disk_delay_steps` later.
        self.write_backlog.push(0);
        if !self.partitioned {
            let due: Vec<Message> = take_due(&mut self.to_s, self.now);
            for m in due {
                if !self.s_alive {
                    continue;
                }
                if let Some((off, len)) =
                    self.s.handle_message(m, self.now).expect("standby accepts")
                {
                    *self.write_backlog.last_mut().unwrap() = off + len as u64;
                }
            }
            let due: Vec<Message> = take_due(&mut self.to_p, self.now);
            for m in due {
                if self.p_alive {
                    self.p
                        .handle_message(0, m, self.now)
                        .expect("primary accepts");
                }
            }
        }
        if self.write_backlog.len() > self.disk_delay_steps {
            let w = self.write_backlog.remove(0);
            if w > 0 {
                self.s.handle_written(w);
            }
        }
        if self.p_alive {
            self.p.handle_timeout(self.now);
        }
        if self.s_alive && self.s.handle_timeout(self.now) && self.lost_at.is_none() {
            self.lost_at = Some(self.elapsed());
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }
}

fn take_due(q: &mut Vec<(Instant, Message)>, now: Instant) -> Vec<Message> {
    q.sort_by_key(|(t, _)| *t);
    let n = q.iter().take_while(|(t, _)| *t <= now).count();
    q.drain(..n).map(|(_, m)| m).collect()
}

fn lossy() -> Link {
    Link {
        loss: 0.2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(40),
        stream_delay: Duration::from_millis(2),
    }
}

#[test]
fn no_false_failover_under_loss_delay_and_reordering() {
    for seed in 1..=5 {
        let mut pair = Pair::new(lossy(), seed);
        pair.run(Duration::from_secs(30));
        assert_eq!(
            pair.lost_at, None,
            "seed {seed}: standby declared a live primary lost"
        );
        assert_eq!(pair.s.state(), StandbyState::Following);
        assert_eq!(pair.p.state(), PrimaryState::Protected, "seed {seed}");
        let lag = pair.log_end - pair.p.acked();
        assert!(lag < 64 << 10, "seed {seed}: lag {lag} bytes");
        assert!(!pair.p.should_throttle());
    }
}

#[test]
fn primary_death_is_detected_within_timeout() {
    for seed in 1..=5 {
        let mut pair = Pair::new(lossy(), seed);
        pair.run(Duration::from_secs(5));
        let died = pair.elapsed();
        pair.p_alive = false;
        pair.run(Duration::from_secs(2));
        let lost = pair.lost_at.expect("primary loss detected");
        let detect = lost - died;
        // Last heartbeat heard at most (heartbeat + max delay) before death.
        assert!(
            detect <= Duration::from_millis(300 + 2),
            "seed {seed}: {detect:?}"
        );
        assert!(
            detect >= Duration::from_millis(300 - 50 - 40),
            "seed {seed}: too early {detect:?}"
        );
        assert_eq!(pair.s.state(), StandbyState::PrimaryLost);
        assert_eq!(pair.s.epoch(), 2, "the standby takes the next epoch");
        assert!(
            pair.s.poll_transmit(pair.now).is_none(),
            "a lost session sends nothing more"
        );
    }
}

#[test]
fn partition_then_heal_makes_the_old_primary_step_down() {
    let mut pair = Pair::new(lossy(), 7);
    pair.run(Duration::from_secs(3));
    pair.partitioned = true;
    pair.run(Duration::from_secs(1));
    assert_eq!(
        pair.s.state(),
        StandbyState::PrimaryLost,
        "standby takes over"
    );
    assert_eq!(
        pair.p.state(),
        PrimaryState::Unprotected,
        "primary saw its standby vanish"
    );
    assert!(
        !pair.p.should_throttle(),
        "an unprotected primary serves on"
    );
    // Heal: the new primary dials the old one and announces its epoch.
    pair.partitioned = false;
    pair.p.handle_connected(0, pair.now);
    let hello = Message::Hello {
        version_min: crate::wire::VERSION_MIN,
        version_max: crate::wire::VERSION_MAX,
        role: Role::Primary,
        epoch: pair.s.epoch(),
        resume_offset: 0,
        exe_sha256: SHA,
    };
    pair.p.handle_message(0, hello, pair.now).unwrap();
    assert_eq!(pair.p.state(), PrimaryState::SteppedDown);
    // And heartbeats of a newer primary do the same.
    let mut p2 = Primary::new(Config::default(), 1, SHA);
    p2.handle_connected(0, pair.now);
    p2.handle_message(
        0,
        Message::Heartbeat {
            role: Role::Primary,
            epoch: 2,
            sent_ms: 0,
            offset: 0,
        },
        pair.now,
    )
    .unwrap();
    assert_eq!(p2.state(), PrimaryState::SteppedDown);
}

#[test]
fn standby_death_and_a_new_standby_catching_up() {
    let mut pair = Pair::new(lossy(), 11);
    pair.run(Duration::from_secs(2));
    pair.s_alive = false;
    pair.run(Duration::from_secs(1));
    assert_eq!(pair.p.state(), PrimaryState::Unprotected, "primary notices");
    assert!(!pair.p.should_throttle(), "and serves on alone");
    pair.run(Duration::from_secs(5));
    // A fresh standby (empty log) joins and catches up from offset 0.
    pair.s = Standby::new(
        Config {
            max_unacked: 1 << 20,
            chunk: 64 << 10,
            ..Config::default()
        },
        SHA,
        0,
    );
    pair.s_alive = true;
    pair.lost_at = None;
    pair.connect();
    pair.step();
    pair.step();
    pair.step();
    assert!(matches!(
        pair.p.state(),
        PrimaryState::CatchingUp | PrimaryState::Protected
    ));
    pair.run(Duration::from_secs(2));
    assert_eq!(pair.p.state(), PrimaryState::Protected);
    assert!(pair.log_end - pair.s.written() < 128 << 10, "caught up");
    assert_eq!(pair.lost_at, None);
}

#[test]
fn slow_standby_disk_throttles_the_primary_and_recovers() {
    let mut pair = Pair::new(
        Link {
            loss: 0.0,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            stream_delay: Duration::from_millis(1),
        },
        3,
    );
    pair.run(Duration::from_secs(1));
    assert!(!pair.p.should_throttle());
    pair.disk_delay_steps = 1500; // writes take 1.5 s to become durable
    let mut throttled = false;
    for _ in 0..2000 {
        pair.step();
        if pair.p.should_throttle() {
            throttled = true;
            // The driver slows the program: the log stops growing.
            pair.rate = 0;
        }
    }
    assert!(
        throttled,
        "unacknowledged bytes above the limit must throttle"
    );
    pair.disk_delay_steps = 0;
    pair.run(Duration::from_secs(2));
    assert!(
        !pair.p.should_throttle(),
        "throttle lifts once the standby catches up"
    );
}

#[test]
fn refusals() {
    let now = Instant::now();
    let mut p = Primary::new(Config::default(), 1, SHA);
    p.log_appended(100);
    p.handle_connected(0, now);
    let hello = |sha, resume| Message::Hello {
        version_min: VERSION_MIN,
        version_max: VERSION_MAX,
        role: Role::Standby,
        epoch: 0,
        resume_offset: resume,
        exe_sha256: sha,
    };
    assert_eq!(
        p.handle_message(0, hello([9; 32], 0), now),
        Err(SessionError::WrongProgram)
    );
    assert!(matches!(
        p.poll_transmit(now).map(|(_, t)| t),
        Some(Transmit::Stream(Message::Refuse { .. }))
    ));
    p.handle_connected(0, now);
    assert_eq!(
        p.handle_message(0, hello(SHA, 5000), now),
        Err(SessionError::ResumeBeyondEnd {
            asked: 5000,
            have: 100
        })
    );
    p.handle_connected(0, now);
    let v = Message::Hello {
        version_min: 7,
        version_max: 9,
        role: Role::Standby,
        epoch: 0,
        resume_offset: 0,
        exe_sha256: SHA,
    };
    assert_eq!(
        p.handle_message(0, v, now),
        Err(SessionError::Version { min: 7, max: 9 })
    );
    p.handle_connected(0, now);
    p.handle_message(0, hello(SHA, 0), now).unwrap();
    assert_eq!(
        p.handle_message(0, Message::Ack { offset: 1000 }, now),
        Err(SessionError::AckBeyondSent {
            acked: 1000,
            sent: 0
        })
    );

    let mut s = Standby::new(Config::default(), SHA, 0);
    s.handle_connected(now);
    assert_eq!(
        s.handle_message(
            Message::Log {
                offset: 0,
                bytes: vec![1]
            },
            now
        ),
        Err(SessionError::Unexpected("log before hello"))
    );
    let ph = Message::Hello {
        version_min: VERSION_MIN,
        version_max: VERSION_MAX,
        role: Role::Primary,
        epoch: 1,
        resume_offset: 0,
        exe_sha256: SHA,
    };
    s.handle_message(ph, now).unwrap();
    assert_eq!(
        s.handle_message(
            Message::Log {
                offset: 8,
                bytes: vec![1]
            },
            now
        ),
        Err(SessionError::Gap {
            expected: 0,
            got: 8
        })
    );
}

/// Epochs only grow along a chain of failovers: each new primary takes one
/// more than the newest it heard of (also across a restart, from the epoch
/// its log directory kept), and any older primary that hears it steps down.
#[test]
fn chained_failovers_take_ever_higher_epochs() {
    let mut pair = Pair::new(lossy(), 11);
    pair.run(Duration::from_secs(2));
    pair.p_alive = false;
    pair.run(Duration::from_secs(1));
    assert_eq!(pair.s.epoch(), 2);
    // The new primary (epoch 2) and a new standby of it.
    let cfg = pair.p.cfg;
    let mut second = Pair::new(lossy(), 12);
    second.p = Primary::new(cfg, pair.s.epoch(), SHA);
    second.s = Standby::new(cfg, SHA, 0);
    second.connect();
    second.run(Duration::from_secs(2));
    assert_eq!(second.s.epoch(), 2, "learned from the hello");
    second.p_alive = false;
    second.run(Duration::from_secs(1));
    assert_eq!(second.s.epoch(), 3, "one more than the newest it heard of");
    // A restarted standby knows the epoch its directory kept, even before
    // a hello; the primary of epoch 1 that wakes steps down on hearing 3.
    let mut s = Standby::new(cfg, SHA, 0);
    s.know_epoch(3);
    assert_eq!(s.epoch(), 3);
    let mut old = Primary::new(cfg, 1, SHA);
    let now = Instant::now();
    old.handle_connected(0, now);
    old.handle_message(
        0,
        Message::Heartbeat {
            role: Role::Primary,
            epoch: 3,
            sent_ms: 0,
            offset: 0,
        },
        now,
    )
    .unwrap();
    assert_eq!(old.state(), PrimaryState::SteppedDown);
    // A standby learns every primary before the one it follows.
    let a: std::net::SocketAddr = "198.51.100.1:7600".parse().unwrap();
    let mut p = Primary::new(cfg, 2, SHA);
    p.set_former(vec![a]);
    p.log_appended(16);
    let mut st = Standby::new(cfg, SHA, 0);
    p.handle_connected(0, now);
    st.handle_connected(now);
    while let Some(Transmit::Stream(m)) = st.poll_transmit(now) {
        p.handle_message(0, m, now).unwrap();
    }
    while let Some((_, t)) = p.poll_transmit(now) {
        if let Transmit::Stream(m) = t {
            st.handle_message(m, now).unwrap();
        }
    }
    assert_eq!(st.former(), &[a]);
    // ... and one of epoch 3 does not step down for itself.
    let mut same = Primary::new(cfg, 3, SHA);
    same.handle_connected(0, now);
    let _ = same.handle_message(
        0,
        Message::Heartbeat {
            role: Role::Primary,
            epoch: 3,
            sent_ms: 0,
            offset: 0,
        },
        now,
    );
    assert_ne!(same.state(), PrimaryState::SteppedDown);
}

/// A primary with standbys `ids` past their hello at offset 0.
fn primary_with(cfg: Config, ids: &[PeerId], now: Instant) -> Primary {
    let mut p = Primary::new(cfg, 1, SHA);
    for &id in ids {
        join(&mut p, id, now);
    }
    p
}

/// Standby `id` connects and says hello with no log of its own.
fn join(p: &mut Primary, id: PeerId, now: Instant) {
    p.handle_connected(id, now);
    p.handle_message(id, standby_hello(), now).unwrap();
}

/// A standby's hello with no log of its own.
fn standby_hello() -> Message {
    Message::Hello {
        version_min: VERSION_MIN,
        version_max: VERSION_MAX,
        role: Role::Standby,
        epoch: 0,
        resume_offset: 0,
        exe_sha256: SHA,
    }
}

/// Everything the primary has to send now, by standby (log bytes counted).
fn drain(p: &mut Primary, now: Instant) -> std::collections::BTreeMap<PeerId, u64> {
    let mut sent = std::collections::BTreeMap::new();
    while let Some((id, t)) = p.poll_transmit(now) {
        if let Transmit::LogRange { offset, len } = t {
            let e = sent.entry(id).or_insert(offset);
            assert_eq!(*e, offset, "standby {id} gets the log in order");
            *e = offset + len;
        }
    }
    sent
}

#[test]
fn two_standbys_each_get_the_whole_log_and_the_quorum_is_the_nth_ack() {
    let now = Instant::now();
    let cfg = Config {
        chunk: 1000,
        max_unacked: 1 << 20,
        sync_standbys: 2,
        ..Config::default()
    };
    let mut p = primary_with(cfg, &[1, 2], now);
    assert_eq!(p.state(), PrimaryState::CatchingUp);
    p.log_appended(5000);
    let sent = drain(&mut p, now);
    assert_eq!(sent.get(&1), Some(&5000));
    assert_eq!(sent.get(&2), Some(&5000));
    // One standby acknowledges: with two sync standbys the quorum mark is
    // the other's (0)...
    p.handle_message(1, Message::Ack { offset: 5000 }, now)
        .unwrap();
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!(p.acked(), 5000, "only one caught up: it is the quorum");
    p.handle_message(2, Message::Ack { offset: 3000 }, now)
        .unwrap();
    // ...now both caught up: the second highest.
    assert_eq!(p.acked(), 5000, "the mark never goes back");
    p.log_appended(9000);
    drain(&mut p, now);
    p.handle_message(1, Message::Ack { offset: 9000 }, now)
        .unwrap();
    assert_eq!(p.acked(), 5000, "standby 2 holds only 3000: not released");
    p.handle_message(2, Message::Ack { offset: 7000 }, now)
        .unwrap();
    assert_eq!(p.acked(), 7000);
    // With one sync standby the most advanced one's acknowledgement is
    // enough.
    let mut one = primary_with(
        Config {
            sync_standbys: 1,
            ..cfg
        },
        &[1, 2],
        now,
    );
    one.log_appended(4000);
    drain(&mut one, now);
    one.handle_message(2, Message::Ack { offset: 4000 }, now)
        .unwrap();
    one.handle_message(1, Message::Ack { offset: 1000 }, now)
        .unwrap();
    assert_eq!(one.acked(), 4000);
    // A standby that leaves does not take the protection with it.
    one.handle_disconnected(2);
    assert_eq!(one.state(), PrimaryState::Protected);
    assert_eq!(one.acked(), 4000);
    assert_eq!(one.throttle_mark(), 1000);
    one.handle_disconnected(1);
    assert_eq!(one.state(), PrimaryState::Unprotected);
}

#[test]
fn a_standby_catching_up_neither_lowers_the_mark_nor_starves_the_others() {
    let now = Instant::now();
    let cfg = Config {
        chunk: 1000,
        max_unacked: 4000,
        sync_standbys: 2,
        ..Config::default()
    };
    let mut p = primary_with(cfg, &[1], now);
    p.log_appended(3000);
    drain(&mut p, now);
    p.handle_message(1, Message::Ack { offset: 3000 }, now)
        .unwrap();
    assert_eq!(p.acked(), 3000);
    // A second standby joins far behind a long log: it is not in the
    // quorum until it caught up, so output keeps flowing on standby 1.
    p.log_appended(20_000);
    join(&mut p, 2, now);
    // The caught-up standby's bytes go first.
    let mut order = vec![];
    for _ in 0..6 {
        match p.poll_transmit(now) {
            Some((id, Transmit::LogRange { .. })) => order.push(id),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(&order[..3], &[1, 1, 1], "standby 1 first: {order:?}");
    p.handle_message(1, Message::Ack { offset: 6000 }, now)
        .unwrap();
    assert_eq!(p.acked(), 6000, "standby 2 (catching up) does not count");
    assert_eq!(p.standbys(now).len(), 2);
    assert!(
        !p.standbys(now)
            .iter()
            .find(|s| s.id == 2)
            .unwrap()
            .caught_up
    );
}

#[test]
fn a_silent_standby_is_dropped_alone() {
    let t0 = Instant::now();
    let cfg = Config::default();
    let mut p = primary_with(cfg, &[1, 2], t0);
    let later = t0 + cfg.timeout / 2;
    p.handle_message(
        1,
        Message::Heartbeat {
            role: Role::Standby,
            epoch: 0,
            sent_ms: 0,
            offset: 0,
        },
        later,
    )
    .unwrap();
    assert!(p.poll_timeout().unwrap() <= t0 + cfg.timeout);
    let lost = p.handle_timeout(t0 + cfg.timeout);
    assert_eq!(lost, vec![2]);
    assert_eq!(p.connected(), 1);
    assert_eq!(p.handle_timeout(later + cfg.timeout), vec![1]);
    assert_eq!(p.state(), PrimaryState::Unprotected);
}

#[test]
fn a_standby_that_needs_deleted_log_gets_the_checkpoint_then_the_log_after_it() {
    let now = Instant::now();
    let cfg = Config {
        chunk: 1000,
        ..Config::default()
    };
    let mut p = Primary::new(cfg, 1, SHA);
    p.log_appended(10_000);
    p.set_retained(Retention {
        start: 6_000,
        header_end: 400,
        checkpoint: Some((7_000, 123_456)),
    });
    join(&mut p, 1, now);
    let mut ck = None;
    let mut logs = 0;
    while let Some((_, t)) = p.poll_transmit(now) {
        match t {
            Transmit::Checkpoint {
                header_end,
                position,
                len,
            } => ck = Some((header_end, position, len)),
            Transmit::LogRange { .. } => logs += 1,
            _ => {}
        }
    }
    assert_eq!(ck, Some((400, 7_000, 123_456)));
    assert_eq!(logs, 0, "no log before the checkpoint is installed");
    assert!(matches!(
        p.handle_message(1, Message::Ack { offset: 7_000 }, now),
        Ok(())
    ));
    let sent = drain(&mut p, now);
    assert_eq!(sent.get(&1), Some(&10_000), "the log from byte 7000 on");
    // The standby side: installed, it acknowledges the checkpoint's position.
    let mut s = Standby::new(cfg, SHA, 0);
    s.handle_connected(now);
    s.installed(7_000);
    assert_eq!(s.written(), 7_000);

    // With no checkpoint to give, such a standby is refused with the reason.
    let mut p = Primary::new(cfg, 1, SHA);
    p.log_appended(10_000);
    p.set_retained(Retention {
        start: 6_000,
        header_end: 400,
        checkpoint: None,
    });
    p.handle_connected(2, now);
    assert!(p.handle_message(2, standby_hello(), now).is_err());
    let refused = std::iter::from_fn(|| p.poll_transmit(now)).any(|(_, t)| {
        matches!(t, Transmit::Stream(Message::Refuse { reason }) if reason.contains("deleted the log"))
    });
    assert!(refused);
}
