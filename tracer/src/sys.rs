//! The only place in the recorder that talks to the kernel with raw calls:
//! ptrace register and memory access, signals to single threads, the
//! pre-exec set-up of a tracee, rdtsc. Each `unsafe` block says why it holds.
//!
//! This module knows nothing of recording or replay (mechanism, not policy).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::sys::ptrace;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use thiserror::Error;

/// Errors of raw tracee access.
#[derive(Debug, Error)]
pub enum SysError {
    /// The thread is gone (ESRCH): it died or was never ours.
    #[error("thread {tid} died")]
    Died { tid: i32 },
    /// Any other failed kernel call.
    #[error("{what} for thread {tid}: {source}")]
    Os {
        what: &'static str,
        tid: i32,
        source: nix::Error,
    },
    /// Reading or writing the tracee's memory failed.
    #[error("memory access at {addr:#x} ({len} bytes) in {tid}: {source}")]
    Mem {
        tid: i32,
        addr: u64,
        len: usize,
        source: io::Error,
    },
}

fn os(what: &'static str, tid: i32, e: nix::Error) -> SysError {
    if e == nix::Error::ESRCH {
        SysError::Died { tid }
    } else {
        SysError::Os {
            what,
            tid,
            source: e,
        }
    }
}

/// Registers of a stopped thread.
pub type Regs = libc::user_regs_struct;

pub fn get_regs(tid: i32) -> Result<Regs, SysError> {
    ptrace::getregs(Pid::from_raw(tid)).map_err(|e| os("PTRACE_GETREGS", tid, e))
}

pub fn set_regs(tid: i32, regs: &Regs) -> Result<(), SysError> {
    ptrace::setregs(Pid::from_raw(tid), *regs).map_err(|e| os("PTRACE_SETREGS", tid, e))
}

pub fn cont(tid: i32, sig: i32) -> Result<(), SysError> {
    let s = signal_opt(sig);
    ptrace::cont(Pid::from_raw(tid), s).map_err(|e| os("PTRACE_CONT", tid, e))
}

pub fn syscall(tid: i32, sig: i32) -> Result<(), SysError> {
    let s = signal_opt(sig);
    ptrace::syscall(Pid::from_raw(tid), s).map_err(|e| os("PTRACE_SYSCALL", tid, e))
}

fn signal_opt(sig: i32) -> Option<nix::sys::signal::Signal> {
    if sig == 0 {
        None
    } else {
        nix::sys::signal::Signal::try_from(sig).ok()
    }
}

pub fn event_msg(tid: i32) -> Result<u64, SysError> {
    ptrace::getevent(Pid::from_raw(tid))
        .map(|v| v as u64)
        .map_err(|e| os("PTRACE_GETEVENTMSG", tid, e))
}

/// Whether a syscall-stop is an entry (not an exit), from
/// `PTRACE_GET_SYSCALL_INFO`.
pub fn at_syscall_entry(tid: i32) -> Result<bool, SysError> {
    const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
    const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
    let mut info = [0u8; 88];
    // SAFETY: the kernel writes at most the size we pass into `info`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_SYSCALL_INFO,
            tid,
            info.len(),
            info.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if r < 0 {
        return Err(os("PTRACE_GET_SYSCALL_INFO", tid, nix::Error::last()));
    }
    Ok(info[0] == PTRACE_SYSCALL_INFO_ENTRY)
}

/// The siginfo of a signal-delivery-stop as the kernel's 128 raw bytes.
pub fn get_siginfo(tid: i32) -> Result<[u8; 128], SysError> {
    let si = ptrace::getsiginfo(Pid::from_raw(tid)).map_err(|e| os("PTRACE_GETSIGINFO", tid, e))?;
    let mut out = [0u8; 128];
    // siginfo_t is a 128-byte plain-old-data struct on x86_64.
    // SAFETY: we copy exactly its size out of a valid, initialised value.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &si as *const libc::siginfo_t as *const u8,
            out.as_mut_ptr(),
            128,
        );
    }
    Ok(out)
}

