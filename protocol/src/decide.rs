//! The per-syscall decision: how a syscall the program is about to make is
//! treated — executed on both sides, executed and its result injected,
//! emulated from the log, refused — whether it may block, and which bytes
//! are hashed for divergence checks.
//!
//! A pure function of the syscall model, the arguments and what the fds
//! are. The recorder writes its decision into each record; the replayer
//! makes the same decision from its own shadow state and stops with a
//! divergence if the two differ (a different model or a different fd).

use crate::record::Mode;
use crate::shadow::FdKind;
use crate::sysmodel::{self, Class, Family, IoctlPolicy, Out, Spec};

/// Which bytes of a call are hashed into its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashOf {
    Nothing,
    /// The bytes written (any write: replay checks those it does not emit).
    Written,
    /// The bytes read from a regular file (replay checks the file is the
    /// recorded one).
    Read,
}

/// How one syscall runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    /// May wait for another thread or the outside world.
    pub blocking: bool,
    pub hash: HashOf,
    /// The buffers the kernel writes, when not the model entry's own (an
    /// emulated ioctl's).
    pub outs: Option<&'static [Out]>,
}

/// The decision for one syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run(Plan),
    /// Not run on either side: answered with `-errno`; `why` is said once.
    Refuse {
        errno: i32,
        why: Option<String>,
    },
    /// exit or exit_group: logged as an `Exit` event.
    Exit {
        group: bool,
    },
}

/// What the decision needs to know about the calling process.
pub trait Context {
    /// What fd `fd` of the calling process refers to.
    fn kind(&mut self, fd: i32) -> FdKind;
    /// How many threads the calling process has.
    fn threads(&self) -> usize;
}

fn by_fd(kind: FdKind) -> Mode {
    if kind == FdKind::External {
        Mode::Emulated
    } else {
        Mode::Executed
    }
}

/// Decide how syscall `nr` with `args` runs. `None` of the model: refused
/// with `ENOSYS` and named (fail closed).
pub fn decide(nr: u32, args: &[u64; 6], cx: &mut dyn Context) -> Decision {
    let Some(spec) = sysmodel::spec(nr) else {
        return Decision::Refuse {
            errno: libc::ENOSYS,
            why: Some(format!(
                "unknown syscall {} (nr {nr}) refused with ENOSYS",
                sysmodel::name(nr)
            )),
        };
    };
    decide_spec(spec, args, cx)
}

/// [`decide`] for a known model entry.
pub fn decide_spec(spec: &Spec, args: &[u64; 6], cx: &mut dyn Context) -> Decision {
    let mut plan = Plan {
        mode: Mode::Executed,
        blocking: spec.blocking,
        hash: HashOf::Nothing,
        outs: None,
    };
    match spec.class {
        Class::Allow | Class::Local | Class::Special => {}
        Class::LocalInject => plan.mode = Mode::ExecutedInjected,
        Class::External => plan.mode = Mode::Emulated,
        Class::Refuse => {
            return Decision::Refuse {
                errno: libc::ENOSYS,
                why: (spec.family != Family::Fallback).then(|| {
                    format!(
                        "{} is not supported under hotstandby: refused with ENOSYS",
                        spec.name
                    )
                }),
            }
        }
        Class::FdLocal => plan.mode = by_fd(cx.kind(args[0] as i32)),
        Class::FdRead | Class::FdWrite => {
            let k = cx.kind(args[0] as i32);
            plan.mode = by_fd(k);
            if k == FdKind::File {
                plan.blocking = false;
            }
            plan.hash = match spec.class {
                Class::FdWrite => HashOf::Written,
                _ if k == FdKind::File => HashOf::Read,
                _ => HashOf::Nothing,
            };
        }
    }
    match spec.family {
        Family::Clone => {
            let flags = clone_flags(spec.nr, args);
            plan.mode = Mode::Executed;
            // A vfork parent waits in the kernel until its child execs.
            plan.blocking = flags & libc::CLONE_VFORK as u64 != 0;
        }
        Family::Exec if cx.threads() > 1 => {
            return Decision::Refuse {
                errno: libc::ENOSYS,
                why: Some("execve from a multi-threaded process is not supported".into()),
            }
        }
        Family::Exit { group } => return Decision::Exit { group },
        Family::Kill => plan.mode = Mode::Emulated,
        Family::Accept => plan.mode = Mode::PlaceholderFd,
        Family::RestartSyscall => plan.mode = Mode::Emulated,
        // Answered by the supervisor (its answer is logged).
        Family::BufferRegister | Family::BufferDrain => plan.mode = Mode::Emulated,
        Family::MaskWait(_) if spec.class == Class::Special => plan.mode = Mode::Emulated,
        Family::Futex => plan.blocking = sysmodel::futex_blocks(args[1]),
        Family::Fcntl => {
            let cmd = args[1] as i32;
            plan.mode = if cx.kind(args[0] as i32) != FdKind::External
                || matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC)
            {
                Mode::Executed
            } else if matches!(cmd, libc::F_SETFL | libc::F_SETFD) {
                // The flags (O_NONBLOCK, FD_CLOEXEC) belong to the program's
                // own fd, placeholder or not: set on replay too, so a socket
                // made real at takeover behaves as the program expects.
                Mode::ExecutedInjected
            } else {
                Mode::Emulated
            };
        }
        Family::Ioctl => match sysmodel::ioctl_policy(args[1], cx.kind(args[0] as i32)) {
            IoctlPolicy::Execute => plan.mode = Mode::Executed,
            IoctlPolicy::Emulate(outs) => {
                plan.mode = Mode::Emulated;
                plan.outs = Some(outs);
            }
            IoctlPolicy::Refuse => {
                return Decision::Refuse {
                    errno: libc::ENOTTY,
                    why: Some(format!(
                    "ioctl request {:#x} on an external fd is not in the model; answered ENOTTY",
                    args[1]
                )),
                }
            }
        },
        _ => {}
    }
    Decision::Run(plan)
}

