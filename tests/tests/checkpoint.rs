//! Checkpoints of a replayed program: a replay that takes them must still
//! match the log; a replay started from one must finish the log exactly as
//! the whole replay does; a checkpoint whose memory was changed must be
//! caught as a divergence (the negative control); corrupt, truncated and
//! foreign checkpoints are refused with the reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hotstandby_protocol::checkpoint::{Checkpoint, Item, Writer};
use hotstandby_tests::*;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    b
}

fn replay_with(b: &Path, log: &Path, extra: &[&str]) -> Output {
    tie(&mut Command::new(b))
        .args(["replay", "--show-output", "--log"])
        .arg(log)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run hotstandby replay")
}

/// The checkpoint files in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    hotstandby_replayer::checkpoint::list(dir)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Replay with checkpoints, then from each retained checkpoint: every run
/// exits 0, and a run from a checkpoint prints exactly the tail of what the
/// whole replay printed. Returns the checkpoints.
fn checkpoint_and_resume(b: &Path, log: &Path, every: &str) -> (Vec<PathBuf>, Vec<u8>) {
    let full = replay_with(b, log, &["--checkpoint-every", every]);
    assert_eq!(full.status.code(), Some(0), "{}", text(&full));
    let stderr = String::from_utf8_lossy(&full.stderr);
    let taken = stderr.matches("checkpoint taken").count();
    assert!(taken >= 3, "expected several checkpoints: {}", text(&full));
    let cks = checkpoints(&log.join("checkpoints"));
    assert_eq!(cks.len(), 2, "the last two are kept ({taken} taken)");
    for ck in &cks {
        let from = replay_with(b, log, &["--from-checkpoint", ck.to_str().unwrap()]);
        assert_eq!(from.status.code(), Some(0), "{}", text(&from));
        let e = String::from_utf8_lossy(&from.stderr);
        assert!(e.contains("restored from checkpoint"), "{e}");
        assert!(
            full.stdout.ends_with(&from.stdout),
            "the replay from {} printed what the whole replay did not end with:\n{}",
            ck.display(),
            text(&from)
        );
        // It replayed the log from the checkpoint's event, not from 0.
        let at: u64 = e
            .split("event=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("the restore names its event");
        assert!(at > 0);
    }
    (cks, full.stdout)
}

/// Rewrite a checkpoint with `f` applied to every memory item (a valid
/// file: new hash).
fn rewrite(src: &Path, dst: &Path, f: impl Fn(&mut Vec<u8>) -> bool) -> bool {
    let bytes = std::fs::read(src).unwrap();
    let c = Checkpoint::parse(&bytes).unwrap();
    let mut w = Writer::new(Vec::new(), &c.state).unwrap();
    let mut changed = false;
    for it in c.items() {
        match it.unwrap() {
            Item::Mem { addr, bytes } => {
                let mut v = bytes.to_vec();
                changed |= f(&mut v);
                w.memory(addr, &v).unwrap();
            }
            Item::File { path, mode, bytes } => w.file(path, mode, bytes).unwrap(),
            Item::Dir { path, mode } => w.dir(path, mode).unwrap(),
        }
    }
    std::fs::write(dst, w.finish().unwrap().0).unwrap();
    changed
}

fn record_redis(b: &Path, s: &Scratch) -> (PathBuf, u16) {
    let data = s.join("data");
    std::fs::create_dir(&data).unwrap();
    let log = s.join("log");
    let port = free_port();
    let mut child = tie(&mut Command::new(b))
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
            "yes",
        ])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(port);
    let cli = |input: &str| {
        let mut c = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .as_mut()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        drop(c.stdin.take());
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned()
    };
    // Values the negative control can find in memory: "val-<i>-".
    let mut sets = String::new();
    for i in 0..3000 {
        sets.push_str(&format!("SET key:{i} val-{i}-{}\n", "x".repeat(64)));
    }
    assert_eq!(cli(&sets).lines().count(), 3000);
    // Then a long read phase, so the retained checkpoints fall in it and
    // the replies after them carry the values.
    for round in 0..4 {
        let mut gets = String::new();
        for i in 0..3000 {
            gets.push_str(&format!("GET key:{}\nINCR reads\n", (i * 7 + round) % 3000));
        }
        let out = cli(&gets);
        assert!(out.contains("val-"), "GET replies carry the values");
    }
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "save"])
        .status();
    let st = child.wait().unwrap();
    assert!(st.success(), "redis exit {st:?}");
    (log, port)
}

