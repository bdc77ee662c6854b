//! Negative controls: replays that must fail do, with the exit status and
//! message the contract promises; corrupt logs are refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use hotstandby_tests::*;

fn bin() -> PathBuf {
    let b = PathBuf::from(env!("CARGO_BIN_EXE_hotstandby"));
    require_tracing(&b);
    b
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn changed_input_file_diverges() {
    let b = bin();
    let s = Scratch::new("neg-input");
    let text: String = (0..2000).map(|i| format!("row {i}\n")).collect();
    std::fs::write(s.join("input.txt"), &text).unwrap();
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &["sha256sum", "input.txt"], None);
    assert!(rec.status.success());
    // Unchanged: replays.
    assert_eq!(replay(&b, &log).status.code(), Some(0));
    // One byte changed, same length: divergence on the read.
    std::fs::write(
        s.join("input.txt"),
        text.replacen("row 1000", "row 100X", 1),
    )
    .unwrap();
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    let e = stderr(&r);
    assert!(e.contains("divergence (read bytes) at event #"), "{e}");
    assert!(e.contains("differs from the recording"), "{e}");
}

#[test]
fn different_binary_is_refused() {
    let b = bin();
    let s = Scratch::new("neg-bin");
    let prog = s.join("prog");
    std::fs::copy("/usr/bin/shuf", &prog).unwrap();
    let log = s.join("log");
    let rec = record(
        &b,
        &log,
        s.path(),
        None,
        &[prog.to_str().unwrap(), "-i", "1-9", "-n", "3"],
        None,
    );
    assert!(rec.status.success());
    assert_eq!(replay(&b, &log).status.code(), Some(0));
    std::fs::copy("/usr/bin/tac", &prog).unwrap();
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("is not the program that was recorded"),
        "{}",
        stderr(&r)
    );
}

/// Tampering with a recorded input (valid checksums, different random
/// bytes) makes the program write different output, which the write-hash
/// check must catch.
#[test]
fn tampered_input_is_caught_by_output_hash() {
    use hotstandby_protocol::frame;
    use hotstandby_protocol::record::{Event, Record};
    let b = bin();
    let s = Scratch::new("neg-tamper");
    let log = s.join("log");
    let rec = record(
        &b,
        &log,
        s.path(),
        None,
        &["od", "-An", "-N16", "-tx1", "/dev/urandom"],
        None,
    );
    assert!(rec.status.success());
    let loaded = hotstandby_recorder::logfile::load(&log).unwrap();
    let mut out = frame::file_header().to_vec();
    let mut seq = 0;
    frame::encode_frame(&mut out, seq, &Record::Header(loaded.identity.clone()));
    let mut changed = false;
    for e in &loaded.events {
        let mut e = e.clone();
        if let Event::Syscall(sc) = &mut e {
            if sc.nr == libc::SYS_read as u32 && sc.args[2] == 16 && !sc.writes.is_empty() {
                for w in &mut sc.writes {
                    for byte in &mut w.data {
                        *byte ^= 0x5a;
                    }
                }
                changed = true;
            }
        }
        seq += 1;
        frame::encode_frame(&mut out, seq, &Record::Event(e));
    }
    seq += 1;
    frame::encode_frame(
        &mut out,
        seq,
        &Record::Trailer(loaded.trailer.clone().unwrap()),
    );
    assert!(changed, "od made no 16-byte read to tamper with");
    std::fs::write(log.join("events.hsl"), out).unwrap();
    let v = Command::new(&b)
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "the rewritten log is structurally sound"
    );
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    // Same length, different bytes: only the output hash can tell.
    assert!(
        stderr(&r).contains("write") && stderr(&r).contains("hash"),
        "{}",
        stderr(&r)
    );
}

fn corrupt_case(log: &Path, b: &Path, want: &str) {
    let v = Command::new(b)
        .args(["log", "verify"])
        .arg(log)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(4), "verify: {}", stderr(&v));
    assert!(stderr(&v).contains(want), "verify message: {}", stderr(&v));
    let r = replay(b, log);
    assert_eq!(r.status.code(), Some(4), "replay: {}", stderr(&r));
    assert_eq!(
        stderr(&r).lines().next(),
        stderr(&v).lines().next(),
        "replay and verify must refuse with the same message"
    );
    let d = Command::new(b)
        .args(["log", "dump"])
        .arg(log)
        .output()
        .unwrap();
    assert_eq!(d.status.code(), Some(4));
}

