use super::*;
use crate::sysmodel;

fn tcp(fd: i32) -> TcpConn {
    TcpConn {
        tid: 2,
        fd,
        local: vec![],
        remote: vec![],
        snd_base: 0,
        rcv_base: 0,
        mss: 0,
        snd_wscale: 0,
        rcv_wscale: 0,
        options: 0,
        reuse: 0,
        snd_wnd: 0,
        rcv_wnd: 0,
        tsval: 0,
        wall_ms: 0,
    }
}

fn ended(notes: &[Note<()>]) -> Vec<i32> {
    notes
        .iter()
        .filter_map(|n| match n {
            Note::Ended(c) => Some(c.tcp.fd),
            _ => None,
        })
        .collect()
}

#[test]
fn aliases_share_and_the_last_close_ends() {
    let mut t = ConnTable::default();
    t.insert((1, 4), 10u32);
    t.dup((1, 4), (1, 5));
    *t.get_mut((1, 5)).unwrap() += 1;
    assert_eq!(t.get((1, 4)), Some(&11));
    assert_eq!(t.close((1, 4)), None, "fd 5 still holds it");
    assert_eq!(t.close((1, 5)), Some(11));
    assert!(t.get((1, 5)).is_none());
}

#[test]
fn dup2_over_a_connection_closes_it() {
    let mut t = ConnTable::default();
    t.insert((1, 4), 1u32);
    t.insert((1, 6), 2u32);
    assert_eq!(t.dup((1, 4), (1, 6)), Some(2));
    assert_eq!(t.get((1, 6)), Some(&1));
    let all: Vec<_> = t.iter_mut().map(|(fds, v)| (fds, *v)).collect();
    assert_eq!(all, vec![(vec![(1, 4), (1, 6)], 1)]);
}

#[test]
fn close_range_ends_the_connections_in_it() {
    let mut s: Shadow<()> = Shadow::new(2, [0, 1, 2]);
    s.accepted(2, 5, tcp(5), ());
    s.accepted(2, 9, tcp(9), ());
    let notes = s.apply(2, Change::CloseRange { lo: 3, hi: 6 });
    assert_eq!(ended(&notes), vec![5]);
    assert!(s.conn(2, 9).is_some());
    assert_eq!(s.kind(2, 1), Some(FdKind::External), "stdio untouched");
}

#[test]
fn exec_resets_handlers_and_drops_close_on_exec_fds() {
    let mut s: Shadow<()> = Shadow::new(2, [0, 1, 2]);
    let h = SigAct {
        handler: 0x401000,
        flags: libc::SA_RESTART as u64,
    };
    let ign = SigAct {
        handler: 1,
        flags: 0,
    };
    s.apply(2, Change::SigAction { sig: 10, act: h });
    s.apply(2, Change::SigAction { sig: 13, act: ign });
    assert_eq!(s.disposition(2, 10), Disposition::Handler { restart: true });
    s.apply(
        2,
        Change::NewFd {
            fd: 7,
            kind: FdKind::File,
        },
    );
    s.accepted(2, 8, tcp(8), ());
    let notes = s.apply(
        2,
        Change::Exec {
            open: vec![0, 1, 2, 7],
        },
    );
    assert_eq!(ended(&notes), vec![8], "the close-on-exec connection ends");
    assert_eq!(s.disposition(2, 10), Disposition::Fatal, "handler reset");
    assert_eq!(
        s.disposition(2, 13),
        Disposition::Ignore,
        "ignored stays ignored"
    );
    assert_eq!(s.kind(2, 7), Some(FdKind::File));
}

#[test]
fn a_forked_child_shares_connections_until_both_close() {
    let mut s: Shadow<()> = Shadow::new(2, [0, 1, 2]);
    s.accepted(2, 5, tcp(5), ());
    s.apply(2, Change::Fork { child: 3 });
    assert!(ended(&s.apply(2, Change::Close { fd: 5 })).is_empty());
    let n = s.apply(
        3,
        Change::Io {
            fd: 5,
            wrote: true,
            n: 10,
        },
    );
    assert!(matches!(
        n[..],
        [Note::Io {
            wrote: true,
            n: 10,
            ..
        }]
    ));
    assert_eq!(s.conn(3, 5).unwrap().written, 10);
    assert_eq!(ended(&s.apply(3, Change::Gone)), vec![5]);
}

struct Mem(Vec<u8>);
impl Peek for Mem {
    fn read(&mut self, _addr: u64, len: usize) -> Option<Vec<u8>> {
        Some(self.0[..len].to_vec())
    }
    fn classify(&mut self, _fd: i32) -> FdKind {
        FdKind::File
    }
}

#[test]
fn effects_follow_the_model() {
    let sp = |nr: i64| sysmodel::spec(nr as u32).unwrap();
    let mut pipe = Mem([5i32.to_le_bytes(), 6i32.to_le_bytes()].concat());
    assert_eq!(
        effects(sp(libc::SYS_pipe2), &[0x1000, 0, 0, 0, 0, 0], 0, &mut pipe),
        vec![
            Change::NewFd {
                fd: 5,
                kind: FdKind::Internal
            },
            Change::NewFd {
                fd: 6,
                kind: FdKind::Internal
            }
        ]
    );
    let mut act = Mem([0x4010u64.to_le_bytes(), 4u64.to_le_bytes()].concat());
    assert_eq!(
        effects(
            sp(libc::SYS_rt_sigaction),
            &[15, 0x2000, 0, 8, 0, 0],
            0,
            &mut act
        ),
        vec![Change::SigAction {
            sig: 15,
            act: SigAct {
                handler: 0x4010,
                flags: 4
            }
        }]
    );
    let mut none = Mem(vec![]);
    assert_eq!(
        effects(sp(libc::SYS_openat), &[0, 0, 0, 0, 0, 0], 7, &mut none),
        vec![Change::NewFd {
            fd: 7,
            kind: FdKind::File
        }]
    );
    assert_eq!(
        effects(sp(libc::SYS_dup2), &[4, 9, 0, 0, 0, 0], 9, &mut none),
        vec![Change::Dup { from: 4, to: 9 }]
    );
    let peek = libc::MSG_PEEK as u64;
    assert!(effects(sp(libc::SYS_recvfrom), &[4, 0, 9, peek, 0, 0], 9, &mut none).is_empty());
    assert_eq!(
        effects(sp(libc::SYS_recvfrom), &[4, 0, 9, 0, 0, 0], 9, &mut none),
        vec![Change::Io {
            fd: 4,
            wrote: false,
            n: 9
        }]
    );
    assert!(effects(sp(libc::SYS_close), &[4, 0, 0, 0, 0, 0], -9, &mut none).is_empty());
}