/// Replace the siginfo of a pending signal-delivery-stop.
pub fn set_siginfo(tid: i32, raw: &[u8]) -> Result<(), SysError> {
    let mut buf = [0u8; 128];
    let n = raw.len().min(128);
    buf[..n].copy_from_slice(&raw[..n]);
    let ptr = buf.as_ptr() as *const libc::siginfo_t;
    // SAFETY: any 128 bytes are a valid siginfo_t (integers and unions of them); buf is that size.
    let si: libc::siginfo_t = unsafe { std::ptr::read_unaligned(ptr) };
    ptrace::setsiginfo(Pid::from_raw(tid), &si).map_err(|e| os("PTRACE_SETSIGINFO", tid, e))
}

/// si_code of raw siginfo bytes.
pub fn si_code(raw: &[u8]) -> i32 {
    i32::from_le_bytes(raw[8..12].try_into().expect("siginfo has 128 bytes"))
}

/// Send `sig` to one thread.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<(), SysError> {
    // SAFETY: tgkill takes plain integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
    if r < 0 {
        return Err(os("tgkill", tid, nix::Error::last()));
    }
    Ok(())
}

/// Read `len` bytes of the tracee's memory.
pub fn read_mem(tid: i32, addr: u64, len: usize) -> Result<Vec<u8>, SysError> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let mut local = [io::IoSliceMut::new(&mut buf)];
    match process_vm_readv(Pid::from_raw(tid), &mut local, &remote) {
        Ok(n) if n == len => return Ok(buf),
        _ => {}
    }
    // Fall back to /proc/PID/mem, which also reads pages that are not
    // readable by the program itself.
    let f = File::open(format!("/proc/{tid}/mem")).map_err(|source| SysError::Mem {
        tid,
        addr,
        len,
        source,
    })?;
    f.read_exact_at(&mut buf, addr)
        .map_err(|source| SysError::Mem {
            tid,
            addr,
            len,
            source,
        })?;
    Ok(buf)
}

/// Read the tracee's memory at `addr` into `buf` (process_vm_readv, then
/// /proc/PID/mem for pages the program itself cannot read).
pub fn read_mem_into(tid: i32, addr: u64, buf: &mut [u8]) -> Result<(), SysError> {
    let len = buf.len();
    if len == 0 {
        return Ok(());
    }
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let mut local = [io::IoSliceMut::new(buf)];
    if let Ok(n) = process_vm_readv(Pid::from_raw(tid), &mut local, &remote) {
        if n == len {
            return Ok(());
        }
    }
    let err = |source| SysError::Mem {
        tid,
        addr,
        len,
        source,
    };
    let f = File::open(format!("/proc/{tid}/mem")).map_err(err)?;
    f.read_exact_at(buf, addr).map_err(err)
}

/// Read a NUL-terminated string (at most `max` bytes) from the tracee.
pub fn read_cstr(tid: i32, addr: u64, max: usize) -> Result<Vec<u8>, SysError> {
    let mut out = Vec::new();
    let mut a = addr;
    while out.len() < max {
        // Do not cross a page boundary in one read: the next page may be unmapped.
        let to_page = 4096 - (a as usize % 4096);
        let chunk = read_mem(tid, a, to_page.min(max - out.len()))?;
        if let Some(p) = chunk.iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..p]);
            return Ok(out);
        }
        a += chunk.len() as u64;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

thread_local! {
    /// Open /proc/TID/mem files, so a write costs one pwrite, not an open.
    static MEM_FILES: std::cell::RefCell<std::collections::HashMap<i32, File>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Write bytes into the tracee's memory (through /proc/PID/mem, which
/// ignores page protections as the kernel's own writes would).
pub fn write_mem(tid: i32, addr: u64, data: &[u8]) -> Result<(), SysError> {
    if data.is_empty() {
        return Ok(());
    }
    let err = |source| SysError::Mem {
        tid,
        addr,
        len: data.len(),
        source,
    };
    MEM_FILES.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(f) = m.get(&tid) {
            if f.write_all_at(data, addr).is_ok() {
                return Ok(());
            }
            m.remove(&tid);
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{tid}/mem"))
            .map_err(err)?;
        f.write_all_at(data, addr).map_err(err)?;
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(tid, f);
        Ok(())
    })
}

