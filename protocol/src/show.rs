//! Events as one line of text, as `hotstandby log dump` prints them and a
//! divergence shows the events before it.

use crate::record::{Event, Mode, SyscallEvent};
use crate::sysmodel::{self, Arg};

pub fn show_bytes(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

pub fn fmt_args(s: &SyscallEvent) -> String {
    let Some(spec) = sysmodel::spec(s.nr) else {
        return s
            .args
            .iter()
            .map(|a| format!("{a:#x}"))
            .collect::<Vec<_>>()
            .join(", ");
    };
    spec.args
        .iter()
        .zip(s.args.iter())
        .map(|(k, v)| match k {
            Arg::Int | Arg::Pid | Arg::Len => format!("{}", *v as i64),
            Arg::Fd => format!("{}", *v as i32),
            Arg::Sig => format!("{}", *v as i32),
            Arg::Hex => format!("{v:#x}"),
            Arg::Ptr => {
                if *v == 0 {
                    "NULL".into()
                } else {
                    format!("{v:#x}")
                }
            }
            Arg::Path => {
                if s.path.is_empty() {
                    format!("{v:#x}")
                } else {
                    format!("\"{}\"", show_bytes(&s.path))
                }
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn fmt_ret(r: i64) -> String {
    if (-4095..0).contains(&r) {
        let e = nix_errno_name(-r as i32);
        format!("-1 {e}")
    } else if r > 0xffff {
        format!("{r:#x}")
    } else {
        format!("{r}")
    }
}

fn nix_errno_name(e: i32) -> String {
    let s = std::io::Error::from_raw_os_error(e).to_string();
    match s.find(" (os error") {
        Some(i) => format!("E{e} ({})", &s[..i]),
        None => format!("E{e}"),
    }
}

pub fn mode_tag(m: Mode) -> &'static str {
    match m {
        Mode::Executed => "exec",
        Mode::Emulated => "emul",
        Mode::ExecutedInjected => "exec+inject",
        Mode::Refused => "refused",
        Mode::PlaceholderFd => "placeholder",
        Mode::Restart => "restart",
    }
}

/// One line for an event.
pub fn event_line(i: usize, e: &Event) -> String {
    match e {
        Event::Syscall(s) => {
            let bytes: usize = s.writes.iter().map(|w| w.data.len()).sum();
            let mut line = format!(
                "#{i} [{}] {}({}) = {} <{}>",
                s.tid,
                sysmodel::name(s.nr),
                fmt_args(s),
                fmt_ret(s.ret),
                mode_tag(s.mode)
            );
            if bytes > 0 {
                line.push_str(&format!(" wrote {bytes} bytes"));
                if let Some(w) = s.writes.first() {
                    let n = w.data.len().min(32);
                    line.push_str(&format!(" \"{}\"", show_bytes(&w.data[..n])));
                    if w.data.len() > n {
                        line.push_str("...");
                    }
                }
            }
            if s.hash != 0 {
                line.push_str(&format!(" hash={:016x}", s.hash));
            }
            line
        }
        Event::Enter { tid, nr, args, .. } => format!(
            "#{i} [{tid}] {}({}) <blocked in kernel>",
            sysmodel::name(*nr),
            args.iter()
                .take(3)
                .map(|a| format!("{a:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Event::Switch { tid } => format!("#{i} [{tid}] --- runs ---"),
        Event::Spawn { tid, child, flags } => {
            format!("#{i} [{tid}] +++ new thread {child} (flags {flags:#x}) +++")
        }
        Event::Signal {
            tid,
            signo,
            at_entry: true,
            ..
        } => format!(
            "#{i} [{tid}] --- signal {} delivered before its next syscall ---",
            sig_name(*signo)
        ),
        Event::Signal { tid, signo, .. } => {
            format!("#{i} [{tid}] --- signal {} delivered ---", sig_name(*signo))
        }
        Event::Fault { tid, signo, rip } => format!(
            "#{i} [{tid}] --- fault {} at {rip:#x} ---",
            sig_name(*signo)
        ),
        Event::Rdtsc {
            tid,
            rip,
            value,
            rdtscp,
            ..
        } => {
            format!(
                "#{i} [{tid}] {} at {rip:#x} = {value}",
                if *rdtscp { "rdtscp" } else { "rdtsc" }
            )
        }
        Event::Exit { tid, code, group } => {
            format!(
                "#{i} [{tid}] {}({code}) = ?",
                if *group { "exit_group" } else { "exit" }
            )
        }
        Event::Batch { tid, packed } => {
            let calls = match crate::packed::unpack(packed) {
                Ok(c) => c,
                Err(e) => return format!("#{i} [{tid}] buffered: corrupt batch: {e}"),
            };
            let mut names: Vec<String> = calls
                .iter()
                .take(6)
                .map(|c| {
                    let fb = if c.flags & 1 != 0 { " (then traced)" } else { "" };
                    format!("{}({}) = {}{fb}", sysmodel::name(c.nr as u32), c.fd, fmt_ret(c.ret))
                })
                .collect();
            if calls.len() > 6 {
                names.push(format!("… {} more", calls.len() - 6));
            }
            format!(
                "#{i} [{tid}] buffered: {} call(s): {}",
                calls.len(),
                names.join(", ")
            )
        }
        Event::Tcp(c) => format!(
            "#{i} [{}] tcp fd {} {} <- {} snd_base {} rcv_base {} mss {} wscale {}/{} opts {:#x} ts {}",
            c.tid,
            c.fd,
            sockaddr_str(&c.local),
            sockaddr_str(&c.remote),
            c.snd_base,
            c.rcv_base,
            c.mss,
            c.snd_wscale,
            c.rcv_wscale,
            c.options,
            c.tsval
        ),
    }
}

/// `a.b.c.d:port` (or `[v6]:port`) from sockaddr bytes.
pub fn sockaddr_str(b: &[u8]) -> String {
    if b.len() >= 8 && u16::from_le_bytes([b[0], b[1]]) == libc::AF_INET as u16 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        format!("{}.{}.{}.{}:{port}", b[4], b[5], b[6], b[7])
    } else if b.len() >= 24 && u16::from_le_bytes([b[0], b[1]]) == libc::AF_INET6 as u16 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let a: [u8; 16] = b[8..24].try_into().expect("16 bytes");
        format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
    } else {
        format!("<{} address bytes>", b.len())
    }
}

/// `SIGTERM` for 15.
pub fn sig_name(s: i32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get(s as usize) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ if (34..=64).contains(&s) => format!("SIGRTMIN+{}", s - 34),
        _ => format!("signal {s}"),
    }
}
