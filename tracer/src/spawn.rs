//! Starting a program under the supervisor, identically for record and
//! replay: its own PID, IPC and mount namespaces (so pids, SysV ids and
//! /proc paths are the same on both sides), same argv, env, cwd, umask,
//! `ADDR_NO_RANDOMIZE`, rdtsc trapping, the seccomp filter, and no vDSO.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hotstandby_protocol::record::Identity;
use nix::sys::ptrace::{self, Options};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::seccomp::{self, SeccompError};
use crate::sys::{self, ChildSetup, SysError};
use crate::task::{Stopped, Tid};

/// Errors starting a tracee.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// The command was not found on PATH.
    #[error("{0}: command not found")]
    NotFound(String),
    /// The executable could not be read for hashing.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An argument or variable holds a NUL byte.
    #[error("argument or environment entry contains a NUL byte")]
    Nul,
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Sys(#[from] SysError),
    /// waitpid or ptrace failed while starting.
    #[error("starting the tracee: {0}")]
    Start(nix::Error),
    /// The child exited before exec completed (its message is on stderr).
    #[error("the program could not be started (exit status {0})")]
    ExecFailed(i32),
    /// The program's id in its PID namespace could not be read.
    #[error("cannot read the program's pid in its PID namespace from /proc")]
    Namespace,
}

/// Resolve a command name like execvp does.
pub fn resolve(cmd: &str, path_var: Option<&str>) -> Result<PathBuf, SpawnError> {
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return if p.exists() {
            Ok(std::fs::canonicalize(&p).unwrap_or(p))
        } else {
            Err(SpawnError::NotFound(cmd.into()))
        };
    }
    for dir in path_var
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
    {
        let p = Path::new(dir).join(cmd);
        if let Ok(m) = std::fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    Err(SpawnError::NotFound(cmd.into()))
}

/// sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], SpawnError> {
    let bytes = std::fs::read(path).map_err(|source| SpawnError::Read {
        path: path.into(),
        source,
    })?;
    Ok(Sha256::digest(&bytes).into())
}

