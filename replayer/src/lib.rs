//! Replay: the policy that runs the recorded program again over the tracer
//! core and feeds it the log, event by event, in the recorded order; it
//! stops at the first divergence, or goes live at the end of a cut-off log.
//!
//! Module by module the mirror image of `hotstandby-recorder`: [`engine`]
//! (the event loop and schedule), `syscall`, `signal`, `net`, [`takeover`]
//! (going live), [`divergence`].

mod buffer;
pub mod checkpoint;
pub mod divergence;
mod engine;
mod net;
mod signal;
mod syscall;
pub mod takeover;

pub use divergence::{Divergence, Kind};
pub use engine::{
    check_identity, kill_and_reap, replay, LiveFeed, ReplayError, ReplayOptions, ReplayOutcome,
};
pub use takeover::{Handover, Resend};
