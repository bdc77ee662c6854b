//! What a file descriptor of the program refers to, read from /proc when
//! it is opened (see `hotstandby_protocol::shadow::FdKind`), and which fds
//! a process holds.

pub use hotstandby_protocol::shadow::FdKind;

/// The fds open in process `pid` now, in order.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
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
    if link.starts_with("/dev/shm/") {
        // POSIX shared memory: the program's own (its /dev/shm is private).
        return FdKind::File;
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
            classify_target("/dev/shm/PostgreSQL.1", || None),
            FdKind::File
        );
        assert_eq!(
            classify_target("anon_inode:[timerfd]", || None),
            FdKind::External
        );
        assert_eq!(classify_target("/memfd:x (deleted)", || None), FdKind::File);
    }
}
