//! The byte format of a log stream: a 16-byte file header, then frames.
//!
//! ```text
//! file header  : magic "HSBYLOG\0" (8) | version u16 LE | flags u16 LE | header length u32 LE (=16)
//! frame header : payload length u32 LE | crc32 u32 LE | sequence u64 LE
//! payload      : one rkyv-archived `Record`, validated before access
//! padding      : zero bytes up to the next multiple of 16
//! ```
//!
//! The crc32 (IEEE) covers the sequence number and the payload. Sequence
//! numbers start at 0 (the header record) and increase by one per frame, so a
//! reader can tell a lost or repeated frame from a corrupt one. Every frame
//! starts 16-byte aligned relative to the start of the stream, which keeps the
//! rkyv payload aligned when the stream is memory-mapped. The same bytes are
//! what the primary streams to the standby.

use rkyv::rancor;
use thiserror::Error;

use crate::record::{ArchivedRecord, Record};

/// First eight bytes of every log stream.
pub const MAGIC: [u8; 8] = *b"HSBYLOG\0";
/// Format version written by this build.
pub const VERSION: u16 = 3;
/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 16;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Frame alignment.
pub const ALIGN: usize = 16;

/// Why bytes are not a valid log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with the log magic: not a hotstandby log.
    #[error("not a hotstandby log (bad magic {found:02x?})")]
    BadMagic { found: Vec<u8> },
    /// The log was written by a format version this build does not read.
    #[error("log format version {found} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { found: u16 },
    /// The stream is shorter than its file header.
    #[error("log is truncated inside its file header ({len} bytes)")]
    ShortHeader { len: usize },
    /// A frame header or payload runs past the end of the data.
    #[error("record {seq} at byte offset {offset} is truncated (needs {needed} bytes, {available} present)")]
    Truncated {
        seq: u64,
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// A frame claims an impossible length.
    #[error("record {seq} at byte offset {offset} has an invalid length {len}")]
    BadLength { seq: u64, offset: usize, len: usize },
    /// A frame's checksum does not match its bytes.
    #[error("record {seq} at byte offset {offset} fails its checksum (stored {stored:08x}, computed {computed:08x})")]
    Crc {
        seq: u64,
        offset: usize,
        stored: u32,
        computed: u32,
    },
    /// Frames are not numbered consecutively.
    #[error("record at byte offset {offset} has sequence {found}, expected {expected}")]
    Sequence {
        offset: usize,
        expected: u64,
        found: u64,
    },
    /// The payload passed its checksum but is not a valid record.
    #[error("record {seq} at byte offset {offset} is not a valid record: {reason}")]
    Invalid {
        seq: u64,
        offset: usize,
        reason: String,
    },
    /// Padding after a frame is not zero.
    #[error("record {seq} at byte offset {offset} has non-zero padding")]
    Padding { seq: u64, offset: usize },
}

/// Round `n` up to the frame alignment.
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The 16-byte file header for a new stream.
pub fn file_header() -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(FILE_HEADER_LEN as u32).to_le_bytes());
    h
}

/// Check a file header; returns the offset of the first frame.
pub fn check_file_header(bytes: &[u8]) -> Result<usize, FrameError> {
    let magic_ok = bytes.len() >= 8 && bytes[..8] == MAGIC;
    let magic_prefix = bytes.len() < 8 && MAGIC.starts_with(bytes);
    if !magic_ok && !magic_prefix {
        return Err(FrameError::BadMagic {
            found: bytes[..bytes.len().min(8)].to_vec(),
        });
    }
    if bytes.len() < FILE_HEADER_LEN {
        return Err(FrameError::ShortHeader { len: bytes.len() });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if hlen != FILE_HEADER_LEN {
        return Err(FrameError::BadLength {
            seq: 0,
            offset: 12,
            len: hlen,
        });
    }
    Ok(FILE_HEADER_LEN)
}

fn crc_of(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Append one framed record with sequence `seq` to `out`. `out.len()` must
/// be a multiple of 16 (it is, when `out` holds a whole stream).
pub fn encode_frame(out: &mut Vec<u8>, seq: u64, record: &Record) {
    let payload =
        rkyv::to_bytes::<rancor::Error>(record).expect("in-memory serialisation cannot fail");
    encode_raw_frame(out, seq, &payload);
}

/// Frame already-serialised payload bytes.
pub fn encode_raw_frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    debug_assert_eq!(out.len() % ALIGN, 0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc_of(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let padded = align_up(out.len());
    out.resize(padded, 0);
}

/// One frame located in a stream.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Byte offset of the frame header in the stream.
    pub offset: usize,
    /// Sequence number.
    pub seq: u64,
    /// The payload bytes (checksum verified).
    pub payload: &'a [u8],
    /// Offset just past this frame (and its padding).
    pub end: usize,
}

impl<'a> Frame<'a> {
    /// Validate the payload and access it as an archived record.
    pub fn record(&self) -> Result<&'a ArchivedRecord, FrameError> {
        decode_payload(self.payload).map_err(|reason| FrameError::Invalid {
            seq: self.seq,
            offset: self.offset,
            reason,
        })
    }
}

/// Validate payload bytes as a `Record`. The slice must be 16-byte aligned
/// in memory (frames in a mapped or `AlignedVec` stream are).
pub fn decode_payload(payload: &[u8]) -> Result<&ArchivedRecord, String> {
    if !(payload.as_ptr() as usize).is_multiple_of(8) {
        return Err(
            "payload is not 8-byte aligned in memory; read the log from an aligned buffer"
                .to_string(),
        );
    }
    let r = rkyv::access::<ArchivedRecord, rancor::Error>(payload).map_err(|e| e.to_string())?;
    if let ArchivedRecord::Event(crate::record::ArchivedEvent::Batch { packed, .. }) = r {
        crate::packed::check(packed).map_err(|e| format!("batch: {e}"))?;
    }
    Ok(r)
}

/// Iterates over the frames of a stream held in memory (a mapped file or
/// a receive buffer). A frame that is incomplete at the end of the data is
/// reported as [`FrameError::Truncated`]; a live reader may treat that as
/// "not yet written" and retry with more data.
#[derive(Debug)]
pub struct FrameReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    next_seq: u64,
    failed: bool,
}

