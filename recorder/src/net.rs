//! The program's TCP connections while recording: each accepted one is
//! captured (through the `NetObserver`) and logged as a `Tcp` event, so a
//! standby can rebuild it; what the program reads, writes and closes is told
//! to the observer with the log offset of the record that says so (the
//! output rule holds packets until the standby has that offset). Mirror:
//! `hotstandby_replayer::net`.

use hotstandby_protocol::record::Event;
use hotstandby_protocol::shadow::Note;
use hotstandby_protocol::sysmodel::{Family, Spec};
use hotstandby_tracer::{sys, Tid};

use crate::record::{RecordError, Recorder};

impl Recorder {
    /// Tell the network side what a shadow change did to connections.
    pub(crate) fn net_notes(&mut self, notes: Vec<Note<()>>) {
        let Some(net) = self.net.clone() else {
            return;
        };
        let off = self.log.bytes();
        for n in notes {
            match n {
                Note::Ended(c) => net.closed(Some(&c.tcp), off),
                Note::Shutdown(id) | Note::Io { id, .. } => {
                    let Some(c) = self.shadow.conn_by_id_mut(id) else {
                        continue;
                    };
                    match n {
                        Note::Io { wrote, n, .. } => net.io(&c.tcp, wrote, n, off),
                        _ => net.closed(Some(&c.tcp), off),
                    }
                }
            }
        }
    }

    /// After a logged syscall: capture an accepted connection, note a
    /// listening port.
    pub(crate) fn net_after(
        &mut self,
        t: Tid,
        spec: &Spec,
        args: &[u64; 6],
        ret: i64,
    ) -> Result<(), RecordError> {
        let Some(net) = self.net.clone() else {
            return Ok(());
        };
        let (tgid, ns_tgid) = (self.th(t).tgid, self.th(t).ns_tgid);
        match spec.family {
            Family::Accept => {
                let fd = ret as i32;
                let Ok(dup) = sys::dup_from(tgid, fd) else {
                    return Ok(());
                };
                use std::os::fd::AsFd;
                match net.capture(dup.as_fd(), self.ns(t), fd) {
                    Ok(Some(conn)) => {
                        self.log.event(Event::Tcp(conn.clone()))?;
                        net.accepted(&conn);
                        if let Some(old) = self.shadow.accepted(ns_tgid, fd, conn, ()) {
                            net.closed(Some(&old.tcp), self.log.bytes());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        "connection on fd {fd}: cannot read its TCP state ({e}); a takeover cannot keep it"
                    ),
                }
            }
            Family::Listen => {
                if let Ok(dup) = sys::dup_from(tgid, args[0] as i32) {
                    use std::os::fd::AsFd;
                    net.listening(dup.as_fd());
                }
            }
            _ => {}
        }
        Ok(())
    }
}
