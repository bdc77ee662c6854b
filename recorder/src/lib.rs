//! Recording: the policy that runs the program for real and writes every
//! nondeterministic input and scheduling decision to a log, over the tracer
//! core (`hotstandby-tracer`); and the log files.
//!
//! Module by module the mirror image of `hotstandby-replayer`: [`record`]
//! (the scheduler), [`syscall`], [`signal`], [`net`], [`live`] (a program
//! taken over from a replay goes on recording).

mod buffer;
pub mod live;
pub mod logfile;
mod net;
pub mod record;
mod signal;
mod syscall;

pub use buffer::{entries as fd_entries, touched as fd_touched};
pub use live::{continue_live, Takeover, TakeoverState, TakeoverThread};
pub use record::{copy_tree, record, RecordError, RecordOptions, RecordOutcome};
pub use signal::{is_fault, rdtsc_len};
