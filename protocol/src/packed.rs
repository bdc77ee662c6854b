//! The compact encoding of buffered calls inside a `Batch` event.
//!
//! Buffered calls are most of a busy server's log (a redis request is two
//! `gettimeofday`, one `read` and one `write`), so they are not archived one
//! by one: a batch carries its calls as one byte string, each call a head
//! byte and only the fields the previous call does not imply.
//!
//! ```text
//! call  := head [nr] [fd] [ret] [flags extra] [hash] [data]
//! head  := bit 0  NR     nr follows (varint); else the previous call's nr
//!          bit 1  FD     fd follows (zigzag varint); else the previous call's
//!                        fd (-1 before the first call)
//!          bit 2  RET    ret follows (zigzag varint); else ret is the data's
//!                        length (0 for a CLOCK call)
//!          bit 3  FLAGS  flags (u8) and extra (u8) follow; else both 0
//!          bit 4  HASH   hash follows (u64 LE); else 0
//!          bit 5  DATA   data follows: length (varint) then the bytes
//!          bit 6  CLOCK  data is 16 bytes (two i64 LE: seconds and the
//!                        sub-second part) given as two zigzag varint deltas
//!                        from the previous clock value of the same nr in
//!                        this batch (0, 0 before the first); excludes DATA
//!          bit 7  reserved, must be 0
//! ```
//!
//! A `gettimeofday` is 5–7 bytes instead of 16 of payload plus the record;
//! a socket read is its bytes plus 3–4; a write 12–13. Decoding checks every
//! length against what is left and refuses unknown bits, so a corrupt batch
//! is an error naming the call, never a panic or a wrong value.

use thiserror::Error;

use crate::record::BufCall;

const NR: u8 = 1;
const FD: u8 = 2;
const RET: u8 = 4;
const FLAGS: u8 = 8;
const HASH: u8 = 16;
const DATA: u8 = 32;
const CLOCK: u8 = 64;

/// Largest data a packed call may carry (a buffered read is at most the
/// buffer's size, 1 MiB).
const MAX_DATA: u64 = 16 << 20;

/// Why packed calls do not decode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PackError {
    /// The bytes end inside call `index`.
    #[error("buffered call {index} is truncated at byte {at}")]
    Truncated { index: usize, at: usize },
    /// Call `index` uses a head bit this build does not know, or a field
    /// out of range.
    #[error("buffered call {index} is malformed at byte {at}: {what}")]
    Malformed {
        index: usize,
        at: usize,
        what: &'static str,
    },
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Whether `nr` returns a clock value as 16 bytes of two i64.
fn is_clock(nr: u16) -> bool {
    matches!(
        nr as i64,
        libc::SYS_clock_gettime | libc::SYS_gettimeofday | libc::SYS_clock_getres
    )
}

/// Per-nr previous clock values while packing or unpacking one batch.
#[derive(Default)]
struct Clocks(Vec<(u16, i64, i64)>);

impl Clocks {
    fn prev(&mut self, nr: u16) -> &mut (u16, i64, i64) {
        match self.0.iter().position(|c| c.0 == nr) {
            Some(i) => &mut self.0[i],
            None => {
                self.0.push((nr, 0, 0));
                self.0.last_mut().expect("just pushed")
            }
        }
    }
}

