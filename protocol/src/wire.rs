//! Replication messages and their byte encoding.
//!
//! Every message is `type u16 LE | length u32 LE | payload`. `type` 0 is
//! invalid by design, so zeroed memory never parses as a message. The
//! decoder checks every length before reading and never panics: bytes from
//! the network are untrusted until the TLS peer is authenticated, and even
//! then are validated.
//!
//! ```text
//! Hello     1  version_min u16 | version_max u16 | role u8 | epoch u64 |
//!              resume_offset u64 | log_id [32] (sha256 of the header record;
//!              zeros from a standby without a log)
//! Log       2  offset u64 | bytes (rest)            primary → standby, stream
//! Ack       3  offset u64                           standby → primary, stream
//! Refuse    4  reason (UTF-8, rest)                  either way, then close
//! Heartbeat 5  role u8 | epoch u64 | sent_ms u64 | offset u64   datagram
//! Former    6  count u16 | count × (family u8 (4|6) | address (4|16) |
//!              port u16)                primary → standby, stream, after
//!              Hello: every primary of this log before this one, to be
//!              told of a takeover (so an old primary that wakes up at any
//!              epoch steps down)
//! ```

use thiserror::Error;

/// Oldest protocol version this build speaks (2: `Former`).
pub const VERSION_MIN: u16 = 2;
/// Newest protocol version this build speaks.
pub const VERSION_MAX: u16 = 2;
/// Largest message accepted (a log chunk is at most 1 MiB).
pub const MAX_MESSAGE: usize = 2 << 20;
const HEADER: usize = 6;

/// Message types on the wire.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Invalid = 0,
    Hello = 1,
    Log = 2,
    Ack = 3,
    Refuse = 4,
    Heartbeat = 5,
    Former = 6,
}

/// Which side a node plays.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary = 1,
    Standby = 2,
}

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        version_min: u16,
        version_max: u16,
        role: Role,
        epoch: u64,
        resume_offset: u64,
        exe_sha256: [u8; 32],
    },
    Log {
        offset: u64,
        bytes: Vec<u8>,
    },
    Ack {
        offset: u64,
    },
    Refuse {
        reason: String,
    },
    Heartbeat {
        role: Role,
        epoch: u64,
        sent_ms: u64,
        offset: u64,
    },
    /// The primaries of this log before the sender.
    Former {
        addrs: Vec<std::net::SocketAddr>,
    },
}

/// At most this many former primaries travel in one `Former`.
pub const MAX_FORMER: usize = 64;

/// Why bytes are not a message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the header or the declared length.
    #[error("incomplete message: need {need} bytes, have {have}")]
    Incomplete { need: usize, have: usize },
    /// Type 0 or a type this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u16),
    /// Declared length over the limit.
    #[error("message of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// The payload does not have the layout of its type.
    #[error("malformed {kind} message: {why}")]
    Malformed {
        kind: &'static str,
        why: &'static str,
    },
}

impl Message {
    /// Append the encoding of `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        let ty = match self {
            Message::Hello {
                version_min,
                version_max,
                role,
                epoch,
                resume_offset,
                exe_sha256,
            } => {
                out.extend_from_slice(&version_min.to_le_bytes());
                out.extend_from_slice(&version_max.to_le_bytes());
                out.push(*role as u8);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&resume_offset.to_le_bytes());
                out.extend_from_slice(exe_sha256);
                MsgType::Hello
            }
            Message::Log { offset, bytes } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(bytes);
                MsgType::Log
            }
            Message::Ack { offset } => {
                out.extend_from_slice(&offset.to_le_bytes());
                MsgType::Ack
            }
            Message::Refuse { reason } => {
                out.extend_from_slice(reason.as_bytes());
                MsgType::Refuse
            }
            Message::Heartbeat {
                role,
                epoch,
                sent_ms,
                offset,
            } => {
                out.push(*role as u8);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&sent_ms.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                MsgType::Heartbeat
            }
            Message::Former { addrs } => {
                let addrs = &addrs[..addrs.len().min(MAX_FORMER)];
                out.extend_from_slice(&(addrs.len() as u16).to_le_bytes());
                for a in addrs {
                    match a.ip() {
                        std::net::IpAddr::V4(ip) => {
                            out.push(4);
                            out.extend_from_slice(&ip.octets());
                        }
                        std::net::IpAddr::V6(ip) => {
                            out.push(6);
                            out.extend_from_slice(&ip.octets());
                        }
                    }
                    out.extend_from_slice(&a.port().to_le_bytes());
                }
                MsgType::Former
            }
        };
        let len = (out.len() - start - HEADER) as u32;
        out[start..start + 2].copy_from_slice(&(ty as u16).to_le_bytes());
        out[start + 2..start + 6].copy_from_slice(&len.to_le_bytes());
    }

    /// Encode into a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decode one message from the front of `buf`; returns it and the
    /// number of bytes it used. `Incomplete` means "read more".
    pub fn decode(buf: &[u8]) -> Result<(Message, usize), WireError> {
        if buf.len() < HEADER {
            return Err(WireError::Incomplete {
                need: HEADER,
                have: buf.len(),
            });
        }
        let ty = u16::from_le_bytes([buf[0], buf[1]]);
        let len = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
        if len > MAX_MESSAGE {
            return Err(WireError::TooLong(len));
        }
        if !(1..=6).contains(&ty) {
            return Err(WireError::UnknownType(ty));
        }
        if buf.len() < HEADER + len {
            return Err(WireError::Incomplete {
                need: HEADER + len,
                have: buf.len(),
            });
        }
        let p = &buf[HEADER..HEADER + len];
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("checked length"));
        let role = |b: u8, kind| match b {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Standby),
            _ => Err(WireError::Malformed {
                kind,
                why: "unknown role",
            }),
        };
        let msg = match ty {
            1 => {
                if p.len() != 2 + 2 + 1 + 8 + 8 + 32 {
                    return Err(WireError::Malformed {
                        kind: "hello",
                        why: "wrong length",
                    });
                }
                Message::Hello {
                    version_min: u16::from_le_bytes([p[0], p[1]]),
                    version_max: u16::from_le_bytes([p[2], p[3]]),
                    role: role(p[4], "hello")?,
                    epoch: u64_at(5),
                    resume_offset: u64_at(13),
                    exe_sha256: p[21..53].try_into().expect("checked length"),
                }
            }
            2 => {
                if p.len() < 8 {
                    return Err(WireError::Malformed {
                        kind: "log",
                        why: "no offset",
                    });
                }
                Message::Log {
                    offset: u64_at(0),
                    bytes: p[8..].to_vec(),
                }
            }
            3 => {
                if p.len() != 8 {
                    return Err(WireError::Malformed {
                        kind: "ack",
                        why: "wrong length",
                    });
                }
                Message::Ack { offset: u64_at(0) }
            }
            4 => Message::Refuse {
                reason: String::from_utf8(p.to_vec()).map_err(|_| WireError::Malformed {
                    kind: "refuse",
                    why: "reason is not UTF-8",
                })?,
            },
            6 => Message::Former {
                addrs: decode_former(p)?,
            },
            _ => {
                if p.len() != 1 + 8 + 8 + 8 {
                    return Err(WireError::Malformed {
                        kind: "heartbeat",
                        why: "wrong length",
                    });
                }
                Message::Heartbeat {
                    role: role(p[0], "heartbeat")?,
                    epoch: u64_at(1),
                    sent_ms: u64_at(9),
                    offset: u64_at(17),
                }
            }
        };
        Ok((msg, HEADER + len))
    }
}

