//! Helpers for the integration tests in `tests/tests/`: scratch
//! directories, building the C test programs, running `hotstandby record`
//! and `replay`, free loopback ports.
//!
//! The tests need ptrace (and root for the data-directory bind mount);
//! they fail loudly, never skip, when the machine cannot run them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory under /tmp removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("hotstandby-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Directory of the test programs' sources.
pub fn programs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("programs")
}

/// Compile `programs/NAME.c` into `dir/NAME` with gcc.
pub fn build_c(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&out)
        .arg(programs_dir().join(format!("{name}.c")))
        .status()
        .expect("gcc must be installed to build the test programs");
    assert!(st.success(), "gcc failed on {name}.c");
    out
}

/// The real Python interpreter (not the pyenv shim, which forks).
pub fn python() -> String {
    let o = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be installed");
    String::from_utf8(o.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// Fail loudly if this machine cannot trace processes.
pub fn require_tracing(bin: &Path) {
    let s = Scratch::new("preflight");
    let o = Command::new(bin)
        .args(["record", "--log"])
        .arg(s.join("log"))
        .args(["--", "true"])
        .output()
        .expect("run hotstandby");
    assert!(
        o.status.success(),
        "this machine cannot run the record/replay tests (ptrace/seccomp unavailable?): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Fail loudly unless running as root (needed for mount namespaces).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test needs root (private mount namespace for the data directory); run it as root, as CI does");
}

/// Tie a child to the test thread that starts it: if the test is killed
/// (a timeout), the kernel kills the child too, so nothing a test started
/// outlives it (a spinning recording once did, loading the machine for
/// hours).
pub fn tie(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl only sets a flag of the child; async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    c
}

/// Run `hotstandby record` in `cwd`.
pub fn record(
    bin: &Path,
    log: &Path,
    cwd: &Path,
    data_dir: Option<&Path>,
    argv: &[&str],
    stdin: Option<&Path>,
) -> Output {
    let mut c = Command::new(bin);
    tie(&mut c);
    c.arg("record").arg("--log").arg(log);
    if let Some(d) = data_dir {
        c.arg("--data-dir").arg(d);
    }
    c.arg("--").args(argv).current_dir(cwd);
    match stdin {
        Some(f) => c.stdin(std::fs::File::open(f).expect("stdin file")),
        None => c.stdin(Stdio::null()),
    };
    c.output().expect("run hotstandby record")
}

/// Run `hotstandby replay --show-output`.
pub fn replay(bin: &Path, log: &Path) -> Output {
    tie(&mut Command::new(bin))
        .args(["replay", "--show-output", "--log"])
        .arg(log)
        .stdin(Stdio::null())
        .output()
        .expect("run hotstandby replay")
}

/// Record, replay, and check that the replay reproduced the program's
/// output exactly. Returns the recorded stdout.
pub fn roundtrip(
    bin: &Path,
    name: &str,
    argv: &[&str],
    cwd: &Path,
    stdin: Option<&Path>,
) -> Vec<u8> {
    let s = Scratch::new(&format!("rt-{name}"));
    let log = s.join("log");
    let rec = record(bin, &log, cwd, None, argv, stdin);
    assert!(
        rec.status.success(),
        "{name}: record failed: {:?}\n{}",
        rec.status,
        String::from_utf8_lossy(&rec.stderr)
    );
    assert!(
        !rec.stdout.is_empty(),
        "{name}: the program printed nothing"
    );
    let rep = replay(bin, &log);
    assert_eq!(
        rep.status.code(),
        Some(0),
        "{name}: replay did not succeed: {}",
        String::from_utf8_lossy(&rep.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&rep.stdout),
        String::from_utf8_lossy(&rec.stdout),
        "{name}: replayed output differs from the recorded output"
    );
    rec.stdout
}

/// A TCP port on 127.0.0.1 that is free right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Wait until something listens on `port` (bounded).
pub fn wait_listening(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nothing listens on port {port} after 5 s");
}

/// A tiny deterministic PRNG for test inputs (xorshift64*), seeded by time.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        Rng(t | 1)
    }
    pub fn seeded(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Two test hosts, "primary" and "standby", each in its own network
/// namespace, joined by a veth pair with addresses from 198.51.100.0/24
/// (documentation range, never routed anywhere). Removed on drop, also
/// when a test fails; processes started in them must be killed by the test
/// (by PID) before.
#[derive(Debug)]
pub struct TwoHosts {
    pub primary_ns: String,
    pub standby_ns: String,
    pub primary_ip: &'static str,
    pub standby_ip: &'static str,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2 (ip) must be installed");
    assert!(st.success(), "ip {} failed", args.join(" "));
}

impl TwoHosts {
    /// `tag`: a short name unique among concurrently running tests.
    pub fn new(tag: &str) -> Self {
        require_root();
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let h = TwoHosts {
            primary_ns: format!("hsp-{id}"),
            standby_ns: format!("hss-{id}"),
            primary_ip: "198.51.100.1",
            standby_ip: "198.51.100.2",
        };
        let (vp, vs) = (format!("vp{id}"), format!("vs{id}"));
        ip(&["netns", "add", &h.primary_ns]);
        ip(&["netns", "add", &h.standby_ns]);
        ip(&[
            "link",
            "add",
            &vp,
            "netns",
            &h.primary_ns,
            "type",
            "veth",
            "peer",
            "name",
            &vs,
            "netns",
            &h.standby_ns,
        ]);
        for (ns, dev, addr) in [
            (&h.primary_ns, &vp, "198.51.100.1/24"),
            (&h.standby_ns, &vs, "198.51.100.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }

    /// A command run inside a host's namespace.
    pub fn cmd(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        tie(&mut c);
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Drop all traffic between the two hosts (iptables inside the
    /// primary's namespace only), or restore it.
    pub fn partition(&self, on: bool) {
        let op = if on { "-A" } else { "-D" };
        for (chain, flag) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let st = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.primary_ns,
                    "iptables",
                    op,
                    chain,
                    flag,
                    self.standby_ip,
                    "-j",
                    "DROP",
                ])
                .status()
                .expect("iptables must be installed");
            assert!(st.success(), "iptables {op} {chain} failed");
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.primary_ns, &self.standby_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Three test hosts — primary, standby, client — on one bridge (inside a
/// fourth "switch" namespace), addresses 198.51.100.1, .2 and .3/24, each
/// host's interface named `eth0`. Removed on drop.
#[derive(Debug)]
pub struct Lan {
    pub switch: String,
    pub primary_ns: String,
    pub standby_ns: String,
    pub client_ns: String,
}

impl Lan {
    pub fn new(tag: &str) -> Self {
        require_root();
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let lan = Lan {
            switch: format!("hsw-{id}"),
            primary_ns: format!("hsp-{id}"),
            standby_ns: format!("hss-{id}"),
            client_ns: format!("hsc-{id}"),
        };
        for ns in [
            &lan.switch,
            &lan.primary_ns,
            &lan.standby_ns,
            &lan.client_ns,
        ] {
            ip(&["netns", "add", ns]);
        }
        ip(&["-n", &lan.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.switch, "link", "set", "br0", "up"]);
        for (k, ns, addr) in [
            ("p", &lan.primary_ns, "198.51.100.1/24"),
            ("s", &lan.standby_ns, "198.51.100.2/24"),
            ("c", &lan.client_ns, "198.51.100.3/24"),
        ] {
            let port = format!("b{k}{id}");
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
                &lan.switch,
            ]);
            ip(&["-n", &lan.switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &lan.switch, "link", "set", &port, "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// A command run inside a host's namespace.
    pub fn cmd(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        tie(&mut c);
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Take a host's link down (its kernel sends nothing more).
    pub fn unplug(&self, ns: &str) {
        ip(&["-n", ns, "link", "set", "eth0", "down"]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in [
            &self.primary_ns,
            &self.standby_ns,
            &self.client_ns,
            &self.switch,
        ] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Poll `f` every 10 ms until it holds; fail naming `what` after `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a child by its PID when dropped (also when a test fails).
#[derive(Debug)]
pub struct Guard(pub Option<Child>);
impl Guard {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().expect("running").id() as i32
    }
    /// Wait, and fail with its stderr unless it exited with status 0.
    pub fn wait_ok(&mut self, secs: u64) -> std::process::Output {
        let o = self.wait(secs);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }
    pub fn wait(&mut self, secs: u64) -> std::process::Output {
        let c = self.0.take().expect("running");
        let pid = c.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(c.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(o) => o.expect("wait"),
            Err(_) => {
                // SAFETY: kill takes plain integers; the pid is our child's.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("process {pid} did not finish within {secs} s");
            }
        }
    }
}
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `hotstandby status --log LOG` output.
pub fn status(b: &Path, log: &Path) -> String {
    let o = Command::new(b)
        .args(["status", "--log"])
        .arg(log)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}
