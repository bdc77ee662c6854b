//! Same-CPU scheduling. Only one thread of the program runs user code at a
//! time, and every ptrace stop is a hand-off between it and the tracer: on
//! a VM a wake-up across CPUs costs ~90 µs, on the same CPU ~8 µs (measured
//! here: a pipe round trip). So the tracer thread pins itself to the CPU it
//! is on before it starts the program, which inherits the pin (threads and
//! child processes too); the replication driver stays free to run on the
//! others. The program still sees the CPUs it would have had: the recorder
//! answers `sched_getaffinity` with the mask from before the pin.
//!
//! `HOTSTANDBY_PIN=0` turns it off (for measuring both ways).

/// The CPU the tracer and its program share, and the mask they had before.
#[derive(Debug, Clone)]
pub struct Pinning {
    pub cpu: usize,
    /// `cpu_set_t` bytes of the mask before pinning.
    pub original: Vec<u8>,
}

fn mask_bytes(set: &libc::cpu_set_t) -> Vec<u8> {
    // SAFETY: cpu_set_t is plain bytes of its size.
    unsafe {
        std::slice::from_raw_parts(
            set as *const libc::cpu_set_t as *const u8,
            std::mem::size_of::<libc::cpu_set_t>(),
        )
        .to_vec()
    }
}

/// Pin the calling thread to the CPU it runs on (unless `HOTSTANDBY_PIN=0`
/// or only one CPU is allowed anyway). Children created afterwards inherit
/// the pin.
pub fn pin_here() -> Option<Pinning> {
    if std::env::var("HOTSTANDBY_PIN").is_ok_and(|v| v == "0") {
        return None;
    }
    // SAFETY: zeroed cpu_set_t is an empty set; the calls write only into it.
    unsafe {
        let mut orig: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut orig) != 0 {
            return None;
        }
        if libc::CPU_COUNT(&orig) <= 1 {
            return None;
        }
        let cpu = libc::sched_getcpu();
        if cpu < 0 || !libc::CPU_ISSET(cpu as usize, &orig) {
            return None;
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            return None;
        }
        Some(Pinning {
            cpu: cpu as usize,
            original: mask_bytes(&orig),
        })
    }
}

/// Undo [`pin_here`] for the calling thread.
pub fn unpin(p: &Pinning) {
    // SAFETY: `original` holds the bytes of a cpu_set_t read by pin_here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(
            p.original.as_ptr(),
            &mut set as *mut libc::cpu_set_t as *mut u8,
            p.original.len().min(std::mem::size_of::<libc::cpu_set_t>()),
        );
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
