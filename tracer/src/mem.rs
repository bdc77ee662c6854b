//! Applying the syscall model to a stopped tracee: which memory the kernel
//! wrote (to record it), which bytes a write sent or a read delivered (to
//! hash or show them). Shared by recording and replay so both read the same
//! bytes the same way.

use hotstandby_protocol::record::MemWrite;
use hotstandby_protocol::sysmodel::{Data, Family, Out, Spec};

use crate::sys::{self, Regs, SysError};

/// The six syscall arguments in order.
pub fn args_of(r: &Regs) -> [u64; 6] {
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9]
}

/// Largest single output buffer recorded (reads are capped by the kernel
/// to what the program asked for; this only guards against nonsense).
const MAX_OUT: usize = 64 << 20;

/// Values some outputs need from syscall entry (value-result lengths).
#[derive(Debug, Clone, Default)]
pub struct EntryInfo {
    /// For each `Out::ValueResult`, the length the program passed in.
    pub vr_len: Vec<u32>,
}

pub fn entry_info(tid: i32, spec: &Spec, args: &[u64; 6]) -> EntryInfo {
    let mut info = EntryInfo::default();
    for o in spec.out {
        if let Out::ValueResult(_, l) = *o {
            let len = if args[l] == 0 {
                0
            } else {
                sys::read_mem(tid, args[l], 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
                    .unwrap_or(0)
            };
            info.vr_len.push(len);
        }
    }
    info
}

fn read_iov(tid: i32, iov: u64, cnt: u64) -> Result<Vec<(u64, u64)>, SysError> {
    let cnt = cnt.min(1024) as usize;
    let raw = sys::read_mem(tid, iov, cnt * 16)?;
    Ok(raw
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().expect("8")),
                u64::from_le_bytes(c[8..].try_into().expect("8")),
            )
        })
        .collect())
}

fn scatter(
    tid: i32,
    iov: &[(u64, u64)],
    mut n: u64,
    out: &mut Vec<MemWrite>,
) -> Result<(), SysError> {
    for &(base, len) in iov {
        if n == 0 {
            break;
        }
        let take = len.min(n);
        if take > 0 {
            out.push(MemWrite {
                addr: base,
                data: sys::read_mem(tid, base, take as usize)?,
            });
        }
        n -= take;
    }
    Ok(())
}

/// Read every buffer the kernel wrote for a completed syscall.
pub fn collect_outputs(
    tid: i32,
    spec: &Spec,
    args: &[u64; 6],
    ret: i64,
    entry: &EntryInfo,
) -> Result<Vec<MemWrite>, SysError> {
    let mut out = Vec::new();
    if ret < 0 {
        return Ok(out);
    }
    let mut vr = entry.vr_len.iter();
    let push = |addr: u64, len: usize, out: &mut Vec<MemWrite>| -> Result<(), SysError> {
        if addr != 0 && len > 0 {
            out.push(MemWrite {
                addr,
                data: sys::read_mem(tid, addr, len.min(MAX_OUT))?,
            });
        }
        Ok(())
    };
    for o in spec.out {
        match *o {
            Out::Fixed(a, size) => push(args[a], size, &mut out)?,
            Out::Ret(a) => push(args[a], ret as usize, &mut out)?,
            Out::RetTimes(a, e) => push(args[a], ret as usize * e, &mut out)?,
            Out::ArgTimes(a, c, e) => push(args[a], (args[c] as usize).min(1 << 20) * e, &mut out)?,
            Out::ValueResult(a, l) => {
                let given = *vr.next().unwrap_or(&0);
                if args[l] != 0 {
                    let now = sys::read_mem(tid, args[l], 4)?;
                    let actual = u32::from_le_bytes(now.clone().try_into().expect("4"));
                    push(args[a], actual.min(given) as usize, &mut out)?;
                    out.push(MemWrite {
                        addr: args[l],
                        data: now,
                    });
                }
            }
            Out::Iov(a, c) => {
                let iov = read_iov(tid, args[a], args[c])?;
                scatter(tid, &iov, ret as u64, &mut out)?;
            }
            Out::MsgHdr(a) => {
                let m = sys::read_mem(tid, args[a], 56)?;
                let w = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().expect("8"));
                let (name, namelen) = (w(0), u32::from_le_bytes(m[8..12].try_into().expect("4")));
                let (iov, iovlen, control, controllen) = (w(16), w(24), w(32), w(40));
                push(name, namelen as usize, &mut out)?;
                push(control, controllen as usize, &mut out)?;
                let iov = read_iov(tid, iov, iovlen)?;
                scatter(tid, &iov, ret as u64, &mut out)?;
                out.push(MemWrite {
                    addr: args[a],
                    data: m,
                });
            }
            Out::FdSets => {
                let bytes = (args[0] as usize).div_ceil(64) * 8;
                for set in &args[1..=3] {
                    push(*set, bytes, &mut out)?;
                }
            }
        }
    }
    Ok(out)
}

/// The iovecs the bytes of a read or write go through, in order.
fn data_iov(tid: i32, data: Data, args: &[u64; 6], n: u64) -> Result<Vec<(u64, u64)>, SysError> {
    match data {
        Data::Buf(a) => Ok(vec![(args[a], n)]),
        Data::Iov(a, c) => read_iov(tid, args[a], args[c]),
        Data::Msg(a) => {
            let m = sys::read_mem(tid, args[a], 56)?;
            let w = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().expect("8"));
            read_iov(tid, w(16), w(24))
        }
    }
}

fn gather(tid: i32, iov: &[(u64, u64)], n: usize) -> Result<Vec<u8>, SysError> {
    let mut out = Vec::with_capacity(n);
    let mut left = n as u64;
    for &(base, len) in iov {
        if left == 0 {
            break;
        }
        let take = len.min(left);
        out.extend(sys::read_mem(tid, base, take as usize)?);
        left -= take;
    }
    Ok(out)
}

/// The bytes a call of the Write family sent (the first `n`), or that a
/// Read delivered; empty for other families.
pub fn moved_bytes(tid: i32, spec: &Spec, args: &[u64; 6], n: i64) -> Result<Vec<u8>, SysError> {
    if n <= 0 {
        return Ok(Vec::new());
    }
    let n = (n as usize).min(MAX_OUT);
    let data = match spec.family {
        Family::Write(d) | Family::Read { data: d, .. } => d,
        _ => return Ok(Vec::new()),
    };
    let iov = data_iov(tid, data, args, n as u64)?;
    gather(tid, &iov, n)
}

/// [`moved_bytes`] by syscall number.
pub fn moved_bytes_nr(tid: i32, nr: u32, args: &[u64; 6], n: i64) -> Result<Vec<u8>, SysError> {
    match hotstandby_protocol::sysmodel::spec(nr) {
        Some(spec) => moved_bytes(tid, spec, args, n),
        None => Ok(Vec::new()),
    }
}

/// 64-bit hash used for divergence checks of data.
pub fn hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data) | 1
}
