//! What each file descriptor of the recorded program refers to, so the
//! recorder can decide per syscall whether replay executes it (an object the
//! program owns) or injects the recorded result (the outside world).
//!
//! The decision is written into each log record; replay never consults
//! this table.

use std::collections::HashMap;

/// The class of an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A regular file or directory: replay executes, reads are hashed.
    File,
    /// A pipe, socketpair, eventfd, epoll or null device created by the
    /// program itself: replay executes.
    Internal,
    /// A network socket, inherited stdio, tty, /proc or /sys file, device,
    /// timerfd, signalfd, inotify: replay emulates.
    External,
}

/// fd → kind for one process.
#[derive(Debug, Default, Clone)]
pub struct FdTable {
    map: HashMap<i32, FdKind>,
}

impl FdTable {
    /// Mark every fd open in `pid` right now as external (inherited).
    pub fn inherit(pid: i32) -> Self {
        let mut map = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in rd.flatten() {
                if let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() {
                    map.insert(fd, FdKind::External);
                }
            }
        }
        Self { map }
    }

    /// Classify every fd open in `pid` now, for a program taken over from a
    /// replay: stdin, stdout and stderr stay external (they were inherited).
    pub fn adopt(pid: i32) -> Self {
        let mut map = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in rd.flatten() {
                if let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() {
                    map.insert(
                        fd,
                        if fd <= 2 {
                            FdKind::External
                        } else {
                            classify(pid, fd)
                        },
                    );
                }
            }
        }
        Self { map }
    }

    /// The kind of `fd`, classifying it from /proc when unknown.
    pub fn kind(&mut self, pid: i32, fd: i32) -> FdKind {
        if let Some(k) = self.map.get(&fd) {
            return *k;
        }
        let k = classify(pid, fd);
        self.map.insert(fd, k);
        k
    }

    pub fn set(&mut self, fd: i32, kind: FdKind) {
        self.map.insert(fd, kind);
    }

    /// Record an fd the program just opened by path.
    pub fn opened(&mut self, pid: i32, fd: i32) {
        let k = classify(pid, fd);
        self.map.insert(fd, k);
    }

    pub fn dup(&mut self, pid: i32, old: i32, new: i32) {
        let k = self.kind(pid, old);
        self.map.insert(new, k);
    }

    pub fn close(&mut self, fd: i32) {
        self.map.remove(&fd);
    }

    pub fn close_range(&mut self, lo: u32, hi: u32) {
        self.map
            .retain(|fd, _| (*fd as u32) < lo || (*fd as u32) > hi);
    }
}

/// Classify an fd of `pid` by what /proc says it is.
pub fn classify(pid: i32, fd: i32) -> FdKind {
    let link = match std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
        Ok(l) => l.to_string_lossy().into_owned(),
        Err(_) => return FdKind::External,
    };
    classify_target(&link, || {
        std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()
    })
}

/// Classify by the /proc/PID/fd link text (and the target's metadata).
pub fn classify_target(link: &str, meta: impl FnOnce() -> Option<std::fs::Metadata>) -> FdKind {
    use std::os::unix::fs::FileTypeExt;
    if link.starts_with("pipe:")
        || link == "anon_inode:[eventfd]"
        || link == "anon_inode:[eventpoll]"
    {
        return FdKind::Internal;
    }
    if link.starts_with("socket:") || link.starts_with("anon_inode:") {
        return FdKind::External;
    }
    if link.starts_with("/proc/") || link.starts_with("/sys/") {
        return FdKind::External;
    }
    if matches!(link, "/dev/null" | "/dev/zero" | "/dev/full") {
        return FdKind::Internal;
    }
    if link.starts_with("/dev/") {
        return FdKind::External;
    }
    match meta() {
        Some(m) if m.is_file() || m.is_dir() => FdKind::File,
        Some(m)
            if m.file_type().is_fifo()
                || m.file_type().is_socket()
                || m.file_type().is_char_device() =>
        {
            FdKind::External
        }
        Some(_) => FdKind::External,
        // A memfd or deleted file: still the program's own.
        None if link.starts_with("/memfd:") || link.ends_with(" (deleted)") => FdKind::File,
        None => FdKind::External,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify_target("pipe:[123]", || None), FdKind::Internal);
        assert_eq!(classify_target("socket:[9]", || None), FdKind::External);
        assert_eq!(classify_target("/proc/cpuinfo", || None), FdKind::External);
        assert_eq!(classify_target("/dev/urandom", || None), FdKind::External);
        assert_eq!(classify_target("/dev/null", || None), FdKind::Internal);
        assert_eq!(
            classify_target("anon_inode:[timerfd]", || None),
            FdKind::External
        );
        assert_eq!(classify_target("/memfd:x (deleted)", || None), FdKind::File);
    }
}