#[test]
fn redis_replay_from_a_checkpoint_finishes_the_log_and_a_changed_one_diverges() {
    require_root();
    let b = bin();
    let s = Scratch::new("ck-redis");
    let (log, _) = record_redis(&b, &s);
    let (cks, _) = checkpoint_and_resume(&b, &log, "1M");

    // Negative control: the same checkpoint with the values in memory
    // changed ("val-" to "VAL-") is a valid file, restores, and must be
    // caught at the first reply that carries one.
    let bad = s.join("changed.hsck");
    assert!(
        rewrite(&cks[0], &bad, |m| {
            let mut hit = false;
            for i in 0..m.len().saturating_sub(4) {
                if &m[i..i + 4] == b"val-" {
                    m[i..i + 4].copy_from_slice(b"VAL-");
                    hit = true;
                }
            }
            hit
        }),
        "the checkpoint holds redis's values"
    );
    let o = replay_with(&b, &log, &["--from-checkpoint", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "a divergence: {}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("restored from checkpoint"), "{e}");
    eprintln!("{e}");
    // (Through the syscall buffer the write is a buffered call; traced, a
    // write event: both compare the bytes.)
    assert!(
        e.contains("divergence")
            && (e.contains("other bytes written") || e.contains("(written bytes)")),
        "{e}"
    );
}

#[test]
fn corrupt_truncated_and_foreign_checkpoints_are_refused() {
    require_root();
    let b = bin();
    let s = Scratch::new("ck-bad");
    std::fs::write(s.join("t.py"), THREADS_PY).unwrap();
    let py = python();
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &[&py, "t.py"], None);
    assert!(rec.status.success(), "{}", text(&rec));
    let full = replay_with(&b, &log, &["--checkpoint-every", "256K"]);
    assert_eq!(full.status.code(), Some(0), "{}", text(&full));
    let cks = checkpoints(&log.join("checkpoints"));
    let good = cks.last().expect("a checkpoint").clone();
    let bytes = std::fs::read(&good).unwrap();

    let refused = |path: &Path, want: &str| {
        let o = replay_with(&b, &log, &["--from-checkpoint", path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(6), "{}", text(&o));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "expected {want:?} in: {e}");
        assert!(!e.contains("restored from checkpoint"), "{e}");
    };
    let flipped = s.join("flipped.hsck");
    let mut c = bytes.clone();
    let mid = c.len() / 2;
    c[mid] ^= 0x01;
    std::fs::write(&flipped, &c).unwrap();
    refused(&flipped, "fails its checksum");
    let cut = s.join("cut.hsck");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    refused(&cut, "without its trailer");
    let garbage = s.join("garbage.hsck");
    std::fs::write(&garbage, b"GIF89a this is not a checkpoint at all").unwrap();
    refused(&garbage, "not a hotstandby checkpoint");
    refused(&s.join("missing.hsck"), "No such file");
    // Whole and sealed, but inconsistent: no main thread.
    let c = Checkpoint::parse(&bytes).unwrap();
    let mut st = c.state.clone();
    st.threads.retain(|t| t.tid != st.leader);
    let mut w = Writer::new(Vec::new(), &st).unwrap();
    for it in c.items() {
        match it.unwrap() {
            Item::Mem { addr, bytes } => w.memory(addr, bytes).unwrap(),
            Item::File { path, mode, bytes } => w.file(path, mode, bytes).unwrap(),
            Item::Dir { path, mode } => w.dir(path, mode).unwrap(),
        }
    }
    let headless = s.join("headless.hsck");
    std::fs::write(&headless, w.finish().unwrap().0).unwrap();
    refused(&headless, "do not hold its main thread");

    // A checkpoint of another recording of the same program.
    let log2 = s.join("log2");
    let rec = record(&b, &log2, s.path(), None, &[&py, "t.py"], None);
    assert!(rec.status.success(), "{}", text(&rec));
    let o = replay_with(&b, &log2, &["--from-checkpoint", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("taken from another log"),
        "{}",
        text(&o)
    );
}

/// Four threads, a lock, a queue and a pipe that holds bytes across the
/// checkpoint (read only at the end).
const THREADS_PY: &str = r#"
import threading, queue, random, time, os
r, w = os.pipe()
q = queue.Queue()
lock = threading.Lock()
total = [0]
def worker(n):
    for i in range(3000):
        v = random.randint(1, 1000)
        with lock:
            total[0] += v
        q.put((n, i, v, time.time()))
        if i % 50 == 0:
            os.write(w, b"x")
            time.sleep(0.001)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in ts: t.start()
for t in ts: t.join()
items = []
while not q.empty():
    items.append(q.get())
print("total", total[0], "items", len(items), "pipe", len(os.read(r, 100000)))
print("last", items[-1])
"#;

#[test]
fn python_threads_and_a_pipe_resume_from_a_checkpoint() {
    require_root();
    let b = bin();
    let s = Scratch::new("ck-py");
    std::fs::write(s.join("t.py"), THREADS_PY).unwrap();
    let py = python();
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &[&py, "t.py"], None);
    assert!(rec.status.success(), "{}", text(&rec));
    let (_, out) = checkpoint_and_resume(&b, &log, "256K");
    assert_eq!(out, rec.stdout);
    assert!(String::from_utf8_lossy(&out).contains("items 12000 pipe 240"));
}

/// Shared mappings of files outside the data directory: a read-only one
/// (like the JVM's `lib/modules`) is left exactly as it is by checkpoints
/// and restores, and a writable one the program deletes at its exit (like
/// the JVM's perf data in /tmp) is made again with its saved contents.
const SHARED_PY: &str = r#"
import mmap, os, time
ro = open("ro.bin", "rb")
m1 = mmap.mmap(ro.fileno(), 0, prot=mmap.PROT_READ)
f = open("perf.bin", "w+b")
f.truncate(8192)
m2 = mmap.mmap(f.fileno(), 8192)
total = 0
for i in range(400):
    m2[i % 8192] = (m2[i % 8192] + i) % 256
    total += m1[i * 7 % len(m1)]
    if i % 20 == 0:
        time.sleep(0.001)
print("sum", total, "perf", sum(m2[:512]))
os.unlink("perf.bin")
"#;

#[test]
fn shared_file_mappings_outside_the_data_directory_are_left_alone_or_made_again() {
    require_root();
    let b = bin();
    let s = Scratch::new("ck-shared");
    std::fs::write(s.join("t.py"), SHARED_PY).unwrap();
    let ro: Vec<u8> = (0..20000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(s.join("ro.bin"), &ro).unwrap();
    let before = std::fs::metadata(s.join("ro.bin")).unwrap();
    let py = python();
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &[&py, "t.py"], None);
    assert!(rec.status.success(), "{}", text(&rec));
    let full = replay_with(&b, &log, &["--checkpoint-every", "16K"]);
    assert_eq!(full.status.code(), Some(0), "{}", text(&full));
    assert_eq!(full.stdout, rec.stdout);
    let cks = checkpoints(&log.join("checkpoints"));
    assert!(!cks.is_empty(), "{}", text(&full));
    let saved = cks.iter().any(|ck| {
        let bytes = std::fs::read(ck).unwrap();
        let c = Checkpoint::parse(&bytes).unwrap();
        c.state
            .mappings
            .iter()
            .any(|m| m.contents_saved && m.path.ends_with(b"perf.bin"))
    });
    assert!(
        saved,
        "a checkpoint holds perf.bin's shared mapping with its contents"
    );
    for ck in &cks {
        assert!(
            !s.join("perf.bin").exists(),
            "the program deletes it at exit"
        );
        let o = replay_with(&b, &log, &["--from-checkpoint", ck.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("restored from checkpoint"));
        assert!(rec.stdout.ends_with(&o.stdout), "{}", text(&o));
    }
    let after = std::fs::metadata(s.join("ro.bin")).unwrap();
    assert_eq!(
        std::fs::read(s.join("ro.bin")).unwrap(),
        ro,
        "ro.bin was changed"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec()),
        (before.len(), before.mtime(), before.mtime_nsec())
    );
}
