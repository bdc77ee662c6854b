//! The output rule.
//!
//! Every TCP packet the primary's host sends from the virtual IP goes
//! through an NFQUEUE; the supervisor lets it leave only when the standby
//! has acknowledged the log position that produced it:
//!
//! - its data: the program's write of the last byte it carries is logged;
//! - its acknowledgement number: the program's reads of every byte it
//!   acknowledges are logged (so a byte the client was told arrived is one
//!   the standby will hand to the program too, or the client sends again);
//! - FIN / RST: the program's close (or shutdown) is logged.
//!
//! A SYN-ACK leaves at once (nothing of the program is in it); packets of a
//! connection not yet accepted wait until it is, unless they acknowledge
//! nothing beyond the handshake. Without a standby ("unprotected") every
//! packet leaves at once. If the supervisor dies, the queue has no reader
//! and the kernel drops what it would send: no data, no FIN, no RST leaks.

use crate::nfqueue::{Packet, Queue};
use crate::{os, NetError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// (local address, local port, remote address, remote port), IPv4.
pub type Key = (u32, u16, u32, u16);

/// The IPv4 4-tuple of a connection from its sockaddrs (IPv4 or
/// IPv4-mapped IPv6); None for other families.
pub fn key_of(local: &[u8], remote: &[u8]) -> Option<Key> {
    let (la, lp) = v4(local)?;
    let (ra, rp) = v4(remote)?;
    Some((la, lp, ra, rp))
}

fn v4(sa: &[u8]) -> Option<(u32, u16)> {
    if sa.len() < 8 {
        return None;
    }
    let fam = u16::from_le_bytes([sa[0], sa[1]]) as i32;
    let port = u16::from_be_bytes([sa[2], sa[3]]);
    if fam == libc::AF_INET {
        return Some((u32::from_be_bytes(sa[4..8].try_into().ok()?), port));
    }
    if fam == libc::AF_INET6 && sa.len() >= 24 && sa[8..18] == [0; 10] && sa[18..20] == [0xff, 0xff]
    {
        return Some((u32::from_be_bytes(sa[20..24].try_into().ok()?), port));
    }
    None
}

#[derive(Debug, Default)]
struct Conn {
    snd_base: u32,
    rcv_base: u32,
    written: u64,
    read: u64,
    /// (log offset after a record, total written / read by then).
    writes: VecDeque<(u64, u64)>,
    reads: VecDeque<(u64, u64)>,
    closed_at: Option<u64>,
    /// When the close was reported (the entry is forgotten a while later).
    closed_when: Option<Instant>,
}

/// How long a closed connection (or an unaccepted handshake) is remembered:
/// its last FIN/ACK exchanges and retransmissions (Linux's TIME_WAIT).
const LINGER: std::time::Duration = std::time::Duration::from_secs(60);

impl Conn {
    /// `seq` as a count of bytes from `base`, near `total` (handles wrap).
    fn rel(seq: u32, base: u32, total: u64) -> i64 {
        let cur = base.wrapping_add(total as u32);
        total as i64 - cur.wrapping_sub(seq) as i32 as i64
    }
    /// Offset from which `total >= need` holds, if logged yet.
    fn offset_for(ms: &VecDeque<(u64, u64)>, need: i64) -> Option<u64> {
        if need <= 0 {
            return Some(0);
        }
        ms.iter().find(|(_, t)| *t as i64 >= need).map(|(o, _)| *o)
    }
}

#[derive(Debug, Clone, Copy)]
struct Tcp {
    key: Key,
    seq: u32,
    ack: u32,
    data: u32,
    syn: bool,
    fin: bool,
    rst: bool,
    has_ack: bool,
}

fn parse(p: &Packet) -> Option<Tcp> {
    let h = &p.head;
    if h.len() < 20 || h[0] >> 4 != 4 || h[9] != 6 {
        return None;
    }
    let ihl = (h[0] & 0xf) as usize * 4;
    if h.len() < ihl + 20 {
        return None;
    }
    let t = &h[ihl..];
    let doff = (t[12] >> 4) as usize * 4;
    let flags = t[13];
    let be32 = |o: usize| u32::from_be_bytes(t[o..o + 4].try_into().expect("4 bytes"));
    Some(Tcp {
        key: (
            u32::from_be_bytes(h[12..16].try_into().ok()?),
            u16::from_be_bytes([t[0], t[1]]),
            u32::from_be_bytes(h[16..20].try_into().ok()?),
            u16::from_be_bytes([t[2], t[3]]),
        ),
        seq: be32(4),
        ack: be32(8),
        data: (p.len as usize).saturating_sub(ihl + doff) as u32,
        syn: flags & 0x02 != 0,
        fin: flags & 0x01 != 0,
        rst: flags & 0x04 != 0,
        has_ack: flags & 0x10 != 0,
    })
}

/// Upper bounds of the hold-time histogram's buckets, µs.
pub const HOLD_BUCKETS_US: [u64; 10] =
    [50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000, 250_000];

#[derive(Debug, Default)]
struct State {
    protected: bool,
    acked: u64,
    conns: HashMap<Key, Conn>,
    listening: HashSet<u16>,
    /// Client sequence base (ack of our SYN-ACK) of handshakes not yet
    /// accepted, and when seen.
    handshakes: HashMap<Key, (u32, Instant)>,
    /// Packets held, in arrival order.
    held: VecDeque<(Packet, Option<Tcp>, Instant)>,
    stop: Option<bool>,
    released: u64,
    /// Recent hold times of released packets (µs), for the status line.
    hold_us: VecDeque<u32>,
    /// Released packets by hold time, per bucket of [`HOLD_BUCKETS_US`]
    /// (the last: longer), and the sum of all hold times (µs).
    hold_hist: [u64; HOLD_BUCKETS_US.len() + 1],
    hold_sum_us: u64,
    last_forget: Option<Instant>,
}

impl State {
    /// Drop connections closed (and acknowledged, when protected) more than
    /// [`LINGER`] ago, and handshakes never accepted: a long-running server
    /// must not accumulate them.
    fn forget(&mut self, now: Instant) {
        self.last_forget = Some(now);
        let (acked, protected) = (self.acked, self.protected);
        self.conns.retain(|_, c| {
            let old = c
                .closed_when
                .is_some_and(|t| now.duration_since(t) > LINGER);
            let logged = c.closed_at.is_some_and(|o| o <= acked || !protected);
            !(old && logged)
        });
        self.handshakes
            .retain(|_, (_, t)| now.duration_since(*t) <= LINGER);
    }
}

/// Why a packet waits (or None: it may leave).
fn needs(s: &State, t: &Tcp) -> Option<u64> {
    let Some(c) = s.conns.get(&t.key) else {
        if t.syn || !s.listening.contains(&t.key.1) {
            return Some(0);
        }
        // A connection the program has not accepted yet.
        let hs = s.handshakes.get(&t.key).map(|(a, _)| a);
        if t.data == 0 && !t.fin && (t.rst || hs.is_none() || Some(&t.ack) == hs) {
            return Some(0);
        }
        return None;
    };
    let mut need = 0u64;
    if t.data > 0 {
        let end = Conn::rel(t.seq.wrapping_add(t.data), c.snd_base, c.written);
        need = need.max(Conn::offset_for(&c.writes, end)?);
    }
    if t.fin || t.rst {
        need = need.max(c.closed_at?);
    }
    if t.has_ack {
        let a = Conn::rel(t.ack, c.rcv_base, c.read);
        // After the close, what the program never read it never will: the
        // close record covers it.
        need = need.max(match Conn::offset_for(&c.reads, a) {
            Some(o) => o,
            None => c.closed_at?,
        });
    }
    Some(need)
}

/// Shared between the recorder (what the program did, at which log
/// offset), the replication driver (what the standby acknowledged) and the
/// queue thread.
///
/// Packets are released by whichever thread learns they may leave: the
/// queue thread when they arrive, the replication driver when it hands in
/// the acknowledgement that covers them (no wake-up of the queue thread
/// between the two). Lock order: `queue`, then `st`.
#[derive(Debug)]
pub struct Gate {
    st: Mutex<State>,
    /// The queue, once [`Gate::serve`] runs: receiving is the queue
    /// thread's, verdicts anybody's (under this lock, so two threads'
    /// verdicts never interleave and reorder a connection's packets).
    queue: Mutex<Option<Queue>>,
    /// A verdict the driver could not send; the queue thread reports it.
    failed: Mutex<Option<NetError>>,
    wake: OwnedFd,
    want: AtomicBool,
    held_now: AtomicU64,
}

impl Gate {
    pub fn new() -> Result<Arc<Self>, NetError> {
        // SAFETY: plain eventfd(2) call; the result is checked and owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("eventfd"));
        }
        Ok(Arc::new(Gate {
            st: Mutex::new(State::default()),
            queue: Mutex::new(None),
            failed: Mutex::new(None),
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            want: AtomicBool::new(false),
            held_now: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poke(&self) {
        if self.want.load(Ordering::Acquire) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe {
                libc::write(
                    self.wake.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
        }
    }

    /// A standby is attached (packets wait for its acknowledgements) or not
    /// (packets leave at once).
    pub fn set_protected(&self, on: bool) {
        self.lock().protected = on;
        self.want.store(true, Ordering::Release);
        self.poke();
    }

    /// The standby holds the log up to `offset`. What that lets leave
    /// leaves now, from this thread, unless the queue thread is at work
    /// (then it is asked to look again).
    pub fn acked(&self, offset: u64) {
        {
            let mut s = self.lock();
            if offset <= s.acked {
                return;
            }
            s.acked = offset;
            for c in s.conns.values_mut() {
                prune(&mut c.writes, offset);
                prune(&mut c.reads, offset);
            }
        }
        if !self.want.load(Ordering::Acquire) {
            return;
        }
        let mut q = match self.queue.try_lock() {
            Ok(q) => q,
            Err(_) => return self.poke(),
        };
        let Some(queue) = q.as_mut() else {
            return self.poke();
        };
        if let Err(e) = self.release(queue, &mut Vec::new(), &mut Vec::new()) {
            *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            drop(q);
            self.poke();
        }
    }

    pub fn listening(&self, port: u16) {
        self.lock().listening.insert(port);
    }

    pub fn accepted(&self, key: Key, snd_base: u32, rcv_base: u32) {
        let mut s = self.lock();
        s.handshakes.remove(&key);
        s.conns.insert(
            key,
            Conn {
                snd_base,
                rcv_base,
                ..Conn::default()
            },
        );
        drop(s);
        self.poke();
    }

    /// A connection carried over from a takeover, with its totals.
    pub fn adopt(&self, key: Key, snd_base: u32, rcv_base: u32, written: u64, read: u64) {
        let mut s = self.lock();
        s.conns.insert(
            key,
            Conn {
                snd_base,
                rcv_base,
                written,
                read,
                writes: VecDeque::from([(0, written)]),
                reads: VecDeque::from([(0, read)]),
                closed_at: None,
                closed_when: None,
            },
        );
    }

    /// The program wrote (`wrote`) or read bytes on `key`; the record that
    /// says so ends at log `offset`.
    pub fn io(&self, key: Key, wrote: bool, n: u64, offset: u64) {
        let mut s = self.lock();
        let keep_history = s.protected;
        if let Some(c) = s.conns.get_mut(&key) {
            if !keep_history {
                // Unprotected: no acknowledgement will prune the history;
                // the latest record alone is what matters (and suffices,
                // conservatively, if a standby joins).
                c.writes.clear();
                c.reads.clear();
            }
            if wrote {
                c.written += n;
                c.writes.push_back((offset, c.written));
            } else {
                c.read += n;
                c.reads.push_back((offset, c.read));
            }
        }
        // No wake-up: protected, a packet this record lets leave still
        // waits for its acknowledgement; unprotected, none waits.
    }

    /// The program closed `key` (None: every connection, at exit).
    pub fn closed(&self, key: Option<Key>, offset: u64) {
        let mut s = self.lock();
        for (k, c) in s.conns.iter_mut() {
            if key.is_none_or(|x| x == *k) && c.closed_at.is_none() {
                c.closed_at = Some(offset);
                c.closed_when = Some(Instant::now());
            }
        }
        // No wake-up, as in `io`.
    }

    /// Packets held right now.
    pub fn held(&self) -> u64 {
        self.held_now.load(Ordering::Relaxed)
    }

    /// (released so far, p50 and p99 of recent hold times in µs).
    pub fn hold_stats(&self) -> (u64, u32, u32) {
        let s = self.lock();
        let mut v: Vec<u32> = s.hold_us.iter().copied().collect();
        v.sort_unstable();
        let q = |f: f64| {
            v.get(((v.len() as f64 - 1.0) * f) as usize)
                .copied()
                .unwrap_or(0)
        };
        (s.released, q(0.5), q(0.99))
    }

    /// Released packets by hold time: cumulative (upper bound µs, count)
    /// ending with (`u64::MAX`, all), and the sum of hold times in µs.
    pub fn hold_histogram(&self) -> (Vec<(u64, u64)>, u64) {
        let s = self.lock();
        let mut acc = 0;
        let mut out = Vec::with_capacity(HOLD_BUCKETS_US.len() + 1);
        for (i, n) in s.hold_hist.iter().enumerate() {
            acc += n;
            out.push((HOLD_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX), acc));
        }
        (out, s.hold_sum_us)
    }

    /// Stop the queue thread; held packets are released or dropped.
    pub fn stop(&self, release: bool) {
        self.lock().stop = Some(release);
        self.want.store(true, Ordering::Release);
        self.poke();
    }

    /// Serve queue `q` until [`Gate::stop`] (or an error). The queue is
    /// closed on return: what arrives later has no reader and is dropped
    /// by the kernel.
    pub fn serve(self: &Arc<Self>, q: Queue) -> Result<(), NetError> {
        let fd = q.raw_fd();
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(q);
        let r = self.serve_queue(fd);
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        r
    }

    fn serve_queue(&self, fd: std::os::fd::RawFd) -> Result<(), NetError> {
        let mut fresh = Vec::new();
        let mut verdicts = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
            if fds[1].revents != 0 {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                unsafe {
                    libc::read(
                        self.wake.as_raw_fd(),
                        &mut v as *mut u64 as *mut libc::c_void,
                        8,
                    )
                };
            }
            if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(e);
            }
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            // Set by `serve` for as long as this runs.
            let Some(queue) = q.as_mut() else {
                return Ok(());
            };
            fresh.clear();
            queue.recv(&mut fresh)?;
            if self.release(queue, &mut fresh, &mut verdicts)? {
                return Ok(());
            }
        }
    }

    /// Hold `fresh` packets, then give the verdicts of every held packet
    /// that may leave now. True once stopped.
    fn release(
        &self,
        queue: &mut Queue,
        fresh: &mut Vec<Packet>,
        verdicts: &mut Vec<(u32, bool)>,
    ) -> Result<bool, NetError> {
        verdicts.clear();
        let stop = {
            let mut s = self.lock();
            let now = Instant::now();
            for p in fresh.drain(..) {
                let t = parse(&p);
                if let Some(t) = &t {
                    if t.syn && t.has_ack && !s.conns.contains_key(&t.key) {
                        s.handshakes.insert(t.key, (t.ack, now));
                    }
                }
                s.held.push_back((p, t, now));
            }
            if s.last_forget
                .is_none_or(|t| now.duration_since(t) > std::time::Duration::from_secs(1))
            {
                s.forget(now);
            }
            let stop = s.stop;
            let mut keep = VecDeque::with_capacity(s.held.len());
            let held = std::mem::take(&mut s.held);
            for (p, t, at) in held {
                let go = match (stop, &t) {
                    (Some(r), _) => Some(r),
                    _ if !s.protected => Some(true),
                    (None, None) => Some(true),
                    (None, Some(t)) => needs(&s, t).filter(|o| *o <= s.acked).map(|_| true),
                };
                match go {
                    Some(a) => {
                        verdicts.push((p.id, a));
                        s.released += 1;
                        if s.hold_us.len() >= 4096 {
                            s.hold_us.pop_front();
                        }
                        let us = now.duration_since(at).as_micros().min(u32::MAX as u128) as u32;
                        s.hold_us.push_back(us);
                        let b = HOLD_BUCKETS_US.partition_point(|&le| le < us as u64);
                        s.hold_hist[b] += 1;
                        s.hold_sum_us += us as u64;
                    }
                    None => keep.push_back((p, t, at)),
                }
            }
            s.held = keep;
            self.held_now.store(s.held.len() as u64, Ordering::Relaxed);
            self.want.store(!s.held.is_empty(), Ordering::Release);
            stop
        };
        if !verdicts.is_empty() {
            queue.verdicts(verdicts)?;
        }
        Ok(stop.is_some())
    }
}

fn prune(ms: &mut VecDeque<(u64, u64)>, acked: u64) {
    while ms.len() > 1 && ms[1].0 <= acked {
        ms.pop_front();
    }
}

#[cfg(test)]
mod tests;
