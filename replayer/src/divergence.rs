//! The first mismatch between a replay and its log, as a typed value.

use std::fmt;

/// What kind of mismatch stopped replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The program made another syscall, or the same with other arguments.
    Call,
    /// A path argument differs.
    Path,
    /// An executed syscall returned another result.
    Result,
    /// The model decides this call differently here than when recording
    /// (another model, or an fd that is something else here).
    Decision,
    /// Bytes written to the outside world differ from the recording.
    Written,
    /// Bytes read from a file differ (the file is not the recorded one).
    Read,
    /// A thread is not where the log's schedule needs it.
    Schedule,
    /// A signal could not be delivered as recorded.
    Signal,
    /// A fault or rdtsc did not happen where recorded.
    Instruction,
    /// A new thread or process got another id than recorded.
    Spawn,
    /// The program exited differently.
    Exit,
    /// The thread stopped for a reason the log does not explain.
    Stop,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Call => "syscall",
            Kind::Path => "path",
            Kind::Result => "result",
            Kind::Decision => "decision",
            Kind::Written => "written bytes",
            Kind::Read => "read bytes",
            Kind::Schedule => "schedule",
            Kind::Signal => "signal",
            Kind::Instruction => "instruction",
            Kind::Spawn => "spawn",
            Kind::Exit => "exit",
            Kind::Stop => "stop",
        }
    }
}

/// Where and how replay left the recorded path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub kind: Kind,
    /// The thread, as the program knows it (the log's id).
    pub tid: u32,
    /// Index of the event in the log (as `hotstandby log dump` numbers it).
    pub index: u64,
    /// The syscall or event concerned.
    pub what: String,
    /// What the log says.
    pub expected: String,
    /// What the program did on replay.
    pub actual: String,
    /// The few events before it, as `log dump` shows them.
    pub context: Vec<String>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "divergence ({}) at event #{} in thread {} ({}): expected {}, actual {}",
            self.kind.name(),
            self.index,
            self.tid,
            self.what,
            self.expected,
            self.actual
        )?;
        if !self.context.is_empty() {
            write!(f, "\nthe events before it:")?;
            for c in &self.context {
                write!(f, "\n  {c}")?;
            }
        }
        Ok(())
    }
}
