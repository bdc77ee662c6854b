//! Real servers recorded under real load and replayed exactly: memcached
//! with 4 worker threads, nginx with a master and 2 workers under wrk,
//! PostgreSQL under pgbench (run as the postgres user), a node.js HTTP
//! server under wrk, a Java thread pool. Each load is bounded in count and
//! time; every server listens on 127.0.0.1 only. What the clients were told
//! is checked, and the replay checks every byte the server wrote to them
//! (hashed into the log) — a replay that served different data diverges.
//!
//! These programs must be installed (`.ci/run` installs them); a missing
//! one fails its test, naming the package.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hotstandby_tests::*;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    require_root();
    b
}

/// The path of a program, or a failure naming the package to install.
fn need(program: &str, package: &str) -> PathBuf {
    // PostgreSQL's server programs live in a versioned directory.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    for d in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        dirs.push(PathBuf::from(d));
    }
    for dir in dirs {
        let p = dir.join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("{program} is not installed: apt-get install {package} (.ci/run does)");
}

/// Start `hotstandby record` of `argv` with `data_dir` as the program's
/// data directory.
fn start_record(b: &Path, log: &Path, data_dir: Option<&Path>, cwd: &Path, argv: &[&str]) -> Guard {
    let mut c = Command::new(b);
    tie(&mut c);
    c.arg("record").arg("--log").arg(log);
    if let Some(d) = data_dir {
        c.arg("--data-dir").arg(d);
    }
    c.arg("--")
        .args(argv)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Guard(Some(c.spawn().expect("start hotstandby record")))
}

/// Replay and require success, showing the divergence if any.
fn replay_ok(b: &Path, log: &Path, what: &str) {
    let r = replay(b, log);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{what}: replay failed:\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

fn signal(g: &Guard, sig: i32) {
    // SAFETY: kill takes plain integers; the pid is our child's.
    unsafe { libc::kill(g.pid(), sig) };
}

fn wrk(url: &str, conns: u32, secs: u32) -> String {
    let o = tie(&mut Command::new(need("wrk", "wrk")))
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            url,
        ])
        .output()
        .expect("run wrk");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "wrk failed: {out}");
    assert!(
        !out.contains("Socket errors"),
        "wrk saw socket errors: {out}"
    );
    assert!(!out.contains("Non-2xx"), "wrk saw errors: {out}");
    out
}

