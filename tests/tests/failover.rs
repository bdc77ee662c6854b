//! Failure injection on two test hosts (network namespaces joined by a veth
//! pair): a counter program under `hotstandby run` on the primary, a
//! `hotstandby standby` following it. After each failure the surviving
//! side's file must hold 1..N with no gap and no repetition, and the exit
//! statuses must be right.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hotstandby_tests::*;

const N: i64 = 3000;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    b
}

fn lines(p: &Path) -> Vec<i64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn assert_counts(v: &[i64], n: i64, what: &str) {
    assert_eq!(
        v.len() as i64,
        n,
        "{what}: expected {n} numbers, got {}",
        v.len()
    );
    for (i, x) in v.iter().enumerate() {
        assert_eq!(
            *x,
            i as i64 + 1,
            "{what}: number {} is {x} (gap or repetition)",
            i + 1
        );
    }
}

struct Lab {
    _s: Scratch,
    hosts: TwoHosts,
    b: PathBuf,
    counter: PathBuf,
    a: PathBuf,
    dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let b = bin();
        let s = Scratch::new(&format!("failover-{tag}"));
        let counter = build_c("counter", s.path());
        let dir = s.path().to_path_buf();
        for k in ["kp", "ks"] {
            let st = Command::new(&b)
                .args(["keygen", "--out"])
                .arg(dir.join(k))
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        }
        let a = dir.join("A");
        std::fs::create_dir(&a).unwrap();
        Lab {
            hosts: TwoHosts::new(tag),
            b,
            counter,
            a,
            dir,
            _s: s,
        }
    }

    fn primary(&self) -> Guard {
        self.primary_n(N)
    }

    /// A primary whose program counts to `n`.
    fn primary_n(&self, n: i64) -> Guard {
        self.primary_with(n, &[])
    }

    /// A primary whose program counts to `n`, with `extra` options.
    fn primary_with(&self, n: i64, extra: &[&str]) -> Guard {
        let c = self
            .hosts
            .cmd(&self.hosts.primary_ns, &self.b)
            .args(["run", "--listen", "198.51.100.1:7600"])
            .args(extra)
            .arg("--log")
            .arg(self.dir.join("lp"))
            .arg("--cert")
            .arg(self.dir.join("kp/node.crt"))
            .arg("--key")
            .arg(self.dir.join("kp/node.key"))
            .args(if extra.contains(&"--peer-cert") {
                vec![]
            } else {
                vec!["--peer-cert".into(), self.dir.join("ks/node.crt")]
            })
            .arg("--data-dir")
            .arg(&self.a)
            .arg("--")
            .arg(&self.counter)
            .args([&n.to_string(), "2000"])
            .current_dir(&self.a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Guard(Some(c))
    }

    /// A standby with its own log and data directory named `name`.
    fn standby(&self, name: &str) -> (Guard, PathBuf, PathBuf) {
        self.standby_of(
            name,
            &self.hosts.standby_ns,
            "198.51.100.1:7600",
            "198.51.100.2:7600",
            ["ks", "kp"],
        )
    }

    /// A standby on host `ns` following `primary`, serving on `listen` once
    /// it takes over, with keys `[own, peer]`.
    fn standby_of(
        &self,
        name: &str,
        ns: &str,
        primary: &str,
        listen: &str,
        keys: [&str; 2],
    ) -> (Guard, PathBuf, PathBuf) {
        self.standby_with(name, ns, primary, listen, keys, &[], &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn standby_with(
        &self,
        name: &str,
        ns: &str,
        primary: &str,
        listen: &str,
        keys: [&str; 2],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Guard, PathBuf, PathBuf) {
        let data = self.dir.join(format!("{name}-data"));
        std::fs::create_dir_all(&data).unwrap();
        let log = self.dir.join(format!("{name}-log"));
        let c = self
            .hosts
            .cmd(ns, &self.b)
            .args(["standby", "--primary", primary, "--listen", listen])
            .args(extra)
            .arg("--log")
            .arg(&log)
            .arg("--cert")
            .arg(self.dir.join(format!("{}/node.crt", keys[0])))
            .arg("--key")
            .arg(self.dir.join(format!("{}/node.key", keys[0])))
            .args(if extra.contains(&"--peer-cert") {
                vec![]
            } else {
                vec![
                    "--peer-cert".into(),
                    self.dir.join(format!("{}/node.crt", keys[1])),
                ]
            })
            .arg("--data-dir")
            .arg(&data)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (Guard(Some(c)), data.join("counter.txt"), log)
    }

    fn a_file(&self) -> PathBuf {
        self.a.join("counter.txt")
    }
}

/// SIGSTOP a node: its supervisor and all its descendants (the init of
/// the program's namespace, the program); returns them, supervisor first.
fn pause(g: &Guard) -> Vec<i32> {
    let ppid_of = |pid: i32| -> Option<i32> {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the ")" that ends the command name: state, then ppid.
        st.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .collect();
    let mut pids = vec![g.pid()];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(all.iter().filter(|p| ppid_of(**p) == Some(parent)));
        i += 1;
    }
    for pid in pids.iter() {
        // SAFETY: plain integers; these are our child and its descendants.
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    pids
}

/// SIGCONT what [`pause`] stopped.
fn resume(pids: &[i32]) {
    for pid in pids {
        // SAFETY: as in `pause`.
        unsafe { libc::kill(*pid, libc::SIGCONT) };
    }
}

fn following(lab: &Lab, log: &Path, file: &Path) {
    wait_until("the standby to follow", 20, || {
        status(&lab.b, log).contains("Following") && lines(file).len() > 100
    });
}

#[test]
fn kill_9_of_the_primary_supervisor() {
    let lab = Lab::new("k");
    let mut p = lab.primary();
    let (mut s, sfile, slog) = lab.standby("s1");
    following(&lab, &slog, &sfile);
    wait_until("the primary to report itself protected", 10, || {
        status(&lab.b, &lab.dir.join("lp")).contains("protection:  PROTECTED")
    });
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    let po = p.wait(10);
    assert_eq!(po.status.code(), None, "killed by a signal");
    let so = s.wait(60);
    let out = String::from_utf8_lossy(&so.stdout);
    let err = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{err}");
    assert!(err.contains("GOING LIVE"), "{err}");
    assert_eq!(out.trim(), format!("done {N}"));
    assert_counts(&lines(&sfile), N, "standby's file");
    let primary_had = lines(&lab.a_file());
    assert!(
        (primary_had.len() as i64) < N,
        "the primary was killed mid-run"
    );
}

#[test]
fn a_new_standby_catches_up_and_then_takes_over() {
    let lab = Lab::new("r");
    let mut p = lab.primary();
    let (mut s1, f1, l1) = lab.standby("s1");
    following(&lab, &l1, &f1);
    // The standby dies; the primary serves on, unprotected.
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s1.pid(), libc::SIGKILL) };
    s1.wait(10);
    wait_until("the primary to notice", 10, || {
        status(&lab.b, &lab.dir.join("lp")).contains("Unprotected")
    });
    let before = lines(&lab.a_file()).len();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lines(&lab.a_file()).len() > before,
        "an unprotected primary keeps serving"
    );
    // A new standby with an empty log catches up from the start, then the primary dies.
    let (mut s2, f2, l2) = lab.standby("s2");
    following(&lab, &l2, &f2);
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    let so = s2.wait(60);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
    assert_counts(&lines(&f2), N, "new standby's file");
}

#[test]
fn a_stopped_primary_that_wakes_up_steps_down() {
    let lab = Lab::new("t");
    let mut p = lab.primary();
    let (mut s, sfile, slog) = lab.standby("s1");
    following(&lab, &slog, &sfile);
    // SIGSTOP the primary's supervisor and program (its process group is ours to stop).
    let prog = lines(&lab.a_file()).len();
    let pids = pause(&p);
    wait_until("the standby to take over", 20, || {
        status(&lab.b, &slog).contains("epoch 2")
    });
    resume(&pids);
    let po = p.wait(30);
    let perr = String::from_utf8_lossy(&po.stderr);
    assert_eq!(
        po.status.code(),
        Some(75),
        "the old primary must step down loudly: {perr}"
    );
    assert!(perr.contains("NEWER PRIMARY"), "{perr}");
    assert!(lines(&lab.a_file()).len() >= prog);
    let so = s.wait(60);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
    assert_counts(&lines(&sfile), N, "standby's file");
}

