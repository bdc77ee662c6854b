//! The external arbiter: a leader key with a lease in etcd (v3 API,
//! through etcd's JSON gateway, `POST /v3/...`), as Patroni keeps its
//! leader lock. The holder of the key is the only node allowed to release
//! output; the key lives only as long as its holder renews the lease.
//!
//! Timing rule (Patroni's `loop_wait + 2 × retry_timeout ≤ ttl`): the
//! holder renews every `ttl / 4` (every 100 ms after a failure), each
//! request bounded by `ttl / 10` per member, and counts its lease as valid
//! only until `last renewal sent + ttl − ttl/6`; a watchdog stops output at
//! that instant even while a renewal is in flight, so the holder stops
//! before etcd can let anybody else take the key.
//!
//! With `--arbiter`, `run` takes the key before it starts the program (and
//! refuses to start while another node holds it), a standby that lost its
//! primary goes live only once it holds the key, and the holder steps down
//! (exit 75, output held) when it cannot renew in time.

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> anyhow::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("etcd sent bad base64")
}

/// etcd's int64 fields come as JSON strings; absent means 0.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// A key's value and modification revision.
type Kv = (Vec<u8>, i64);

/// A client of an etcd cluster: each call tries the members in turn.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<String>,
    timeout: Duration,
    /// TLS to etcd (`--arbiter-ca`, and with `--arbiter-cert`/`-key`
    /// mutual TLS); plain HTTP without.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The member that answered last: asked first next time (a dead or
    /// partitioned member costs a timeout on every call otherwise).
    preferred: std::sync::atomic::AtomicUsize,
}

