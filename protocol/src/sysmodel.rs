//! The x86_64 syscall model: for each syscall the supervisor knows, its
//! arguments (for display and divergence checks), which memory the kernel
//! writes and how the size is known, whether it may block, and how replay
//! treats it ([`Class`]).
//!
//! A syscall that is not in this table is *unknown*: the recorder never lets
//! it run; it answers `ENOSYS` and names it (fail closed).

use std::sync::LazyLock;

/// How an argument is shown and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// Signed integer.
    Int,
    /// Unsigned value shown in hex (flags, masks).
    Hex,
    /// File descriptor.
    Fd,
    /// Pointer to memory the kernel reads or writes (shown in hex).
    Ptr,
    /// Pointer to a NUL-terminated path (captured by the recorder).
    Path,
    /// Length or count.
    Len,
    /// Process or thread id (the same on both sides: the program runs in
    /// its own PID namespace).
    Pid,
    /// Signal number.
    Sig,
}

/// Where an output buffer is and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// `size` bytes at the pointer in argument `arg`.
    Fixed(usize, usize),
    /// At argument `arg`, as many bytes as the result.
    Ret(usize),
    /// At argument `arg`, `result * elem` bytes.
    RetTimes(usize, usize),
    /// At argument `arg`, `args[count] * elem` bytes.
    ArgTimes(usize, usize, usize),
    /// A buffer at `arg` whose length is the u32 the kernel stored at
    /// `len_arg` (value-result sockaddr/optval); both are written.
    ValueResult(usize, usize),
    /// An iovec array at `arg` with `args[count]` entries, filled with
    /// as many bytes as the result, in order.
    Iov(usize, usize),
    /// A `struct msghdr` at `arg` as filled by recvmsg.
    MsgHdr(usize),
    /// Three fd_sets at args 1, 2, 3 sized by `args[0]` (select).
    FdSets,
}

/// How replay treats a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Deterministic, process-local; the seccomp filter lets it run without
    /// a stop on both sides.
    Allow,
    /// Touches only objects the process owns: replay executes it and
    /// compares the result.
    Local,
    /// Executed on both sides; its result (a pid, an old value) differs
    /// between machines, so replay injects the recorded result afterwards.
    LocalInject,
    /// The outside world answers: replay injects the recorded result and
    /// memory writes without running it.
    External,
    /// Reads from an fd: local or external depending on what the fd is.
    FdRead,
    /// Writes to an fd: executed when local; on an external fd only the
    /// hash of the bytes is checked and the write is not emitted.
    FdWrite,
    /// Acts on the fd in argument 0 without moving data: executed when the
    /// fd is the program's own, emulated when it is external (an inherited
    /// terminal answers differently on another machine).
    FdLocal,
    /// Needs dedicated handling in the supervisor.
    Special,
    /// Answered with ENOSYS on both sides (glibc falls back): rseq, clone3,
    /// io_uring.
    Refuse,
}

/// Where the bytes of a read or a write are in its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// One buffer at argument `.0` (read, write, pread64, recvfrom, sendto).
    Buf(usize),
    /// An iovec array at argument `.0` with `args[.1]` entries.
    Iov(usize, usize),
    /// A `struct msghdr` at argument `.0` (recvmsg, sendmsg).
    Msg(usize),
}

/// Where a mask-changing wait keeps its temporary signal mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskAt {
    /// A `sigset_t *` in argument `.0` (rt_sigsuspend, ppoll, epoll_pwait).
    Arg(usize),
    /// pselect6: argument `.0` points at `{ sigset_t *, size_t }`.
    Pselect(usize),
}

