//! The seccomp-bpf filter installed in every tracee: syscalls the model
//! classes as `Allow` run without a stop; everything else, including every
//! syscall the model does not know, stops the tracee for the supervisor
//! (`SECCOMP_RET_TRACE`). Nothing unknown is ever allowed blindly.
//!
//! The filter is compiled by `seccompiler`, with an instruction-pointer
//! exemption prepended: syscalls made from the syscall buffer's one
//! untraced instruction (`buffer::UNTRACED_IP`, compared on all 64 bits)
//! are allowed.

use std::collections::BTreeMap;

use hotstandby_protocol::sysmodel;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

/// Errors building the filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// seccompiler refused the rules.
    #[error("building the seccomp filter: {0}")]
    Build(String),
}

/// The BPF program as the kernel's `sock_filter` array.
pub fn build_filter() -> Result<Vec<libc::sock_filter>, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        sysmodel::allowed().map(|nr| (nr as i64, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trace(0),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))?;
    // First: a syscall made from the syscall buffer's untraced instruction
    // (its full 64-bit address, after the instruction) is allowed.
    let ip = crate::buffer::UNTRACED_IP;
    /// EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (linux/audit.h).
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut out = vec![
        ins(ld, 0, 0, 4), // arch: only the x86_64 syscall instruction
        ins(jeq, 0, 5, AUDIT_ARCH_X86_64),
        ins(ld, 0, 0, 8), // instruction_pointer, low word
        ins(jeq, 0, 3, ip as u32),
        ins(ld, 0, 0, 12), // high word
        ins(jeq, 0, 1, (ip >> 32) as u32),
        ins(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    out.extend(prog.into_iter().map(|f| libc::sock_filter {
        code: f.code,
        jt: f.jt,
        jf: f.jf,
        k: f.k,
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_builds() {
        let f = super::build_filter().unwrap();
        assert!(f.len() > 10 && f.len() < 4096);
    }
}