/// Forget cached handles of a thread that is gone.
pub fn forget(tid: i32) {
    MEM_FILES.with(|m| {
        m.borrow_mut().remove(&tid);
    });
}

/// The time-stamp counter of the supervisor's CPU.
pub fn rdtsc() -> u64 {
    // The supervisor is not under PR_SET_TSC, so rdtsc cannot fault.
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// What the child does between fork and exec, prepared before the fork so
/// the child only makes raw syscalls (no allocation after fork).
#[derive(Debug)]
pub struct ChildSetup {
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    pub umask: u32,
    pub filter: Vec<libc::sock_filter>,
    /// (source, target) for a private bind mount of the data directory.
    pub bind: Option<(CString, CString)>,
    /// Not root: a user namespace mapping our own uid and gid gives the
    /// init the rights to set up the others.
    pub user_ns: Option<(CString, CString)>,
}

/// The signals an operator sends a supervisor (or the program's init) to
/// reach the program: passed on to it.
pub const FORWARDED: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// The program's pid in its own PID namespace, for the init to forward
/// signals to.
static PROGRAM: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn init_forward(sig: libc::c_int) {
    let p = PROGRAM.load(std::sync::atomic::Ordering::Relaxed);
    if p > 0 {
        // SAFETY: kill takes plain integers; async-signal-safe.
        unsafe {
            libc::syscall(libc::SYS_kill, p, sig);
        }
    }
}

/// Write `data` to a file with raw syscalls (for the child after clone).
///
/// # Safety
/// For the child after clone: only raw syscalls are made.
unsafe fn raw_write_file(path: &std::ffi::CStr, data: &[u8]) -> bool {
    // SAFETY: the caller passes a valid C string; data is a live slice.
    unsafe {
        let fd = libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_WRONLY) as i32;
        if fd < 0 {
            return false;
        }
        let n = libc::syscall(libc::SYS_write, fd, data.as_ptr(), data.len());
        libc::syscall(libc::SYS_close, fd);
        n == data.len() as i64
    }
}

