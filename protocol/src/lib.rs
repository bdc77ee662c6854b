//! Pure data shared by the recorder and the replayer: the log records, the
//! framing of the append-only log stream, and the x86_64 syscall model.
//!
//! This crate owns no I/O: it turns records into bytes and bytes into
//! validated records. Reading files, mapping memory and talking to the kernel
//! belong to `hotstandby-recorder` and `hotstandby-replayer`.

pub mod checkpoint;
pub mod decide;
pub mod frame;
pub mod observe;
pub mod packed;
pub mod record;
pub mod session;
pub mod shadow;
pub mod show;
pub mod sysmodel;
pub mod wire;

pub use frame::{FrameError, FrameReader, FILE_HEADER_LEN, MAGIC, VERSION};
pub use record::{Event, Identity, MemWrite, Mode, Record, SyscallEvent, TcpConn, Trailer};