impl Etcd {
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            anyhow!("--arbiter must be etcd://HOST:PORT[,HOST:PORT...] (got {url})")
        })?;
        let members: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        if members.is_empty() {
            bail!("--arbiter {url}: no member");
        }
        for m in &members {
            if !m.contains(':') {
                bail!("--arbiter {url}: member {m:?} is not HOST:PORT");
            }
        }
        Ok(Etcd {
            members,
            timeout,
            tls: None,
            preferred: 0.into(),
        })
    }

    /// Speak TLS to etcd: verify its members against the CA certificates
    /// in `ca` (PEM) and, with `client` (certificate, key), present that
    /// certificate (etcd's `--client-cert-auth`).
    pub fn with_tls(mut self, ca: &Path, client: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let pem = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem(ca)?.as_slice()) {
            let c = c.with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("--arbiter-ca {}: no certificate in it", ca.display());
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS for the arbiter")?
        .with_root_certificates(roots);
        let cfg = match client {
            None => b.with_no_client_auth(),
            Some((cert, key)) => {
                let certs: Vec<_> = rustls_pemfile::certs(&mut pem(cert)?.as_slice())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("{}: not a PEM certificate", cert.display()))?;
                if certs.is_empty() {
                    bail!("--arbiter-cert {}: no certificate in it", cert.display());
                }
                let k = rustls_pemfile::private_key(&mut pem(key)?.as_slice())
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        anyhow!("--arbiter-key {}: no private key in it", key.display())
                    })?;
                b.with_client_auth_cert(certs, k)
                    .context("the arbiter client certificate and key")?
            }
        };
        self.tls = Some(Arc::new(cfg));
        Ok(self)
    }

    /// One gateway call; the first member that answers wins.
    fn call(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut why = Vec::new();
        let first = self.preferred.load(Relaxed);
        for k in 0..self.members.len() {
            let i = (first + k) % self.members.len();
            let m = &self.members[i];
            match post(m, path, &body.to_string(), self.timeout, self.tls.as_ref()) {
                Ok(v) => {
                    self.preferred.store(i, Relaxed);
                    return Ok(v);
                }
                Err(e) => why.push(format!("{m}: {e:#}")),
            }
        }
        bail!("no etcd member answered {path}: {}", why.join("; "))
    }

    /// A new lease of `ttl` (whole seconds, at least 1).
    pub fn grant(&self, ttl: Duration) -> anyhow::Result<i64> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl.as_secs().max(1) }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            bail!("etcd granted no lease: {v}");
        }
        Ok(id)
    }

    /// Renew `lease`: its remaining TTL in seconds, or None when etcd no
    /// longer knows it (expired or revoked).
    pub fn keepalive(&self, lease: i64) -> anyhow::Result<Option<i64>> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        let r = v.get("result").unwrap_or(&v);
        Ok(Some(int(&r["TTL"])).filter(|t| *t > 0))
    }

    pub fn revoke(&self, lease: i64) -> anyhow::Result<()> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))?;
        Ok(())
    }

    /// The value of `key` and its modification revision, if it exists.
    pub fn get(&self, key: &[u8]) -> anyhow::Result<Option<Kv>> {
        let v = self.call("/v3/kv/range", &json!({ "key": b64(key) }))?;
        match v["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => Ok(Some((
                unb64(kv["value"].as_str().unwrap_or(""))?,
                int(&kv["mod_revision"]),
            ))),
            None => Ok(None),
        }
    }

    /// Put `key` = `value` (attached to `lease`, 0: none).
    pub fn put(&self, key: &[u8], value: &[u8], lease: i64) -> anyhow::Result<()> {
        let mut put = json!({ "key": b64(key), "value": b64(value) });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", &put)?;
        Ok(())
    }

    /// Every key under `prefix` with its value.
    pub fn range_prefix(&self, prefix: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut end = prefix.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let v = self.call(
            "/v3/kv/range",
            &json!({ "key": b64(prefix), "range_end": b64(&end) }),
        )?;
        let mut out = vec![];
        for kv in v["kvs"].as_array().into_iter().flatten() {
            out.push((
                unb64(kv["key"].as_str().unwrap_or(""))?,
                unb64(kv["value"].as_str().unwrap_or(""))?,
            ));
        }
        Ok(out)
    }

    /// Put `key` = `value` (attached to `lease`, 0: none) only if `key`'s
    /// modification revision is `rev` (0: only if it does not exist).
    /// Ok(None) when written, Ok(Some(current)) when the comparison failed.
    pub fn put_if(
        &self,
        key: &[u8],
        rev: i64,
        value: &[u8],
        lease: i64,
    ) -> anyhow::Result<Option<Option<Kv>>> {
        let (target, field) = if rev == 0 {
            ("CREATE", "create_revision")
        } else {
            ("MOD", "mod_revision")
        };
        let mut put = json!({ "key": b64(key), "value": b64(value) });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let v = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{ "key": b64(key), "result": "EQUAL", "target": target, field: rev.to_string() }],
                "success": [{ "request_put": put }],
                "failure": [{ "request_range": { "key": b64(key) } }],
            }),
        )?;
        if v["succeeded"].as_bool() == Some(true) {
            return Ok(None);
        }
        let kv = v["responses"][0]["response_range"]["kvs"]
            .as_array()
            .and_then(|a| a.first())
            .cloned();
        Ok(Some(match kv {
            Some(kv) => Some((
                unb64(kv["value"].as_str().unwrap_or(""))?,
                int(&kv["mod_revision"]),
            )),
            None => None,
        }))
    }
}

/// One HTTP/1.1 POST with `Connection: close` (over TLS with `tls`); the
/// JSON body of a 200.
fn post(
    member: &str,
    path: &str,
    body: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Value> {
    let addrs: Vec<SocketAddr> = member
        .to_socket_addrs()
        .with_context(|| format!("resolving {member}"))?
        .collect();
    let sa = addrs
        .first()
        .ok_or_else(|| anyhow!("{member}: no address"))?;
    let c = TcpStream::connect_timeout(sa, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {member}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = match tls {
        None => exchange(c, &req)?,
        Some(cfg) => {
            let host = member.rsplit_once(':').map_or(member, |(h, _)| h);
            let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']))
                .with_context(|| format!("{member}: not a host name for TLS"))?
                .to_owned();
            let conn = rustls::ClientConnection::new(cfg.clone(), name)
                .with_context(|| format!("TLS to {member}"))?;
            exchange(rustls::StreamOwned::new(conn, c), &req)
                .with_context(|| format!("TLS to {member}"))?
        }
    };
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    let mut payload = resp[split + 4..].to_vec();
    let status = head.lines().next().unwrap_or("").to_string();
    if head.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload)?;
    }
    // A streaming call (keepalive) sends one JSON object per line.
    let first = payload
        .split(|&b| b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or(&[]);
    let v: Value = serde_json::from_slice(first)
        .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(first)))?;
    if !status.contains(" 200 ") {
        bail!(
            "{status}: {}",
            v["error"].as_str().unwrap_or(&v.to_string())
        );
    }
    if let Some(e) = v.get("error") {
        bail!("etcd: {e}");
    }
    Ok(v)
}