fn requests(wrk_out: &str) -> u64 {
    wrk_out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn memcached_four_threads_under_a_client() {
    let b = bin();
    let mc = need("memcached", "memcached");
    let s = Scratch::new("memcached");
    let log = s.join("log");
    let port = free_port();
    let ps = port.to_string();
    let mut rec = start_record(
        &b,
        &log,
        None,
        s.path(),
        &[
            mc.to_str().unwrap(),
            "-A",
            "-u",
            "root",
            "-t",
            "4",
            "-U",
            "0",
            "-l",
            "127.0.0.1",
            "-p",
            &ps,
        ],
    );
    wait_listening(port);
    // Four clients at once, each with its own keys, then every key read
    // back from a fresh connection.
    let mut rng = Rng::new();
    let seeds: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    let clients: Vec<_> = seeds
        .iter()
        .enumerate()
        .map(|(c, seed)| {
            let seed = *seed;
            std::thread::spawn(move || {
                let mut r = Rng::seeded(seed);
                let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut rd = BufReader::new(s);
                let mut want = std::collections::BTreeMap::new();
                for i in 0..150 {
                    let k = format!("c{c}-k{}", r.next_u64() % 40);
                    let v = format!("{}-{i}", r.next_u64());
                    write!(w, "set {k} 0 0 {}\r\n{v}\r\n", v.len()).unwrap();
                    let mut line = String::new();
                    rd.read_line(&mut line).unwrap();
                    assert_eq!(line, "STORED\r\n");
                    want.insert(k, v);
                }
                want
            })
        })
        .collect();
    let mut want = std::collections::BTreeMap::new();
    for c in clients {
        want.extend(c.join().unwrap());
    }
    let s2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s2.try_clone().unwrap();
    let mut rd = BufReader::new(s2);
    for (k, v) in &want {
        write!(w, "get {k}\r\n").unwrap();
        let mut hdr = String::new();
        rd.read_line(&mut hdr).unwrap();
        let mut val = String::new();
        rd.read_line(&mut val).unwrap();
        let mut end = String::new();
        rd.read_line(&mut end).unwrap();
        assert_eq!(
            val.trim_end(),
            v,
            "memcached returned another value for {k}"
        );
        assert_eq!(end, "END\r\n");
    }
    write!(w, "shutdown\r\n").unwrap();
    let o = rec.wait(60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    replay_ok(&b, &log, "memcached");
}

#[test]
fn nginx_master_and_two_workers_under_wrk() {
    let b = bin();
    let ng = need("nginx", "nginx-light");
    let s = Scratch::new("nginx-workers");
    let d = s.join("www");
    std::fs::create_dir_all(d.join("html")).unwrap();
    std::fs::write(d.join("html/index.html"), "hello from nginx workers\n").unwrap();
    let port = free_port();
    let conf = format!(
        "worker_processes 2;\nmaster_process on;\ndaemon off;\nerror_log stderr warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 256; }}\n\
         http {{ access_log off; sendfile on;\n\
         client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;\n\
         uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {p}/html; }} }}\n",
        p = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    // The workers drop to `nobody`: their files must be readable to it.
    std::fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let log = s.join("log");
    let conf = d.join("nginx.conf");
    let mut rec = start_record(
        &b,
        &log,
        Some(&d),
        s.path(),
        &[
            ng.to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
            "-p",
            d.to_str().unwrap(),
        ],
    );
    wait_listening(port);
    let out = wrk(&format!("http://127.0.0.1:{port}/"), 8, 3);
    assert!(requests(&out) > 50, "wrk made too few requests: {out}");
    // Graceful stop: the supervisor forwards SIGQUIT to the master (its pid
    // file holds the pid in the program's own namespace, 2).
    signal(&rec, libc::SIGQUIT);
    let o = rec.wait(60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("nginx.pid"))
            .unwrap_or_default()
            .trim(),
        "",
        "nginx removes its pid file on a graceful stop"
    );
    replay_ok(&b, &log, "nginx with workers");
}

#[test]
fn postgresql_under_pgbench() {
    let b = bin();
    let initdb = need("initdb", "postgresql");
    let postgres = need("postgres", "postgresql");
    let pgbench = need("pgbench", "postgresql-contrib");
    let psql = need("psql", "postgresql-client");
    let s = Scratch::new("postgres");
    std::fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = s.join("data");
    let chown = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(s.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let as_pg = |c: &mut Command| {
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    };
    let mut init = Command::new("setpriv");
    as_pg(&mut init);
    let o = init
        .arg(&initdb)
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let port = free_port();
    let ps = port.to_string();
    let log = s.join("log");
    let mut rec = start_record(
        &b,
        &log,
        Some(&data),
        s.path(),
        &[
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            postgres.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-p",
            &ps,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ],
    );
    wait_listening(port);
    let pg = |args: &[&str]| {
        let o = tie(&mut Command::new(&pgbench))
            .args(["-h", "127.0.0.1", "-p", &ps, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .unwrap();
        let out =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "pgbench {args:?}: {out}");
        out
    };
    // Accepting connections before it is ready ("the database system is
    // starting up"): wait until a query answers, bounded.
    wait_until("PostgreSQL to accept queries", 30, || {
        tie(&mut Command::new(&psql))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &ps,
                "-U",
                "postgres",
                "-Atc",
                "select 1",
                "postgres",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
            .unwrap_or(false)
    });
    pg(&["-i", "-s", "1"]);
    let out = pg(&["-c", "4", "-T", "5"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let sum = tie(&mut Command::new(&psql))
        .args(["-h", "127.0.0.1", "-p", &ps, "-U", "postgres", "-Atc"])
        .arg("select count(*), sum(abalance) = (select sum(delta) from pgbench_history) from pgbench_accounts")
        .arg("postgres")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout).trim(),
        "100000|t",
        "the balances add up to the history"
    );
    // Fast shutdown (forwarded to the postmaster).
    signal(&rec, libc::SIGINT);
    let o = rec.wait(60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    replay_ok(&b, &log, "postgresql");
}

#[test]
fn node_http_server_under_wrk() {
    let b = bin();
    let node = need("node", "nodejs");
    let s = Scratch::new("node");
    let port = free_port();
    std::fs::write(
        s.join("server.js"),
        format!(
            "const http = require('http'); let n = 0;\n\
             const srv = http.createServer((req, res) => {{ n++;\n\
               if (req.url === '/quit') {{ res.end('served ' + n + '\\n'); srv.close(); setTimeout(() => process.exit(0), 50); return; }}\n\
               res.end('hello ' + n + ' ' + Math.random().toFixed(6) + '\\n'); }});\n\
             srv.listen({port}, '127.0.0.1');\n"
        ),
    )
    .unwrap();
    let log = s.join("log");
    let mut rec = start_record(
        &b,
        &log,
        None,
        s.path(),
        &[node.to_str().unwrap(), "server.js"],
    );
    wait_listening(port);
    let out = wrk(&format!("http://127.0.0.1:{port}/"), 8, 3);
    let n = requests(&out);
    assert!(n > 50, "wrk made too few requests: {out}");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET /quit HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = std::io::Read::read_to_string(&mut c, &mut body);
    let served: u64 = body
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("served "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(served > n, "the server counted {served} requests, wrk {n}");
    let o = rec.wait(60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    replay_ok(&b, &log, "node");
}

#[test]
fn java_thread_pool() {
    let b = bin();
    let javac = need("javac", "openjdk-17-jdk-headless");
    let s = Scratch::new("java");
    std::fs::write(
        s.join("Pool.java"),
        r#"import java.util.concurrent.*;
import java.util.*;
public class Pool {
    public static void main(String[] a) throws Exception {
        ExecutorService ex = Executors.newFixedThreadPool(4);
        List<Future<Long>> fs = new ArrayList<>();
        Random r = new Random();
        for (int i = 0; i < 40; i++) {
            final long seed = r.nextLong();
            fs.add(ex.submit(() -> { long x = seed; for (int k = 0; k < 100000; k++) x = x * 6364136223846793005L + 1442695040888963407L; return x ^ System.nanoTime(); }));
        }
        long acc = 0;
        for (Future<Long> f : fs) acc ^= f.get();
        ex.shutdown();
        System.out.println("acc=" + acc + " uuid=" + UUID.randomUUID());
    }
}
"#,
    )
    .unwrap();
    let o = Command::new(&javac)
        .arg("Pool.java")
        .current_dir(s.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "javac: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let java = need("java", "openjdk-17-jdk-headless");
    let out = roundtrip(
        &b,
        "java",
        &[
            java.to_str().unwrap(),
            "-cp",
            s.path().to_str().unwrap(),
            "Pool",
        ],
        s.path(),
        None,
    );
    assert!(String::from_utf8_lossy(&out).starts_with("acc="));
}

/// A recorded server that exits while a client is connected leaves the
/// connection's TIME-WAIT on its port; a new server must bind that port at
/// once (the supervisor's TCP_REPAIR capture must not clear the socket's
/// reuse flag, which would make that TIME-WAIT block the port for 60 s).
#[test]
fn a_recorded_server_that_exits_can_be_started_again_at_once() {
    let b = bin();
    let redis = need("redis-server", "redis-server");
    let s = Scratch::new("restart");
    let port = free_port();
    let ps = port.to_string();
    let args = [
        redis.to_str().unwrap(),
        "--port",
        &ps,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        s.path().to_str().unwrap(),
    ];
    let mut rec = start_record(&b, &s.join("log"), None, s.path(), &args);
    wait_listening(port);
    // A client that stays connected, so the server closes first.
    let mut keep = TcpStream::connect(("127.0.0.1", port)).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    keep.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    std::io::Read::read_exact(&mut keep, &mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let mut cli = TcpStream::connect(("127.0.0.1", port)).unwrap();
    cli.write_all(b"SHUTDOWN NOSAVE\r\n").unwrap();
    let o = rec.wait(60);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The clients close after the server did: the server's side waits.
    drop(keep);
    drop(cli);
    std::thread::sleep(Duration::from_millis(100));
    // The case is real: the server's side of a connection is in TIME-WAIT.
    let ss = Command::new("ss")
        .args([
            "-tan",
            "state",
            "time-wait",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .unwrap();
    let tw = String::from_utf8_lossy(&ss.stdout).lines().count();
    assert!(
        tw > 1,
        "expected a TIME-WAIT on port {port}: {}",
        String::from_utf8_lossy(&ss.stdout)
    );
    let mut native = Guard(Some(
        tie(&mut Command::new(&redis))
            .args(&args[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let alive = TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"PING\r\n")?;
        let mut p = [0u8; 7];
        std::io::Read::read_exact(&mut c, &mut p)?;
        Ok(p)
    });
    if alive.as_ref().map(|p| p == b"+PONG\r\n").unwrap_or(false) {
        signal(&native, libc::SIGTERM);
        let _ = native.wait(20);
        return;
    }
    signal(&native, libc::SIGKILL);
    let o = native.wait(20);
    panic!(
        "a new redis could not serve on port {port} right after the recorded one exited: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}
