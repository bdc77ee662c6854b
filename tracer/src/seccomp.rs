//! The seccomp-bpf filter installed in every tracee: syscalls the model
//! classes as `Allow` run without a stop; everything else, including every
//! syscall the model does not know, stops the tracee for the supervisor
//! (`SECCOMP_RET_TRACE`). Nothing unknown is ever allowed blindly.
//!
//! The filter is compiled by `seccompiler`; later an instruction-pointer
//! exemption for an in-process syscall buffer can be prepended to the
//! program without changing its shape.

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
    Ok(prog
        .into_iter()
        .map(|f| libc::sock_filter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_builds() {
        let f = super::build_filter().unwrap();
        assert!(f.len() > 10 && f.len() < 4096);
    }
}