/// Send `req`, read the whole answer (at most 4 MiB).
fn exchange<S: Read + Write>(mut s: S, req: &str) -> anyhow::Result<Vec<u8>> {
    s.write_all(req.as_bytes())?;
    s.flush()?;
    let mut resp = Vec::new();
    match s.take(4 << 20).read_to_end(&mut resp) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify after a complete
        // answer (`Connection: close`): keep what came.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(resp)
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .context("bad chunk size")?;
        b = &b[eol + 2..];
        if n == 0 || b.len() < n {
            out.extend_from_slice(&b[..n.min(b.len())]);
            return Ok(out);
        }
        out.extend_from_slice(&b[..n]);
        b = b.get(n + 2..).unwrap_or(&[]);
    }
}

/// What the leader key (and a standby's entry under `members/`) says of
/// a node: its name, where it serves standbys, and how much of the log it
/// held when it took the key (0 for a primary started by `run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub name: String,
    pub addr: Option<SocketAddr>,
    #[serde(default)]
    pub offset: u64,
}

impl Holder {
    /// A value as etcd holds it (a bare name from an older node, too).
    fn parse(v: &[u8]) -> Holder {
        serde_json::from_slice(v).unwrap_or_else(|_| Holder {
            name: String::from_utf8_lossy(v).into_owned(),
            ..Holder::default()
        })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{} ({a})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The leader key of one protected service, as one node holds or seeks it.
#[derive(Debug)]
pub struct Leadership {
    etcd: Etcd,
    /// `/hotstandby/SERVICE/`.
    prefix: String,
    key: Vec<u8>,
    me: Holder,
    ttl: Duration,
    lease: i64,
    /// When the last successful renewal (or the grant) was *sent*.
    renewed: Option<Instant>,
}

/// Why a node does not hold the key.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// This node holds it now.
    Mine,
    /// Another node does.
    By(Holder),
}

impl Leadership {
    pub fn new(etcd: Etcd, service: &str, me: &str, ttl: Duration) -> Self {
        let prefix = format!("/hotstandby/{service}/");
        Leadership {
            etcd,
            key: format!("{prefix}leader").into_bytes(),
            prefix,
            me: Holder {
                name: me.into(),
                ..Holder::default()
            },
            ttl,
            lease: 0,
            renewed: None,
        }
    }

    /// Where this node serves standbys, as others must reach it: `listen`,
    /// or when that is a wildcard, the address this host reaches the
    /// arbiter from (with `listen`'s port).
    fn advertise(&mut self, listen: SocketAddr) {
        let mut a = listen;
        if a.ip().is_unspecified() {
            let local = self.etcd.members.iter().find_map(|m| {
                let to = m.to_socket_addrs().ok()?.next()?;
                let u = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
                u.connect(to).ok()?;
                u.local_addr().ok()
            });
            if let Some(l) = local {
                a.set_ip(l.ip());
            }
        }
        self.me.addr = Some(a);
    }

    fn value(&self) -> Vec<u8> {
        serde_json::to_vec(&self.me).expect("a holder serializes")
    }

    /// Take the key if nobody holds it (or this node already does).
    pub fn campaign(&mut self) -> anyhow::Result<Held> {
        let sent = Instant::now();
        // A lease from an earlier attempt is kept alive (or replaced once
        // gone), so the key is never taken on a lease about to end.
        if self.lease != 0 && self.etcd.keepalive(self.lease)?.is_none() {
            self.lease = 0;
        }
        if self.lease == 0 {
            self.lease = self.etcd.grant(self.ttl)?;
        }
        match self.etcd.put_if(&self.key, 0, &self.value(), self.lease)? {
            None => {
                self.renewed = Some(sent);
                Ok(Held::Mine)
            }
            Some(Some((v, _))) if Holder::parse(&v).name == self.me.name => {
                // Ours from before (another lease of this node): keep the
                // key on our current lease only if renewing works.
                self.renew().map(|_| Held::Mine)
            }
            Some(Some((v, _))) => Ok(Held::By(Holder::parse(&v))),
            Some(None) => Ok(Held::By(Holder::default())),
        }
    }