/// Two failovers in a row, each from a paused primary: the epoch grows by
/// one each time (and is kept in the log directory), and both old
/// primaries — the second at epoch 2, the first at epoch 1, which never
/// heard of the second takeover's primary directly — step down loudly when
/// they are continued; the counter is exact on the last one.
#[test]
fn chained_failovers_raise_the_epoch_and_every_old_primary_steps_down() {
    let lab = Lab::new("c");
    let mut p = lab.primary_n(8000);
    let (mut s1, f1, l1) = lab.standby("s1");
    following(&lab, &l1, &f1);
    let p_pids = pause(&p);
    wait_until("the first takeover", 20, || {
        status(&lab.b, &l1).contains("role:        primary (epoch 2)")
    });
    assert_eq!(
        std::fs::read_to_string(l1.join("epoch")).unwrap().trim(),
        "2"
    );
    // A new standby on host A (the paused primary still holds port 7600).
    let (mut s2, f2, l2) = lab.standby_of(
        "s2",
        &lab.hosts.primary_ns,
        "198.51.100.2:7600",
        "198.51.100.1:7601",
        ["kp", "ks"],
    );
    wait_until("the second standby to catch up and follow", 40, || {
        status(&lab.b, &l2).contains("Following") && lines(&f2).len() + 50 > lines(&f1).len()
    });
    let s1_pids = pause(&s1);
    wait_until("the second takeover", 20, || {
        status(&lab.b, &l2).contains("role:        primary (epoch 3)")
    });
    assert_eq!(
        std::fs::read_to_string(l2.join("epoch")).unwrap().trim(),
        "3"
    );
    assert!(
        std::fs::read_to_string(l2.join("former"))
            .unwrap()
            .contains("198.51.100.1:7600"),
        "the second standby learned the first primary from the second"
    );
    resume(&s1_pids);
    let o = s1.wait(30);
    assert_eq!(
        o.status.code(),
        Some(75),
        "the primary of epoch 2 steps down: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    resume(&p_pids);
    let o = p.wait(30);
    assert_eq!(
        o.status.code(),
        Some(75),
        "the primary of epoch 1 steps down: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = s2.wait(120);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_counts(&lines(&f2), 8000, "the third node's file");
}

#[test]
fn a_partition_between_the_hosts() {
    let lab = Lab::new("x");
    let mut p = lab.primary();
    let (mut s, sfile, slog) = lab.standby("s1");
    following(&lab, &slog, &sfile);
    lab.hosts.partition(true);
    wait_until("the standby to take over", 20, || {
        status(&lab.b, &slog).contains("epoch 2")
    });
    wait_until("the primary to see its standby gone", 20, || {
        status(&lab.b, &lab.dir.join("lp")).contains("Unprotected")
    });
    lab.hosts.partition(false);
    let po = p.wait(30);
    assert_eq!(
        po.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&po.stderr)
    );
    let so = s.wait(60);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
    assert_counts(&lines(&sfile), N, "standby's file");
}

fn redis_cli(lab: &Lab, ns: &str, host: &str, args: &[&str]) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "redis-cli", "-h", host, "-p", "6390"])
        .args(args)
        .output()
        .unwrap();
    let _ = lab;
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// redis-server under `run` on the primary host, written to on the
/// primary's address; after the primary host's supervisor is killed the
/// standby's redis answers on the standby's address with every key.
#[test]
fn redis_fails_over_with_its_data() {
    let lab = Lab::new("d");
    let data = lab.dir.join("A");
    let c = lab
        .hosts
        .cmd(&lab.hosts.primary_ns, &lab.b)
        .args(["run", "--listen", "198.51.100.1:7600", "--log"])
        .arg(lab.dir.join("lp"))
        .arg("--cert")
        .arg(lab.dir.join("kp/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("kp/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("ks/node.crt"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--",
            "redis-server",
            "--port",
            "6390",
            "--bind",
            "198.51.100.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Guard(Some(c));
    let (mut s, _sfile, slog) = lab.standby("s1");
    wait_until("redis on the primary", 20, || {
        redis_cli(&lab, &lab.hosts.primary_ns, "198.51.100.1", &["ping"]) == "PONG"
    });
    wait_until("the standby to follow", 20, || {
        status(&lab.b, &slog).contains("Following")
    });
    let mut rng = Rng::new();
    let mut script = String::new();
    let mut expect = Vec::new();
    for i in 0..400 {
        let v = format!("{:x}", rng.next_u64());
        script.push_str(&format!("SET key:{i} {v}\n"));
        expect.push(v);
    }
    script.push_str("INCRBY counter 400\n");
    let mut cli = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.hosts.primary_ns,
            "redis-cli",
            "-h",
            "198.51.100.1",
            "-p",
            "6390",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    cli.stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    drop(cli.stdin.take());
    let replies = cli.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&replies.stdout)
            .lines()
            .filter(|l| *l == "OK")
            .count(),
        400,
        "every write acknowledged"
    );
    // Without the output rule (network takeover) an acknowledgement can
    // precede the standby's copy by the replication lag: wait it out.
    wait_until("the standby to hold the whole log", 20, || {
        status(&lab.b, &lab.dir.join("lp")).contains("lag:         0 bytes")
    });
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    wait_until("redis on the standby's address", 30, || {
        redis_cli(&lab, &lab.hosts.standby_ns, "198.51.100.2", &["ping"]) == "PONG"
    });
    assert_eq!(
        redis_cli(
            &lab,
            &lab.hosts.standby_ns,
            "198.51.100.2",
            &["get", "counter"]
        ),
        "400"
    );
    for (i, v) in expect.iter().enumerate() {
        assert_eq!(
            &redis_cli(
                &lab,
                &lab.hosts.standby_ns,
                "198.51.100.2",
                &["get", &format!("key:{i}")]
            ),
            v,
            "key:{i}"
        );
    }
    assert_eq!(
        redis_cli(
            &lab,
            &lab.hosts.standby_ns,
            "198.51.100.2",
            &["incr", "counter"]
        ),
        "401"
    );
    redis_cli(
        &lab,
        &lab.hosts.standby_ns,
        "198.51.100.2",
        &["shutdown", "nosave"],
    );
    let so = s.wait(30);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
}

/// A standby with the wrong certificate and garbage on the QUIC port are
/// refused while the primary keeps serving; a proper standby still joins.
#[test]
fn bad_peers_are_refused_and_the_primary_serves_on() {
    let lab = Lab::new("b");
    let st = Command::new(&lab.b)
        .args(["keygen", "--out"])
        .arg(lab.dir.join("kx"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut p = lab.primary();
    // Garbage datagrams at the primary's port.
    let st = Command::new("ip")
        .args(["netns", "exec", &lab.hosts.standby_ns, "bash", "-c"])
        .arg("for i in 1 2 3 4 5; do head -c 1200 /dev/urandom > /dev/udp/198.51.100.1/7600; done")
        .status()
        .unwrap();
    assert!(st.success());
    // A standby holding a certificate the primary does not pin.
    let bad = lab
        .hosts
        .cmd(&lab.hosts.standby_ns, &lab.b)
        .args(["standby", "--primary", "198.51.100.1:7600", "--log"])
        .arg(lab.dir.join("bad-log"))
        .arg("--cert")
        .arg(lab.dir.join("kx/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("kx/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("kp/node.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut bad = Guard(Some(bad));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        status(&lab.b, &lab.dir.join("lp")).contains("Unprotected"),
        "no log goes to an unpinned peer"
    );
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(bad.pid(), libc::SIGKILL) };
    let bo = bad.wait(10);
    let berr = String::from_utf8_lossy(&bo.stderr);
    assert!(
        berr.contains("not one of the pinned --peer-cert certificates"),
        "the refusal names the problem: {berr}"
    );
    assert!(
        !lab.dir.join("bad-log/events.hsl").exists()
            || std::fs::metadata(lab.dir.join("bad-log/events.hsl"))
                .unwrap()
                .len()
                == 0,
        "not one byte of log reached the unpinned standby"
    );
    let before = lines(&lab.a_file()).len();
    std::thread::sleep(Duration::from_millis(200));
    assert!(lines(&lab.a_file()).len() > before, "the primary serves on");
    // The right standby still joins and protects it.
    let (mut s, sfile, slog) = lab.standby("s1");
    following(&lab, &slog, &sfile);
    let po = p.wait(60);
    let perr = String::from_utf8_lossy(&po.stderr);
    assert_eq!(po.status.code(), Some(0), "{perr}");
    assert!(
        perr.contains("refused a connection"),
        "the primary says why: {perr}"
    );
    let so = s.wait(30);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
    assert_counts(&lines(&lab.a_file()), N, "primary's file");
}

/// A standby whose log directory holds another recording is refused; the
/// primary serves on.
#[test]
fn a_log_directory_from_another_program_is_refused() {
    let lab = Lab::new("o");
    let other = lab.dir.join("other-log");
    let st = Command::new(&lab.b)
        .arg("record")
        .arg("--log")
        .arg(&other)
        .args(["--", "date"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut p = lab.primary();
    let c = lab
        .hosts
        .cmd(&lab.hosts.standby_ns, &lab.b)
        .args(["standby", "--primary", "198.51.100.1:7600", "--log"])
        .arg(&other)
        .arg("--cert")
        .arg(lab.dir.join("ks/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("ks/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("kp/node.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut s = Guard(Some(c));
    let so = s.wait(20);
    let err = String::from_utf8_lossy(&so.stderr);
    assert_ne!(so.status.code(), Some(0));
    assert!(
        err.contains("different log"),
        "the refusal names the problem: {err}"
    );
    let before = lines(&lab.a_file()).len();
    std::thread::sleep(Duration::from_millis(200));
    assert!(lines(&lab.a_file()).len() > before, "the primary serves on");
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
}

/// After a takeover the pair forms again with the roles swapped: a new
/// standby on the old primary's host follows the new primary, and takes
/// over in turn when that one dies.
#[test]
fn the_pair_forms_again_with_roles_swapped() {
    let lab = Lab::new("w");
    let mut p = lab.primary();
    let (mut s1, f1, l1) = lab.standby("s1");
    following(&lab, &l1, &f1);
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    wait_until("the standby to take over", 20, || {
        status(&lab.b, &l1).contains("epoch 2")
    });
    // A new standby on host A, certificates swapped, its own empty data dir.
    let data = lab.dir.join("s2-data");
    std::fs::create_dir_all(&data).unwrap();
    let l2 = lab.dir.join("s2-log");
    let c = lab
        .hosts
        .cmd(&lab.hosts.primary_ns, &lab.b)
        .args([
            "standby",
            "--primary",
            "198.51.100.2:7600",
            "--listen",
            "198.51.100.1:7600",
            "--log",
        ])
        .arg(&l2)
        .arg("--cert")
        .arg(lab.dir.join("kp/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("kp/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("ks/node.crt"))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut s2 = Guard(Some(c));
    let f2 = data.join("counter.txt");
    wait_until("the new standby to catch up and follow", 30, || {
        status(&lab.b, &l2).contains("Following") && lines(&f2).len() + 50 > lines(&f1).len()
    });
    // The new primary's status file is rewritten every 100 ms.
    wait_until("the new primary to report itself protected", 10, || {
        status(&lab.b, &l1).contains("protection:  PROTECTED")
    });
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s1.pid(), libc::SIGKILL) };
    s1.wait(10);
    let so = s2.wait(60);
    assert_eq!(
        so.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&so.stderr)
    );
    assert_counts(&lines(&f2), N, "second standby's file");
}

/// A standby whose log disk fills up stops with a message naming it; the
/// primary goes on serving, unprotected.
#[test]
fn a_standby_with_a_full_disk_stops_and_the_primary_serves_on() {
    let lab = Lab::new("f");
    let small = lab.dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "hsbtest"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a small tmpfs (root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let mut p = lab.primary();
    let c = lab
        .hosts
        .cmd(&lab.hosts.standby_ns, &lab.b)
        .args(["standby", "--primary", "198.51.100.1:7600", "--log"])
        .arg(small.join("log"))
        .arg("--cert")
        .arg(lab.dir.join("ks/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("ks/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("kp/node.crt"))
        .arg("--data-dir")
        .arg(lab.dir.join("B"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::create_dir_all(lab.dir.join("B")).unwrap();
    let mut s = Guard(Some(c));
    let so = s.wait(30);
    let err = String::from_utf8_lossy(&so.stderr);
    assert_ne!(so.status.code(), Some(0));
    assert!(
        err.contains("No space left on device") && err.contains("small/log"),
        "{err}"
    );
    wait_until("the primary to notice", 10, || {
        status(&lab.b, &lab.dir.join("lp")).contains("UNPROTECTED")
    });
    let before = lines(&lab.a_file()).len();
    std::thread::sleep(Duration::from_millis(200));
    assert!(lines(&lab.a_file()).len() > before, "the primary serves on");
    let po = p.wait(60);
    assert_eq!(
        po.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&po.stderr)
    );
    assert_counts(&lines(&lab.a_file()), N, "primary's file");
}

/// With `--vip`, the primary holds the virtual IP; when the primary host
/// dies (supervisor killed, link down) the standby takes the address,
/// announces it, and the client finds redis on the same address with its
/// data. (Open connections are not carried over yet: the client reconnects.)
#[test]
fn the_virtual_ip_moves_to_the_standby() {
    let b = bin();
    let s = Scratch::new("vip");
    let lan = Lan::new("v");
    let dir = s.path();
    for k in ["kp", "ks"] {
        let st = Command::new(&b)
            .args(["keygen", "--out"])
            .arg(dir.join(k))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let (a, bdir) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&bdir).unwrap();
    let node = |c: &mut Command, me: &str, peer: &str| {
        c.arg("--cert")
            .arg(dir.join(format!("{me}/node.crt")))
            .arg("--key")
            .arg(dir.join(format!("{me}/node.key")));
        c.arg("--peer-cert")
            .arg(dir.join(format!("{peer}/node.crt")));
        c.args(["--vip", "198.51.100.10/24", "--dev", "eth0"]);
    };
    let mut pc = lan.cmd(&lan.primary_ns, &b);
    pc.args(["run", "--listen", "198.51.100.1:7600", "--log"])
        .arg(dir.join("lp"));
    node(&mut pc, "kp", "ks");
    pc.args([
        "--",
        "redis-server",
        "--port",
        "6390",
        "--bind",
        "198.51.100.10",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--dir",
    ])
    .arg(&a)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut p = Guard(Some(pc.spawn().unwrap()));
    let mut sc = lan.cmd(&lan.standby_ns, &b);
    sc.args([
        "standby",
        "--primary",
        "198.51.100.1:7600",
        "--listen",
        "198.51.100.2:7600",
        "--log",
    ])
    .arg(dir.join("ls"));
    node(&mut sc, "ks", "kp");
    sc.arg("--data-dir")
        .arg(&bdir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut st = Guard(Some(sc.spawn().unwrap()));
    let cli = |args: &[&str]| {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lan.client_ns,
                "redis-cli",
                "-h",
                "198.51.100.10",
                "-p",
                "6390",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    wait_until("redis on the virtual IP", 20, || cli(&["ping"]) == "PONG");
    wait_until("the standby to follow", 20, || {
        status(&b, &dir.join("ls")).contains("Following")
    });
    for i in 0..100 {
        assert_eq!(cli(&["set", &format!("k{i}"), &format!("v{i}")]), "OK");
        cli(&["incr", "counter"]);
    }
    wait_until("the standby to hold the whole log", 20, || {
        status(&b, &dir.join("lp")).contains("lag:         0 bytes")
    });
    // The primary host dies: its supervisor (and so redis) is killed and its link goes down.
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    lan.unplug(&lan.primary_ns);
    let t = Instant::now();
    wait_until("redis on the virtual IP again", 20, || {
        cli(&["ping"]) == "PONG"
    });
    eprintln!(
        "virtual IP answered again {} ms after the kill",
        t.elapsed().as_millis()
    );
    assert_eq!(cli(&["get", "counter"]), "100");
    // Bound to the virtual IP again (not to every address of the host).
    let ss = Command::new("ip")
        .args(["netns", "exec", &lan.standby_ns, "ss", "-ltnH"])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(ss.contains("198.51.100.10:6390"), "{ss}");
    for i in 0..100 {
        assert_eq!(cli(&["get", &format!("k{i}")]), format!("v{i}"));
    }
    assert_eq!(cli(&["incr", "counter"]), "101");
    cli(&["shutdown", "nosave"]);
    let so = st.wait(30);
    let err = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{err}");
    assert!(
        err.contains("took the virtual IP 198.51.100.10/24"),
        "{err}"
    );
}

/// `status --json` as a user's script would read it.
fn status_json(lab: &Lab, log: &Path) -> serde_json::Value {
    let o = Command::new(&lab.b)
        .args(["status", "--json", "--log"])
        .arg(log)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A Prometheus scrape of `addr` from host `ns`, as "name{labels}" → value.
fn scrape(lab: &Lab, ns: &str, addr: &str) -> std::collections::HashMap<String, f64> {
    let o = lab
        .hosts
        .cmd(ns, Path::new("curl"))
        .args(["-sf", "--max-time", "5", &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line {l:?}"));
            (
                k.to_string(),
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("value in {l:?}")),
            )
        })
        .collect()
}

#[test]
fn status_json_and_metrics_follow_the_roles_through_a_failover() {
    let lab = Lab::new("m");
    let (pm, sm) = ("198.51.100.1:9464", "198.51.100.2:9464");
    let mut p = lab.primary_with(100_000, &["--metrics", pm]);
    // The standby logs JSON lines (checked at the end).
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &["--metrics", sm],
        &[("HOTSTANDBY_LOG_FORMAT", "json")],
    );
    following(&lab, &slog, &sfile);
    let plog = lab.dir.join("lp");
    wait_until("the primary's JSON to say protected", 10, || {
        status_json(&lab, &plog)["primary"]["protection"] == "protected"
    });
    let j = status_json(&lab, &plog);
    assert_eq!(j["role"], "primary", "{j}");
    assert_eq!(j["epoch"], 1, "{j}");
    assert_eq!(j["stale"], false, "{j}");
    assert!(j["primary"]["events"].as_u64().unwrap() > 100, "{j}");
    assert_eq!(
        j["primary"]["output_rule"],
        serde_json::Value::Null,
        "no --vip: {j}"
    );
    let j = status_json(&lab, &slog);
    assert_eq!(j["role"], "standby", "{j}");
    assert_eq!(j["standby"]["replaying"], true, "{j}");
    assert!(j["standby"]["replayed_events"].as_u64().unwrap() > 0, "{j}");

    let m = scrape(&lab, &lab.hosts.primary_ns, pm);
    assert_eq!(
        m.get("hotstandby_role{role=\"primary\"}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(m.get("hotstandby_protected"), Some(&1.0), "{m:?}");
    assert_eq!(m.get("hotstandby_epoch"), Some(&1.0), "{m:?}");
    assert!(m["hotstandby_events_recorded_total"] > 100.0, "{m:?}");
    let m = scrape(&lab, &lab.hosts.standby_ns, sm);
    assert_eq!(
        m.get("hotstandby_role{role=\"standby\"}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(m.get("hotstandby_failovers_total"), Some(&0.0), "{m:?}");
    assert!(m["hotstandby_events_replayed_total"] > 0.0, "{m:?}");

    let list = |ns: &str| {
        let o = lab
            .hosts
            .cmd(ns, &lab.b)
            .args(["list", pm, sm])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = list(&lab.hosts.primary_ns);
    assert_eq!(code, Some(0), "{out}");
    let row = |out: &str, a: &str| -> Vec<String> {
        let l = out
            .lines()
            .find(|l| l.starts_with(a))
            .unwrap_or_else(|| panic!("{a} in {out}"));
        l.split_whitespace().map(str::to_string).collect()
    };
    let r = row(&out, pm);
    assert_eq!(
        (r[1].as_str(), r[3].as_str(), r[4].as_str()),
        ("primary", "1", "protected"),
        "{out}"
    );
    assert_eq!(row(&out, sm)[1], "standby", "{out}");

    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    wait_until(
        "the standby's metrics to say primary of epoch 2",
        20,
        || {
            let m = scrape(&lab, &lab.hosts.standby_ns, sm);
            m.get("hotstandby_role{role=\"primary\"}") == Some(&1.0)
                && m.get("hotstandby_epoch") == Some(&2.0)
                && m.get("hotstandby_failovers_total") == Some(&1.0)
        },
    );
    let j = status_json(&lab, &slog);
    assert_eq!(j["role"], "primary", "{j}");
    assert_eq!(j["failovers"], 1, "{j}");
    assert_eq!(j["primary"]["protection"], "unprotected", "{j}");
    let (code, out) = list(&lab.hosts.standby_ns);
    assert_eq!(code, Some(1), "the old primary does not answer: {out}");
    assert!(row(&out, pm)[1].starts_with("unreachable"), "{out}");
    let r = row(&out, sm);
    assert_eq!(
        (r[1].as_str(), r[3].as_str(), r[4].as_str()),
        ("primary", "2", "UNPROTECTED"),
        "{out}"
    );

    // Its log: one JSON object per line, the takeover among them.
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s.pid(), libc::SIGTERM) };
    let o = s.wait(20);
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string()),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("GOING LIVE"))),
        "{err}"
    );
}

#[test]
fn a_metrics_address_in_use_is_refused_at_start() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let s = Scratch::new("metrics-busy");
    let o = Command::new(bin())
        .args([
            "run",
            "--metrics",
            &addr,
            "--listen",
            "127.0.0.1:0",
            "--log",
        ])
        .arg(s.join("log"))
        .args(["--cert", "/nonexistent/c", "--key", "/nonexistent/k"])
        .args(["--peer-cert", "/nonexistent/p", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!("--metrics {addr}: cannot listen there")),
        "{err}"
    );
}

/// A TOML string (paths here have no quotes or backslashes).
fn q(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

#[test]
fn a_pair_runs_from_config_files_and_flags_win_over_them() {
    let lab = Lab::new("cf");
    let d = &lab.dir;
    // The primary: everything in its file, the program too.
    let pconf = d.join("primary.toml");
    std::fs::write(
        &pconf,
        format!(
            "log = {}\ncert = {}\nkey = {}\npeer_cert = {}\ndata_dir = {}\nheartbeat_ms = 50\n\
             [run]\nlisten = \"198.51.100.1:7600\"\ncommand = [{}, \"{N}\", \"2000\"]\n",
            q(&d.join("lp")),
            q(&d.join("kp/node.crt")),
            q(&d.join("kp/node.key")),
            q(&d.join("ks/node.crt")),
            q(&lab.a),
            q(&lab.counter),
        ),
    )
    .unwrap();
    let _p = Guard(Some(
        lab.hosts
            .cmd(&lab.hosts.primary_ns, &lab.b)
            .args(["run", "--config"])
            .arg(&pconf)
            .current_dir(&lab.a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // The standby: its file names a primary nobody listens on and a log
    // directory; the flags correct both.
    let sdata = d.join("s-data");
    std::fs::create_dir_all(&sdata).unwrap();
    let sconf = d.join("standby.toml");
    std::fs::write(
        &sconf,
        format!(
            "log = {}\ncert = {}\nkey = {}\npeer_cert = {}\ndata_dir = {}\n\
             [standby]\nprimary = \"198.51.100.1:9\"\nlisten = \"198.51.100.2:7600\"\n",
            q(&d.join("not-this-log")),
            q(&d.join("ks/node.crt")),
            q(&d.join("ks/node.key")),
            q(&d.join("kp/node.crt")),
            q(&sdata),
        ),
    )
    .unwrap();
    let slog = d.join("s-log");
    let _s = Guard(Some(
        lab.hosts
            .cmd(&lab.hosts.standby_ns, &lab.b)
            .args(["standby", "--config"])
            .arg(&sconf)
            .args(["--primary", "198.51.100.1:7600", "--log"])
            .arg(&slog)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    following(&lab, &slog, &sdata.join("counter.txt"));
    wait_until("the primary to report itself protected", 10, || {
        status(&lab.b, &d.join("lp")).contains("protection:  PROTECTED")
    });
    assert!(
        !d.join("not-this-log").exists(),
        "the --log flag wins over the file"
    );
}

#[test]
fn a_bad_config_file_is_refused_naming_the_key() {
    let s = Scratch::new("config-bad");
    let run = |text: &str| {
        let f = s.join("node.toml");
        std::fs::write(&f, text).unwrap();
        let o = Command::new(bin())
            .args(["run", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run("timeout_ms = \"soon\"\n");
    assert!(
        err.contains("node.toml") && err.contains("timeout_ms"),
        "{err}"
    );
    let err = run("log = \"/tmp/x\"\ntimout_ms = 300\n");
    assert!(
        err.contains("unknown field") && err.contains("timout_ms"),
        "{err}"
    );
    let err = run("[run]\nlisten = \"198.51.100.1:7600\"\ncommand = [\"true\"]\n");
    assert!(
        err.contains("--log is required (or `log` in the --config file)"),
        "{err}"
    );
    let err = run("[run]\nlisten = \"198.51.100.1:7600\"\ncommand = []\n");
    assert!(err.contains("no program to run"), "{err}");
    let o = Command::new(bin())
        .args(["run", "--config", "/nonexistent/node.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("reading the config file /nonexistent/node.toml"),
        "{err}"
    );
}

/// An etcd cluster of `n` members on host `ns` at `ip` (client ports
/// 2379, 2479, ...; peer ports one above each), and its --arbiter URL.
fn etcd_cluster(lab: &Lab, ns: &str, ip: &str, n: u16) -> (Vec<Guard>, String) {
    let m = |i: u16| (format!("e{i}"), 2379 + 100 * i, 2380 + 100 * i);
    let initial: Vec<String> = (0..n)
        .map(|i| {
            let (name, _, peer) = m(i);
            format!("{name}=http://{ip}:{peer}")
        })
        .collect();
    let mut g = Vec::new();
    for i in 0..n {
        let (name, client, peer) = m(i);
        let c = lab
            .hosts
            .cmd(ns, Path::new("etcd"))
            .args(["--name", &name, "--data-dir"])
            .arg(lab.dir.join(format!("etcd-{name}")))
            .args([
                "--listen-client-urls",
                &format!("http://{ip}:{client}"),
                "--advertise-client-urls",
                &format!("http://{ip}:{client}"),
                "--listen-peer-urls",
                &format!("http://{ip}:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:{peer}"),
                "--initial-cluster",
                &initial.join(","),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (etcd-server)");
        g.push(Guard(Some(c)));
    }
    let url = format!(
        "etcd://{}",
        (0..n)
            .map(|i| format!("{ip}:{}", m(i).1))
            .collect::<Vec<_>>()
            .join(",")
    );
    wait_until("etcd to elect a leader", 30, || {
        etcd_status(lab, ns, &format!("{ip}:2379")).is_some_and(|v| v["leader"].is_string())
    });
    (g, url)
}

/// `/v3/maintenance/status` of one member, asked from host `ns`.
fn etcd_status(lab: &Lab, ns: &str, member: &str) -> Option<serde_json::Value> {
    let o = lab
        .hosts
        .cmd(ns, Path::new("curl"))
        .args(["-sf", "--max-time", "2", "-X", "POST"])
        .arg(format!("http://{member}/v3/maintenance/status"))
        .args(["-d", "{}"])
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

/// etcd, one member, on the standby's host (so cutting the primary from
/// the standby cuts it from the arbiter too).
fn etcd_on_standby(lab: &Lab) -> Guard {
    let (mut g, _) = etcd_cluster(lab, &lab.hosts.standby_ns, "198.51.100.2", 1);
    g.pop().expect("one member")
}

/// The options for a node using the arbiter at `url` with a lease of
/// `ttl_ms`.
fn arbiter_args(url: &str, ttl_ms: u32) -> Vec<String> {
    let ttl = ttl_ms.to_string();
    [
        "--arbiter",
        url,
        "--service",
        "counter",
        "--arbiter-ttl-ms",
        &ttl,
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn with_an_arbiter_a_cut_off_primary_steps_down_before_the_standby_goes_live() {
    let lab = Lab::new("ar");
    let _etcd = etcd_on_standby(&lab);
    // The service's history in the arbiter: epoch 7 ("Nw==", base64 of
    // "7", under /hotstandby/counter/epoch).
    let epoch_key = "L2hvdHN0YW5kYnkvY291bnRlci9lcG9jaA==";
    let etcd = |call: &str, body: String| -> serde_json::Value {
        let o = lab
            .hosts
            .cmd(&lab.hosts.primary_ns, Path::new("curl"))
            .args(["-sf", "--max-time", "5", "-X", "POST"])
            .arg(format!("http://198.51.100.2:2379/v3/kv/{call}"))
            .args(["-d", &body])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    etcd(
        "put",
        format!("{{\"key\":\"{epoch_key}\",\"value\":\"Nw==\"}}"),
    );
    let arb = arbiter_args("etcd://198.51.100.2:2379", 2000);
    let arb: Vec<&str> = arb.iter().map(String::as_str).collect();
    let mut p = lab.primary_with(N, &arb);
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &arb,
        &[],
    );
    following(&lab, &slog, &sfile);
    let st = status(&lab.b, &lab.dir.join("lp"));
    assert!(
        st.contains("role:        primary (epoch 7)"),
        "the arbiter's epoch: {st}"
    );

    // A second primary for the same service is refused while the key is held.
    let o = lab
        .hosts
        .cmd(&lab.hosts.primary_ns, &lab.b)
        .args(["run", "--listen", "198.51.100.1:7601", "--log"])
        .arg(lab.dir.join("lp2"))
        .arg("--cert")
        .arg(lab.dir.join("kp/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("kp/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("ks/node.crt"))
        .args(arb)
        .args(["--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("the arbiter says") && err.contains("is the primary"),
        "{err}"
    );

    // Cut the primary off from the standby and from etcd.
    let cut = Instant::now();
    lab.hosts.partition(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut pg = Guard(p.0.take());
    std::thread::spawn(move || {
        let o = pg.wait(30);
        let _ = tx.send((Instant::now(), o));
    });
    let mut live_at = None;
    wait_until("the standby to take over", 30, || {
        let live = status(&lab.b, &slog).contains("role:        primary");
        if live && live_at.is_none() {
            live_at = Some(Instant::now());
        }
        live
    });
    let (down_at, po) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the primary exits");
    let perr = String::from_utf8_lossy(&po.stderr);
    assert_eq!(po.status.code(), Some(75), "{perr}");
    assert!(perr.contains("LOST THE ARBITER'S LEASE"), "{perr}");
    let live_at = live_at.unwrap();
    eprintln!(
        "after the cut: old primary stepped down at {:?}, standby live at {:?}",
        down_at - cut,
        live_at - cut
    );
    assert!(
        down_at < live_at,
        "the old primary stepped down {:?} after the cut, the standby went live {:?} after it",
        down_at - cut,
        live_at - cut
    );
    lab.hosts.partition(false);
    let st = status(&lab.b, &slog);
    assert!(
        st.contains("role:        primary (epoch 8)"),
        "one above the arbiter's: {st}"
    );
    let kv = etcd("range", format!("{{\"key\":\"{epoch_key}\"}}"));
    assert_eq!(
        kv["kvs"][0]["value"], "OA==",
        "epoch 8 in the arbiter: {kv}"
    );
    let so = s.wait(60);
    let serr = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{serr}");
    assert!(serr.contains("took the arbiter's leader key"), "{serr}");
    assert_counts(&lines(&sfile), N, "standby's file");
}

#[test]
fn with_an_arbiter_a_standby_cut_from_it_does_not_go_live() {
    let lab = Lab::new("as");
    let (_etcd, url) = etcd_cluster(&lab, &lab.hosts.primary_ns, "198.51.100.1", 1);
    let arb = arbiter_args(&url, 2000);
    let arb: Vec<&str> = arb.iter().map(String::as_str).collect();
    let mut p = lab.primary_with(N, &arb);
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &arb,
        &[],
    );
    following(&lab, &slog, &sfile);
    // The standby cannot reach etcd (a rule in its own namespace), then the
    // primary dies.
    let rule = |op: &str| {
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.hosts.standby_ns,
                "iptables",
                op,
                "OUTPUT",
            ])
            .args([
                "-d",
                "198.51.100.1",
                "-p",
                "tcp",
                "--dport",
                "2379",
                "-j",
                "DROP",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "iptables {op}");
    };
    rule("-A");
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    // Three lease lifetimes: long past the old primary's lease.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        let st = status(&lab.b, &slog);
        assert!(
            !st.contains("role:        primary"),
            "went live without the arbiter: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rule("-D");
    wait_until("the standby to take over once etcd answers", 20, || {
        status(&lab.b, &slog).contains("role:        primary")
    });
    let so = s.wait(60);
    let serr = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{serr}");
    assert!(
        serr.contains("not going live until the arbiter's leader key is ours"),
        "{serr}"
    );
    assert_counts(&lines(&sfile), N, "standby's file");
}

#[test]
fn with_an_arbiter_the_etcd_leader_killed_causes_no_failover() {
    let lab = Lab::new("al");
    let (mut etcd, url) = etcd_cluster(&lab, &lab.hosts.standby_ns, "198.51.100.2", 3);
    // The default lease (5 s): etcd's own election takes one to two.
    let arb = arbiter_args(&url, 5000);
    let arb: Vec<&str> = arb.iter().map(String::as_str).collect();
    let mut p = lab.primary_with(N, &arb);
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &arb,
        &[],
    );
    following(&lab, &slog, &sfile);
    // Find the leader and kill it.
    let members: Vec<String> = (0..3)
        .map(|i| format!("198.51.100.2:{}", 2379 + 100 * i))
        .collect();
    let st = etcd_status(&lab, &lab.hosts.standby_ns, &members[0]).expect("etcd answers");
    let leader = st["leader"].as_str().unwrap().to_string();
    let idx = members
        .iter()
        .position(|m| {
            etcd_status(&lab, &lab.hosts.standby_ns, m)
                .is_some_and(|v| v["header"]["member_id"].as_str() == Some(leader.as_str()))
        })
        .expect("the leader is a member");
    let mut dead = Guard(etcd[idx].0.take());
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(dead.pid(), libc::SIGKILL) };
    dead.wait(10);
    // The program runs to its end on the primary; the standby never takes
    // over.
    let po = p.wait(60);
    let perr = String::from_utf8_lossy(&po.stderr);
    assert_eq!(po.status.code(), Some(0), "{perr}");
    assert!(!perr.contains("LOST THE ARBITER'S LEASE"), "{perr}");
    let so = s.wait(60);
    let serr = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{serr}");
    assert!(!serr.contains("GOING LIVE"), "{serr}");
    assert_counts(&lines(&lab.a_file()), N, "primary's file");
}

#[test]
fn with_an_arbiter_a_paused_primary_steps_down_when_it_wakes() {
    let lab = Lab::new("ap");
    let _etcd = etcd_on_standby(&lab);
    let arb = arbiter_args("etcd://198.51.100.2:2379", 2000);
    let arb: Vec<&str> = arb.iter().map(String::as_str).collect();
    let mut p = lab.primary_with(N, &arb);
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &arb,
        &[],
    );
    following(&lab, &slog, &sfile);
    let paused = pause(&p);
    wait_until("the standby to take the key and go live", 30, || {
        status(&lab.b, &slog).contains("role:        primary")
    });
    resume(&paused);
    let po = p.wait(20);
    let perr = String::from_utf8_lossy(&po.stderr);
    assert_eq!(po.status.code(), Some(75), "{perr}");
    assert!(perr.contains("LOST THE ARBITER'S LEASE"), "{perr}");
    let so = s.wait(60);
    let serr = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{serr}");
    assert_counts(&lines(&sfile), N, "standby's file");
}

#[test]
fn with_an_arbiter_two_standbys_one_takes_over_and_the_other_follows_it_without_starting_over() {
    let lab = Lab::new("a2");
    let _etcd = etcd_on_standby(&lab);
    // A third node's keys; each node pins the other two (a PEM file of
    // both certificates).
    let st = Command::new(&lab.b)
        .args(["keygen", "--out"])
        .arg(lab.dir.join("kt"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let cert = |k: &str| std::fs::read_to_string(lab.dir.join(format!("{k}/node.crt"))).unwrap();
    for (file, a, b) in [("kp", "ks", "kt"), ("ks", "kp", "kt"), ("kt", "kp", "ks")] {
        std::fs::write(
            lab.dir.join(format!("{file}/peers.pem")),
            cert(a) + &cert(b),
        )
        .unwrap();
    }
    let arb = arbiter_args("etcd://198.51.100.2:2379", 2000);
    let mut popts: Vec<&str> = arb.iter().map(String::as_str).collect();
    popts.extend(["--sync-standbys", "2", "--peer-cert"]);
    let ppeers = lab.dir.join("kp/peers.pem");
    popts.push(ppeers.to_str().unwrap());
    // The counter runs long enough to outlive the failover.
    let mut p = lab.primary_with(N * 3, &popts);
    let standby = |name: &str, listen: &str, keys: &str| {
        let mut o: Vec<String> = arb.clone();
        o.extend(["--node-name".into(), name.into(), "--peer-cert".into()]);
        o.push(
            lab.dir
                .join(format!("{keys}/peers.pem"))
                .display()
                .to_string(),
        );
        let o: Vec<&str> = o.iter().map(String::as_str).collect();
        lab.standby_with(
            name,
            &lab.hosts.standby_ns,
            "198.51.100.1:7600",
            listen,
            [keys, "kp"],
            &o,
            &[],
        )
    };
    let (s1, f1, log1) = standby("s1", "198.51.100.2:7600", "ks");
    let (s2, f2, log2) = standby("s2", "198.51.100.2:7601", "kt");
    following(&lab, &log1, &f1);
    following(&lab, &log2, &f2);
    wait_until("the primary to stream to both standbys", 20, || {
        let v = status_json(&lab, &lab.dir.join("lp"));
        let sb = &v["primary"]["standbys"];
        sb.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|s| s["in_quorum"] == true))
            && v["primary"]["protection"] == "protected"
    });
    let v = status_json(&lab, &lab.dir.join("lp"));
    assert_eq!(v["primary"]["sync_standbys"], 2, "{v}");
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    let replayed_before =
        |log: &Path| status_json(&lab, log)["standby"]["replayed_events"].as_u64();
    let (b1, b2) = (replayed_before(&log1), replayed_before(&log2));
    // One of them takes the key and goes live; the other follows it.
    let mut winner = None;
    wait_until("a standby to go live", 30, || {
        for (i, log) in [&log1, &log2].into_iter().enumerate() {
            if status(&lab.b, log).contains("role:        primary") {
                winner = Some(i);
            }
        }
        winner.is_some()
    });
    let w = winner.unwrap();
    let (wlog, llog) = if w == 0 {
        (&log1, &log2)
    } else {
        (&log2, &log1)
    };
    let waddr = ["198.51.100.2:7600", "198.51.100.2:7601"][w];
    wait_until("the other standby to follow the new primary", 30, || {
        let v = status_json(&lab, llog);
        v["state"] == "Following" && v["peer"] == waddr
    });
    wait_until("the new primary to count its follower", 20, || {
        status_json(&lab, wlog)["primary"]["standbys"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    let (mut gw, mut gl) = if w == 0 { (s1, s2) } else { (s2, s1) };
    let wo = gw.wait(120);
    let werr = String::from_utf8_lossy(&wo.stderr);
    assert_eq!(wo.status.code(), Some(0), "winner: {werr}");
    assert_eq!(
        String::from_utf8_lossy(&wo.stdout).trim(),
        format!("done {}", N * 3)
    );
    let lo = gl.wait(60);
    let lerr = String::from_utf8_lossy(&lo.stderr);
    assert_eq!(lo.status.code(), Some(0), "follower: {lerr}");
    assert!(lerr.contains("the new primary: following it"), "{lerr}");
    // It resumed where it was, not from the start: the same replay went
    // on (its event count only grew), and it asked for a tail.
    let resumed: Vec<u64> = lerr
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "connected to primary {waddr}; resuming the log at byte"
            ))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        resumed.first().is_some_and(|b| *b > 0),
        "the follower resumed at byte {resumed:?}: {lerr}"
    );
    assert!(!lerr.contains("GOING LIVE"), "{lerr}");
    eprintln!(
        "winner s{}; follower resumed at byte {:?}; events replayed before the failover {b1:?} / {b2:?}",
        w + 1,
        resumed
    );
    // Both copies of the log are the same bytes, and both programs wrote
    // every count once.
    let a = std::fs::read(wlog.join("events.hsl")).unwrap();
    let b = std::fs::read(llog.join("events.hsl")).unwrap();
    assert_eq!(a.len(), b.len(), "the two logs have the same length");
    assert!(
        a == b,
        "the follower's log is the new primary's, byte for byte"
    );
    assert_counts(&lines(&f1), N * 3, "s1's file");
    assert_counts(&lines(&f2), N * 3, "s2's file");
}

/// A CA, a server certificate for `ip` and a client certificate, made with
/// openssl in `dir` (ca.crt, srv.crt/key, cli.crt/key).
fn tls_files(dir: &Path, ip: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let script = format!(
        "set -e
ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
openssl req -x509 $ec -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca
openssl req -x509 $ec -keyout other.key -out other.crt -days 2 -subj /CN=other-ca
printf 'subjectAltName=IP:{ip}\\nextendedKeyUsage=serverAuth,clientAuth\\n' > srv.ext
printf 'extendedKeyUsage=clientAuth\\n' > cli.ext
for n in srv cli; do
  openssl req $ec -keyout $n.key -out $n.csr -subj /CN=$n
  openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile $n.ext
done"
    );
    let o = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn with_an_arbiter_over_mutual_tls_the_standby_takes_over_and_a_wrong_ca_is_refused() {
    let lab = Lab::new("at");
    let t = lab.dir.join("tls");
    tls_files(&t, "198.51.100.2");
    let f = |n: &str| t.join(n).display().to_string();
    let etcd = lab
        .hosts
        .cmd(&lab.hosts.standby_ns, Path::new("etcd"))
        .args(["--name", "e0", "--data-dir"])
        .arg(lab.dir.join("etcd-tls"))
        .args([
            "--listen-client-urls",
            "https://198.51.100.2:2379",
            "--advertise-client-urls",
            "https://198.51.100.2:2379",
            "--listen-peer-urls",
            "http://198.51.100.2:2380",
            "--initial-advertise-peer-urls",
            "http://198.51.100.2:2380",
            "--initial-cluster",
            "e0=http://198.51.100.2:2380",
            "--cert-file",
            &f("srv.crt"),
            "--key-file",
            &f("srv.key"),
            "--client-cert-auth",
            "--trusted-ca-file",
            &f("ca.crt"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd must be installed (etcd-server)");
    let _etcd = Guard(Some(etcd));
    wait_until("etcd to answer over TLS", 30, || {
        lab.hosts
            .cmd(&lab.hosts.primary_ns, Path::new("curl"))
            .args(["-sf", "--max-time", "2", "--cacert", &f("ca.crt")])
            .args(["--cert", &f("cli.crt"), "--key", &f("cli.key")])
            .args([
                "-X",
                "POST",
                "https://198.51.100.2:2379/v3/maintenance/status",
                "-d",
                "{}",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let mut arb = arbiter_args("etcd://198.51.100.2:2379", 2000);
    // A node that does not trust etcd's CA, and one with no client
    // certificate, are refused with the reason.
    for (extra, want) in [
        (
            vec!["--arbiter-ca", &f("other.crt")],
            "TLS to 198.51.100.2:2379",
        ),
        (vec!["--arbiter-ca", &f("ca.crt")], "198.51.100.2:2379"),
    ] {
        let mut a: Vec<&str> = arb.iter().map(String::as_str).collect();
        a.extend(extra.iter().map(|s| -> &str { s }));
        let mut p = lab.primary_with(10, &a);
        let o = p.wait(30);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains("asking the arbiter for the leader key") && err.contains(want),
            "{err}"
        );
    }
    arb.extend(
        [
            "--arbiter-ca",
            &f("ca.crt"),
            "--arbiter-cert",
            &f("cli.crt"),
            "--arbiter-key",
            &f("cli.key"),
        ]
        .map(String::from),
    );
    let arb: Vec<&str> = arb.iter().map(String::as_str).collect();
    let mut p = lab.primary_with(N, &arb);
    let (mut s, sfile, slog) = lab.standby_with(
        "s1",
        &lab.hosts.standby_ns,
        "198.51.100.1:7600",
        "198.51.100.2:7600",
        ["ks", "kp"],
        &arb,
        &[],
    );
    following(&lab, &slog, &sfile);
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    p.wait(10);
    let so = s.wait(60);
    let serr = String::from_utf8_lossy(&so.stderr);
    assert_eq!(so.status.code(), Some(0), "{serr}");
    assert!(serr.contains("took the arbiter's leader key"), "{serr}");
    assert_counts(&lines(&sfile), N, "standby's file");
}

/// Allocated bytes of a log directory's event file (holes not counted).
fn log_on_disk(log: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(log.join("events.hsl"))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// redis under `run` with a standby that checkpoints every 2 MiB of log and
/// uploads each checkpoint to its primary: while the data set grows, both
/// logs stay under a bound on disk (each deletes its log before the older
/// of two checkpoints); the standby, killed and restarted, resumes from
/// its newest checkpoint; the primary is killed and the standby takes
/// over; a new standby with an empty log directory joins the new primary
/// from the checkpoint it sends (not from the first event); the new
/// primary is killed in turn and the new standby takes over with every
/// acknowledged key.
#[test]
fn redis_with_checkpoints_bounded_logs_restart_failover_and_a_new_standby_from_a_checkpoint() {
    let lab = Lab::new("ck");
    let data = lab.dir.join("A");
    let c = lab
        .hosts
        .cmd(&lab.hosts.primary_ns, &lab.b)
        .args(["run", "--listen", "198.51.100.1:7600", "--log"])
        .arg(lab.dir.join("lp"))
        .arg("--cert")
        .arg(lab.dir.join("kp/node.crt"))
        .arg("--key")
        .arg(lab.dir.join("kp/node.key"))
        .arg("--peer-cert")
        .arg(lab.dir.join("ks/node.crt"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--",
            "redis-server",
            "--port",
            "6390",
            "--bind",
            "198.51.100.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--enable-debug-command",
            "yes",
            "--dir",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Guard(Some(c));
    let every = 2u64 << 20;
    let ck_args = ["--checkpoint-every", "2M"];
    let standby = |name: &str, ns: &str, primary: &str, listen: &str, keys: [&str; 2]| {
        lab.standby_with(name, ns, primary, listen, keys, &ck_args, &[])
    };
    let on_b = |name: &str| {
        standby(
            name,
            &lab.hosts.standby_ns,
            "198.51.100.1:7600",
            "198.51.100.2:7600",
            ["ks", "kp"],
        )
    };
    let (mut s, _, slog) = on_b("s1");
    wait_until("redis on the primary", 20, || {
        redis_cli(&lab, &lab.hosts.primary_ns, "198.51.100.1", &["ping"]) == "PONG"
    });
    wait_until("the standby to follow", 20, || {
        status(&lab.b, &slog).contains("Following")
    });
    let write = |ns: &str, host: &str, round: usize| {
        let mut script = String::new();
        for i in 0..2000 {
            script.push_str(&format!(
                "SET key:{round}:{i} v{round}-{i}-{}\n",
                "x".repeat(200)
            ));
        }
        script.push_str("INCR rounds\n");
        let mut cli = Command::new("ip")
            .args(["netns", "exec", ns, "redis-cli"])
            .args(["-h", host, "-p", "6390"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        cli.stdin
            .as_mut()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        drop(cli.stdin.take());
        let out = cli.wait_with_output().unwrap();
        let ok = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| *l == "OK")
            .count();
        assert_eq!(ok, 2000, "round {round}: every SET acknowledged");
    };
    let caught_up = |plog: &Path| {
        wait_until("the standby to hold the whole log", 60, || {
            status(&lab.b, plog).contains("lag:         0 bytes")
        })
    };
    let lp = lab.dir.join("lp");
    let (mut max_s, mut max_p) = (0, 0);
    for round in 0..12 {
        write(&lab.hosts.primary_ns, "198.51.100.1", round);
        caught_up(&lp);
        max_s = max_s.max(log_on_disk(&slog));
        max_p = max_p.max(log_on_disk(&lp));
    }
    let length = std::fs::metadata(lp.join("events.hsl")).unwrap().len();
    let bound = 4 * every + (4 << 20);
    eprintln!(
        "log written {length} bytes; on disk at most: primary {max_p}, standby {max_s} (bound {bound})"
    );
    assert!(
        length > 2 * bound,
        "the run writes more log than the bound ({length} bytes)"
    );
    assert!(
        max_s <= bound,
        "the standby's log stayed under {bound} bytes on disk: {max_s}"
    );
    assert!(
        max_p <= bound,
        "the primary's log stayed under {bound} bytes on disk: {max_p}"
    );
    for dir in [&slog, &lp] {
        let n = std::fs::read_dir(dir.join("checkpoints"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".hsck"))
            .count();
        assert_eq!(n, 2, "two checkpoints kept in {}", dir.display());
    }
    let stats = Command::new(&lab.b)
        .args(["log", "stats"])
        .arg(&slog)
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("retained:  from byte"), "{stats}");
    assert!(stats.contains("checkpoint: at byte"), "{stats}");
    for dir in [&slog, &lp] {
        let st = status(&lab.b, dir);
        assert!(
            st.contains("log on disk:") && st.contains("kept from byte"),
            "{st}"
        );
        assert!(st.contains("checkpoint:  at byte"), "{st}");
        let j = status_json(&lab, dir);
        let on_disk = j["storage"]["log_on_disk_bytes"].as_u64().unwrap();
        assert!(on_disk > 0 && on_disk <= bound, "{j}");
        assert_eq!(
            j["storage"]["checkpoints"].as_array().map(|a| a.len()),
            Some(2),
            "{j}"
        );
    }

    // Kill the standby and start it again on the same directories.
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s.pid(), libc::SIGKILL) };
    let first = s.wait(10);
    let e1 = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(e1.contains("checkpoint taken"), "{e1}");
    assert!(e1.contains("uploaded checkpoint"), "{e1}");
    // Restarted at once (a_standby_restarted_at_once_is_accepted).
    let (mut s, _, _) = on_b("s1");
    wait_until("the restarted standby to follow", 30, || {
        status(&lab.b, &slog).contains("Following")
    });
    for round in 12..14 {
        write(&lab.hosts.primary_ns, "198.51.100.1", round);
    }
    caught_up(&lp);
    // The whole data set as the primary acknowledged it.
    let digest1 = redis_cli(
        &lab,
        &lab.hosts.primary_ns,
        "198.51.100.1",
        &["debug", "digest"],
    );
    assert_eq!(digest1.len(), 40, "DEBUG DIGEST: {digest1}");
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    let po = p.wait(10);
    let up = |ns: &str, host: &str, s: &mut Guard, what: &str| {
        let t0 = std::time::Instant::now();
        while redis_cli(&lab, ns, host, &["ping"]) != "PONG" {
            if t0.elapsed() > std::time::Duration::from_secs(30) {
                // SAFETY: plain integers; the pid is our child's.
                unsafe { libc::kill(s.pid(), libc::SIGKILL) };
                let o = s.wait(10);
                panic!(
                    "redis did not answer on {host} in 30 s ({what}); the standby said:\n{}\nthe first primary said:\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    String::from_utf8_lossy(&po.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    up(
        &lab.hosts.standby_ns,
        "198.51.100.2",
        &mut s,
        "first failover",
    );
    let check = |ns: &str, host: &str, rounds: usize| {
        let cli = |args: &[&str]| redis_cli(&lab, ns, host, args);
        assert_eq!(cli(&["get", "rounds"]), rounds.to_string());
        assert_eq!(cli(&["dbsize"]), (rounds * 2000 + 1).to_string());
        for round in 0..rounds {
            for i in (0..2000).step_by(397) {
                assert_eq!(
                    cli(&["get", &format!("key:{round}:{i}")]),
                    format!("v{round}-{i}-{}", "x".repeat(200)),
                    "key:{round}:{i} on {host}"
                );
            }
        }
    };
    check(&lab.hosts.standby_ns, "198.51.100.2", 14);
    assert_eq!(
        redis_cli(
            &lab,
            &lab.hosts.standby_ns,
            "198.51.100.2",
            &["debug", "digest"]
        ),
        digest1,
        "the new primary holds exactly the data set the old one acknowledged"
    );

    // Re-protection: a new standby on the first host, empty directories,
    // joins the new primary from the checkpoint it sends.
    let (mut s2, _, s2log) = standby(
        "s2",
        &lab.hosts.primary_ns,
        "198.51.100.2:7600",
        "198.51.100.1:7600",
        ["kp", "ks"],
    );
    wait_until("the new standby to follow", 60, || {
        status(&lab.b, &s2log).contains("Following")
    });
    for round in 14..16 {
        write(&lab.hosts.standby_ns, "198.51.100.2", round);
    }
    caught_up(&slog);
    let digest2 = redis_cli(
        &lab,
        &lab.hosts.standby_ns,
        "198.51.100.2",
        &["debug", "digest"],
    );
    assert_ne!(digest2, digest1, "two more rounds were written");
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s.pid(), libc::SIGKILL) };
    let so = s.wait(10);
    let e2 = String::from_utf8_lossy(&so.stderr).into_owned();
    assert!(e2.contains("resuming the replay from checkpoint"), "{e2}");
    assert!(e2.contains("restored from checkpoint"), "{e2}");
    assert!(e2.contains("sent checkpoint to a standby"), "{e2}");
    up(
        &lab.hosts.primary_ns,
        "198.51.100.1",
        &mut s2,
        "second failover",
    );
    check(&lab.hosts.primary_ns, "198.51.100.1", 16);
    assert_eq!(
        redis_cli(
            &lab,
            &lab.hosts.primary_ns,
            "198.51.100.1",
            &["debug", "digest"]
        ),
        digest2,
        "the standby that joined from a checkpoint holds exactly the acknowledged data set"
    );
    redis_cli(
        &lab,
        &lab.hosts.primary_ns,
        "198.51.100.1",
        &["shutdown", "nosave"],
    );
    let o = s2.wait(30);
    let e3 = String::from_utf8_lossy(&o.stderr);
    assert!(e3.contains("installed the primary's checkpoint"), "{e3}");
    assert!(e3.contains("restored from checkpoint"), "{e3}");
    assert_eq!(o.status.code(), Some(0), "{e3}");
}

/// A standby killed and started again at once on the same directories is
/// accepted as soon as the primary has dropped the dead one (within its
/// session timeout), not turned away as a second standby.
#[test]
fn a_standby_restarted_at_once_is_accepted() {
    let lab = Lab::new("rs");
    let mut p = lab.primary();
    let (mut s1, f1, l1) = lab.standby("s1");
    following(&lab, &l1, &f1);
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s1.pid(), libc::SIGKILL) };
    s1.wait(10);
    let (mut s2, _, _) = lab.standby("s1");
    let t0 = std::time::Instant::now();
    let mut ok = false;
    while t0.elapsed() < Duration::from_secs(10) {
        // The restarted process itself reports following (its pid in the
        // status it writes).
        let st = status_json(&lab, &l1);
        if st["pid"].as_i64() == Some(s2.pid() as i64) && st["state"] == "Following" {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(s2.pid(), libc::SIGKILL) };
    let so = s2.wait(10);
    // SAFETY: plain integers; the pid is our child's.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    let po = p.wait(10);
    assert!(
        ok,
        "the restarted standby was not accepted within 10 s:\n{}\nprimary:\n{}",
        String::from_utf8_lossy(&so.stderr),
        String::from_utf8_lossy(&po.stderr)
    );
}