impl<'a> FrameReader<'a> {
    /// Start reading a whole stream (file header included).
    pub fn new(bytes: &'a [u8]) -> Result<Self, FrameError> {
        let pos = check_file_header(bytes)?;
        Ok(Self {
            bytes,
            pos,
            next_seq: 0,
            failed: false,
        })
    }

    /// Resume reading at `pos` (a frame boundary) expecting sequence `seq`.
    pub fn resume(bytes: &'a [u8], pos: usize, seq: u64) -> Self {
        Self {
            bytes,
            pos,
            next_seq: seq,
            failed: false,
        }
    }

    /// Offset of the next unread frame.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Sequence number of the next unread frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// True when every byte has been consumed.
    pub fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn read_frame(&mut self) -> Result<Frame<'a>, FrameError> {
        let off = self.pos;
        let seq = self.next_seq;
        let avail = self.bytes.len() - off;
        if avail < FRAME_HEADER_LEN {
            return Err(FrameError::Truncated {
                seq,
                offset: off,
                needed: FRAME_HEADER_LEN,
                available: avail,
            });
        }
        let h = &self.bytes[off..off + FRAME_HEADER_LEN];
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4")) as usize;
        let stored = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        let fseq = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        if len == 0 || len > MAX_PAYLOAD {
            return Err(FrameError::BadLength {
                seq,
                offset: off,
                len,
            });
        }
        let end = align_up(off + FRAME_HEADER_LEN + len);
        if end > self.bytes.len() {
            return Err(FrameError::Truncated {
                seq,
                offset: off,
                needed: end - off,
                available: avail,
            });
        }
        let payload = &self.bytes[off + FRAME_HEADER_LEN..off + FRAME_HEADER_LEN + len];
        let computed = crc_of(fseq, payload);
        if computed != stored {
            return Err(FrameError::Crc {
                seq,
                offset: off,
                stored,
                computed,
            });
        }
        if fseq != seq {
            return Err(FrameError::Sequence {
                offset: off,
                expected: seq,
                found: fseq,
            });
        }
        if self.bytes[off + FRAME_HEADER_LEN + len..end]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(FrameError::Padding { seq, offset: off });
        }
        Ok(Frame {
            offset: off,
            seq,
            payload,
            end,
        })
    }
}

impl<'a> Iterator for FrameReader<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at_end() {
            return None;
        }
        match self.read_frame() {
            Ok(f) => {
                self.pos = f.end;
                self.next_seq += 1;
                Some(Ok(f))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Event, Mode, SyscallEvent, Trailer};

    fn sample_stream() -> rkyv::util::AlignedVec<16> {
        let mut v = file_header().to_vec();
        let ev = Event::Syscall(SyscallEvent {
            tid: 7,
            nr: 0,
            args: [3, 0x1000, 10, 0, 0, 0],
            ret: 5,
            mode: Mode::Emulated,
            writes: vec![crate::record::MemWrite {
                addr: 0x1000,
                data: b"hello".to_vec(),
            }],
            hash: 0,
            aux: 0,
            path: vec![],
        });
        encode_frame(&mut v, 0, &Record::Event(ev));
        encode_frame(
            &mut v,
            1,
            &Record::Trailer(Trailer {
                events: 1,
                exit_status: 0,
                end_unix_ns: 1,
            }),
        );
        let mut a = rkyv::util::AlignedVec::<16>::new();
        a.extend_from_slice(&v);
        a
    }

    #[test]
    fn roundtrip() {
        let s = sample_stream();
        let frames: Vec<_> = FrameReader::new(&s)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(frames.len(), 2);
        match frames[0].record().unwrap() {
            ArchivedRecord::Event(e) => assert_eq!(e.tid(), 7),
            _ => panic!("expected event"),
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let s = sample_stream();
        for i in 0..s.len() {
            let mut c = rkyv::util::AlignedVec::<16>::new();
            c.extend_from_slice(&s);
            c[i] ^= 0x40;
            let res: Result<Vec<_>, _> = match FrameReader::new(&c) {
                Ok(r) => r.map(|f| f.and_then(|f| f.record().map(|_| ()))).collect(),
                Err(e) => Err(e),
            };
            // The reserved flag bytes 10..12 of the file header are the only
            // bytes a reader ignores.
            if (10..12).contains(&i) {
                continue;
            }
            assert!(res.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_is_named() {
        let s = sample_stream();
        let cut = &s[..s.len() - 3];
        let err = FrameReader::new(cut)
            .unwrap()
            .find_map(|f| f.err())
            .unwrap();
        assert!(matches!(err, FrameError::Truncated { seq: 1, .. }), "{err}");
    }

    #[test]
    fn foreign_bytes_are_refused() {
        assert!(matches!(
            FrameReader::new(b"GIF89a....xxxxxxxx"),
            Err(FrameError::BadMagic { .. })
        ));
    }
}
