use super::*;

const K: Key = (0xc633_640a, 6379, 0xc633_6403, 40000);

fn pkt(seq: u32, ack: u32, data: u32, flags: u8) -> Tcp {
    Tcp {
        key: K,
        seq,
        ack,
        data,
        syn: flags & 0x02 != 0,
        fin: flags & 0x01 != 0,
        rst: flags & 0x04 != 0,
        has_ack: true,
    }
}

fn state() -> State {
    let mut s = State {
        protected: true,
        ..State::default()
    };
    s.listening.insert(6379);
    s.conns.insert(
        K,
        Conn {
            snd_base: 1000,
            rcv_base: 5000,
            ..Conn::default()
        },
    );
    s
}

#[test]
fn data_waits_for_the_write_record() {
    let mut s = state();
    // 10 bytes at the first byte the program writes: not logged yet.
    assert_eq!(needs(&s, &pkt(1000, 5000, 10, 0)), None);
    let c = s.conns.get_mut(&K).unwrap();
    c.written = 6;
    c.writes.push_back((300, 6));
    assert_eq!(
        needs(&s, &pkt(1000, 5000, 10, 0)),
        None,
        "only 6 of 10 bytes logged"
    );
    let c = s.conns.get_mut(&K).unwrap();
    c.written = 10;
    c.writes.push_back((420, 10));
    assert_eq!(needs(&s, &pkt(1000, 5000, 10, 0)), Some(420));
    assert_eq!(needs(&s, &pkt(1000, 5000, 6, 0)), Some(300));
}

#[test]
fn ack_waits_for_the_read_record() {
    let mut s = state();
    // Acknowledging 7 bytes the program has not read.
    assert_eq!(needs(&s, &pkt(1000, 5007, 0, 0)), None);
    let c = s.conns.get_mut(&K).unwrap();
    c.read = 7;
    c.reads.push_back((900, 7));
    assert_eq!(needs(&s, &pkt(1000, 5007, 0, 0)), Some(900));
    // Acknowledging nothing new leaves at once.
    assert_eq!(needs(&s, &pkt(1000, 5000, 0, 0)), Some(0));
}

#[test]
fn fin_and_rst_wait_for_the_close() {
    let mut s = state();
    assert_eq!(needs(&s, &pkt(1000, 5000, 0, 0x01)), None);
    assert_eq!(needs(&s, &pkt(1000, 5000, 0, 0x04)), None);
    s.conns.get_mut(&K).unwrap().closed_at = Some(1234);
    assert_eq!(needs(&s, &pkt(1000, 5000, 0, 0x01)), Some(1234));
    // After the close, an ack of unread bytes is covered by the close.
    assert_eq!(needs(&s, &pkt(1001, 5020, 0, 0x04)), Some(1234));
}

#[test]
fn handshake_leaves_but_early_data_ack_waits_for_accept() {
    let mut s = state();
    s.conns.clear();
    let mut syn = pkt(999, 5000, 0, 0x02);
    syn.has_ack = true;
    assert_eq!(needs(&s, &syn), Some(0));
    s.handshakes.insert(K, (5000, Instant::now()));
    assert_eq!(needs(&s, &pkt(1000, 5000, 0, 0)), Some(0));
    assert_eq!(
        needs(&s, &pkt(1000, 5010, 0, 0)),
        None,
        "acks request bytes before accept"
    );
    // Traffic of ports the program does not listen on is not its own.
    let mut other = pkt(1, 2, 100, 0);
    other.key.1 = 22;
    assert_eq!(needs(&s, &other), Some(0));
}

#[test]
fn sequence_numbers_wrap() {
    let mut s = state();
    let c = s.conns.get_mut(&K).unwrap();
    c.snd_base = u32::MAX - 3;
    c.written = 10;
    c.writes.push_back((77, 10));
    assert_eq!(needs(&s, &pkt(u32::MAX - 3, 5000, 10, 0)), Some(77));
    assert_eq!(Conn::rel(6, u32::MAX - 3, 10), 10);
}

#[test]
fn keys_from_v4_and_mapped_v6() {
    let mut v4 = vec![2, 0, 0x18, 0xeb, 198, 51, 100, 10];
    v4.extend([0; 8]);
    let mut v6 = vec![10, 0, 0x9c, 0x40, 0, 0, 0, 0];
    v6.extend([0; 10]);
    v6.extend([0xff, 0xff, 198, 51, 100, 3]);
    v6.extend([0; 4]);
    assert_eq!(key_of(&v4, &v6), Some(K));
}

#[test]
fn closed_connections_and_stale_handshakes_are_forgotten() {
    let mut s = state();
    let t0 = Instant::now();
    s.handshakes.insert((1, 2, 3, 4), (9, t0));
    let c = s.conns.get_mut(&K).unwrap();
    c.closed_at = Some(100);
    c.closed_when = Some(t0);
    s.forget(t0 + LINGER / 2);
    assert!(
        s.conns.contains_key(&K),
        "kept while it may still exchange FIN/ACK"
    );
    s.forget(t0 + LINGER * 2);
    assert!(
        s.conns.contains_key(&K),
        "kept: the standby has not acknowledged the close"
    );
    s.acked = 100;
    s.forget(t0 + LINGER * 2);
    assert!(!s.conns.contains_key(&K));
    assert!(s.handshakes.is_empty());
}

#[test]
fn unprotected_history_stays_one_record_long() {
    let g = Gate::new().unwrap();
    g.listening(6379);
    g.accepted(K, 1000, 5000);
    for i in 1..=1000u64 {
        g.io(K, true, 1, i * 16);
    }
    let s = g.lock();
    let c = s.conns.get(&K).unwrap();
    assert_eq!(c.writes.len(), 1);
    assert_eq!(c.writes[0], (16_000, 1000));
}
