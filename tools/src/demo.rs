//! `hotstandby demo`: a whole network takeover on this one machine.
//!
//! Builds a lab of network namespaces on a bridge (primary 198.51.100.1,
//! standby .2, client .3; virtual IP 198.51.100.10), runs redis-server
//! under `hotstandby run` on the primary (a small built-in INCR server when
//! redis is not installed), a standby following it, and four clients with
//! persistent connections through the virtual IP issuing INCR. Then the
//! primary host dies (its supervisor and program killed, its link down).
//! The clients' connections pause and carry on with the standby; the demo
//! shows the pause, the connections kept and the counter intact, and
//! removes the lab. Needs root (namespaces, iptables, TCP_REPAIR).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const VIP: &str = "198.51.100.10";
const PORT: u16 = 6379;
const CLIENTS: usize = 4;

fn resp(cmd: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", cmd.len()).into_bytes();
    for a in cmd {
        v.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
    }
    v
}

fn read_reply(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed by the server");
    }
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.trim().parse()?;
        if n < 0 {
            return Ok("(nil)".into());
        }
        let mut body = String::new();
        r.read_line(&mut body)?;
        return Ok(body.trim_end().to_string());
    }
    if let Some(e) = line.strip_prefix('-') {
        bail!("server error: {}", e.trim_end());
    }
    Ok(line.trim_end().trim_start_matches([':', '+']).to_string())
}

