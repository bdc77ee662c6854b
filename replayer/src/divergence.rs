//! The first mismatch between a replay and its log.

use std::fmt;

/// Where and how replay left the recorded path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Recorded thread id.
    pub tid: u32,
    /// Index of the event in the log (as `hotstandby log dump` numbers it).
    pub index: usize,
    /// The syscall or event concerned.
    pub what: String,
    /// What the log says.
    pub expected: String,
    /// What the program did on replay.
    pub actual: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "divergence at event #{} in thread {} ({}): expected {}, actual {}",
            self.index, self.tid, self.what, self.expected, self.actual
        )
    }
}