/// What a syscall does beyond its class: the special cases of recording,
/// replay and the supervisor's shadow state, as data. Both sides act on the
/// family, never on the syscall number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Nothing beyond its class.
    Plain,
    /// Opens a file by path: the new fd (the result) is classified by what
    /// it turns out to be.
    Open,
    /// Returns a new fd of this kind.
    NewFd(FdKind),
    /// Writes two new internal fds (`int[2]`) at the pointer in argument `.0`.
    NewFdPair(usize),
    /// Copies fd `args[0]`: to the result (`None`) or to fd `args[i]`.
    Dup(Option<usize>),
    /// `fcntl`: `F_DUPFD*` duplicate, `F_SETFL`/`F_SETFD` set the program's
    /// own flags on any fd; other commands on external fds are emulated.
    Fcntl,
    /// `ioctl`: decided by request and fd kind ([`ioctl_policy`]).
    Ioctl,
    Close,
    /// Closes `args[0]..=args[1]`.
    CloseRange,
    /// Moves bytes in from fd `args[0]`; `flags` is the argument holding
    /// MSG_* flags (a `MSG_PEEK` read consumes nothing).
    Read {
        data: Data,
        flags: Option<usize>,
    },
    /// Moves bytes out to fd `args[0]`.
    Write(Data),
    /// `sendfile(out, in, offset, count)`: bytes of a file out to `args[0]`.
    SendFile,
    /// Accepts a connection: on replay a placeholder socket takes its fd.
    Accept,
    /// Socket set-up that replay emulates and a takeover makes real.
    Bind,
    Listen,
    SockOpt,
    Shutdown,
    /// `futex`: blocking by operation ([`futex_blocks`]).
    Futex,
    /// clone, fork, vfork: a new thread or process.
    Clone,
    Exec,
    Exit {
        group: bool,
    },
    /// Sends a signal: executed when recording; on replay the signal comes
    /// from the log.
    Kill,
    SigAction,
    /// Waits with a temporary signal mask.
    MaskWait(MaskAt),
    /// Reaps a child (wait4, waitid): on replay it reaps exactly the child
    /// the recording reaped.
    Wait,
    RestartSyscall,
    /// Refused without a message: glibc falls back silently (rseq, clone3).
    Fallback,
    /// `sched_getaffinity`: the program sees the CPUs it would have had
    /// without the supervisor's same-CPU pin.
    Affinity,
    /// The syscall buffer's pseudo-syscalls: a thread registers its buffer
    /// (`hotstandby_buffer(addr, size, fdtab, fdtab_size)`), and on replay
    /// asks for its outbox to be drained (never logged).
    BufferRegister,
    BufferDrain,
}

/// One syscall in the model.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub nr: u32,
    pub name: &'static str,
    pub args: &'static [Arg],
    pub class: Class,
    pub out: &'static [Out],
    /// May wait for something outside the calling thread.
    pub blocking: bool,
    pub family: Family,
}

use crate::shadow::FdKind;
use Arg::*;
use Class::*;
use Family::*;
use Out::*;

macro_rules! table {
    ($( $sys:ident : $class:expr, [$($a:expr),*], [$($o:expr),*], $blk:expr $(, $fam:expr)? ; )*) => {
        fn build() -> Vec<Option<Spec>> {
            let mut t: Vec<Option<Spec>> = vec![None; 1024];
            // The syscall buffer's pseudo-syscalls (no kernel has them).
            t[1000] = Some(Spec {
                nr: 1000,
                name: "hotstandby_buffer",
                args: &[Ptr, Len, Ptr, Len],
                class: Special,
                out: &[],
                blocking: false,
                family: BufferRegister,
            });
            t[1001] = Some(Spec {
                nr: 1001,
                name: "hotstandby_drain",
                args: &[],
                class: Special,
                out: &[],
                blocking: false,
                family: BufferDrain,
            });
            $(
                {
                    let nr = libc::$sys as usize;
                    #[allow(unused_mut, unused_assignments)]
                    let mut family = Plain;
                    $( family = $fam; )?
                    t[nr] = Some(Spec {
                        nr: nr as u32,
                        name: &stringify!($sys)[4..],
                        args: &[$($a),*],
                        class: $class,
                        out: &[$($o),*],
                        blocking: $blk,
                        family,
                    });
                }
            )*
            t
        }
    };
}

const TS: usize = 16; // struct timespec
const STAT: usize = 144; // struct stat
const STATX: usize = 256; // struct statx