    /// Renew the lease; an error when etcd does not answer or the lease is
    /// gone (then the key is not ours any more).
    pub fn renew(&mut self) -> anyhow::Result<()> {
        let sent = Instant::now();
        match self.etcd.keepalive(self.lease)? {
            Some(_) => {
                self.renewed = Some(sent);
                Ok(())
            }
            None => {
                self.renewed = None;
                bail!("the arbiter's lease expired: another node may hold the key")
            }
        }
    }

    /// Until when this node may act as the holder (None: it may not).
    pub fn valid_until(&self) -> Option<Instant> {
        self.renewed.map(|t| t + self.ttl - self.ttl / 6)
    }

    /// Let the key go at once (a clean stop).
    pub fn resign(&mut self) -> anyhow::Result<()> {
        self.renewed = None;
        if self.lease != 0 {
            self.etcd.revoke(self.lease)?;
            self.lease = 0;
        }
        Ok(())
    }

    /// Renewal period of the timing rule.
    pub fn loop_wait(&self) -> Duration {
        self.ttl / 4
    }
}

/// This process's leadership, once `--arbiter` configured one.
static ARBITER: std::sync::Mutex<Option<Leadership>> = std::sync::Mutex::new(None);

fn arbiter() -> std::sync::MutexGuard<'static, Option<Leadership>> {
    ARBITER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `--arbiter` configured one.
pub fn configured() -> bool {
    arbiter().is_some()
}

/// Configure the arbiter for this process.
pub fn install(l: Leadership) {
    *arbiter() = Some(l);
}

/// Primary at start: take the key or refuse to run. `listen`: where it
/// serves standbys (told in the key, for standbys that must find it).
pub fn take_or_refuse(listen: SocketAddr) -> anyhow::Result<()> {
    let mut a = arbiter();
    let Some(l) = a.as_mut() else { return Ok(()) };
    l.advertise(listen);
    match l.campaign().context("asking the arbiter for the leader key")? {
        Held::Mine => {
            tracing::info!(
                "the arbiter's leader key {} is ours (lease ttl {} ms)",
                String::from_utf8_lossy(&l.key),
                l.ttl.as_millis()
            );
            Ok(())
        }
        Held::By(h) => bail!(
            "the arbiter says {h} is the primary ({}): start this node as a standby (or wait for that node's lease to expire)",
            String::from_utf8_lossy(&l.key)
        ),
    }
}

/// What a standby that lost its primary does, as the arbiter decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elected {
    /// This node holds the leader key: go live.
    Won,
    /// Another node is (or still is) the primary: follow it, from no
    /// further than `upto` bytes of the log (where it took over; `u64::MAX`
    /// for the primary this node followed).
    Follow { addr: SocketAddr, upto: u64 },
}

/// A standby whose primary fell silent: publish how much of the log it
/// holds (`members/NAME`), then
/// - the key still held by the lost primary for longer than its lease
///   could last without renewals: that primary is alive (only the link
///   to it broke): follow it again;
/// - the key taken by another node: follow that one (the new primary);
/// - the key free: campaign if no other standby published a longer log
///   (ties: the smaller name), or if the one that did has not taken the
///   key within a lease's time; holding the key, go live.
///
/// Never goes live without the key: a standby that cannot reach the
/// arbiter waits. Without an arbiter: `Won` at once.
pub fn elect(offset: u64, lost: SocketAddr, listen: SocketAddr) -> Elected {
    let mut a = arbiter();
    let Some(l) = a.as_mut() else {
        return Elected::Won;
    };
    l.advertise(listen);
    l.me.offset = offset;
    let since = Instant::now();
    let mut free_since: Option<Instant> = None;
    let mut said = None;
    loop {
        let why = match l.election_round(lost, since, &mut free_since) {
            Ok(Ok(e)) => {
                match &e {
                    Elected::Won => tracing::warn!(
                        "took the arbiter's leader key {}: going live",
                        String::from_utf8_lossy(&l.key)
                    ),
                    Elected::Follow { addr, .. } if *addr == lost => tracing::warn!(
                        "the primary at {addr} still renews the arbiter's key: only the link to it broke; following it again"
                    ),
                    Elected::Follow { addr, .. } => {
                        tracing::warn!("the arbiter names {addr} the new primary: following it")
                    }
                }
                return e;
            }
            Ok(Err(why)) => why,
            Err(e) => format!("{e:#}"),
        };
        if said.as_ref() != Some(&why) {
            tracing::warn!("not going live until the arbiter's leader key is ours: {why}");
            said = Some(why);
        }
        std::thread::sleep(Duration::from_millis(100).min(l.loop_wait()));
    }
}

