//! The ptrace/seccomp supervisor: starting a tracee deterministically,
//! intercepting its syscalls, recording, and the log files.
//!
//! Raw kernel access lives in [`sys`] only; [`record`] holds the recording
//! policy.

pub mod fdtable;
pub mod logfile;
pub mod model;
pub mod record;
pub mod seccomp;
pub mod sys;
pub mod tracee;

pub use record::{
    continue_live, record, ConnTrack, RecordError, RecordOptions, RecordOutcome, Takeover,
    TakeoverState, TakeoverThread,
};