table! {
    // --- memory and process-local state: never stop -------------------
    SYS_brk: Allow, [Ptr], [], false;
    SYS_mmap: Allow, [Ptr, Len, Hex, Hex, Fd, Int], [], false;
    SYS_munmap: Allow, [Ptr, Len], [], false;
    SYS_mprotect: Allow, [Ptr, Len, Hex], [], false;
    SYS_mremap: Allow, [Ptr, Len, Len, Hex, Ptr], [], false;
    SYS_madvise: Allow, [Ptr, Len, Int], [], false;
    SYS_msync: Allow, [Ptr, Len, Hex], [], false;
    SYS_mlock: Allow, [Ptr, Len], [], false;
    SYS_munlock: Allow, [Ptr, Len], [], false;
    SYS_rt_sigprocmask: Allow, [Int, Ptr, Ptr, Len], [], false;
    SYS_rt_sigreturn: Allow, [], [], false;
    SYS_sigaltstack: Allow, [Ptr, Ptr], [], false;
    SYS_arch_prctl: Allow, [Hex, Ptr], [], false;
    SYS_getuid: Allow, [], [], false;
    SYS_geteuid: Allow, [], [], false;
    SYS_getgid: Allow, [], [], false;
    SYS_getegid: Allow, [], [], false;
    SYS_getgroups: Allow, [Len, Ptr], [], false;
    SYS_getresuid: Allow, [Ptr, Ptr, Ptr], [], false;
    SYS_getresgid: Allow, [Ptr, Ptr, Ptr], [], false;
    SYS_set_robust_list: Allow, [Ptr, Len], [], false;
    SYS_get_robust_list: Allow, [Pid, Ptr, Ptr], [], false;
    SYS_umask: Allow, [Hex], [], false;
    SYS_getpriority: Allow, [Int, Int], [], false;
    SYS_capget: Allow, [Ptr, Ptr], [], false;

    // --- local objects: executed on replay, result compared -------------
    SYS_open: Local, [Path, Hex, Hex], [], false, Open;
    SYS_openat: Local, [Fd, Path, Hex, Hex], [], false, Open;
    SYS_creat: Local, [Path, Hex], [], false, Open;
    SYS_close: Local, [Fd], [], false, Close;
    SYS_close_range: Local, [Fd, Fd, Hex], [], false, CloseRange;
    SYS_dup: Local, [Fd], [], false, Dup(None);
    SYS_dup2: Local, [Fd, Fd], [], false, Dup(Some(1));
    SYS_dup3: Local, [Fd, Fd, Hex], [], false, Dup(Some(1));
    SYS_pipe: Local, [Ptr], [Fixed(0, 8)], false, NewFdPair(0);
    SYS_pipe2: Local, [Ptr, Hex], [Fixed(0, 8)], false, NewFdPair(0);
    SYS_socketpair: Local, [Int, Int, Int, Ptr], [Fixed(3, 8)], false, NewFdPair(3);
    SYS_eventfd: Local, [Int], [], false, NewFd(FdKind::Internal);
    SYS_eventfd2: Local, [Int, Hex], [], false, NewFd(FdKind::Internal);
    SYS_epoll_create: Local, [Int], [], false, NewFd(FdKind::Internal);
    SYS_epoll_create1: Local, [Hex], [], false, NewFd(FdKind::Internal);
    SYS_epoll_ctl: Local, [Fd, Int, Fd, Ptr], [], false;
    SYS_timerfd_create: Local, [Int, Hex], [], false, NewFd(FdKind::External);
    SYS_timerfd_settime: LocalInject, [Fd, Hex, Ptr, Ptr], [Fixed(3, 32)], false;
    SYS_timerfd_gettime: External, [Fd, Ptr], [Fixed(1, 32)], false;
    SYS_signalfd: Local, [Fd, Ptr, Len], [], false, NewFd(FdKind::External);
    SYS_signalfd4: Local, [Fd, Ptr, Len, Hex], [], false, NewFd(FdKind::External);
    SYS_memfd_create: Local, [Path, Hex], [], false, Open;
    SYS_inotify_init1: Local, [Hex], [], false, NewFd(FdKind::External);
    SYS_inotify_add_watch: External, [Fd, Path, Hex], [], false;
    SYS_inotify_rm_watch: External, [Fd, Int], [], false;
    SYS_lseek: FdLocal, [Fd, Int, Int], [], false;
    SYS_ftruncate: FdLocal, [Fd, Len], [], false;
    SYS_truncate: Local, [Path, Len], [], false;
    SYS_fsync: FdLocal, [Fd], [], false;
    SYS_fdatasync: FdLocal, [Fd], [], false;
    SYS_sync_file_range: FdLocal, [Fd, Int, Int, Hex], [], false;
    SYS_fallocate: FdLocal, [Fd, Hex, Int, Len], [], false;
    SYS_fadvise64: FdLocal, [Fd, Int, Len, Int], [], false;
    SYS_flock: FdLocal, [Fd, Hex], [], true;
    SYS_mkdir: Local, [Path, Hex], [], false;
    SYS_mkdirat: Local, [Fd, Path, Hex], [], false;
    SYS_rmdir: Local, [Path], [], false;
    SYS_unlink: Local, [Path], [], false;
    SYS_unlinkat: Local, [Fd, Path, Hex], [], false;
    SYS_rename: Local, [Path, Ptr], [], false;
    SYS_renameat: Local, [Fd, Path, Fd, Ptr], [], false;
    SYS_renameat2: Local, [Fd, Path, Fd, Ptr, Hex], [], false;
    SYS_link: Local, [Path, Ptr], [], false;
    SYS_linkat: Local, [Fd, Path, Fd, Ptr, Hex], [], false;
    SYS_symlink: Local, [Path, Ptr], [], false;
    SYS_symlinkat: Local, [Path, Fd, Ptr], [], false;
    SYS_chmod: Local, [Path, Hex], [], false;
    SYS_fchmod: FdLocal, [Fd, Hex], [], false;
    SYS_fchmodat: Local, [Fd, Path, Hex], [], false;
    SYS_chown: Local, [Path, Int, Int], [], false;
    SYS_fchown: FdLocal, [Fd, Int, Int], [], false;
    SYS_lchown: Local, [Path, Int, Int], [], false;
    SYS_fchownat: Local, [Fd, Path, Int, Int, Hex], [], false;
    SYS_utimensat: Local, [Fd, Path, Ptr, Hex], [], false;
    SYS_chdir: Local, [Path], [], false;
    SYS_fchdir: Local, [Fd], [], false;
    SYS_getcwd: External, [Ptr, Len], [Ret(0)], false;
    SYS_rt_sigaction: Local, [Sig, Ptr, Ptr, Len], [], false, SigAction;
    SYS_prctl: Local, [Int, Hex, Hex, Hex, Hex], [], false;
    SYS_setrlimit: Local, [Int, Ptr], [], false;
    SYS_getrlimit: External, [Int, Ptr], [Fixed(1, 16)], false;
    SYS_prlimit64: External, [Pid, Int, Ptr, Ptr], [Fixed(3, 16)], false;
    SYS_set_tid_address: Allow, [Ptr], [], false;
    SYS_setsid: Local, [], [], false;
    SYS_setpgid: Local, [Pid, Pid], [], false;
    // The same ids on both sides (PID namespace): executed and compared.
    // Traced all the same: a thread spinning on them still reaches
    // boundaries where held signals are delivered.
    SYS_getpid: Local, [], [], false;
    SYS_gettid: Local, [], [], false;
    SYS_getppid: Local, [], [], false;
    SYS_getpgrp: Local, [], [], false;
    SYS_getpgid: Local, [Pid], [], false;
    SYS_getsid: Local, [Pid], [], false;
    SYS_sched_yield: Local, [], [], false;
    SYS_socket: Local, [Int, Hex, Int], [], false, NewFd(FdKind::External);
    SYS_mlockall: Local, [Hex], [], false;
    SYS_munlockall: Local, [], [], false;
    SYS_setpriority: Local, [Int, Int, Int], [], false;
    SYS_sched_setaffinity: External, [Pid, Len, Ptr], [], false;
    SYS_sched_setscheduler: External, [Pid, Int, Ptr], [], false;
    SYS_sched_getscheduler: External, [Pid], [], false;
    SYS_sched_getparam: External, [Pid, Ptr], [Fixed(1, 4)], false;
    SYS_sched_get_priority_max: External, [Int], [], false;
    SYS_sched_get_priority_min: External, [Int], [], false;
    SYS_ioprio_set: External, [Int, Int, Int], [], false;
    SYS_ioprio_get: External, [Int, Int], [], false;
    SYS_setuid: Local, [Int], [], false;
    SYS_setgid: Local, [Int], [], false;
    SYS_setgroups: Local, [Len, Ptr], [], false;
    SYS_setresuid: Local, [Int, Int, Int], [], false;
    SYS_setresgid: Local, [Int, Int, Int], [], false;
    SYS_capset: Local, [Ptr, Ptr], [], false;
    SYS_setfsuid: Local, [Int], [], false;
    SYS_setfsgid: Local, [Int], [], false;
    SYS_kill: Special, [Pid, Sig], [], false, Kill;
    SYS_tkill: Special, [Pid, Sig], [], false, Kill;
    SYS_tgkill: Special, [Pid, Pid, Sig], [], false, Kill;
    SYS_rt_sigqueueinfo: Special, [Pid, Sig, Ptr], [], false, Kill;
    SYS_rt_tgsigqueueinfo: Special, [Pid, Pid, Sig, Ptr], [], false, Kill;
    SYS_setitimer: External, [Int, Ptr, Ptr], [Fixed(2, 32)], false;
    SYS_getitimer: External, [Int, Ptr], [Fixed(1, 32)], false;
    SYS_alarm: External, [Int], [], false;
    SYS_timer_create: External, [Int, Ptr, Ptr], [Fixed(2, 4)], false;
    SYS_timer_settime: External, [Int, Hex, Ptr, Ptr], [Fixed(3, 32)], false;
    SYS_timer_gettime: External, [Int, Ptr], [Fixed(1, 32)], false;
    SYS_timer_getoverrun: External, [Int], [], false;
    SYS_timer_delete: External, [Int], [], false;

    // --- the outside world: emulated on replay ------------------------
    SYS_clock_gettime: External, [Int, Ptr], [Fixed(1, TS)], false;
    SYS_clock_getres: External, [Int, Ptr], [Fixed(1, TS)], false;
    SYS_gettimeofday: External, [Ptr, Ptr], [Fixed(0, 16), Fixed(1, 8)], false;
    SYS_time: External, [Ptr], [Fixed(0, 8)], false;
    SYS_getrandom: External, [Ptr, Len, Hex], [Ret(0)], false;
    SYS_nanosleep: External, [Ptr, Ptr], [Fixed(1, TS)], true;
    SYS_clock_nanosleep: External, [Int, Hex, Ptr, Ptr], [Fixed(3, TS)], true;
    SYS_uname: External, [Ptr], [Fixed(0, 390)], false;
    SYS_sysinfo: External, [Ptr], [Fixed(0, 112)], false;
    SYS_getrusage: External, [Int, Ptr], [Fixed(1, 144)], false;
    SYS_times: External, [Ptr], [Fixed(0, 32)], false;
    SYS_sched_getaffinity: External, [Pid, Len, Ptr], [Ret(2)], false, Affinity;
    SYS_getcpu: External, [Ptr, Ptr, Ptr], [Fixed(0, 4), Fixed(1, 4)], false;
    SYS_futex: External, [Ptr, Int, Int, Ptr, Ptr, Int], [], true, Futex;
    SYS_epoll_wait: External, [Fd, Ptr, Int, Int], [RetTimes(1, 12)], true;
    SYS_epoll_pwait: External, [Fd, Ptr, Int, Int, Ptr, Len], [RetTimes(1, 12)], true, MaskWait(MaskAt::Arg(4));
    SYS_epoll_pwait2: External, [Fd, Ptr, Int, Ptr, Ptr, Len], [RetTimes(1, 12)], true;
    SYS_poll: External, [Ptr, Len, Int], [ArgTimes(0, 1, 8)], true;
    SYS_ppoll: External, [Ptr, Len, Ptr, Ptr, Len], [ArgTimes(0, 1, 8), Fixed(2, TS)], true, MaskWait(MaskAt::Arg(3));
    SYS_select: External, [Int, Ptr, Ptr, Ptr, Ptr], [FdSets, Fixed(4, 16)], true;
    SYS_pselect6: External, [Int, Ptr, Ptr, Ptr, Ptr, Ptr], [FdSets, Fixed(4, TS)], true, MaskWait(MaskAt::Pselect(5));
    SYS_pause: External, [], [], true;
    SYS_rt_sigsuspend: Special, [Ptr, Len], [], true, MaskWait(MaskAt::Arg(0));
    SYS_rt_sigtimedwait: External, [Ptr, Ptr, Ptr, Len], [Fixed(1, 128)], true;
    SYS_rt_sigpending: External, [Ptr, Len], [Fixed(0, 8)], false;
    SYS_wait4: LocalInject, [Pid, Ptr, Hex, Ptr], [Fixed(1, 4), Fixed(3, 144)], true, Wait;
    SYS_waitid: LocalInject, [Int, Pid, Ptr, Hex, Ptr], [Fixed(2, 128), Fixed(4, 144)], true, Wait;
    SYS_accept: Special, [Fd, Ptr, Ptr], [ValueResult(1, 2)], true, Accept;
    SYS_accept4: Special, [Fd, Ptr, Ptr, Hex], [ValueResult(1, 2)], true, Accept;
    SYS_connect: External, [Fd, Ptr, Len], [], true;
    SYS_bind: External, [Fd, Ptr, Len], [], false, Bind;
    SYS_listen: External, [Fd, Int], [], false, Listen;
    SYS_shutdown: External, [Fd, Int], [], false, Shutdown;
    SYS_setsockopt: External, [Fd, Int, Int, Ptr, Len], [], false, SockOpt;
    SYS_getsockopt: External, [Fd, Int, Int, Ptr, Ptr], [ValueResult(3, 4)], false;
    SYS_getsockname: External, [Fd, Ptr, Ptr], [ValueResult(1, 2)], false;
    SYS_getpeername: External, [Fd, Ptr, Ptr], [ValueResult(1, 2)], false;
    SYS_stat: External, [Path, Ptr], [Fixed(1, STAT)], false;
    SYS_lstat: External, [Path, Ptr], [Fixed(1, STAT)], false;
    SYS_fstat: External, [Fd, Ptr], [Fixed(1, STAT)], false;
    SYS_newfstatat: External, [Fd, Path, Ptr, Hex], [Fixed(2, STAT)], false;
    SYS_statx: External, [Fd, Path, Hex, Hex, Ptr], [Fixed(4, STATX)], false;
    SYS_statfs: External, [Path, Ptr], [Fixed(1, 120)], false;
    SYS_fstatfs: External, [Fd, Ptr], [Fixed(1, 120)], false;
    SYS_access: External, [Path, Hex], [], false;
    SYS_faccessat: External, [Fd, Path, Hex], [], false;
    SYS_faccessat2: External, [Fd, Path, Hex, Hex], [], false;
    SYS_readlink: External, [Path, Ptr, Len], [Ret(1)], false;
    SYS_readlinkat: External, [Fd, Path, Ptr, Len], [Ret(2)], false;
    SYS_getdents64: External, [Fd, Ptr, Len], [Ret(1)], false;
    SYS_getdents: External, [Fd, Ptr, Len], [Ret(1)], false;
    SYS_getxattr: External, [Path, Ptr, Ptr, Len], [Ret(2)], false;
    SYS_lgetxattr: External, [Path, Ptr, Ptr, Len], [Ret(2)], false;
    SYS_fgetxattr: External, [Fd, Ptr, Ptr, Len], [Ret(2)], false;
    SYS_sendfile: External, [Fd, Fd, Ptr, Len], [Fixed(2, 8)], true, SendFile;
    SYS_ioctl: Special, [Fd, Hex, Ptr], [], false, Ioctl;
    SYS_fcntl: Special, [Fd, Int, Hex], [], false, Fcntl;
    SYS_membarrier: External, [Int, Hex, Int], [], false;

    // --- SysV IPC: private to the program's IPC namespace, so ids and
    // segments are the same on both sides; executed ------------------------
    SYS_shmget: Local, [Hex, Len, Hex], [], false;
    SYS_shmat: Local, [Int, Ptr, Hex], [], false;
    SYS_shmdt: Local, [Ptr], [], false;
    SYS_shmctl: LocalInject, [Int, Int, Ptr], [Fixed(2, 112)], false;
    SYS_semget: Local, [Hex, Int, Hex], [], false;
    SYS_semop: Local, [Int, Ptr, Len], [], true;
    SYS_semtimedop: Local, [Int, Ptr, Len, Ptr], [], true;
    SYS_semctl: Local, [Int, Int, Int, Hex], [], false;
    SYS_msgget: Local, [Hex, Hex], [], false;
    SYS_msgsnd: Local, [Int, Ptr, Len, Hex], [], true;
    SYS_msgrcv: Local, [Int, Ptr, Len, Int, Hex], [], true;
    SYS_msgctl: LocalInject, [Int, Int, Ptr], [Fixed(2, 120)], false;

    // --- fd I/O: local or external depending on the fd ------------------
    SYS_read: FdRead, [Fd, Ptr, Len], [Ret(1)], true, Read { data: Data::Buf(1), flags: None };
    SYS_pread64: FdRead, [Fd, Ptr, Len, Int], [Ret(1)], true, Read { data: Data::Buf(1), flags: None };
    SYS_readv: FdRead, [Fd, Ptr, Len], [Iov(1, 2)], true, Read { data: Data::Iov(1, 2), flags: None };
    SYS_preadv: FdRead, [Fd, Ptr, Len, Int, Int], [Iov(1, 2)], true, Read { data: Data::Iov(1, 2), flags: None };
    SYS_preadv2: FdRead, [Fd, Ptr, Len, Int, Int, Hex], [Iov(1, 2)], true, Read { data: Data::Iov(1, 2), flags: None };
    SYS_recvfrom: FdRead, [Fd, Ptr, Len, Hex, Ptr, Ptr], [Ret(1), ValueResult(4, 5)], true, Read { data: Data::Buf(1), flags: Some(3) };
    SYS_recvmsg: FdRead, [Fd, Ptr, Hex], [MsgHdr(1)], true, Read { data: Data::Msg(1), flags: Some(2) };
    SYS_write: FdWrite, [Fd, Ptr, Len], [], true, Write(Data::Buf(1));
    SYS_pwrite64: FdWrite, [Fd, Ptr, Len, Int], [], true, Write(Data::Buf(1));
    SYS_writev: FdWrite, [Fd, Ptr, Len], [], true, Write(Data::Iov(1, 2));
    SYS_pwritev: FdWrite, [Fd, Ptr, Len, Int, Int], [], true, Write(Data::Iov(1, 2));
    SYS_pwritev2: FdWrite, [Fd, Ptr, Len, Int, Int, Hex], [], true, Write(Data::Iov(1, 2));
    SYS_sendto: FdWrite, [Fd, Ptr, Len, Hex, Ptr, Len], [], true, Write(Data::Buf(1));
    SYS_sendmsg: FdWrite, [Fd, Ptr, Hex], [], true, Write(Data::Msg(1));

    // --- threads, processes, exec, exit ---------------------------------
    SYS_clone: Special, [Hex, Ptr, Ptr, Ptr, Hex], [], false, Clone;
    SYS_fork: Special, [], [], false, Clone;
    SYS_vfork: Special, [], [], false, Clone;
    SYS_execve: Special, [Path, Ptr, Ptr], [], false, Exec;
    SYS_execveat: Special, [Fd, Path, Ptr, Ptr, Hex], [], false, Exec;
    SYS_exit: Special, [Int], [], false, Exit { group: false };
    SYS_exit_group: Special, [Int], [], false, Exit { group: true };
    SYS_restart_syscall: Special, [], [], true, RestartSyscall;

    // --- refused: glibc and most programs fall back ---------------------
    SYS_clone3: Refuse, [Ptr, Len], [], false, Fallback;
    SYS_rseq: Refuse, [Ptr, Len, Hex, Hex], [], false, Fallback;
    SYS_io_uring_setup: Refuse, [Len, Ptr], [], false;
    SYS_io_uring_enter: Refuse, [Fd, Len, Len, Hex, Ptr, Len], [], false;
    SYS_io_uring_register: Refuse, [Fd, Int, Ptr, Len], [], false;
    SYS_io_setup: Refuse, [Len, Ptr], [], false;
    SYS_futex_waitv: Refuse, [Ptr, Len, Hex, Ptr, Int], [], false;
    SYS_recvmmsg: Refuse, [Fd, Ptr, Len, Hex, Ptr], [], false;
    SYS_sendmmsg: Refuse, [Fd, Ptr, Len, Hex], [], false;
    SYS_pidfd_open: Refuse, [Pid, Hex], [], false;
    SYS_process_vm_readv: Refuse, [Pid, Ptr, Len, Ptr, Len, Hex], [], false;
    SYS_process_vm_writev: Refuse, [Pid, Ptr, Len, Ptr, Len, Hex], [], false;
    SYS_ptrace: Refuse, [Int, Pid, Ptr, Ptr], [], false;
    SYS_userfaultfd: Refuse, [Hex], [], false;
    SYS_perf_event_open: Refuse, [Ptr, Pid, Int, Fd, Hex], [], false;
    SYS_bpf: Refuse, [Int, Ptr, Len], [], false;
    SYS_seccomp: Refuse, [Int, Hex, Ptr], [], false;
    // Memory protection keys: V8 and others check for them and do without.
    SYS_pkey_alloc: Refuse, [Hex, Hex], [], false, Fallback;
    SYS_pkey_free: Refuse, [Int], [], false, Fallback;
    SYS_pkey_mprotect: Refuse, [Ptr, Len, Hex, Int], [], false, Fallback;
}