/// The standbys' entries under `members/`.
const MEMBERS: &str = "members/";

impl Leadership {
    /// One look at the arbiter for [`elect`]: the outcome, or why there is
    /// none yet.
    fn election_round(
        &mut self,
        lost: SocketAddr,
        since: Instant,
        free_since: &mut Option<Instant>,
    ) -> anyhow::Result<Result<Elected, String>> {
        if self.lease != 0 && self.etcd.keepalive(self.lease)?.is_none() {
            self.lease = 0;
        }
        if self.lease == 0 {
            self.lease = self.etcd.grant(self.ttl)?;
        }
        let mine = format!("{}{MEMBERS}{}", self.prefix, self.me.name).into_bytes();
        self.etcd.put(&mine, &self.value(), self.lease)?;
        match self.etcd.get(&self.key)? {
            Some((v, _)) => {
                *free_since = None;
                let h = Holder::parse(&v);
                if h.name == self.me.name {
                    return Ok(match self.campaign()? {
                        Held::Mine => Ok(Elected::Won),
                        Held::By(h) => Err(format!("held by {h}")),
                    });
                }
                match h.addr {
                    Some(addr) if addr != lost => Ok(Ok(Elected::Follow {
                        addr,
                        upto: if h.offset == 0 { u64::MAX } else { h.offset },
                    })),
                    Some(addr) if since.elapsed() > self.ttl + 2 * self.loop_wait() => {
                        Ok(Ok(Elected::Follow {
                            addr,
                            upto: u64::MAX,
                        }))
                    }
                    _ => Ok(Err(format!("held by {h} (its lease has not ended)"))),
                }
            }
            None => {
                let free = *free_since.get_or_insert_with(Instant::now);
                let others = self
                    .etcd
                    .range_prefix(format!("{}{MEMBERS}", self.prefix).as_bytes())?;
                let best = others
                    .iter()
                    .map(|(_, v)| Holder::parse(v))
                    .chain(std::iter::once(self.me.clone()))
                    .max_by(|a, b| a.offset.cmp(&b.offset).then_with(|| b.name.cmp(&a.name)))
                    .expect("this node is among them");
                // Give the others a moment to publish, and the best one a
                // lease's time to take the key.
                let settled = since.elapsed() >= self.loop_wait();
                if settled && (best.name == self.me.name || free.elapsed() > self.ttl) {
                    return Ok(match self.campaign()? {
                        Held::Mine => Ok(Elected::Won),
                        Held::By(h) => Err(format!("taken by {h}")),
                    });
                }
                Ok(Err(if best.name == self.me.name {
                    "free; letting the other standbys publish their positions".into()
                } else {
                    format!(
                        "free; standby {} holds more of the log ({} bytes, this one {}): it takes over",
                        best.name, best.offset, self.me.offset
                    )
                }))
            }
        }
    }
}

/// Until when the holder may release output (for the watchdog).
static VALID_UNTIL: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

fn set_valid_until(u: Option<Instant>) {
    *VALID_UNTIL.lock().unwrap_or_else(|e| e.into_inner()) = u;
}