/// The clone flags a clone, fork or vfork stands for.
pub fn clone_flags(nr: u32, args: &[u64; 6]) -> u64 {
    match nr as i64 {
        libc::SYS_fork => libc::SIGCHLD as u64,
        libc::SYS_vfork => (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
        _ => args[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cx(FdKind, usize);
    impl Context for Cx {
        fn kind(&mut self, _fd: i32) -> FdKind {
            self.0
        }
        fn threads(&self) -> usize {
            self.1
        }
    }

    fn run(nr: i64, args: [u64; 6], kind: FdKind) -> Plan {
        match decide(nr as u32, &args, &mut Cx(kind, 1)) {
            Decision::Run(p) => p,
            other => panic!("{nr}: {other:?}"),
        }
    }

    #[test]
    fn fd_io_follows_the_fd() {
        let read = libc::SYS_read;
        let p = run(read, [3, 0, 10, 0, 0, 0], FdKind::External);
        assert_eq!(
            (p.mode, p.blocking, p.hash),
            (Mode::Emulated, true, HashOf::Nothing)
        );
        let p = run(read, [3, 0, 10, 0, 0, 0], FdKind::File);
        assert_eq!(
            (p.mode, p.blocking, p.hash),
            (Mode::Executed, false, HashOf::Read)
        );
        let p = run(read, [3, 0, 10, 0, 0, 0], FdKind::Internal);
        assert_eq!((p.mode, p.blocking), (Mode::Executed, true));
        let p = run(libc::SYS_write, [1, 0, 10, 0, 0, 0], FdKind::External);
        assert_eq!((p.mode, p.hash), (Mode::Emulated, HashOf::Written));
        let p = run(libc::SYS_lseek, [1, 0, 0, 0, 0, 0], FdKind::External);
        assert_eq!(p.mode, Mode::Emulated);
        let p = run(libc::SYS_lseek, [1, 0, 0, 0, 0, 0], FdKind::File);
        assert_eq!(p.mode, Mode::Executed);
    }

    #[test]
    fn the_outside_world_is_emulated_and_local_objects_executed() {
        let p = run(libc::SYS_clock_gettime, [0; 6], FdKind::File);
        assert_eq!(p.mode, Mode::Emulated);
        let p = run(libc::SYS_openat, [0; 6], FdKind::File);
        assert_eq!(p.mode, Mode::Executed);
        let p = run(libc::SYS_wait4, [0; 6], FdKind::File);
        assert_eq!(p.mode, Mode::ExecutedInjected);
        let p = run(libc::SYS_accept4, [3, 0, 0, 0, 0, 0], FdKind::External);
        assert_eq!(p.mode, Mode::PlaceholderFd);
        let p = run(libc::SYS_kill, [5, 15, 0, 0, 0, 0], FdKind::External);
        assert_eq!(p.mode, Mode::Emulated);
        let p = run(libc::SYS_shmget, [0; 6], FdKind::External);
        assert_eq!(p.mode, Mode::Executed);
    }

    #[test]
    fn futex_blocks_only_when_it_waits() {
        let p = run(libc::SYS_futex, [0, 0, 0, 0, 0, 0], FdKind::File);
        assert!(p.blocking, "FUTEX_WAIT");
        let p = run(libc::SYS_futex, [0, 1 | 128, 0, 0, 0, 0], FdKind::File);
        assert!(!p.blocking, "FUTEX_WAKE_PRIVATE");
        let p = run(libc::SYS_futex, [0, 9 | 128, 0, 0, 0, 0], FdKind::File);
        assert!(p.blocking, "FUTEX_WAIT_BITSET_PRIVATE");
        assert!(sysmodel::futex_may_wake_spuriously(9 | 128));
        assert!(
            !sysmodel::futex_may_wake_spuriously(6),
            "LOCK_PI returning 0 means 'locked'"
        );
    }

    #[test]
    fn fcntl_and_ioctl_by_command() {
        let f = libc::SYS_fcntl;
        let ext = FdKind::External;
        let setfl = [3, libc::F_SETFL as u64, 0o4000, 0, 0, 0];
        assert_eq!(run(f, setfl, ext).mode, Mode::ExecutedInjected);
        let getfl = [3, libc::F_GETFL as u64, 0, 0, 0, 0];
        assert_eq!(run(f, getfl, ext).mode, Mode::Emulated);
        assert_eq!(run(f, getfl, FdKind::Internal).mode, Mode::Executed);
        let dupfd = [3, libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0];
        assert_eq!(run(f, dupfd, ext).mode, Mode::Executed);
        let tcgets = [0, 0x5401, 0x1000, 0, 0, 0];
        let p = run(libc::SYS_ioctl, tcgets, ext);
        assert_eq!(p.mode, Mode::Emulated);
        assert_eq!(p.outs, Some(&[Out::Fixed(2, 60)][..]));
        let odd = [0, 0x1234_5678, 0, 0, 0, 0];
        assert!(matches!(
            decide(libc::SYS_ioctl as u32, &odd, &mut Cx(ext, 1)),
            Decision::Refuse {
                errno: libc::ENOTTY,
                why: Some(_)
            }
        ));
        assert_eq!(
            run(libc::SYS_ioctl, odd, FdKind::Internal).mode,
            Mode::Executed
        );
    }

    #[test]
    fn refusals_and_exits() {
        let d = decide(
            libc::SYS_io_uring_setup as u32,
            &[0; 6],
            &mut Cx(FdKind::File, 1),
        );
        assert!(matches!(
            d,
            Decision::Refuse {
                errno: libc::ENOSYS,
                why: Some(_)
            }
        ));
        let d = decide(libc::SYS_rseq as u32, &[0; 6], &mut Cx(FdKind::File, 1));
        assert_eq!(
            d,
            Decision::Refuse {
                errno: libc::ENOSYS,
                why: None
            },
            "silent: glibc falls back"
        );
        let d = decide(400, &[0; 6], &mut Cx(FdKind::File, 1));
        assert!(matches!(d, Decision::Refuse { why: Some(w), .. } if w.contains("unknown")));
        let d = decide(libc::SYS_execve as u32, &[0; 6], &mut Cx(FdKind::File, 3));
        assert!(
            matches!(d, Decision::Refuse { .. }),
            "exec from a multi-threaded process"
        );
        assert_eq!(
            run(libc::SYS_execve, [0; 6], FdKind::File).mode,
            Mode::Executed
        );
        let d = decide(
            libc::SYS_exit_group as u32,
            &[0; 6],
            &mut Cx(FdKind::File, 3),
        );
        assert_eq!(d, Decision::Exit { group: true });
    }

    #[test]
    fn vfork_blocks_and_fork_does_not() {
        assert!(run(libc::SYS_vfork, [0; 6], FdKind::File).blocking);
        assert!(!run(libc::SYS_fork, [0; 6], FdKind::File).blocking);
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
        assert!(!run(libc::SYS_clone, [thread, 0, 0, 0, 0, 0], FdKind::File).blocking);
    }
}
