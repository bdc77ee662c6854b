use std::net::SocketAddr;
use std::time::Duration;

use hotstandby_protocol::wire::{Message, Role};

use super::*;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node(name: &str) -> (Dir, NodeKeys) {
    let d = std::env::temp_dir().join(format!("hotstandby-keys-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let (c, k) = keygen(&d, name).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let keys = load_keys(&c, &k).unwrap();
    (Dir(d), keys)
}

/// Connect, send a message and wait for one (within 5 s). A server that
/// rejects the client certificate does so after the client's side of the
/// handshake completed: using the connection is what fails.
async fn use_connection(
    cli: &Endpoint,
    addr: SocketAddr,
) -> Result<Option<Message>, TransportError> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let conn = connect(cli, addr).await?;
        let mut s = MsgStream::open(&conn).await?;
        s.send(&Message::Ack { offset: 1 }).await?;
        s.recv().await
    })
    .await
    .expect("bounded")
}

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn pinned_peers_exchange_messages_and_datagrams() {
    let (_a, a) = node("a");
    let (_b, b) = node("b");
    let srv = server(lo(), &a, vec![b.cert.clone()]).unwrap();
    let addr = srv.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let conn = srv.accept().await.unwrap().await.unwrap();
        let mut s = MsgStream::accept(&conn).await.unwrap();
        let m = s.recv().await.unwrap().unwrap();
        s.send(&Message::Ack { offset: 42 }).await.unwrap();
        let d = recv_datagram(&conn).await.unwrap();
        (m, d, conn)
    });
    let cli = client(lo(), &b, vec![a.cert.clone()]).unwrap();
    let conn = connect(&cli, addr).await.unwrap();
    let mut s = MsgStream::open(&conn).await.unwrap();
    s.send(&Message::Log {
        offset: 0,
        bytes: vec![1; 100_000],
    })
    .await
    .unwrap();
    assert_eq!(s.recv().await.unwrap(), Some(Message::Ack { offset: 42 }));
    let hb = Message::Heartbeat {
        role: Role::Standby,
        epoch: 1,
        sent_ms: 2,
        offset: 3,
    };
    send_datagram(&conn, &hb).unwrap();
    let (m, d, _c) = accept.await.unwrap();
    assert_eq!(
        m,
        Message::Log {
            offset: 0,
            bytes: vec![1; 100_000]
        }
    );
    assert_eq!(d, hb);
}

#[tokio::test]
async fn an_unpinned_certificate_is_refused_both_ways() {
    let (_a, a) = node("pa");
    let (_b, b) = node("pb");
    let (_c, c) = node("pc");
    // The server pins b; c tries to connect.
    let srv = server(lo(), &a, vec![b.cert.clone()]).unwrap();
    let addr = srv.local_addr().unwrap();
    let srv2 = srv.clone();
    let acc = tokio::spawn(async move {
        let inc = srv2.accept().await.unwrap();
        inc.await.err().map(|e| e.to_string())
    });
    let cli = client(lo(), &c, vec![a.cert.clone()]).unwrap();
    assert!(
        use_connection(&cli, addr).await.is_err(),
        "a client with an unpinned certificate must be refused"
    );
    let server_side = acc
        .await
        .unwrap()
        .expect("the server refuses the handshake");
    assert!(server_side.contains("pinned"), "{server_side}");
    // The client pins b but the server presents a.
    let srv3 = srv.clone();
    let acc = tokio::spawn(async move {
        if let Some(inc) = srv3.accept().await {
            let _ = inc.await;
        }
    });
    let cli = client(lo(), &c, vec![b.cert.clone()]).unwrap();
    let e = connect(&cli, addr)
        .await
        .expect_err("an unpinned server must be refused");
    assert!(e.to_string().contains("pinned"), "{e}");
    srv.close(0u32.into(), b"");
    acc.abort();
}

#[tokio::test]
async fn garbage_on_the_port_does_not_stop_the_endpoint() {
    let (_a, a) = node("ga");
    let (_b, b) = node("gb");
    let srv = server(lo(), &a, vec![b.cert.clone()]).unwrap();
    let addr = srv.local_addr().unwrap();
    let udp = std::net::UdpSocket::bind(lo()).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for len in [1usize, 20, 1200, 1500, 64] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        udp.send_to(&bytes, addr).unwrap();
    }
    let accept = tokio::spawn(async move {
        let conn = srv.accept().await.unwrap().await.unwrap();
        let mut s = MsgStream::accept(&conn).await.unwrap();
        s.recv().await.unwrap()
    });
    let cli = client(lo(), &b, vec![a.cert.clone()]).unwrap();
    let conn = connect(&cli, addr).await.unwrap();
    let mut s = MsgStream::open(&conn).await.unwrap();
    s.send(&Message::Ack { offset: 7 }).await.unwrap();
    assert_eq!(accept.await.unwrap(), Some(Message::Ack { offset: 7 }));
}

#[test]
fn keygen_refuses_to_overwrite_and_bad_files_are_named() {
    let (d, _) = node("kx");
    let e = keygen(&d.0, "kx").unwrap_err();
    assert!(e.to_string().contains("node.key"), "{e}");
    let junk = d.0.join("junk.pem");
    std::fs::write(&junk, "not a pem").unwrap();
    let e = load_cert(&junk).unwrap_err();
    assert!(
        e.to_string().contains("junk.pem") && e.to_string().contains("certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn a_peer_cert_file_of_several_certificates_pins_each_of_them() {
    let (_a, a) = node("ma");
    let (db, b) = node("mb");
    let (dc, c) = node("mc");
    let (_d, d) = node("md");
    // The primary's file holds both standbys' certificates.
    let both = db.0.join("standbys.pem");
    let pem = |dir: &Dir| std::fs::read_to_string(dir.0.join("node.crt")).unwrap();
    std::fs::write(&both, pem(&db) + &pem(&dc)).unwrap();
    let pinned = load_certs(&both).unwrap();
    assert_eq!(pinned.len(), 2);
    let srv = server(lo(), &a, pinned).unwrap();
    let addr = srv.local_addr().unwrap();
    let srv2 = srv.clone();
    let acc = tokio::spawn(async move {
        let mut ok = 0;
        while let Some(inc) = srv2.accept().await {
            if inc.await.is_ok() {
                ok += 1;
            }
        }
        ok
    });
    for k in [&b, &c] {
        let cli = client(lo(), k, vec![a.cert.clone()]).unwrap();
        let conn = connect(&cli, addr).await.expect("a pinned standby");
        let mut s = MsgStream::open(&conn).await.unwrap();
        s.send(&Message::Ack { offset: 1 }).await.unwrap();
        conn.close(0u32.into(), b"");
    }
    // A third, unlisted certificate is still refused.
    let cli = client(lo(), &d, vec![a.cert.clone()]).unwrap();
    assert!(
        use_connection(&cli, addr).await.is_err(),
        "an unlisted certificate must be refused"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    srv.close(0u32.into(), b"");
    assert_eq!(acc.await.unwrap(), 2, "both listed standbys were accepted");
}