fn cpuinfo_field(name: &str) -> String {
    let s = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

/// Build the identity of a program about to be recorded.
pub fn identity(
    argv: &[String],
    env: Vec<Vec<u8>>,
    cwd: &Path,
    data_dir: Option<&Path>,
) -> Result<Identity, SpawnError> {
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let exe = resolve(&argv[0], path_var.as_deref())?;
    let sha = sha256_file(&exe)?;
    // SAFETY: umask only swaps an integer in the kernel; we restore it at once.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let uts = nix::sys::utsname::uname().ok();
    Ok(Identity {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd: cwd.as_os_str().as_bytes().to_vec(),
        exe: exe.as_os_str().as_bytes().to_vec(),
        exe_sha256: sha,
        cpu_model: cpuinfo_field("model name"),
        cpu_flags: cpuinfo_field("flags"),
        kernel_release: uts
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        hostname: uts
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
        umask,
        model: hotstandby_protocol::sysmodel::fingerprint(),
        start_unix_ns: now_unix_ns(),
        data_dir: data_dir
            .map(|d| d.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
        preload: Vec::new(),
    })
}

/// The environment the program is started with: its own, and the syscall
/// buffer preloaded when the identity says so.
fn env_of(id: &Identity) -> Vec<Vec<u8>> {
    let mut env: Vec<Vec<u8>> = id
        .env
        .iter()
        .filter(|e| id.preload.is_empty() || !e.starts_with(b"LD_PRELOAD="))
        .cloned()
        .collect();
    if !id.preload.is_empty() {
        env.push(id.preload.clone());
    }
    env
}

/// The environment a recorded program gets: the caller's, with OpenSSL told
/// not to use RDRAND/RDSEED (they cannot be trapped without CPUID faulting).
pub fn recorded_env() -> Vec<Vec<u8>> {
    let mut env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| k != "OPENSSL_ia32cap")
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect();
    env.push(b"OPENSSL_ia32cap=~0x4000000000000000:~0x40000".to_vec());
    env
}

/// Wall clock, ns since the epoch.
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn cstr(b: &[u8]) -> Result<CString, SpawnError> {
    CString::new(b.to_vec()).map_err(|_| SpawnError::Nul)
}

/// A program started under the supervisor.
#[derive(Debug)]
pub struct Spawned {
    /// The program's main thread (supervisor's id), stopped right after
    /// its execve with the vDSO hidden.
    pub task: Stopped,
    /// Its pid in its own PID namespace (2: the init is 1).
    pub ns_pid: u32,
    /// The init's pid (supervisor's id); not traced.
    pub init: Tid,
}

/// Start the program an identity describes, in its own PID, IPC and mount
/// namespaces (see [`sys::fork_tracee`]), stopped right after its execve.
pub fn spawn(id: &Identity, bind: Option<(&Path, &Path)>) -> Result<Spawned, SpawnError> {
    // SAFETY: geteuid/getegid only read ids.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let setup = ChildSetup {
        path: cstr(&id.exe)?,
        argv: id.argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
        env: env_of(id)
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<_, _>>()?,
        cwd: cstr(&id.cwd)?,
        umask: id.umask,
        filter: seccomp::build_filter()?,
        bind: match bind {
            Some((s, d)) => Some((
                cstr(s.as_os_str().as_bytes())?,
                cstr(d.as_os_str().as_bytes())?,
            )),
            None => None,
        },
        user_ns: (uid != 0).then(|| {
            (
                CString::new(format!("{uid} {uid} 1")).expect("digits"),
                CString::new(format!("{gid} {gid} 1")).expect("digits"),
            )
        }),
    };
    let init = sys::fork_tracee(&setup)?;
    let ip = Pid::from_raw(init);
    match waitpid(ip, Some(WaitPidFlag::__WALL)).map_err(SpawnError::Start)? {
        WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSTOP) => {}
        WaitStatus::Exited(_, c) => return Err(SpawnError::ExecFailed(c)),
        _ => return Err(SpawnError::Start(nix::Error::EINVAL)),
    }
    // The init's fork is traced with these options; the program inherits them.
    ptrace::setoptions(
        ip,
        Options::PTRACE_O_TRACESYSGOOD
            | Options::PTRACE_O_TRACESECCOMP
            | Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_TRACEVFORK
            | Options::PTRACE_O_TRACEEXEC
            | Options::PTRACE_O_TRACEEXIT
            | Options::PTRACE_O_EXITKILL,
    )
    .map_err(SpawnError::Start)?;
    sys::cont(init, 0)?;
    let pid = loop {
        match waitpid(ip, Some(WaitPidFlag::__WALL)).map_err(SpawnError::Start)? {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_FORK) => {
                let child = sys::event_msg(init)? as i32;
                // The init is on its own from here: it reaps and forwards.
                ptrace::detach(ip, None).map_err(SpawnError::Start)?;
                break child;
            }
            WaitStatus::Exited(_, c) => return Err(SpawnError::ExecFailed(c)),
            WaitStatus::Signaled(_, s, _) => return Err(SpawnError::ExecFailed(128 + s as i32)),
            WaitStatus::Stopped(_, s) => sys::cont(init, s as i32)?,
            _ => sys::cont(init, 0)?,
        }
    };
    let p = Pid::from_raw(pid);
    loop {
        match waitpid(p, Some(WaitPidFlag::__WALL)).map_err(SpawnError::Start)? {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_EXEC) => {
                sys::hide_vdso(pid)?;
                let ns_pid = crate::nsid::ns_tid(pid).ok_or(SpawnError::Namespace)?;
                return Ok(Spawned {
                    task: Stopped::from_tid(pid),
                    ns_pid,
                    init,
                });
            }
            WaitStatus::Exited(_, c) => return Err(SpawnError::ExecFailed(c)),
            WaitStatus::Signaled(_, s, _) => return Err(SpawnError::ExecFailed(128 + s as i32)),
            // The SIGSTOP of the automatic attach is not delivered.
            WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSTOP) => sys::cont(pid, 0)?,
            WaitStatus::Stopped(_, s) => sys::cont(pid, s as i32)?,
            _ => sys::cont(pid, 0)?,
        }
    }
}
