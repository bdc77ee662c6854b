//! The wait loop and the typestate on a real child: a traced `sh` that
//! makes syscalls, forks and exits.

use super::*;

/// Fork a child that stops itself under ptrace and then runs `body`.
fn traced(body: fn() -> i32) -> Stopped {
    // SAFETY: the child only makes raw calls and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plain syscalls in the child.
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            libc::_exit(body());
        }
    }
    match Running::from_tid(pid).wait().unwrap() {
        Waited::Stopped(s, Stop::Signal { sig, .. }) => {
            assert_eq!(sig, libc::SIGSTOP);
            nix::sys::ptrace::setoptions(
                Pid::from_raw(pid),
                nix::sys::ptrace::Options::PTRACE_O_TRACESYSGOOD
                    | nix::sys::ptrace::Options::PTRACE_O_TRACEFORK
                    | nix::sys::ptrace::Options::PTRACE_O_EXITKILL,
            )
            .unwrap();
            s
        }
        other => panic!("first stop {other:?}"),
    }
}

#[test]
fn syscall_stops_come_typed_and_an_exit_result_can_be_changed() {
    let s = traced(|| {
        // SAFETY: getppid has no arguments.
        let r = unsafe { libc::syscall(libc::SYS_getppid) };
        if r == 4242 {
            7
        } else {
            1
        }
    });
    // Run to syscall stops; at getppid's entry, skip it with 4242.
    let mut run = s.syscall(0).unwrap();
    let mut entries = 0;
    let code = loop {
        match run.wait().unwrap() {
            Waited::Stopped(s, Stop::SyscallEnter) => {
                entries += 1;
                run = s.syscall(0).unwrap();
            }
            Waited::Stopped(mut s, Stop::Exit) => {
                let r = s.regs().unwrap();
                if r.orig_rax == libc::SYS_getppid as u64 {
                    let mut r = r;
                    r.rax = 4242;
                    s.set_regs(&r).unwrap();
                }
                run = s.syscall(0).unwrap();
            }
            Waited::Stopped(s, _) => run = s.syscall(0).unwrap(),
            Waited::Exited(_, c) => break c,
            Waited::Killed(_, sig) => panic!("killed by {sig}"),
        }
    };
    assert_eq!(code, 7, "the program saw the injected result");
    assert!(entries >= 2, "entries and exits are told apart");
}

#[test]
fn a_fork_is_reported_with_its_child() {
    let s = traced(|| {
        // SAFETY: fork and _exit in a child of the test.
        unsafe {
            let c = libc::fork();
            if c == 0 {
                libc::_exit(3);
            }
            let mut st = 0;
            libc::waitpid(c, &mut st, 0);
            libc::WEXITSTATUS(st)
        }
    });
    let mut run = s.resume(0).unwrap();
    // Waits name their thread: the other tests' children are not ours.
    let child = loop {
        match run.wait().unwrap() {
            Waited::Stopped(s, Stop::Spawned { child, vfork }) => {
                assert!(!vfork);
                run = s.resume(0).unwrap();
                break child;
            }
            Waited::Stopped(s, _) => run = s.resume(0).unwrap(),
            other => panic!("before the fork: {other:?}"),
        }
    };
    let mut c = Running::from_tid(child);
    loop {
        match c.wait().unwrap() {
            Waited::Stopped(s, _) => c = s.resume(0).unwrap(),
            Waited::Exited(_, code) => {
                assert_eq!(code, 3);
                break;
            }
            other => panic!("child: {other:?}"),
        }
    }
    let parent_code = loop {
        match run.wait().unwrap() {
            Waited::Stopped(s, _) => run = s.resume(0).unwrap(),
            Waited::Exited(_, code) => break code,
            other => panic!("parent: {other:?}"),
        }
    };
    assert_eq!(parent_code, 3, "the parent reaped its child's status");
}
