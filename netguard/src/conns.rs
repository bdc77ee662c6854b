//! The program's connections by file descriptor, with aliases: `dup`,
//! `dup2`, `dup3` and `fcntl(F_DUPFD*)` give one connection several fds
//! (a thread-per-connection server often reads from one and writes to the
//! other). A connection ends when its last fd is closed.

use std::collections::HashMap;

/// (thread-group id, fd).
pub type Fd = (i32, i32);

#[derive(Debug)]
pub struct ConnTable<T> {
    fds: HashMap<Fd, u64>,
    items: HashMap<u64, T>,
    next: u64,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            fds: HashMap::new(),
            items: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> ConnTable<T> {
    /// A new connection on `fd` (an alias already there is closed first;
    /// what that ends is returned).
    pub fn insert(&mut self, fd: Fd, item: T) -> Option<T> {
        let ended = self.close(fd);
        self.next += 1;
        self.items.insert(self.next, item);
        self.fds.insert(fd, self.next);
        ended
    }

    pub fn get(&self, fd: Fd) -> Option<&T> {
        self.items.get(self.fds.get(&fd)?)
    }

    pub fn get_mut(&mut self, fd: Fd) -> Option<&mut T> {
        self.items.get_mut(self.fds.get(&fd)?)
    }

    /// `to` becomes another fd of the connection on `from` (if any);
    /// returns what closing the old `to` ended.
    pub fn dup(&mut self, from: Fd, to: Fd) -> Option<T> {
        if from == to {
            return None;
        }
        let ended = self.close(to);
        if let Some(id) = self.fds.get(&from).copied() {
            self.fds.insert(to, id);
        }
        ended
    }

    /// Close `fd`; returns the connection if that was its last fd.
    pub fn close(&mut self, fd: Fd) -> Option<T> {
        let id = self.fds.remove(&fd)?;
        if self.fds.values().any(|v| *v == id) {
            return None;
        }
        self.items.remove(&id)
    }

    /// Each connection with all its fds (sorted).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Vec<Fd>, &mut T)> {
        let mut by: HashMap<u64, Vec<Fd>> = HashMap::new();
        for (fd, id) in &self.fds {
            by.entry(*id).or_default().push(*fd);
        }
        self.items.iter_mut().map(move |(id, t)| {
            let mut v = by.remove(id).unwrap_or_default();
            v.sort_unstable();
            (v, t)
        })
    }
}

/// The (old fd, new fd) of a successful dup-family syscall.
pub fn dup_of(nr: u32, args: &[u64; 6], ret: i64) -> Option<(i32, i32)> {
    if ret < 0 {
        return None;
    }
    match nr as i64 {
        libc::SYS_dup => Some((args[0] as i32, ret as i32)),
        libc::SYS_dup2 | libc::SYS_dup3 => Some((args[0] as i32, args[1] as i32)),
        libc::SYS_fcntl if matches!(args[1] as i32, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => {
            Some((args[0] as i32, ret as i32))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_share_and_the_last_close_ends() {
        let mut t = ConnTable::default();
        t.insert((1, 4), 10u32);
        t.dup((1, 4), (1, 5));
        *t.get_mut((1, 5)).unwrap() += 1;
        assert_eq!(t.get((1, 4)), Some(&11));
        assert_eq!(t.close((1, 4)), None, "fd 5 still holds it");
        assert_eq!(t.close((1, 5)), Some(11));
        assert!(t.get((1, 5)).is_none());
    }

    #[test]
    fn dup2_over_a_connection_closes_it() {
        let mut t = ConnTable::default();
        t.insert((1, 4), 1u32);
        t.insert((1, 6), 2u32);
        assert_eq!(t.dup((1, 4), (1, 6)), Some(2));
        assert_eq!(t.get((1, 6)), Some(&1));
        let all: Vec<_> = t.iter_mut().map(|(fds, v)| (fds, *v)).collect();
        assert_eq!(all, vec![(vec![(1, 4), (1, 6)], 1)]);
        assert_eq!(
            dup_of(libc::SYS_dup2 as u32, &[4, 6, 0, 0, 0, 0], 6),
            Some((4, 6))
        );
        assert_eq!(
            dup_of(libc::SYS_fcntl as u32, &[4, 1030, 3, 0, 0, 0], 7),
            Some((4, 7))
        );
        assert_eq!(dup_of(libc::SYS_fcntl as u32, &[4, 1, 0, 0, 0, 0], 1), None);
    }
}
