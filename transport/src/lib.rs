//! The QUIC transport of the replication session.
//!
//! - Mutual TLS where each side *pins* the other's certificate: a peer is
//!   accepted only if its end-entity certificate is byte-for-byte one of
//!   those given with `--peer-cert` (a PEM file of one or more). There is no CA and no name check; anything
//!   else is refused during the handshake, before one byte of log is sent.
//! - One bidirectional stream carries [`Message`]s in order (log bytes,
//!   acknowledgements); QUIC datagrams carry heartbeats.
//! - `keygen` writes a node's key and self-signed certificate.
//!
//! This crate moves bytes; the session logic is the sans-IO state machine
//! in `hotstandby_protocol::session`.

mod pin;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hotstandby_protocol::wire::{Message, WireError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use thiserror::Error;

pub use quinn::{Connection, ConnectionError, Endpoint, Incoming, RecvStream, SendStream};

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A key or certificate file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or key.
    #[error("{path}: no {what} found (expected a PEM file written by `hotstandby keygen`)")]
    NoPem { path: PathBuf, what: &'static str },
    /// Generating a key or certificate failed.
    #[error("generating a key: {0}")]
    Keygen(String),
    /// TLS configuration was rejected.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Connecting failed (including a refused certificate).
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The connection broke.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("sending: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed.
    #[error("receiving: {0}")]
    Read(#[from] quinn::ReadError),
    /// Sending a datagram failed.
    #[error("datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
    /// The peer sent bytes that are not a message.
    #[error("peer sent an invalid message: {0}")]
    Wire(#[from] WireError),
}

/// File names `keygen` writes.
pub const CERT_FILE: &str = "node.crt";
pub const KEY_FILE: &str = "node.key";

/// Write a new key (0600) and self-signed certificate into `dir` (created
/// 0700). Refuses to overwrite an existing key.
pub fn keygen(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TransportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransportError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let key = rcgen::KeyPair::generate().map_err(|e| TransportError::Keygen(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| TransportError::Keygen(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TransportError::Keygen(e.to_string()))?;
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    let write = |path: &Path, mode: u32, data: &str| -> Result<(), TransportError> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(io(path))?;
        f.write_all(data.as_bytes()).map_err(io(path))
    };
    write(&key_path, 0o600, &key.serialize_pem())?;
    write(&cert_path, 0o644, &cert.pem())?;
    Ok((cert_path, key_path))
}

/// This node's certificate and key.
#[derive(Debug)]
pub struct NodeKeys {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// Read a PEM certificate (the first of the file).
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TransportError> {
    Ok(load_certs(path)?.swap_remove(0))
}

/// Read every PEM certificate of a file (at least one): the peers a node
/// accepts, e.g. a primary's two standbys, concatenated.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let data = std::fs::read(path).map_err(|source| TransportError::Io {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .map_while(Result::ok)
        .map(|c| c.into_owned())
        .collect();
    if certs.is_empty() {
        return Err(TransportError::NoPem {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Read this node's certificate and key.
pub fn load_keys(cert: &Path, key: &Path) -> Result<NodeKeys, TransportError> {
    let data = std::fs::read(key).map_err(|source| TransportError::Io {
        path: key.into(),
        source,
    })?;
    let k = rustls_pemfile::private_key(&mut data.as_slice())
        .ok()
        .flatten()
        .ok_or(TransportError::NoPem {
            path: key.into(),
            what: "private key",
        })?;
    Ok(NodeKeys {
        cert: load_cert(cert)?,
        key: k,
    })
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(200)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s fits")));
    t.datagram_receive_buffer_size(Some(1 << 20));
    t
}

/// A listening endpoint that accepts only the pinned peers.
pub fn server(
    listen: SocketAddr,
    keys: &NodeKeys,
    peer: Vec<CertificateDer<'static>>,
) -> Result<Endpoint, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(pin::Pinned::new(peer, keys.cert.clone(), provider.clone()));
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![keys.cert.clone()], keys.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Endpoint::server(cfg, listen).map_err(|source| TransportError::Endpoint {
        addr: listen,
        source,
    })
}

/// A client endpoint that presents `keys` and accepts only the pinned peers.
pub fn client(
    bind: SocketAddr,
    keys: &NodeKeys,
    peer: Vec<CertificateDer<'static>>,
) -> Result<Endpoint, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(pin::Pinned::new(peer, keys.cert.clone(), provider.clone()));
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![keys.cert.clone()], keys.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    let mut ep =
        Endpoint::client(bind).map_err(|source| TransportError::Endpoint { addr: bind, source })?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connect to the pinned peer at `addr`.
pub async fn connect(ep: &Endpoint, addr: SocketAddr) -> Result<Connection, TransportError> {
    let connecting = ep
        .connect(addr, "hotstandby")
        .map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    connecting.await.map_err(|e| TransportError::Connect {
        addr,
        reason: e.to_string(),
    })
}

/// The message stream of a session.
#[derive(Debug)]
pub struct MsgStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl MsgStream {
    /// Open the session stream (the connecting side).
    pub async fn open(conn: &Connection) -> Result<Self, TransportError> {
        let (send, recv) = conn.open_bi().await?;
        Ok(MsgStream {
            send,
            recv,
            buf: Vec::new(),
        })
    }

    /// Accept the session stream (the accepting side).
    pub async fn accept(conn: &Connection) -> Result<Self, TransportError> {
        let (send, recv) = conn.accept_bi().await?;
        Ok(MsgStream {
            send,
            recv,
            buf: Vec::new(),
        })
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.send.write_all(&msg.to_bytes()).await?;
        Ok(())
    }

    /// The next message, or `None` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            match Message::decode(&self.buf) {
                Ok((m, used)) => {
                    self.buf.drain(..used);
                    return Ok(Some(m));
                }
                Err(WireError::Incomplete { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.recv.read(&mut chunk).await? {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None => return Ok(None),
            }
        }
    }
}

/// Send a message as a datagram (heartbeats).
pub fn send_datagram(conn: &Connection, msg: &Message) -> Result<(), TransportError> {
    conn.send_datagram(msg.to_bytes().into())?;
    Ok(())
}

/// Receive the next datagram as a message.
pub async fn recv_datagram(conn: &Connection) -> Result<Message, TransportError> {
    let d = conn.read_datagram().await?;
    Ok(Message::decode(&d)?.0)
}

#[cfg(test)]
mod tests;
