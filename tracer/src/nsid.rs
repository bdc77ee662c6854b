//! The ids the program knows. The program runs in its own PID namespace,
//! so its thread ids are the same on both sides while the supervisor,
//! outside, sees other numbers. The log always holds the program's ids;
//! each supervisor keeps its own map to the ids it traces by.

use std::collections::HashMap;

use crate::task::Tid;

/// The id thread `tid` (supervisor's id) has in the innermost PID
/// namespace it belongs to, from the `NSpid:` line of its status.
pub fn ns_tid(tid: Tid) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    parse_nspid(&s)
}

fn parse_nspid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// Both directions between the program's ids and the supervisor's.
#[derive(Debug, Default, Clone)]
pub struct IdMap {
    to_tid: HashMap<u32, Tid>,
    to_ns: HashMap<Tid, u32>,
}

impl IdMap {
    pub fn insert(&mut self, ns: u32, tid: Tid) {
        self.to_tid.insert(ns, tid);
        self.to_ns.insert(tid, ns);
    }

    pub fn remove_tid(&mut self, tid: Tid) {
        if let Some(ns) = self.to_ns.remove(&tid) {
            self.to_tid.remove(&ns);
        }
    }

    /// The program's id of a traced thread.
    pub fn ns(&self, tid: Tid) -> Option<u32> {
        self.to_ns.get(&tid).copied()
    }

    /// The supervisor's id of a thread the program names.
    pub fn tid(&self, ns: u32) -> Option<Tid> {
        self.to_tid.get(&ns).copied()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nspid_is_the_innermost() {
        let s = "Name:\tx\nPid:\t4242\nNSpid:\t4242\t2\nNStgid:\t4242\t2\n";
        assert_eq!(super::parse_nspid(s), Some(2));
        assert_eq!(super::parse_nspid("NSpid:\t17\n"), Some(17));
        assert_eq!(super::parse_nspid("Pid: 1\n"), None);
        let own = super::ns_tid(std::process::id() as i32);
        assert!(own.is_some());
    }
}