/// Start the program in fresh PID, IPC and mount namespaces: a child is
/// made pid 1 there (a tiny init that reaps and forwards signals), traced
/// just long enough for its fork of the program to be traced too. The
/// program, pid 2 in the namespace, stops itself (SIGSTOP of the automatic
/// attach), then installs the seccomp filter and execs. Returns the init's
/// pid; the caller waits for the init's fork event.
pub fn fork_tracee(setup: &ChildSetup) -> Result<i32, SysError> {
    let argv: Vec<*const libc::c_char> = setup
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = setup
        .env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let prog = libc::sock_fprog {
        len: setup.filter.len() as u16,
        filter: setup.filter.as_ptr() as *mut libc::sock_filter,
    };
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWNS | libc::SIGCHLD;
    if setup.user_ns.is_some() {
        flags |= libc::CLONE_NEWUSER;
    }
    let setgroups = c"/proc/self/setgroups";
    let uid_map = c"/proc/self/uid_map";
    let gid_map = c"/proc/self/gid_map";
    // Like fork: the child gets a copy of this address space on the same
    // stack (no new stack is passed). Other threads of this process hold
    // no lock the child needs: it only makes raw syscalls on memory
    // prepared above, then execs or exits with _exit.
    // SAFETY: see above: the child touches nothing another thread may hold.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    if pid < 0 {
        return Err(os(
            "clone (new PID, IPC and mount namespaces)",
            0,
            nix::Error::last(),
        ));
    }
    if pid > 0 {
        return Ok(pid as i32);
    }
    // The init, pid 1 of the program's namespaces. Any failure exits with
    // 127 after writing a short message.
    // SAFETY: all pointers passed below point into `setup`, `argv`, `envp`
    // and `prog`, which live in this (copied) address space until execve.
    // Only raw syscalls and glibc's thin syscall wrappers are used (glibc's
    // cached thread id is stale after a raw clone, so no raise()).
    unsafe {
        let fail = |msg: &[u8]| -> ! {
            libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
            libc::syscall(libc::SYS_exit_group, 127);
            libc::_exit(127)
        };
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if let Some((uid, gid)) = &setup.user_ns {
            if !raw_write_file(setgroups, b"deny")
                || !raw_write_file(uid_map, uid.as_bytes())
                || !raw_write_file(gid_map, gid.as_bytes())
            {
                fail(b"hotstandby: mapping the user namespace failed\n");
            }
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(b"hotstandby: making the program's mounts private failed\n");
        }
        // /proc of the program's own PID namespace: /proc/self and
        // /proc/PID/... name the ids the program knows.
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(b"hotstandby: mounting /proc for the program's PID namespace failed\n");
        }
        // A /dev/shm of its own: POSIX shared memory and semaphores are
        // named there, and must not meet another run's (nor anyone's).
        if libc::mount(
            c"tmpfs".as_ptr(),
            c"/dev/shm".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr() as *const libc::c_void,
        ) != 0
        {
            fail(b"hotstandby: mounting a private /dev/shm for the program failed\n");
        }
        if let Some((src, dst)) = &setup.bind {
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                fail(b"hotstandby: bind-mounting the data directory failed\n");
            }
        }
        if libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            fail(b"hotstandby: PTRACE_TRACEME failed\n");
        }
        libc::syscall(
            libc::SYS_kill,
            libc::syscall(libc::SYS_getpid),
            libc::SIGSTOP,
        );
        // The supervisor traces forks now: the program is traced from its
        // first instruction.
        let child = libc::syscall(libc::SYS_fork);
        if child < 0 {
            fail(b"hotstandby: the init could not fork the program\n");
        }
        if child > 0 {
            init_loop(child as i32);
        }
        // The program, pid 2.
        if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
            fail(b"hotstandby: personality(ADDR_NO_RANDOMIZE) failed\n");
        }
        if libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_SIGSEGV, 0, 0, 0) != 0 {
            fail(b"hotstandby: prctl(PR_SET_TSC) failed\n");
        }
        reset_signals();
        libc::umask(setup.umask as libc::mode_t);
        if libc::chdir(setup.cwd.as_ptr()) != 0 {
            fail(b"hotstandby: cannot chdir to the recorded working directory\n");
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(b"hotstandby: PR_SET_NO_NEW_PRIVS failed\n");
        }
        if libc::syscall(
            libc::SYS_seccomp,
            1, /* SECCOMP_SET_MODE_FILTER */
            0,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            fail(b"hotstandby: installing the seccomp filter failed\n");
        }
        libc::execve(setup.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(b"hotstandby: execve failed\n");
    }
}