static TABLE: LazyLock<Vec<Option<Spec>>> = LazyLock::new(build);

/// The model's entry for syscall `nr`, or `None` when it is unknown.
pub fn spec(nr: u32) -> Option<&'static Spec> {
    TABLE.get(nr as usize).and_then(|s| s.as_ref())
}

/// The name of any x86_64 syscall number, known to the model or not.
pub fn name(nr: u32) -> String {
    if let Some(s) = spec(nr) {
        return s.name.to_string();
    }
    match syscalls::Sysno::new(nr as usize) {
        Some(s) => s.name().to_string(),
        None => format!("syscall_{nr}"),
    }
}

/// All syscalls the seccomp filter lets through without a stop.
pub fn allowed() -> impl Iterator<Item = u32> {
    TABLE
        .iter()
        .flatten()
        .filter(|s| s.class == Class::Allow)
        .map(|s| s.nr)
}

/// Every entry of the model.
pub fn all() -> impl Iterator<Item = &'static Spec> {
    TABLE.iter().flatten()
}

/// Bump when the meaning of the model changes in a way its table does not
/// show (how a family is handled, say).
const MODEL_REVISION: u32 = 4;

/// A fingerprint of the syscall model: recorded in each log's header, so a
/// replay under a different model (which would decide differently) is
/// refused instead of diverging somewhere later.
pub fn fingerprint() -> [u8; 32] {
    use std::fmt::Write;
    let mut text = format!("model revision {MODEL_REVISION}\n");
    for s in all() {
        let _ = writeln!(text, "{s:?}");
    }
    for op in 0..16 {
        let _ = write!(text, "{}", futex_blocks(op) as u8);
    }
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

const FUTEX_WAIT: u64 = 0;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_LOCK_PI2: u64 = 13;

/// How many of a call's arguments mean something (and are compared on
/// replay): the model's count, except for `futex`, whose operation decides
/// (a wake ignores its last three; their registers hold whatever was there).
pub fn meaningful_args(spec: &Spec, args: &[u64; 6]) -> usize {
    if spec.family != Family::Futex {
        return spec.args.len();
    }
    const FUTEX_WAKE: u64 = 1;
    match args[1] & 0x7f {
        FUTEX_WAKE => 3,
        FUTEX_WAIT => 4,
        _ => 6,
    }
}

/// Whether a futex operation (`args[1]`) may wait.
pub fn futex_blocks(op: u64) -> bool {
    matches!(
        op & 0x7f,
        FUTEX_WAIT | FUTEX_LOCK_PI | FUTEX_WAIT_BITSET | FUTEX_WAIT_REQUEUE_PI | FUTEX_LOCK_PI2
    )
}

/// Whether a futex operation is a plain wait, which may always return 0
/// spuriously (its caller re-checks its condition): what a thread left
/// waiting at a takeover is answered with.
pub fn futex_may_wake_spuriously(op: u64) -> bool {
    matches!(op & 0x7f, FUTEX_WAIT | FUTEX_WAIT_BITSET)
}

/// What to do with an `ioctl` on an fd of a given kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoctlPolicy {
    /// Executed on both sides (fd flags; any request on the program's own fds).
    Execute,
    /// Emulated on an external fd: these are the buffers the kernel writes.
    Emulate(&'static [Out]),
    /// Not in the model: answered `ENOTTY`.
    Refuse,
}

/// The model of `ioctl(fd, req, arg)`.
pub fn ioctl_policy(req: u64, kind: FdKind) -> IoctlPolicy {
    const FIONBIO: u64 = 0x5421;
    const FIOCLEX: u64 = 0x5451;
    const FIONCLEX: u64 = 0x5450;
    const FIOASYNC: u64 = 0x5452;
    const TCGETS: u64 = 0x5401;
    const TCSETS: u64 = 0x5402;
    const TCSETSW: u64 = 0x5403;
    const TCSETSF: u64 = 0x5404;
    const TIOCGPGRP: u64 = 0x540f;
    const TIOCSPGRP: u64 = 0x5410;
    const TIOCGWINSZ: u64 = 0x5413;
    const TIOCSWINSZ: u64 = 0x5414;
    const FIONREAD: u64 = 0x541b;
    const TCGETS_OUT: &[Out] = &[Out::Fixed(2, 60)];
    const WINSZ_OUT: &[Out] = &[Out::Fixed(2, 8)];
    const INT_OUT: &[Out] = &[Out::Fixed(2, 4)];
    match req & 0xffff_ffff {
        FIONBIO | FIOCLEX | FIONCLEX | FIOASYNC => IoctlPolicy::Execute,
        _ if kind != FdKind::External => IoctlPolicy::Execute,
        TCGETS => IoctlPolicy::Emulate(TCGETS_OUT),
        TIOCGWINSZ => IoctlPolicy::Emulate(WINSZ_OUT),
        FIONREAD | TIOCGPGRP => IoctlPolicy::Emulate(INT_OUT),
        TCSETS | TCSETSW | TCSETSF | TIOCSWINSZ | TIOCSPGRP => IoctlPolicy::Emulate(&[]),
        _ => IoctlPolicy::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree() {
        assert_eq!(spec(0).unwrap().name, "read");
        assert_eq!(
            spec(libc::SYS_clock_gettime as u32).unwrap().name,
            "clock_gettime"
        );
        assert_eq!(name(libc::SYS_io_uring_setup as u32), "io_uring_setup");
        for s in all() {
            if let Some(k) = syscalls::Sysno::new(s.nr as usize) {
                assert_eq!(k.name(), s.name, "nr {}", s.nr);
            }
            for o in s.out {
                let max = match *o {
                    Out::Fixed(a, _) | Out::Ret(a) | Out::RetTimes(a, _) | Out::MsgHdr(a) => a,
                    Out::ArgTimes(a, b, _) | Out::ValueResult(a, b) | Out::Iov(a, b) => a.max(b),
                    Out::FdSets => 3,
                };
                assert!(
                    max < s.args.len().max(1),
                    "{} output names argument {max}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn unknown_syscalls_are_not_allowed() {
        // io_uring and friends must never pass the filter.
        let allowed: Vec<u32> = allowed().collect();
        assert!(!allowed.contains(&(libc::SYS_io_uring_setup as u32)));
        assert!(!allowed.contains(&(libc::SYS_clone3 as u32)));
        assert!(allowed.contains(&(libc::SYS_mmap as u32)));
    }
}