#[test]
fn corrupt_truncated_and_foreign_logs_are_refused() {
    let b = bin();
    let s = Scratch::new("neg-corrupt");
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &["date"], None);
    assert!(rec.status.success());
    let stream = log.join("events.hsl");
    let good = std::fs::read(&stream).unwrap();
    let v = Command::new(&b)
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(0));

    let mut bad = good.clone();
    let mid = good.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(&stream, &bad).unwrap();
    corrupt_case(&log, &b, "byte offset");

    std::fs::write(&stream, &good[..good.len() - 5]).unwrap();
    corrupt_case(&log, &b, "truncated");

    std::fs::write(
        &stream,
        b"PK\x03\x04 this is a zip file, not a log ..........",
    )
    .unwrap();
    corrupt_case(&log, &b, "not a hotstandby log");

    std::fs::write(&stream, &good).unwrap();
    let v = Command::new(&b)
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(0));
}

#[test]
fn unknown_syscalls_fail_closed() {
    let b = bin();
    let s = Scratch::new("neg-unknown");
    std::fs::write(
        s.join("u.c"),
        r#"
#include <stdio.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    char buf[128] = {0};
    long r1 = syscall(SYS_io_uring_setup, 4, buf);
    int e1 = errno;
    long r2 = syscall(SYS_kcmp, getpid(), getpid(), 0, 0, 0);
    int e2 = errno;
    printf("io_uring_setup=%ld errno=%d kcmp=%ld errno=%d\n", r1, e1, r2, e2);
    return 0;
}
"#,
    )
    .unwrap();
    let exe = s.join("u");
    assert!(Command::new("gcc")
        .arg("-o")
        .arg(&exe)
        .arg(s.join("u.c"))
        .status()
        .unwrap()
        .success());
    let log = s.join("log");
    let rec = record(&b, &log, s.path(), None, &[exe.to_str().unwrap()], None);
    assert!(rec.status.success());
    let out = String::from_utf8_lossy(&rec.stdout);
    assert!(
        out.contains(&format!("io_uring_setup=-1 errno={}", libc::ENOSYS)),
        "{out}"
    );
    assert!(
        out.contains(&format!("kcmp=-1 errno={}", libc::ENOSYS)),
        "{out}"
    );
    assert!(
        stderr(&rec).contains("unknown syscall kcmp"),
        "the refusal names the syscall: {}",
        stderr(&rec)
    );
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(0), "{}", stderr(&r));
    assert_eq!(r.stdout, rec.stdout);
}

#[test]
fn missing_log_directory_is_a_clear_error() {
    let b = bin();
    let o = Command::new(&b)
        .args(["replay", "--log", "/nonexistent/hotstandby-log"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/hotstandby-log"),
        "{}",
        stderr(&o)
    );
}

/// A log directory inside the data directory is refused before anything
/// starts: the log would be part of the state it records (and replay's copy
/// of the data directory would hold the log). Nothing is made.
#[test]
fn a_log_inside_the_data_directory_is_refused() {
    let b = bin();
    let s = Scratch::new("neg-log-in-data");
    let data = s.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "x").unwrap();
    let o = record(
        &b,
        &data.join("log"),
        s.path(),
        Some(&data),
        &["true"],
        None,
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("inside the data directory"), "{e}");
    assert!(!data.join("log").exists(), "no log directory was made");
    // Also through a relative path and a symlink to the data directory.
    std::os::unix::fs::symlink(&data, s.join("link")).unwrap();
    let o = record(
        &b,
        Path::new("link/sub/log"),
        s.path(),
        Some(Path::new("data")),
        &["true"],
        None,
    );
    assert!(
        stderr(&o).contains("inside the data directory"),
        "{}",
        stderr(&o)
    );
    assert!(
        !s.join("link/sub").exists(),
        "nothing was made through the link"
    );
}