/// Pack `calls` (in order) into bytes.
pub fn pack(calls: &[BufCall]) -> Vec<u8> {
    let mut out = Vec::with_capacity(calls.len() * 8);
    let (mut nr, mut fd) = (None::<u16>, -1i32);
    let mut clocks = Clocks::default();
    for c in calls {
        let mut head = 0u8;
        let at = out.len();
        out.push(0);
        if nr != Some(c.nr) {
            head |= NR;
            put_varint(&mut out, c.nr as u64);
        }
        if fd != c.fd {
            head |= FD;
            put_varint(&mut out, zigzag(c.fd as i64));
        }
        let clock = is_clock(c.nr) && c.data.len() == 16;
        let implied = if clock { 0 } else { c.data.len() as i64 };
        if c.ret != implied {
            head |= RET;
            put_varint(&mut out, zigzag(c.ret));
        }
        if c.flags != 0 || c.extra != 0 {
            head |= FLAGS;
            out.extend_from_slice(&[c.flags, c.extra]);
        }
        if c.hash != 0 {
            head |= HASH;
            out.extend_from_slice(&c.hash.to_le_bytes());
        }
        if clock {
            head |= CLOCK;
            let a = i64::from_le_bytes(c.data[..8].try_into().expect("16 bytes"));
            let b = i64::from_le_bytes(c.data[8..].try_into().expect("16 bytes"));
            let p = clocks.prev(c.nr);
            put_varint(&mut out, zigzag(a.wrapping_sub(p.1)));
            put_varint(&mut out, zigzag(b.wrapping_sub(p.2)));
            (p.1, p.2) = (a, b);
        } else if !c.data.is_empty() {
            head |= DATA;
            put_varint(&mut out, c.data.len() as u64);
            out.extend_from_slice(&c.data);
        }
        out[at] = head;
        (nr, fd) = (Some(c.nr), c.fd);
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    index: usize,
    /// The length of the last DATA field.
    last_len: usize,
}

impl Reader<'_> {
    fn short(&self) -> PackError {
        PackError::Truncated {
            index: self.index,
            at: self.at,
        }
    }

    fn bad(&self, what: &'static str) -> PackError {
        PackError::Malformed {
            index: self.index,
            at: self.at,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PackError> {
        if self.b.len() - self.at < n {
            return Err(self.short());
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, PackError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.at).ok_or_else(|| self.short())?;
            self.at += 1;
            if shift == 63 && byte > 1 {
                return Err(self.bad("varint overflows 64 bits"));
            }
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(self.bad("varint longer than 10 bytes"))
    }
}

/// Unpack bytes made by [`pack`].
pub fn unpack(bytes: &[u8]) -> Result<Vec<BufCall>, PackError> {
    let mut out = Vec::new();
    decode(bytes, true, |c| out.push(c))?;
    Ok(out)
}

/// Check bytes made by [`pack`] without keeping them: the number of calls.
pub fn check(bytes: &[u8]) -> Result<usize, PackError> {
    let mut n = 0;
    decode(bytes, false, |_| n += 1)?;
    Ok(n)
}

fn decode(bytes: &[u8], keep: bool, mut sink: impl FnMut(BufCall)) -> Result<(), PackError> {
    let mut r = Reader {
        b: bytes,
        at: 0,
        index: 0,
        last_len: 0,
    };
    let (mut nr, mut fd) = (None::<u16>, -1i32);
    let mut clocks = Clocks::default();
    while r.at < bytes.len() {
        let head = r.take(1)?[0];
        if head & 0x80 != 0 {
            return Err(r.bad("unknown head bit"));
        }
        if head & CLOCK != 0 && head & DATA != 0 {
            return Err(r.bad("both clock and data"));
        }
        if head & NR != 0 {
            let v = r.varint()?;
            nr = Some(u16::try_from(v).map_err(|_| r.bad("syscall number out of range"))?);
        }
        let Some(n) = nr else {
            return Err(r.bad("first call without a syscall number"));
        };
        if head & FD != 0 {
            let v = unzigzag(r.varint()?);
            fd = i32::try_from(v).map_err(|_| r.bad("fd out of range"))?;
        }
        let ret = if head & RET != 0 {
            Some(unzigzag(r.varint()?))
        } else {
            None
        };
        let (flags, extra) = if head & FLAGS != 0 {
            let f = r.take(2)?;
            (f[0], f[1])
        } else {
            (0, 0)
        };
        let hash = if head & HASH != 0 {
            u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"))
        } else {
            0
        };
        let data = if head & CLOCK != 0 {
            if !is_clock(n) {
                return Err(r.bad("clock data on a call that is not a clock"));
            }
            let da = unzigzag(r.varint()?);
            let db = unzigzag(r.varint()?);
            let p = clocks.prev(n);
            (p.1, p.2) = (p.1.wrapping_add(da), p.2.wrapping_add(db));
            if keep {
                let mut d = p.1.to_le_bytes().to_vec();
                d.extend_from_slice(&p.2.to_le_bytes());
                d
            } else {
                Vec::new()
            }
        } else if head & DATA != 0 {
            let len = r.varint()?;
            if len > MAX_DATA {
                return Err(r.bad("data longer than any buffered call makes"));
            }
            r.last_len = len as usize;
            let d = r.take(len as usize)?;
            if keep {
                d.to_vec()
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        };
        let implied = if head & (CLOCK | DATA) != DATA {
            0
        } else {
            // The length as stored (`data` is empty when not kept).
            r.last_len as i64
        };
        sink(BufCall {
            nr: n,
            flags,
            extra,
            fd,
            ret: ret.unwrap_or(implied),
            hash,
            data,
        });
        r.index += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(nr: i64, fd: i32, ret: i64, hash: u64, data: &[u8]) -> BufCall {
        BufCall {
            nr: nr as u16,
            flags: 0,
            extra: 0,
            fd,
            ret,
            hash,
            data: data.to_vec(),
        }
    }

    fn tv(s: i64, us: i64) -> Vec<u8> {
        let mut d = s.to_le_bytes().to_vec();
        d.extend_from_slice(&us.to_le_bytes());
        d
    }

    #[test]
    fn a_redis_request_packs_small_and_back() {
        let calls = vec![
            call(
                libc::SYS_gettimeofday,
                -1,
                0,
                0,
                &tv(1_790_000_000, 123_456),
            ),
            call(libc::SYS_read, 7, 40, 0, &[b'x'; 40]),
            call(libc::SYS_write, 7, 5, 0xdead_beef_0102_0304, &[]),
            call(
                libc::SYS_gettimeofday,
                -1,
                0,
                0,
                &tv(1_790_000_000, 123_470),
            ),
            call(libc::SYS_gettimeofday, -1, 0, 0, &tv(1_790_000_001, 2)),
            call(libc::SYS_read, 8, -11, 0, &[]),
            BufCall {
                flags: 1,
                extra: 1,
                ..call(libc::SYS_recvfrom, 8, 3, 0, b"abc\x02\x00")
            },
        ];
        let p = pack(&calls);
        assert_eq!(unpack(&p).unwrap(), calls);
        // The second gettimeofday: head + nr (2) + ret 0 + 2 small deltas.
        let one = pack(&calls[..3]).len();
        let two = pack(&calls[..4]).len();
        assert!(
            two - one <= 6,
            "a near clock read packs in {} bytes",
            two - one
        );
        // A redis request (2 clock reads, a 40-byte read, a write) in well
        // under the 150-byte target.
        assert!(
            pack(&calls[..4]).len() < 40 + 40,
            "{}",
            pack(&calls[..4]).len()
        );
    }

    #[test]
    fn extreme_values_round_trip() {
        let calls = vec![
            call(
                libc::SYS_clock_gettime,
                i32::MIN,
                i64::MIN,
                u64::MAX,
                &tv(i64::MAX, i64::MIN),
            ),
            call(
                libc::SYS_clock_gettime,
                i32::MAX,
                i64::MAX,
                1,
                &tv(i64::MIN, i64::MAX),
            ),
            call(libc::SYS_gettimeofday, -1, 0, 0, &[1, 2, 3]),
            call(0xffff, 0, 0, 0, &[]),
        ];
        assert_eq!(unpack(&pack(&calls)).unwrap(), calls);
        assert_eq!(unpack(&[]).unwrap(), vec![]);
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        let calls = vec![
            call(libc::SYS_read, 7, 40, 0, &[b'x'; 40]),
            call(libc::SYS_write, 7, 5, 9, &[]),
        ];
        let p = pack(&calls);
        for cut in 0..p.len() {
            match unpack(&p[..cut]) {
                Ok(v) => assert!(v.len() < calls.len() || cut == p.len()),
                Err(PackError::Truncated { .. }) => {}
                Err(e) => panic!("cut at {cut}: {e}"),
            }
        }
        assert!(matches!(unpack(&[0x80]), Err(PackError::Malformed { .. })));
        assert!(matches!(unpack(&[0x00]), Err(PackError::Malformed { .. })));
        assert!(matches!(
            unpack(&[NR, 0xff, 0xff, 0x7f]),
            Err(PackError::Malformed { .. })
        ));
        assert!(matches!(
            unpack(&[NR | DATA, 0, 0xff, 0xff, 0xff, 0x7f]),
            Err(PackError::Malformed { .. })
        ));
        let mut rng = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut b = p.clone();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng as usize) % b.len();
            b[i] ^= (rng >> 32) as u8 | 1;
            let _ = unpack(&b);
        }
    }
}
