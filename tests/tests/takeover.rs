//! Going live at the end of a cut-off log: the recorder is killed with
//! SIGKILL mid-run (its program dies with it), then `replay --go-live`
//! replays what the log holds and lets the program carry on for real,
//! continuing the same log. This is the standby's takeover, on one host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hotstandby_tests::*;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    b
}

fn lines(p: &Path) -> Vec<i64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().expect("a number per line"))
        .collect()
}

/// The numbers must be exactly 1..=n: no gap, no repetition.
fn assert_counts(v: &[i64], n: i64) {
    assert_eq!(v.len() as i64, n, "expected {n} numbers, got {}", v.len());
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, i as i64 + 1, "number {} is {x}", i + 1);
    }
}

fn wait_lines(p: &Path, at_least: usize) {
    let t = Instant::now();
    while lines(p).len() < at_least {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the program did not get going"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn counter_continues_without_gap_or_repetition() {
    let b = bin();
    let s = Scratch::new("takeover-counter");
    let prog = build_c("counter", s.path());
    let data = s.join("data");
    std::fs::create_dir(&data).unwrap();
    let log = s.join("log");
    let file = data.join("counter.txt");
    let n = 700;
    let mut rec = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .arg("--")
        .arg(&prog)
        .args([&n.to_string(), "1500"])
        .current_dir(&data)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_lines(&file, 150);
    rec.kill().unwrap(); // SIGKILL the supervisor; PTRACE_O_EXITKILL takes the program with it
    rec.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = lines(&file);
    assert!(
        before.len() >= 150 && (before.len() as i64) < n,
        "killed mid-run: {} numbers",
        before.len()
    );
    let frozen = before.len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lines(&file).len(),
        frozen,
        "nothing runs unsupervised after the supervisor died"
    );
    let v = tie(&mut Command::new(&b))
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "a cut-off log is sound up to its last frame"
    );

    // The standby's data directory starts as the primary's did: empty.
    std::fs::remove_file(&file).unwrap();
    let live = tie(&mut Command::new(&b))
        .args(["replay", "--go-live", "--log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&live.stderr);
    assert_eq!(live.status.code(), Some(0), "{err}");
    assert!(err.contains("goes on live"), "{err}");
    assert_eq!(String::from_utf8_lossy(&live.stdout), format!("done {n}\n"));
    assert_counts(&lines(&file), n);

    // The continued log is complete and replays whole, old part and new.
    let v = tie(&mut Command::new(&b))
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains("complete"));
    std::fs::remove_file(&file).unwrap();
    let r = replay(&b, &log);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_counts(&lines(&file), n);
}

fn redis(port: u16, args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn incrs_logged(log: &Path) -> usize {
    use hotstandby_protocol::record::Event;
    let Ok(l) = hotstandby_recorder::logfile::load(log) else {
        return 0;
    };
    let has = |d: &[u8]| d.windows(4).any(|w| w.eq_ignore_ascii_case(b"incr"));
    l.events
        .iter()
        .map(|e| match e {
            Event::Batch { .. } => e
                .calls()
                .expect("a valid batch")
                .iter()
                .filter(|c| has(&c.data))
                .count(),
            Event::Syscall(s) => s.writes.iter().filter(|w| has(&w.data)).count(),
            _ => 0,
        })
        .sum()
}

#[test]
fn redis_keeps_every_acknowledged_write_across_a_takeover() {
    require_root();
    let b = bin();
    let s = Scratch::new("takeover-redis");
    let data = s.join("data");
    std::fs::create_dir(&data).unwrap();
    let log = s.join("log");
    let port = free_port();
    let mut rec = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .args([
            "--",
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    let mut rng = Rng::new();
    let mut expect = Vec::new();
    for i in 0..300 {
        let v = format!("{:x}", rng.next_u64());
        assert_eq!(redis(port, &["set", &format!("key:{i}"), &v]), "OK");
        expect.push(v);
    }
    for _ in 0..50 {
        redis(port, &["incr", "counter"]);
    }
    // Without an output rule (`run --vip`), a reply can reach the client
    // before the call that made it is in the log: buffered calls are logged
    // at the thread's next traced syscall (redis makes one at least every
    // 100 ms). This test is about the takeover keeping what the log holds:
    // kill once the log holds all 50 INCRs (network.rs tests the output rule).
    wait_until("the log to hold the 50 INCRs", 10, || {
        incrs_logged(&log) >= 50
    });
    rec.kill().unwrap();
    rec.wait().unwrap();
    // The program dies with its supervisor: nothing answers until the takeover.
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "redis outlived its killed supervisor"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut live = tie(&mut Command::new(&b))
        .args(["replay", "--go-live", "--log"])
        .arg(&log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    assert_eq!(redis(port, &["get", "counter"]), "50");
    for (i, v) in expect.iter().enumerate() {
        assert_eq!(
            &redis(port, &["get", &format!("key:{i}")]),
            v,
            "key:{i} lost in the takeover"
        );
    }
    assert_eq!(
        redis(port, &["incr", "counter"]),
        "51",
        "the program goes on serving"
    );
    redis(port, &["shutdown", "nosave"]);
    let st = live.wait().unwrap();
    assert_eq!(st.code(), Some(0));
}

/// The README's first command: a whole network takeover on this machine;
/// the clients' connections are kept and the counter matches what they
/// were told.
#[test]
fn the_demo_fails_over() {
    require_root();
    let b = bin();
    let o = tie(&mut Command::new(&b)).arg("demo").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("connections kept: 4/4") && out.contains("demo ok"),
        "{out}"
    );
}

/// Negative control for the no-gap/no-repetition check: going live over a
/// data directory that still holds the dead run's output (instead of the
/// starting state a standby has) repeats numbers, and the check says so.
#[test]
fn the_counter_check_catches_a_takeover_over_the_wrong_files() {
    let b = bin();
    let s = Scratch::new("takeover-negative");
    let prog = build_c("counter", s.path());
    let data = s.join("data");
    std::fs::create_dir(&data).unwrap();
    let log = s.join("log");
    let file = data.join("counter.txt");
    let n = 400;
    let mut rec = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .arg("--")
        .arg(&prog)
        .args([&n.to_string(), "1500"])
        .current_dir(&data)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_lines(&file, 100);
    rec.kill().unwrap();
    rec.wait().unwrap();
    // counter.txt is NOT reset: replay appends the recorded numbers again.
    let live = tie(&mut Command::new(&b))
        .args(["replay", "--go-live", "--log"])
        .arg(&log)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        live.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let v = lines(&file);
    assert!(v.len() as i64 > n, "numbers were repeated");
    assert!(
        std::panic::catch_unwind(|| assert_counts(&v, n)).is_err(),
        "the check must reject repeated numbers"
    );
}