/// Rewrite a log in place, changing its header and events with `fix`.
fn rewrite(
    log: &Path,
    fix_id: impl FnOnce(&mut hotstandby_protocol::record::Identity),
    mut fix_ev: impl FnMut(&mut hotstandby_protocol::record::Event) -> bool,
) -> bool {
    use hotstandby_protocol::frame;
    use hotstandby_protocol::record::Record;
    let loaded = hotstandby_recorder::logfile::load(log).unwrap();
    let mut out = frame::file_header().to_vec();
    let mut id = loaded.identity.clone();
    fix_id(&mut id);
    frame::encode_frame(&mut out, 0, &Record::Header(id));
    let mut seq = 0;
    let mut changed = false;
    for e in &loaded.events {
        let mut e = e.clone();
        changed |= fix_ev(&mut e);
        seq += 1;
        frame::encode_frame(&mut out, seq, &Record::Event(e));
    }
    if let Some(t) = &loaded.trailer {
        seq += 1;
        frame::encode_frame(&mut out, seq, &Record::Trailer(t.clone()));
    }
    std::fs::write(log.join("events.hsl"), out).unwrap();
    changed
}

/// A log written under another syscall model is refused before anything
/// runs, naming the reason (exit 3, as for another program).
#[test]
fn a_log_from_another_syscall_model_is_refused() {
    let b = bin();
    let s = Scratch::new("neg-model");
    let log = s.join("log");
    assert!(record(&b, &log, s.path(), None, &["date"], None)
        .status
        .success());
    assert_eq!(
        replay(&b, &log).status.code(),
        Some(0),
        "unchanged: replays"
    );
    rewrite(&log, |id| id.model[0] ^= 1, |_| false);
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("another syscall model"),
        "{}",
        stderr(&r)
    );
}

/// The negative control of replay's decision check: a record whose mode is
/// not what the model decides (a newfstatat marked as executed) stops
/// replay with a decision divergence naming both.
#[test]
fn a_record_the_model_would_decide_otherwise_diverges() {
    use hotstandby_protocol::record::{Event, Mode};
    let b = bin();
    let s = Scratch::new("neg-decision");
    let log = s.join("log");
    assert!(record(&b, &log, s.path(), None, &["date"], None)
        .status
        .success());
    let mut done = false;
    let changed = rewrite(
        &log,
        |_| {},
        |e| match e {
            Event::Syscall(sc)
                if !done && sc.nr == libc::SYS_newfstatat as u32 && sc.mode == Mode::Emulated =>
            {
                sc.mode = Mode::Executed;
                done = true;
                true
            }
            _ => false,
        },
    );
    assert!(changed, "date made no newfstatat to tamper with");
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    let e = stderr(&r);
    assert!(
        e.contains("divergence (decision)") && e.contains("newfstatat"),
        "{e}"
    );
    assert!(
        e.contains("Executed as recorded") && e.contains("Emulated"),
        "{e}"
    );
}

/// The negative control of the buffer's check: a buffered call in the log
/// changed to another call (a clock read recorded as gettimeofday) stops
/// replay where the program makes the real one, naming the buffered call.
#[test]
fn a_tampered_buffered_call_diverges() {
    use hotstandby_protocol::record::Event;
    if std::env::var_os("HOTSTANDBY_BUFFER").is_some_and(|v| v == "0") {
        eprintln!("SKIPPED a_tampered_buffered_call_diverges: HOTSTANDBY_BUFFER=0 (no buffer)");
        return;
    }
    let b = bin();
    let s = Scratch::new("neg-batch");
    let prog = build_c("clocks", s.path());
    let log = s.join("log");
    assert!(
        record(&b, &log, s.path(), None, &[prog.to_str().unwrap()], None)
            .status
            .success()
    );
    assert_eq!(
        replay(&b, &log).status.code(),
        Some(0),
        "unchanged: replays"
    );
    let mut done = false;
    let changed = rewrite(
        &log,
        |_| {},
        |e| match e {
            Event::Batch { tid, .. } if !done => {
                let tid = *tid;
                let mut calls = e.calls().expect("a valid batch");
                match calls
                    .iter_mut()
                    .find(|c| c.nr == libc::SYS_clock_gettime as u16)
                {
                    Some(c) => {
                        c.nr = libc::SYS_gettimeofday as u16;
                        done = true;
                        *e = Event::batch(tid, &calls);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        },
    );
    assert!(changed, "clocks buffered no clock_gettime to tamper with");
    let r = replay(&b, &log);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    let e = stderr(&r);
    assert!(
        e.contains("divergence") && e.contains("buffered call"),
        "{e}"
    );
}