/// Kills and reaps a child on drop (by PID: only processes we started).
struct Proc(Option<Child>);
impl Proc {
    fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// The lab's namespaces, removed on drop (also on error).
struct Lab {
    switch: String,
    hosts: [String; 3],
}

impl Lab {
    fn new() -> anyhow::Result<Lab> {
        let id = std::process::id() % 100_000;
        let lab = Lab {
            switch: format!("hsdemo-sw{id}"),
            hosts: [
                format!("hsdemo-p{id}"),
                format!("hsdemo-s{id}"),
                format!("hsdemo-c{id}"),
            ],
        };
        for ns in std::iter::once(&lab.switch).chain(lab.hosts.iter()) {
            ip(&["netns", "add", ns])?;
        }
        ip(&["-n", &lab.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.switch, "link", "set", "br0", "up"])?;
        for (i, ns) in lab.hosts.iter().enumerate() {
            let port = format!("hsdb{i}{id}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lab.switch,
            ])?;
            ip(&["-n", &lab.switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &lab.switch, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.51.100.{}/24", i + 1),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }
    fn cmd(&self, host: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host]]).arg(program);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Move the calling thread into a lab host's network namespace.
fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

fn status(me: &Path, log: &Path) -> String {
    Command::new(me)
        .args(["status", "--log"])
        .arg(log)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(secs) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    acked: AtomicU64,
    last: AtomicU64,
    /// Longest wait for one reply, µs.
    max_wait_us: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// A client thread: one persistent connection through the virtual IP,
/// INCR counter in a loop, never reconnecting.
fn client(ns: String, seen: Arc<Seen>, i: usize) {
    let r = (|| -> anyhow::Result<()> {
        enter_netns(&ns)?;
        let s = TcpStream::connect((VIP, PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        while !seen.stop.load(Relaxed) {
            let t = Instant::now();
            w.write_all(&resp(&["INCR", "counter"]))?;
            let v: u64 = read_reply(&mut r)?.parse()?;
            seen.max_wait_us
                .fetch_max(t.elapsed().as_micros() as u64, Relaxed);
            seen.acked.fetch_add(1, Relaxed);
            seen.last.fetch_max(v, Relaxed);
        }
        Ok(())
    })();
    if let Err(e) = r {
        seen.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("client {i}: {e:#}"));
    }
}

/// One command on a new connection from the client host.
fn ask(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let ns = ns.to_string();
    let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || -> anyhow::Result<String> {
        enter_netns(&ns)?;
        let s =
            TcpStream::connect_timeout(&format!("{VIP}:{PORT}").parse()?, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let c: Vec<&str> = cmd.iter().map(|s| s.as_str()).collect();
        w.write_all(&resp(&c))?;
        read_reply(&mut r)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

pub fn run() -> anyhow::Result<u8> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and uses TCP_REPAIR: run it as root");
    }
    for t in ["ip", "iptables"] {
        if Command::new(t).arg("-V").output().is_err() {
            bail!("the demo needs `{t}` (apt-get install -y iproute2 iptables)");
        }
    }
    let me = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("hotstandby-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = Lab::new().and_then(|lab| demo_in(&me, &dir, &lab));
    if result.is_err() {
        for (who, f) in [("primary", "primary.err"), ("standby", "standby.err")] {
            if let Ok(t) = std::fs::read_to_string(dir.join(f)) {
                eprintln!("--- {who}\n{t}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(me: &Path, dir: &Path, lab: &Lab) -> anyhow::Result<u8> {
    for (k, d) in [("primary", "kp"), ("standby", "ks")] {
        let st = Command::new(me)
            .args(["keygen", "--name", k, "--out"])
            .arg(dir.join(d))
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("keygen failed");
        }
    }
    let (a, b) = (dir.join("A"), dir.join("B"));
    std::fs::create_dir_all(&a)?;
    std::fs::create_dir_all(&b)?;
    // HOTSTANDBY_DEMO_BUILTIN=1 uses the built-in server even with redis.
    let redis = std::env::var_os("HOTSTANDBY_DEMO_BUILTIN").is_none()
        && Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
    let program: Vec<String> = if redis {
        [
            "redis-server",
            "--port",
            &PORT.to_string(),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once(a.display().to_string()))
        .collect()
    } else {
        vec![
            me.display().to_string(),
            "demo-server".into(),
            "--port".into(),
            PORT.to_string(),
        ]
    };
    let what = if redis {
        "redis-server"
    } else {
        "the built-in INCR server (redis-server is not installed)"
    };
    println!("lab: primary 198.51.100.1, standby 198.51.100.2, client 198.51.100.3 on one bridge; virtual IP {VIP}");
    let node = |c: &mut Command, me: &str, peer: &str| {
        c.arg("--cert")
            .arg(dir.join(format!("{me}/node.crt")))
            .arg("--key")
            .arg(dir.join(format!("{me}/node.key")))
            .arg("--peer-cert")
            .arg(dir.join(format!("{peer}/node.crt")))
            .args(["--vip", &format!("{VIP}/24"), "--dev", "eth0"]);
    };
    let mut pc = lab.cmd(0, me);
    pc.args(["run", "--listen", "198.51.100.1:7600", "--log"])
        .arg(dir.join("lp"));
    node(&mut pc, "kp", "ks");
    pc.arg("--data-dir").arg(&a).arg("--").args(&program);
    pc.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("primary.err"))?);
    let mut primary = Proc(Some(pc.spawn()?));
    println!("1. primary: {what} under `hotstandby run`, holding the virtual IP; output rule on (NFQUEUE)");
    let mut sc = lab.cmd(1, me);
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
    sc.arg("--data-dir").arg(&b);
    sc.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("standby.err"))?);
    let mut standby = Proc(Some(sc.spawn()?));
    println!("2. standby: replays the same program in lockstep from the log streamed over QUIC (pinned mutual TLS)");
    let cns = lab.hosts[2].clone();
    wait("the program on the virtual IP", 30, || {
        ask(&cns, &["PING"]).is_ok()
    })?;
    wait("the primary to be protected", 30, || {
        let s = status(me, &dir.join("lp"));
        s.contains("PROTECTED") && !s.contains("UNPROTECTED")
    })?;
    let seen = Arc::new(Seen::default());
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (ns, seen) = (cns.clone(), seen.clone());
            std::thread::spawn(move || client(ns, seen, i))
        })
        .collect();
    println!("3. {CLIENTS} clients hold TCP connections to {VIP}:{PORT} and send INCR counter, each waiting for its reply");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "   ... {} INCRs acknowledged, longest reply wait {:.1} ms",
            seen.acked.load(Relaxed),
            seen.max_wait_us.load(Relaxed) as f64 / 1000.0
        );
    }
    seen.max_wait_us.store(0, Relaxed);
    let before = seen.acked.load(Relaxed);
    println!("4. the primary host dies: kill -9 of its supervisor (and {what}), its link down");
    // SAFETY: kill takes plain integers; the pid is our child's.
    unsafe { libc::kill(primary.pid(), libc::SIGKILL) };
    if let Some(c) = primary.0.as_mut() {
        let _ = c.wait();
    }
    ip(&["-n", &lab.hosts[0], "link", "set", "eth0", "down"])?;
    let t0 = Instant::now();
    let resumed = wait("the clients to carry on", 30, || {
        seen.acked.load(Relaxed) > before + 100
    });
    let pause = seen.max_wait_us.load(Relaxed) as f64 / 1000.0;
    let after = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    seen.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let errors = seen
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let acked = seen.acked.load(Relaxed);
    let counter: u64 = ask(&cns, &["GET", "counter"])
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let serr = std::fs::read_to_string(dir.join("standby.err")).unwrap_or_default();
    for l in serr.lines().filter(|l| {
        l.contains("taking over")
            || l.contains("GOING LIVE")
            || l.contains("rebuilt")
            || l.contains("took the virtual IP")
    }) {
        println!("   standby: {}", l.trim_start_matches("hotstandby: "));
    }
    let _ = ask(&cns, &["SHUTDOWN", "NOSAVE"]);
    if let Some(c) = standby.0.as_mut() {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(standby);
    let kept = CLIENTS - errors.len();
    println!(
        "5. clients carried on {} ms after the kill; the longest a client waited for one reply: {pause:.0} ms",
        after.as_millis()
    );
    println!("   connections kept: {kept}/{CLIENTS} (no reset, no reconnect)");
    println!("   counter = {counter}; INCRs acknowledged to clients = {acked}");
    for e in &errors {
        println!("   client error: {e}");
    }
    let ok = resumed.is_ok() && errors.is_empty() && counter == acked;
    if ok {
        println!("demo ok: the standby took over the virtual IP and the live connections; nothing a client was told was lost");
        Ok(0)
    } else {
        println!("demo FAILED (logs were in {})", dir.display());
        println!(
            "--- primary\n{}",
            std::fs::read_to_string(dir.join("primary.err")).unwrap_or_default()
        );
        println!("--- standby\n{serr}");
        Ok(1)
    }
}

/// `hotstandby demo-server`: a small INCR/GET/PING server speaking the
/// redis protocol, one thread per connection, for machines without redis.
pub fn server(port: u16) -> anyhow::Result<u8> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
    let data: Arc<Mutex<std::collections::HashMap<String, i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    for s in l.incoming() {
        if stop.load(Relaxed) {
            break;
        }
        let Ok(s) = s else { continue };
        let (data, stop) = (data.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = serve_conn(s, &data, &stop);
        });
    }
    Ok(0)
}

fn serve_conn(
    s: TcpStream,
    data: &Mutex<std::collections::HashMap<String, i64>>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let n: usize = line.trim().trim_start_matches('*').parse().unwrap_or(0);
        let mut args = Vec::new();
        for _ in 0..n {
            let mut len = String::new();
            r.read_line(&mut len)?;
            let l: usize = len.trim().trim_start_matches('$').parse().unwrap_or(0);
            let mut buf = vec![0u8; l + 2];
            r.read_exact(&mut buf)?;
            args.push(String::from_utf8_lossy(&buf[..l]).into_owned());
        }
        let cmd = args
            .first()
            .map(|s| s.to_ascii_uppercase())
            .unwrap_or_default();
        let reply = {
            let mut d = data.lock().unwrap_or_else(|e| e.into_inner());
            match (cmd.as_str(), args.get(1)) {
                ("PING", _) => "+PONG\r\n".to_string(),
                ("INCR", Some(k)) => {
                    let v = d.entry(k.clone()).or_insert(0);
                    *v += 1;
                    format!(":{v}\r\n")
                }
                ("GET", Some(k)) => match d.get(k) {
                    Some(v) => format!("${}\r\n{v}\r\n", v.to_string().len()),
                    None => "$-1\r\n".into(),
                },
                ("SHUTDOWN", _) => {
                    stop.store(true, Relaxed);
                    std::process::exit(0);
                }
                _ => "-ERR unknown command\r\n".into(),
            }
        };
        w.write_all(reply.as_bytes())?;
    }
}
