//! Record and replay a corpus of real programs; each replay must exit 0
//! with output identical to the recorded run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hotstandby_tests::*;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    b
}

#[test]
fn date() {
    let b = bin();
    let out = roundtrip(&b, "date", &["date", "+%s.%N %A"], Path::new("/tmp"), None);
    assert!(String::from_utf8_lossy(&out).contains('.'));
}

#[test]
fn shuf() {
    let b = bin();
    let out = roundtrip(
        &b,
        "shuf",
        &["shuf", "-i", "1-1000000", "-n", "5"],
        Path::new("/tmp"),
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 5);
}

#[test]
fn sort_random() {
    let b = bin();
    let s = Scratch::new("sortr");
    let input: String = (1..=5000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(s.join("in.txt"), input).unwrap();
    let out = roundtrip(&b, "sort-R", &["sort", "-R", "in.txt"], s.path(), None);
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 5000);
}

#[test]
fn shell_pipeline_head_urandom_sha256sum() {
    // One recorded shell pipeline: sh forks two children that exec head and
    // sha256sum, connected by the program's own pipe.
    let b = bin();
    let out = roundtrip(
        &b,
        "pipeline",
        &[
            "sh",
            "-c",
            "head -c 1M /dev/urandom | sha256sum; echo status $?",
        ],
        Path::new("/tmp"),
        None,
    );
    let out = String::from_utf8_lossy(&out);
    assert!(out.ends_with("-\nstatus 0\n"), "{out}");
    assert_eq!(out.lines().next().unwrap().len(), 64 + 3);
}

#[test]
fn python3_through_the_pyenv_shim() {
    // `python3` on PATH here is a bash script that forks and execs; a user
    // types it, so following fork/exec matters.
    let b = bin();
    let script = programs_dir().join("randoms.py");
    let out = roundtrip(
        &b,
        "py-shim",
        &["python3", script.to_str().unwrap()],
        Path::new("/tmp"),
        None,
    );
    assert!(String::from_utf8_lossy(&out).contains("uuid4"));
}