/// Signal dispositions set to ignore survive exec: give the program the
/// defaults and an empty mask, as a shell would.
///
/// # Safety
/// For a child between fork and exec: raw calls only.
unsafe fn reset_signals() {
    // SAFETY: plain integers and a zeroed sigset on this stack.
    unsafe {
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// The init: forwards the signals an operator sends to the program and
/// reaps every process that ends up its child (orphans of the program),
/// until none is left; then exits with the program's status.
///
/// # Safety
/// For the child after clone: raw calls only.
unsafe fn init_loop(program: i32) -> ! {
    PROGRAM.store(program, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: installs an async-signal-safe handler (it only calls kill);
    // the sigaction struct is fully initialised; wait4 writes to a local.
    unsafe {
        for sig in FORWARDED {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = init_forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        let mut code = 0;
        loop {
            let mut status: i32 = 0;
            let r = libc::syscall(
                libc::SYS_wait4,
                -1,
                &mut status as *mut i32,
                libc::__WALL,
                0,
            );
            if r == program as i64 {
                code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
            } else if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::syscall(libc::SYS_exit_group, code);
            }
        }
    }
}

/// Remove AT_SYSINFO_EHDR from the auxiliary vector of a process stopped
/// right after execve, so the C library finds no vDSO and makes real,
/// recordable syscalls for time. Returns true when an entry was found.
pub fn hide_vdso(tid: i32) -> Result<bool, SysError> {
    let regs = get_regs(tid)?;
    let sp = regs.rsp;
    // A /proc/TID/mem opened before the exec still points at the old
    // address space: writes through it would go nowhere.
    forget(tid);
    let word = |a: u64| -> Result<u64, SysError> {
        let b = read_mem(tid, a, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let argc = word(sp)?;
    let mut p = sp + 8 + argc * 8 + 8; // past argv and its NULL
    while word(p)? != 0 {
        p += 8; // envp
    }
    p += 8;
    loop {
        let key = word(p)?;
        if key == libc::AT_NULL {
            return Ok(false);
        }
        if key == libc::AT_SYSINFO_EHDR {
            write_mem(tid, p, &libc::AT_IGNORE.to_le_bytes())?;
            return Ok(true);
        }
        p += 16;
    }
}

/// The SigBlk mask of a thread from /proc.
pub fn blocked_mask(tid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// A duplicate, in the supervisor, of file descriptor `fd` of process
/// `pid` (pidfd_getfd); the socket or file behind it is the same object.
pub fn dup_from(pid: i32, fd: i32) -> Result<std::os::fd::OwnedFd, SysError> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(os("pidfd_open", pid, nix::Error::last()));
    }
    // SAFETY: pidfd is a fresh descriptor returned above and owned here.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes integers and returns a new fd we own.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(os("pidfd_getfd", pid, nix::Error::last()));
    }
    // SAFETY: dup is a fresh descriptor returned by the kernel, owned here.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup as i32) })
}

const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;

/// The extended FPU state (`NT_X86_XSTATE`) of a stopped thread.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>, SysError> {
    let mut buf = vec![0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // The kernel updates iov_len to what it wrote.
    // SAFETY: the kernel writes at most iov_len bytes into buf, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(os("PTRACE_GETREGSET", tid, nix::Error::last()));
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Put back an extended FPU state read by [`get_xstate`].
pub fn set_xstate(tid: i32, state: &[u8]) -> Result<(), SysError> {
    let mut buf = state.to_vec();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel reads iov_len bytes from buf, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(os("PTRACE_SETREGSET", tid, nix::Error::last()));
    }
    Ok(())
}

/// The blocked-signal mask of a stopped thread.
pub fn get_sigmask(tid: i32) -> Result<u64, SysError> {
    let mut m: u64 = 0;
    // SAFETY: the kernel writes 8 bytes (the size we pass) into m.
    let r = unsafe { libc::ptrace(PTRACE_GETSIGMASK, tid, 8usize, &mut m as *mut u64) };
    if r < 0 {
        return Err(os("PTRACE_GETSIGMASK", tid, nix::Error::last()));
    }
    Ok(m)
}

/// Set the blocked-signal mask of a stopped thread.
pub fn set_sigmask(tid: i32, mask: u64) -> Result<(), SysError> {
    // SAFETY: the kernel reads 8 bytes (the size we pass) from mask.
    let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64) };
    if r < 0 {
        return Err(os("PTRACE_SETSIGMASK", tid, nix::Error::last()));
    }
    Ok(())
}

/// A thread's robust futex list (head, length).
pub fn get_robust_list(tid: i32) -> Result<(u64, u64), SysError> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: the kernel writes one word into each of head and len, live locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(os("get_robust_list", tid, nix::Error::last()));
    }
    Ok((head, len as u64))
}

/// Whether fd `a` of process `pa` and fd `b` of `pb` are the same open
/// file description (kcmp KCMP_FILE).
pub fn same_file(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp takes integers only and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) };
    r == 0
}

/// The bytes queued in a pipe, without taking them: `tee` them into a
/// pipe of ours and read that. `src` is the pipe's read end (a duplicate
/// in the supervisor).
pub fn pipe_contents(src: std::os::fd::BorrowedFd<'_>, size: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(io::Error::from)?;
    // SAFETY: F_SETPIPE_SZ takes an integer; w is our open pipe.
    unsafe {
        libc::fcntl(
            w.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            size.max(4096) as libc::c_int,
        )
    };
    // SAFETY: tee takes two fds we hold open and integers.
    let n = unsafe {
        libc::tee(
            src.as_raw_fd(),
            w.as_raw_fd(),
            size.max(4096),
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) {
            Ok(Vec::new()) // empty
        } else {
            Err(e)
        };
    }
    drop(w);
    let mut out = Vec::with_capacity(n as usize);
    File::from(r).read_to_end(&mut out)?;
    Ok(out)
}