fn decode_former(p: &[u8]) -> Result<Vec<std::net::SocketAddr>, WireError> {
    let bad = |why| WireError::Malformed {
        kind: "former",
        why,
    };
    if p.len() < 2 {
        return Err(bad("no count"));
    }
    let n = u16::from_le_bytes([p[0], p[1]]) as usize;
    if n > MAX_FORMER {
        return Err(bad("too many addresses"));
    }
    let mut at = 2;
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let fam = *p.get(at).ok_or(bad("truncated"))?;
        let ip_len = match fam {
            4 => 4,
            6 => 16,
            _ => return Err(bad("unknown address family")),
        };
        let end = at + 1 + ip_len + 2;
        if p.len() < end {
            return Err(bad("truncated"));
        }
        let ip: std::net::IpAddr = if fam == 4 {
            let o: [u8; 4] = p[at + 1..at + 5].try_into().expect("checked length");
            o.into()
        } else {
            let o: [u8; 16] = p[at + 1..at + 17].try_into().expect("checked length");
            o.into()
        };
        let port = u16::from_le_bytes([p[end - 2], p[end - 1]]);
        addrs.push(std::net::SocketAddr::new(ip, port));
        at = end;
    }
    if at != p.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                version_min: 1,
                version_max: 1,
                role: Role::Standby,
                epoch: 3,
                resume_offset: 4096,
                exe_sha256: [7; 32],
            },
            Message::Log {
                offset: 16,
                bytes: b"frames".to_vec(),
            },
            Message::Ack { offset: 99 },
            Message::Refuse {
                reason: "different program".into(),
            },
            Message::Heartbeat {
                role: Role::Primary,
                epoch: 1,
                sent_ms: 5,
                offset: 6,
            },
            Message::Former {
                addrs: vec![
                    "198.51.100.1:7600".parse().unwrap(),
                    "[2001:db8::1]:7601".parse().unwrap(),
                ],
            },
            Message::Former { addrs: vec![] },
        ]
    }

    #[test]
    fn roundtrip_and_streaming() {
        let mut buf = Vec::new();
        for m in all() {
            m.encode(&mut buf);
        }
        let mut pos = 0;
        for m in all() {
            // Every strict prefix of a message asks for more bytes.
            let (got, used) = Message::decode(&buf[pos..]).unwrap();
            assert_eq!(got, m);
            for cut in 0..used {
                assert!(matches!(
                    Message::decode(&buf[pos..pos + cut]),
                    Err(WireError::Incomplete { .. })
                ));
            }
            pos += used;
        }
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        assert_eq!(
            Message::decode(&[0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownType(0))
        );
        assert_eq!(
            Message::decode(&[9, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownType(9))
        );
        // A former list with a bad family, or one that lies about its count.
        assert!(matches!(
            Message::decode(&[6, 0, 3, 0, 0, 0, 1, 0, 5]),
            Err(WireError::Malformed { kind: "former", .. })
        ));
        assert!(matches!(
            Message::decode(&[6, 0, 2, 0, 0, 0, 9, 0]),
            Err(WireError::Malformed { kind: "former", .. })
        ));
        assert!(matches!(
            Message::decode(&[3, 0, 255, 255, 255, 255]),
            Err(WireError::TooLong(_))
        ));
        assert!(matches!(
            Message::decode(&[3, 0, 1, 0, 0, 0, 1]),
            Err(WireError::Malformed { .. })
        ));
        let mut x = 0x1234_5678_u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Message::decode(&bytes);
        }
    }
}
