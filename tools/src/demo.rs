//! `hotstandby demo`: record a real redis-server serving a client, then
//! replay it offline and show that the replay took the same path.
//!
//! (The failover demo of the live hot standby builds on this once the
//! standby and network takeover land; see docs/design.md.)

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn resp(cmd: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", cmd.len()).into_bytes();
    for a in cmd {
        v.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
    }
    v
}

fn read_reply(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.trim().parse()?;
        if n < 0 {
            return Ok("(nil)".into());
        }
        let mut body = String::new();
        r.read_line(&mut body)?;
        return Ok(body.trim_end().to_string());
    }
    Ok(line.trim_end().to_string())
}

pub fn run() -> anyhow::Result<u8> {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("the demo records redis-server, which is not installed here: apt-get install -y redis-server");
    }
    let me = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("hotstandby-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))?;
    let result = demo_in(&me, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(me: &Path, dir: &Path) -> anyhow::Result<u8> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = dir.join("log");
    let data = dir.join("data");
    println!(
        "1. recording redis-server (5 threads) on 127.0.0.1:{port} into {}",
        log.display()
    );
    let mut rec = Command::new(me)
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
            "--dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting hotstandby record")?;
    let t0 = Instant::now();
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                let _ = rec.kill();
                bail!("redis-server did not start under the recorder: {e}");
            }
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let n = 2000;
    let t1 = Instant::now();
    let mut last = String::new();
    for i in 0..n {
        let key = format!("key:{}", i % 100);
        let val = format!("{:x}", i * 7919 + t1.elapsed().subsec_nanos() as usize);
        w.write_all(&resp(&["SET", &key, &val]))?;
        read_reply(&mut r)?;
        w.write_all(&resp(&["INCR", "counter"]))?;
        last = read_reply(&mut r)?;
        if (i + 1) % 500 == 0 {
            println!("   {:>5} SET+INCR pairs sent, counter = {last}", i + 1);
        }
    }
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "   {} requests in {secs:.2} s ({:.0} req/s through the recorder)",
        2 * n,
        2.0 * n as f64 / secs
    );
    w.write_all(&resp(&["SHUTDOWN", "SAVE"]))?;
    let _ = read_reply(&mut r);
    let out = rec.wait_with_output()?;
    println!(
        "   redis-server exited with {} (counter ended at {last})",
        out.status
    );

    println!("2. the log:");
    let st = Command::new(me).args(["log", "stats"]).arg(&log).output()?;
    for l in String::from_utf8_lossy(&st.stdout).lines().take(9) {
        println!("   {l}");
    }
    println!("3. replaying offline, with no client connected ...");
    let t2 = Instant::now();
    let rep = Command::new(me)
        .args(["replay", "--show-output", "--log"])
        .arg(&log)
        .output()?;
    let same = rep.stdout == out.stdout;
    println!("   {}", String::from_utf8_lossy(&rep.stderr).trim());
    println!(
        "   replay took {:.2} s; exit {}; redis's own output on replay is {}",
        t2.elapsed().as_secs_f64(),
        rep.status.code().unwrap_or(-1),
        if same {
            "identical to the recorded run"
        } else {
            "DIFFERENT"
        }
    );
    if rep.status.code() == Some(0) && same {
        println!("demo ok: every reply redis sent was re-created byte for byte (hash-checked) by the replay.");
        Ok(0)
    } else {
        println!("demo FAILED");
        Ok(1)
    }
}