/// The holder: a renewal thread (every `loop_wait`, every 100 ms after a
/// failure, each call bounded) and a watchdog that does not wait for a
/// renewal in flight: once the lease's trusted window ends it stops
/// releasing output (`fence`) and exits with `code` — another node may
/// hold the key from then on.
pub fn hold(fence: Box<dyn Fn() + Send>, code: i32) -> anyhow::Result<()> {
    let first = match arbiter().as_ref() {
        None => return Ok(()),
        Some(l) => l.valid_until(),
    };
    set_valid_until(first);
    std::thread::Builder::new()
        .name("arbiter".into())
        .spawn(move || loop {
            let (ok, wait) = {
                let mut a = arbiter();
                let Some(l) = a.as_mut() else { return };
                let r = l.renew();
                if let Err(e) = &r {
                    tracing::warn!("renewing the arbiter's lease: {e:#}");
                }
                set_valid_until(l.valid_until());
                (r.is_ok(), l.loop_wait())
            };
            std::thread::sleep(if ok { wait } else { Duration::from_millis(100) });
        })?;
    std::thread::Builder::new()
        .name("arbiter-watch".into())
        .spawn(move || loop {
            let until = *VALID_UNTIL.lock().unwrap_or_else(|e| e.into_inner());
            if until.is_none_or(|u| Instant::now() >= u) {
                fence();
                tracing::error!(
                    "LOST THE ARBITER'S LEASE: this primary stops releasing output and steps down"
                );
                std::process::exit(code);
            }
            std::thread::sleep(Duration::from_millis(20));
        })?;
    Ok(())
}

/// The epoch this node serves, kept in the arbiter: at least `local`, and
/// above every epoch the arbiter has seen when `takeover`. Written with a
/// compare-and-set on the key's revision, so two nodes never pick the same
/// epoch. `local` unchanged without an arbiter.
pub fn epoch(local: u64, takeover: bool) -> anyhow::Result<u64> {
    let a = arbiter();
    let Some(l) = a.as_ref() else {
        return Ok(local);
    };
    let key = format!(
        "/hotstandby/{}/epoch",
        String::from_utf8_lossy(&l.key)
            .trim_start_matches("/hotstandby/")
            .trim_end_matches("/leader")
    )
    .into_bytes();
    loop {
        let cur = l
            .etcd
            .get(&key)
            .context("reading the epoch in the arbiter")?;
        let (seen, rev) = match &cur {
            Some((v, rev)) => (
                String::from_utf8_lossy(v)
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("the arbiter's epoch key holds {v:?}"))?,
                *rev,
            ),
            None => (0, 0),
        };
        let want = if takeover {
            local.max(seen + 1)
        } else {
            local.max(seen)
        };
        if cur.is_some() && want == seen {
            return Ok(want);
        }
        match l.etcd.put_if(&key, rev, want.to_string().as_bytes(), 0)? {
            None => {
                tracing::info!("epoch {want} kept in the arbiter");
                return Ok(want);
            }
            Some(_) => continue, // somebody else wrote it first: look again
        }
    }
}

/// Renew now and say whether this node may still act as the holder
/// (true without an arbiter).
pub fn renew_now() -> bool {
    let mut a = arbiter();
    let Some(l) = a.as_mut() else { return true };
    if let Err(e) = l.renew() {
        tracing::warn!("renewing the arbiter's lease: {e:#}");
    }
    l.valid_until().is_some_and(|u| Instant::now() < u)
}

/// A clean stop: give the key back at once.
pub fn resign() {
    if let Some(l) = arbiter().as_mut() {
        if let Err(e) = l.resign() {
            tracing::warn!("giving the arbiter's key back: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(Etcd::parse("etcd://198.51.100.5:2379", Duration::from_secs(1)).is_ok());
        let e = Etcd::parse("http://x:1", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("etcd://HOST:PORT"), "{e}");
        let e = Etcd::parse("etcd://a:1,b", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("\"b\" is not HOST:PORT"), "{e}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let b = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(dechunk(b).unwrap(), b"hello world");
    }

    #[test]
    fn the_lease_is_trusted_for_less_than_its_ttl() {
        let mut l = Leadership::new(
            Etcd::parse("etcd://127.0.0.1:1", Duration::from_millis(100)).unwrap(),
            "s",
            "n",
            Duration::from_secs(6),
        );
        assert_eq!(l.valid_until(), None);
        let t = Instant::now();
        l.renewed = Some(t);
        assert_eq!(l.valid_until(), Some(t + Duration::from_secs(5)));
        assert_eq!(l.loop_wait(), Duration::from_millis(1500));
        // Nobody answers on port 1: the error says so, the lease is not
        // extended.
        let e = l.renew().unwrap_err().to_string();
        assert!(e.contains("no etcd member answered"), "{e}");
        assert_eq!(l.valid_until(), Some(t + Duration::from_secs(5)));
    }
}
