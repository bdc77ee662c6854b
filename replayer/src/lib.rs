//! Replay: run the recorded program again and feed it the log, event by
//! event, in the recorded order; stop at the first divergence.
//!
//! Syscalls on objects the program owns are executed for real and their
//! results compared; results from the outside world are injected without
//! running the syscall; threads run one at a time in the recorded schedule;
//! signals are delivered at the recorded syscall boundaries. The replayer
//! uses the recorder's tracee control (`hotstandby_recorder::sys`) and knows
//! nothing about the network or the standby role.

mod divergence;
mod engine;

pub use divergence::Divergence;
pub use engine::{
    check_identity, replay, Handover, LiveFeed, ReplayError, ReplayOptions, ReplayOutcome, Resend,
};
