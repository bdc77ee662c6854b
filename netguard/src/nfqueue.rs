//! A minimal NFQUEUE client over a raw netlink socket (nfnetlink_queue).
//!
//! Written here rather than taken from a crate because the output rule must
//! wait on the queue's socket *and* on the standby's acknowledgements at the
//! same time: this exposes the socket for `poll`, batches verdicts into one
//! `send`, and asks the kernel for the packet headers only (with the
//! original length), since verdicts never change a packet.

use crate::{os, NetError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQA_CFG_F_GSO: u32 = 4;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
/// Bytes of each packet copied to us: IPv4 + TCP headers with options.
pub const COPY_RANGE: u32 = 128;

/// A packet held by the kernel until its verdict.
#[derive(Debug, Clone)]
pub struct Packet {
    pub id: u32,
    /// The first bytes of the packet (IP header onwards).
    pub head: Vec<u8>,
    /// The packet's full length.
    pub len: u32,
}

/// One bound queue.
#[derive(Debug)]
pub struct Queue {
    fd: OwnedFd,
    num: u16,
    seq: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(data);
    b.resize(align(b.len()), 0);
}

impl Queue {
    /// Bind queue `num`. Fails if another process holds it.
    pub fn open(num: u16) -> Result<Self, NetError> {
        // SAFETY: plain socket(2) call; the result is checked and owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(os("netlink socket"));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; the family is set below.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r != 0 {
            return Err(os("netlink bind"));
        }
        let big: i32 = 8 << 20;
        // SAFETY: big is a live int. Failure only means a smaller buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &big as *const i32 as *const libc::c_void,
                4,
            );
        }
        let mut q = Queue {
            fd,
            num,
            seq: 1,
            out: Vec::with_capacity(64 << 10),
            buf: vec![0; 256 << 10],
        };
        q.config(|b| put_attr(b, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]))
            .map_err(|e| match e {
                NetError::Os { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                    NetError::Invalid(format!("NFQUEUE {num} is already bound by another process"))
                }
                e => e,
            })?;
        q.config(|b| {
            let mut p = COPY_RANGE.to_be_bytes().to_vec();
            p.push(NFQNL_COPY_PACKET);
            put_attr(b, NFQA_CFG_PARAMS, &p);
            put_attr(b, NFQA_CFG_QUEUE_MAXLEN, &65536u32.to_be_bytes());
            put_attr(b, NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes());
            put_attr(b, NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes());
        })?;
        Ok(q)
    }

    pub fn num(&self) -> u16 {
        self.num
    }

    fn header(&mut self, b: &mut Vec<u8>, msg: u16, flags: u16) -> usize {
        let start = b.len();
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
        b.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        b.extend_from_slice(&self.seq.to_ne_bytes());
        self.seq = self.seq.wrapping_add(1);
        b.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version, queue number (big endian).
        b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        b.extend_from_slice(&self.num.to_be_bytes());
        start
    }

    fn config(&mut self, attrs: impl FnOnce(&mut Vec<u8>)) -> Result<(), NetError> {
        let mut b = Vec::new();
        let start = self.header(&mut b, NFQNL_MSG_CONFIG, NLM_F_ACK);
        attrs(&mut b);
        let len = (b.len() - start) as u32;
        b[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.send(&b)?;
        // Wait for the acknowledgement (an NLMSG_ERROR with errno 0).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            self.wait(100)?;
            let n = self.recv_raw();
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) && std::time::Instant::now() < deadline {
                    continue;
                }
                return Err(NetError::Os {
                    step: "NFQUEUE configuration reply",
                    source: e,
                });
            }
            let b = &self.buf[..n as usize];
            if b.len() >= 20 && u16::from_ne_bytes([b[4], b[5]]) == NLMSG_ERROR {
                let errno = -i32::from_ne_bytes(b[16..20].try_into().expect("4 bytes"));
                if errno == 0 {
                    return Ok(());
                }
                return Err(NetError::Os {
                    step: "NFQUEUE configuration",
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
        }
    }

    fn send(&self, b: &[u8]) -> Result<(), NetError> {
        // SAFETY: b is a live buffer of the given length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                b.as_ptr() as *const libc::c_void,
                b.len(),
                0,
            )
        };
        if n < 0 {
            return Err(os("netlink send"));
        }
        Ok(())
    }

    /// One non-blocking receive into the buffer (bytes, or -1 with errno).
    fn recv_raw(&mut self) -> isize {
        // SAFETY: buf is writable for its length.
        unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        }
    }

    /// Wait up to `ms` for packets (or forever with -1).
    pub fn wait(&self, ms: i32) -> Result<bool, NetError> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(os("poll (NFQUEUE)"));
        }
        Ok(r > 0)
    }

    /// Receive the packets waiting now (none if there are none).
    pub fn recv(&mut self, into: &mut Vec<Packet>) -> Result<(), NetError> {
        loop {
            let n = self.recv_raw();
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR) => continue,
                    // The kernel dropped packets it could not hand us
                    // (they are lost, as on a congested link): go on.
                    Some(libc::ENOBUFS) => {
                        tracing::warn!(
                            "NFQUEUE {}: receive buffer overrun, packets dropped",
                            self.num
                        );
                        continue;
                    }
                    _ => {
                        return Err(NetError::Os {
                            step: "NFQUEUE receive",
                            source: e,
                        })
                    }
                }
            }
            parse(&self.buf[..n as usize], into);
        }
    }

    /// Give verdicts: accept (true) or drop (false) each packet id.
    pub fn verdicts(&mut self, v: &[(u32, bool)]) -> Result<(), NetError> {
        let mut out = std::mem::take(&mut self.out);
        for chunk in v.chunks(1024) {
            out.clear();
            for &(id, accept) in chunk {
                let start = self.header(&mut out, NFQNL_MSG_VERDICT, 0);
                let mut h = (accept as u32).to_be_bytes().to_vec();
                h.extend_from_slice(&id.to_be_bytes());
                put_attr(&mut out, NFQA_VERDICT_HDR, &h);
                let len = (out.len() - start) as u32;
                out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
            }
            self.send(&out)?;
        }
        self.out = out;
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Packets from a buffer of netlink messages; anything else is skipped.
fn parse(mut b: &[u8], into: &mut Vec<Packet>) {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return;
        }
        if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && len >= 20 {
            let mut a = &b[20..len];
            let mut p = Packet {
                id: 0,
                head: Vec::new(),
                len: 0,
            };
            let mut have_id = false;
            let mut cap = None;
            while a.len() >= 4 {
                let alen = u16::from_ne_bytes([a[0], a[1]]) as usize;
                let aty = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
                if alen < 4 || alen > a.len() {
                    break;
                }
                let d = &a[4..alen];
                match aty {
                    NFQA_PACKET_HDR if d.len() >= 4 => {
                        p.id = u32::from_be_bytes(d[0..4].try_into().expect("4 bytes"));
                        have_id = true;
                    }
                    NFQA_PAYLOAD => p.head = d.to_vec(),
                    NFQA_CAP_LEN if d.len() >= 4 => {
                        cap = Some(u32::from_be_bytes(d[0..4].try_into().expect("4 bytes")))
                    }
                    _ => {}
                }
                a = &a[align(alen).min(a.len())..];
            }
            p.len = cap.unwrap_or(p.head.len() as u32);
            if have_id {
                into.push(p);
            }
        }
        b = &b[align(len).min(b.len())..];
    }
}