#[test]
fn sha256_of_urandom_from_outside() {
    // `head -c 1M /dev/urandom` outside the recording, piped into a
    // recorded sha256sum: the random bytes arrive on an external pipe,
    // which replay must feed back exactly.
    let b = bin();
    let s = Scratch::new("sha");
    let log = s.join("log");
    let mut rec = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .args(["--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = Command::new("head")
        .args(["-c", "1M", "/dev/urandom"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::copy(head.stdout.as_mut().unwrap(), rec.stdin.as_mut().unwrap()).unwrap();
    drop(rec.stdin.take());
    head.wait().unwrap();
    let rec = rec.wait_with_output().unwrap();
    assert!(rec.status.success());
    let rep = replay(&b, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(rep.stdout, rec.stdout);
    assert_eq!(
        rec.stdout.len(),
        64 + 4,
        "one sha256 line: {:?}",
        String::from_utf8_lossy(&rec.stdout)
    );
}

#[test]
fn coreutils_ls_od_stat() {
    let b = bin();
    let s = Scratch::new("ls");
    for i in 0..20 {
        std::fs::write(s.join(&format!("f{i}")), vec![b'x'; i * 100]).unwrap();
    }
    roundtrip(
        &b,
        "ls",
        &["ls", "-la", "--time-style=full-iso"],
        s.path(),
        None,
    );
    roundtrip(
        &b,
        "od",
        &["od", "-An", "-N64", "-tx1", "/dev/urandom"],
        s.path(),
        None,
    );
    roundtrip(&b, "stat", &["stat", "f3", "/proc/self"], s.path(), None);
    roundtrip(
        &b,
        "uname-cpuinfo",
        &["head", "-n", "5", "/proc/cpuinfo", "/proc/uptime"],
        s.path(),
        None,
    );
}

#[test]
fn python_randomness() {
    let b = bin();
    let py = python();
    let script = programs_dir().join("randoms.py");
    let out = roundtrip(
        &b,
        "py-random",
        &[&py, script.to_str().unwrap()],
        Path::new("/tmp"),
        None,
    );
    assert!(String::from_utf8_lossy(&out).contains("uuid4"));
}

#[test]
fn python_four_threads_lock_and_queue() {
    let b = bin();
    let s = Scratch::new("pythreads");
    std::fs::write(
        s.join("t.py"),
        r#"
import threading, queue, random, time
q = queue.Queue()
lock = threading.Lock()
total = [0]
def worker(n):
    for i in range(300):
        v = random.randint(1, 1000)
        with lock:
            total[0] += v
        q.put((n, i, v, time.time()))
        if i % 50 == 0:
            time.sleep(0.001)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in ts: t.start()
for t in ts: t.join()
items = []
while not q.empty():
    items.append(q.get())
print("total", total[0], "items", len(items))
print("order", "".join(str(x[0]) for x in items))
print("last", items[-1])
"#,
    )
    .unwrap();
    let py = python();
    let out = roundtrip(&b, "py-threads", &[&py, "t.py"], s.path(), None);
    assert!(String::from_utf8_lossy(&out).contains("items 1200"));
}

#[test]
fn c_rdtsc_clocks_getrandom() {
    let b = bin();
    let s = Scratch::new("clocks");
    let prog = build_c("clocks", s.path());
    let out = roundtrip(&b, "clocks", &[prog.to_str().unwrap()], s.path(), None);
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 20);
}

#[test]
fn c_setitimer_sigalrm() {
    let b = bin();
    let s = Scratch::new("alarm");
    let prog = build_c("alarm", s.path());
    let out = roundtrip(&b, "alarm", &[prog.to_str().unwrap()], s.path(), None);
    assert!(String::from_utf8_lossy(&out).starts_with("ticks=30"));
}

#[test]
fn exit_status_and_signal_death() {
    let b = bin();
    let s = Scratch::new("exit");
    let log = s.join("l1");
    let o = record(
        &b,
        &log,
        s.path(),
        None,
        &["sh", "-c", "echo bye; exit 7"],
        None,
    );
    assert_eq!(o.status.code(), Some(7));
    let r = replay(&b, &log);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stdout, b"bye\n");
    let log = s.join("l2");
    let o = record(
        &b,
        &log,
        s.path(),
        None,
        &["sh", "-c", "echo x; kill -TERM $$; echo not reached"],
        None,
    );
    assert_eq!(o.status.code(), Some(128 + 15), "killed by SIGTERM is 143");
    let r = replay(&b, &log);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// A TCP echo server on loopback, driven by a client, replayed offline.
#[test]
fn tcp_echo_server() {
    let b = bin();
    let s = Scratch::new("echo");
    let log = s.join("log");
    let port = free_port();
    let py = python();
    let script = programs_dir().join("echo_server.py");
    let child = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .args(["--", &py, script.to_str().unwrap(), &port.to_string(), "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(port);
    let mut rng = Rng::new();
    for c in 0..3 {
        // wait_listening's probe counted as one client; the server serves 3.
        if c == 2 {
            break;
        }
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut rd = BufReader::new(sock.try_clone().unwrap());
        for i in 0..100 {
            let v = rng.next_u64();
            writeln!(sock, "client {c} line {i} value {v:x}").unwrap();
            let mut line = String::new();
            rd.read_line(&mut line).unwrap();
            assert!(
                line.starts_with(&format!("CLIENT {c} LINE {i} VALUE {:X}", v)),
                "{line}"
            );
        }
    }
    let rec = child.wait_with_output().unwrap();
    assert!(rec.status.success());
    assert!(String::from_utf8_lossy(&rec.stdout).contains("served 3"));
    let rep = replay(&b, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(rep.stdout, rec.stdout);
}

/// A thread-per-connection server (the demo's built-in one): the main
/// thread blocks in accept while a worker dups its connection's socket. The
/// kernel had already reserved the fd that accept will return, so the dup
/// got the next number; replay must reserve it too (it once diverged here).
#[test]
fn thread_per_connection_server_with_dup() {
    let b = bin();
    let s = Scratch::new("tpc");
    let log = s.join("log");
    let port = free_port();
    let child = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .args(["--"])
        .arg(&b)
        .args(["demo-server", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    let ask = |cmd: &str| {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        write!(sock, "*2\r\n$4\r\nINCR\r\n${}\r\n{cmd}\r\n", cmd.len()).unwrap();
        let mut line = String::new();
        BufReader::new(sock).read_line(&mut line).unwrap();
        line
    };
    for i in 1..=5 {
        assert_eq!(ask("k"), format!(":{i}\r\n"));
    }
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(sock, "*1\r\n$8\r\nSHUTDOWN\r\n").unwrap();
    let rec = child.wait_with_output().unwrap();
    assert!(rec.status.success());
    let rep = replay(&b, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
}

/// redis-server with 5 threads serves a scripted redis-cli session of
/// 1,500 commands with random values, forks a BGSAVE child and saves on
/// shutdown; the replay runs without any client, re-creates every reply
/// (their hashes are checked) and the same log output.
#[test]
fn redis_server_session() {
    require_root();
    let b = bin();
    assert!(
        Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok(),
        "redis-server is not installed (.ci/run installs it)"
    );
    let s = Scratch::new("redis");
    let data = s.join("data");
    std::fs::create_dir(&data).unwrap();
    let log = s.join("log");
    let port = free_port();
    let child = tie(&mut Command::new(&b))
        .arg("record")
        .arg("--log")
        .arg(&log)
        .arg("--data-dir")
        .arg(&data)
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
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(port);
    let mut rng = Rng::new();
    let mut script = String::new();
    let mut expect_counter = 0;
    for i in 0..1500 {
        match i % 5 {
            0 => script.push_str(&format!("SET key:{} {}\n", i % 300, rng.next_u64())),
            1 => script.push_str(&format!("GET key:{}\n", rng.next_u64() % 300)),
            2 => {
                script.push_str("INCR counter\n");
                expect_counter += 1;
            }
            3 => script.push_str(&format!("LPUSH list {}\n", rng.next_u64() % 1000)),
            _ => script.push_str(&format!(
                "HSET h f{} {}\n",
                rng.next_u64() % 50,
                rng.next_u64()
            )),
        }
    }
    script.push_str("GET counter\n");
    let mut cli = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    drop(cli.stdin.take());
    let replies = cli.wait_with_output().unwrap();
    let replies = String::from_utf8_lossy(&replies.stdout);
    assert_eq!(replies.lines().count(), 1501, "one reply per command");
    assert_eq!(
        replies.lines().last().unwrap().trim(),
        expect_counter.to_string()
    );
    // A background save forks a child that writes the snapshot.
    let cli = |args: &[&str]| {
        let o = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(cli(&["bgsave"]).contains("Background saving started"));
    let mut saved = false;
    for _ in 0..200 {
        if cli(&["info", "persistence"]).contains("rdb_bgsave_in_progress:0") {
            saved = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(saved, "BGSAVE did not finish within 5 s");
    assert!(cli(&["info", "persistence"]).contains("rdb_last_bgsave_status:ok"));
    let st = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "save"])
        .status()
        .unwrap();
    let _ = st; // the connection closes as redis exits
    let rec = child.wait_with_output().unwrap();
    assert!(rec.status.success(), "redis exit {:?}", rec.status);
    let rdb = data.join("dump.rdb");
    let before = std::fs::read(&rdb).expect("redis saved dump.rdb on shutdown");
    let rep = replay(&b, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(
        rep.stdout, rec.stdout,
        "redis's own log output differs on replay"
    );
    assert_eq!(
        std::fs::read(&rdb).unwrap(),
        before,
        "replay must not touch the user's data directory"
    );
}

/// The syscall buffer's edges (tests/programs/bufedge.c): socket reads,
/// writes and epoll through the buffer while another thread blocks traced,
/// a 1 kHz signal landing inside buffered calls, direct syscall(2), more
/// buffered calls than the buffer holds, vfork + exec. The replay must give
/// the same digest, and the log must show the buffer was used (batches)
/// and filled up (a batch of at least 10,000 calls, its capacity in calls).
#[test]
fn syscall_buffer_edges() {
    use hotstandby_protocol::record::Event;
    let b = bin();
    let s = Scratch::new("bufedge");
    let prog = build_c("bufedge", s.path());
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &[prog.to_str().unwrap()], None);
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let out = String::from_utf8_lossy(&rec.stdout).to_string();
    assert!(
        out.contains("monotonic-backwards=0") && out.contains("vfork-child=0"),
        "{out}"
    );
    let rep = replay(&b, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&rep.stdout), out);
    let l = hotstandby_recorder::logfile::load(&log).unwrap();
    let sizes: Vec<usize> = l
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Batch { .. } => Some(e.calls().expect("a valid batch").len()),
            _ => None,
        })
        .collect();
    if std::env::var_os("HOTSTANDBY_BUFFER").is_some_and(|v| v == "0") {
        assert!(sizes.is_empty(), "HOTSTANDBY_BUFFER=0 still buffered");
        return;
    }
    assert!(sizes.len() > 10, "only {} batches", sizes.len());
    assert!(
        sizes.iter().any(|&n| n >= 10_000),
        "no batch filled the buffer: largest {:?}",
        sizes.iter().max()
    );
    let socket_calls = l
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Batch { .. } => Some(
                e.calls()
                    .expect("a valid batch")
                    .iter()
                    .filter(|c| c.fd >= 0)
                    .count(),
            ),
            _ => None,
        })
        .sum::<usize>();
    assert!(socket_calls > 100, "only {socket_calls} buffered fd calls");
}
