/*
 * The in-process syscall buffer of hotstandby (see tracer/src/buffer.rs for
 * the supervisor's side and docs/design.md, "The syscall buffer").
 *
 * Preloaded into the recorded program (and into the same program when a
 * standby replays it). Wrappers for the common syscalls make them from one
 * instruction at a fixed address that the seccomp filter lets through
 * without a ptrace stop, and append what the outside world answered to a
 * per-thread buffer in this process's memory. The supervisor reads the
 * buffer at the thread's next traced stop and logs it as one batch, before
 * that stop's own event, so thread switches and signals stay on totally
 * ordered boundaries. On replay the supervisor writes the recorded batch
 * into the buffer and the same wrappers hand its results to the program
 * instead of asking the kernel; the thread stops only when the batch is
 * used up (at the traced call that followed it when recording).
 *
 * Only calls whose answer comes from the outside world are buffered, and
 * only when they cannot block: clock reads; reads from sockets (a
 * blocking socket is tried with MSG_DONTWAIT first); writes to
 * non-blocking sockets; epoll waits tried with a zero timeout. Anything
 * else, and any call that would block, takes the ordinary traced path.
 *
 * Built with -fPIC -mno-red-zone (the untraced call pushes a return
 * address below the stack pointer) -fno-stack-protector, no libc calls in
 * the wrappers' own paths but memcpy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Must match tracer/src/buffer.rs. */
#define HS_PAGE 0x70000000UL
#define HS_SYS_REGISTER 1000
#define HS_SYS_DRAIN 1001
#define HS_MAGIC 0x31425348u /* "HSB1" */
#define HS_BUF_SIZE (1u << 20)
#define HS_OUTBOX_SIZE (4u << 20)
#define HS_REC_HDR 32u
#define HS_FDTAB 4096

enum { MODE_OFF = 0, MODE_RECORD = 1, MODE_REPLAY = 2 };
enum { F_FALLBACK = 1 };
/* What hs_fdtab says of an fd (bits, written by the supervisor): a socket
 * of the outside world (its reads can be buffered), and non-blocking (its
 * writes can be buffered too). 0: every call on it is traced. */
enum { FD_SOCK = 1, FD_NONBLOCK = 2 };
/* Why the library stops replay (hdr.fault). */
enum { FAULT_NONE = 0, FAULT_CALL = 1, FAULT_HASH = 2, FAULT_SHORT = 3 };

struct hs_hdr {
    uint32_t magic;
    uint32_t mode;
    uint32_t len;      /* record: bytes appended; replay: bytes of the batch */
    uint32_t pos;      /* replay: bytes consumed */
    uint32_t count;    /* records appended / consumed */
    uint32_t locked;   /* inside a wrapper */
    uint32_t force;    /* the supervisor asks for a traced call */
    uint32_t fault;    /* replay: why the batch did not match */
    uint32_t go_live;  /* replay: switch to recording once the batch is used up */
    uint32_t fault_nr; /* replay: the call the program made instead */
    uint64_t outbox;   /* replay: bytes written to connections, for their tails */
    uint64_t outbox_len;
    uint64_t outbox_cap;
    uint32_t eager;    /* record: log a batch that wrote to a socket at the next epoll wait */
    uint32_t wrote;    /* record: a socket write since the last batch was taken */
    uint64_t reserved[3];
};
#define HS_HDR_SIZE 96u

struct hs_rec {
    uint16_t nr;
    uint8_t flags;
    uint8_t rsv;
    uint32_t size; /* whole record, a multiple of 8 */
    int32_t fd;
    uint32_t data_len;
    int64_t ret;
    uint64_t hash;
    unsigned char data[];
};

_Static_assert(sizeof(struct hs_hdr) == HS_HDR_SIZE, "header layout");
_Static_assert(sizeof(struct hs_rec) == HS_REC_HDR, "record layout");

/* Read by the supervisor at the address the registration passes. */
unsigned char hs_fdtab[HS_FDTAB] __attribute__((aligned(64)));

static __thread struct hs_hdr *hs_buf __attribute__((tls_model("initial-exec")));
static __thread int hs_state __attribute__((tls_model("initial-exec")));
static int hs_page_ok;

static inline long hs_traced(long nr, long a1, long a2, long a3, long a4, long a5, long a6) {
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* The call from the fixed page: `syscall; ret` at HS_PAGE, allowed by the
 * filter by its instruction pointer. */
static inline long hs_untraced(long nr, long a1, long a2, long a3, long a4, long a5, long a6) {
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    register long fn __asm__("r11") = (long)HS_PAGE;
    long ret;
    __asm__ volatile("call *%%r11"
                     : "=a"(ret), "+r"(fn)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "memory");
    return ret;
}

static inline long hs_ret(long r) {
    if (r < 0 && r > -4096) {
        errno = (int)-r;
        return -1;
    }
    return r;
}

static uint64_t hs_hash(const unsigned char *p, size_t n, uint64_t h) {
    /* FNV-1a, 64-bit. */
    if (!h)
        h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

__attribute__((constructor)) static void hs_init(void) {
    /* Keep the program's environment as it would see it without us. */
    const char *pre = getenv("LD_PRELOAD");
    if (pre && strstr(pre, "hotstandby-preload")) {
        const char *rest = strchr(pre, ':');
        if (rest && rest[1])
            setenv("LD_PRELOAD", rest + 1, 1);
        else
            unsetenv("LD_PRELOAD");
    }
    void *p = mmap((void *)HS_PAGE, 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != (void *)HS_PAGE)
        return;
    unsigned char code[] = {0x0f, 0x05, 0xc3}; /* syscall; ret */
    memcpy(p, code, sizeof code);
    if (mprotect(p, 4096, PROT_READ | PROT_EXEC) != 0)
        return;
    hs_page_ok = 1;
}

/* The thread's buffer, registering it with the supervisor on first use;
 * NULL when buffering is off (then every call is traced). */
static struct hs_hdr *hs_ready(void) {
    if (hs_state == 1)
        return hs_buf;
    if (hs_state < 0 || !hs_page_ok)
        return NULL;
    hs_state = -1;
    long size = HS_BUF_SIZE + HS_OUTBOX_SIZE;
    void *b = (void *)hs_traced(SYS_mmap, 0, size, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if ((unsigned long)b > -4096UL)
        return NULL;
    struct hs_hdr *h = b;
    h->magic = HS_MAGIC;
    h->outbox = (uint64_t)b + HS_BUF_SIZE;
    h->outbox_cap = HS_OUTBOX_SIZE;
    long r = hs_traced(HS_SYS_REGISTER, (long)b, HS_BUF_SIZE, (long)hs_fdtab, HS_FDTAB, 0, 0);
    if (r != 0 || h->mode == MODE_OFF) {
        hs_traced(SYS_munmap, (long)b, size, 0, 0, 0, 0);
        return NULL;
    }
    hs_buf = h;
    hs_state = 1;
    return h;
}

/* Enter a wrapper: the buffer to use, or NULL to take the traced path. */
static struct hs_hdr *hs_enter(void) {
    struct hs_hdr *h = hs_ready();
    if (!h || h->locked)
        return NULL;
    if (h->mode == MODE_REPLAY && h->pos >= h->len && h->go_live) {
        /* The standby took over: what follows is recorded for real. */
        h->mode = MODE_RECORD;
        h->len = h->pos = h->count = 0;
        h->go_live = 0;
    }
    if (h->mode == MODE_RECORD) {
        if (h->force || h->len + HS_REC_HDR + 4096 > HS_BUF_SIZE - HS_HDR_SIZE)
            return NULL;
    } else if (h->mode == MODE_REPLAY) {
        if (h->pos >= h->len)
            return NULL;
    } else {
        return NULL;
    }
    h->locked = 1;
    return h;
}

static inline void hs_leave(struct hs_hdr *h) { h->locked = 0; }

static inline struct hs_rec *hs_at(struct hs_hdr *h, uint32_t off) {
    return (struct hs_rec *)((unsigned char *)h + HS_HDR_SIZE + off);
}

/* Record: a new record with room for `cap` output bytes. */
static struct hs_rec *hs_reserve(struct hs_hdr *h, long nr, int fd, size_t cap) {
    if (h->len + HS_REC_HDR + cap + 8 > HS_BUF_SIZE - HS_HDR_SIZE)
        return NULL;
    struct hs_rec *r = hs_at(h, h->len);
    r->nr = (uint16_t)nr;
    r->flags = 0;
    r->rsv = 0;
    r->fd = fd;
    r->data_len = 0;
    r->ret = 0;
    r->hash = 0;
    return r;
}

static void hs_commit(struct hs_hdr *h, struct hs_rec *r) {
    r->size = (HS_REC_HDR + r->data_len + 7) & ~7u;
    h->len += r->size;
    h->count++;
}

/* Replay: the next record, which must be for call `nr` on `fd`. */
static struct hs_rec *hs_next(struct hs_hdr *h, long nr, int fd) {
    struct hs_rec *r = hs_at(h, h->pos);
    if (r->nr != (uint16_t)nr || r->fd != fd) {
        h->fault = FAULT_CALL;
        h->fault_nr = (uint32_t)nr;
        return NULL;
    }
    h->pos += r->size;
    h->count++;
    return r;
}

/* Replay stops at a mismatch: the traced call that follows carries it to
 * the supervisor (the batch is not used up, or `fault` is set). */

/* ---- clocks -------------------------------------------------------------- */

static long hs_out_call(long nr, long a1, long a2, void *out, size_t n) {
    struct hs_hdr *h = hs_enter();
    if (!h)
        return hs_traced(nr, a1, a2, 0, 0, 0, 0);
    long ret;
    if (h->mode == MODE_RECORD) {
        struct hs_rec *r = hs_reserve(h, nr, -1, n);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, a1, a2, 0, 0, 0, 0);
        }
        ret = hs_untraced(nr, a1, a2, 0, 0, 0, 0);
        r->ret = ret;
        if (ret >= 0 && out) {
            memcpy(r->data, out, n);
            r->data_len = (uint32_t)n;
        }
        hs_commit(h, r);
    } else {
        struct hs_rec *r = hs_next(h, nr, -1);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, a1, a2, 0, 0, 0, 0);
        }
        ret = r->ret;
        if (ret >= 0 && out && r->data_len)
            memcpy(out, r->data, r->data_len < n ? r->data_len : n);
    }
    hs_leave(h);
    return ret;
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    return (int)hs_ret(hs_out_call(SYS_clock_gettime, clk, (long)ts, ts, sizeof *ts));
}

int __clock_gettime(clockid_t clk, struct timespec *ts) { return clock_gettime(clk, ts); }

int gettimeofday(struct timeval *tv, void *tz) {
    void *volatile out = tv; /* may be NULL whatever the prototype says */
    if (tz || !out)
        return (int)hs_ret(hs_traced(SYS_gettimeofday, (long)tv, (long)tz, 0, 0, 0, 0));
    return (int)hs_ret(hs_out_call(SYS_gettimeofday, (long)tv, 0, tv, sizeof *tv));
}

time_t time(time_t *t) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return (time_t)-1;
    if (t)
        *t = ts.tv_sec;
    return ts.tv_sec;
}

/* ---- socket reads ---------------------------------------------------------- */

static inline int hs_fd(int fd) {
    return (fd >= 0 && fd < HS_FDTAB) ? hs_fdtab[fd] : 0;
}

/* A read of up to `n` bytes into `buf` from socket `fd`: `nr` as the program
 * called it (read or recvfrom), made untraced as recvfrom with `flags`
 * (MSG_DONTWAIT added on a blocking socket). Falls back to the traced call
 * when it would block. */
static long hs_sock_read(long nr, int fd, void *buf, size_t n, int flags, long a4, long a5) {
    int kind = hs_fd(fd);
    struct hs_hdr *h = (!(kind & FD_SOCK) || (flags & MSG_PEEK)) ? NULL : hs_enter();
    if (!h)
        return hs_traced(nr, fd, (long)buf, n, nr == SYS_read ? 0 : flags, a4, a5);
    long ret;
    if (h->mode == MODE_RECORD) {
        size_t cap = n > 65536 ? 65536 : n;
        struct hs_rec *r = hs_reserve(h, nr, fd, cap + 132);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, fd, (long)buf, n, nr == SYS_read ? 0 : flags, a4, a5);
        }
        int f = flags | ((kind & FD_NONBLOCK) ? 0 : MSG_DONTWAIT);
        ret = hs_untraced(SYS_recvfrom, fd, (long)buf, cap, f, nr == SYS_read ? 0 : a4,
                          nr == SYS_read ? 0 : a5);
        r->ret = ret;
        if (ret == -EAGAIN && !(kind & FD_NONBLOCK)) {
            /* A blocking socket with nothing to read: the program waits, traced. */
            r->flags = F_FALLBACK;
            hs_commit(h, r);
            hs_leave(h);
            return hs_traced(nr, fd, (long)buf, n, nr == SYS_read ? 0 : flags, a4, a5);
        }
        if (ret > 0) {
            memcpy(r->data, buf, (size_t)ret);
            r->data_len = (uint32_t)ret;
        }
        if (ret >= 0 && nr == SYS_recvfrom && a4 && a5) {
            /* The peer's address: replay writes it back. */
            uint32_t alen = *(uint32_t *)a5;
            if (alen > 128)
                alen = 128;
            {
                memcpy(r->data + r->data_len, (void *)a5, 4);
                memcpy(r->data + r->data_len + 4, (void *)a4, alen);
                r->data_len += 4 + alen;
                r->rsv = 1;
            }
        }
        hs_commit(h, r);
    } else {
        struct hs_rec *r = hs_next(h, nr, fd);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, fd, (long)buf, n, nr == SYS_read ? 0 : flags, a4, a5);
        }
        ret = r->ret;
        if (r->flags & F_FALLBACK) {
            hs_leave(h);
            return hs_traced(nr, fd, (long)buf, n, nr == SYS_read ? 0 : flags, a4, a5);
        }
        uint32_t body = r->data_len;
        if (r->rsv == 1 && ret >= 0 && a4 && a5) {
            uint32_t alen;
            body = ret > 0 ? (uint32_t)ret : 0;
            memcpy(&alen, r->data + body, 4);
            memcpy((void *)a5, r->data + body, 4);
            memcpy((void *)a4, r->data + body + 4, alen);
        }
        if (ret > 0)
            memcpy(buf, r->data, ret > 0 && (uint32_t)ret < body ? (size_t)ret : body);
    }
    hs_leave(h);
    return ret;
}

ssize_t read(int fd, void *buf, size_t n) {
    return hs_ret(hs_sock_read(SYS_read, fd, buf, n, 0, 0, 0));
}

ssize_t __read(int fd, void *buf, size_t n) { return read(fd, buf, n); }

ssize_t recv(int fd, void *buf, size_t n, int flags) {
    return hs_ret(hs_sock_read(SYS_recvfrom, fd, buf, n, flags, 0, 0));
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *a, socklen_t *al) {
    return hs_ret(hs_sock_read(SYS_recvfrom, fd, buf, n, flags, (long)a, (long)al));
}

/* ---- socket writes ------------------------------------------------------ */

/* Replay: keep what the program writes to a socket, for the rebuild of its
 * connection at a takeover (the supervisor keeps the connections' part). */
static int hs_outbox(struct hs_hdr *h, int fd, const struct iovec *iov, int cnt, size_t n) {
    if (h->outbox_len + 8 + n > h->outbox_cap)
        return -1;
    unsigned char *o = (unsigned char *)h->outbox + h->outbox_len;
    uint32_t fd32 = (uint32_t)fd, n32 = (uint32_t)n;
    memcpy(o, &fd32, 4);
    memcpy(o + 4, &n32, 4);
    size_t at = 8, left = n;
    for (int i = 0; i < cnt && left; i++) {
        size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
        memcpy(o + at, iov[i].iov_base, take);
        at += take;
        left -= take;
    }
    h->outbox_len += (8 + n + 7) & ~7ull;
    return 0;
}

/* A write of the iovecs to non-blocking socket `fd`, `nr` as the program
 * called it (write, writev, send, sendto, sendmsg): made untraced as is. */
static long hs_sock_write(long nr, int fd, const struct iovec *iov, int cnt, long a1, long a2,
                          long a3, long a4, long a5) {
    int kind = hs_fd(fd);
    struct hs_hdr *h = ((kind & (FD_SOCK | FD_NONBLOCK)) == (FD_SOCK | FD_NONBLOCK)) ? hs_enter() : NULL;
    if (!h)
        return hs_traced(nr, fd, a1, a2, a3, a4, a5);
    long ret;
    if (h->mode == MODE_RECORD) {
        struct hs_rec *r = hs_reserve(h, nr, fd, 0);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, fd, a1, a2, a3, a4, a5);
        }
        ret = hs_untraced(nr, fd, a1, a2, a3, a4, a5);
        r->ret = ret;
        if (ret > 0) {
            size_t left = (size_t)ret;
            uint64_t hv = 0;
            for (int i = 0; i < cnt && left; i++) {
                size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
                hv = hs_hash(iov[i].iov_base, take, hv);
                left -= take;
            }
            r->hash = hv;
            h->wrote = 1;
        }
        hs_commit(h, r);
    } else {
        struct hs_rec *r = hs_next(h, nr, fd);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, fd, a1, a2, a3, a4, a5);
        }
        ret = r->ret;
        if (ret > 0) {
            size_t left = (size_t)ret;
            uint64_t hv = 0;
            for (int i = 0; i < cnt && left; i++) {
                size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
                hv = hs_hash(iov[i].iov_base, take, hv);
                left -= take;
            }
            if (left) {
                h->fault = FAULT_SHORT;
                h->fault_nr = (uint32_t)nr;
            } else if (hv != r->hash) {
                h->fault = FAULT_HASH;
                h->fault_nr = (uint32_t)nr;
            } else if (hs_outbox(h, fd, iov, cnt, (size_t)ret) != 0) {
                /* Full: the supervisor drains it (not a logged call) and
                 * this write is kept again. */
                hs_leave(h);
                hs_traced(HS_SYS_DRAIN, 0, 0, 0, 0, 0, 0);
                h->locked = 1;
                hs_outbox(h, fd, iov, cnt, (size_t)ret);
            }
        }
    }
    hs_leave(h);
    return ret;
}

ssize_t write(int fd, const void *buf, size_t n) {
    struct iovec v = {(void *)buf, n};
    return hs_ret(hs_sock_write(SYS_write, fd, &v, 1, (long)buf, n, 0, 0, 0));
}

ssize_t __write(int fd, const void *buf, size_t n) { return write(fd, buf, n); }

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    return hs_ret(hs_sock_write(SYS_writev, fd, iov, cnt, (long)iov, cnt, 0, 0, 0));
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    struct iovec v = {(void *)buf, n};
    return hs_ret(hs_sock_write(SYS_sendto, fd, &v, 1, (long)buf, n, flags, 0, 0));
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a,
               socklen_t al) {
    struct iovec v = {(void *)buf, n};
    if (a)
        return hs_ret(hs_traced(SYS_sendto, fd, (long)buf, n, flags, (long)a, al));
    return hs_ret(hs_sock_write(SYS_sendto, fd, &v, 1, (long)buf, n, flags, 0, 0));
}

ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    if (m->msg_name || m->msg_controllen)
        return hs_ret(hs_traced(SYS_sendmsg, fd, (long)m, flags, 0, 0, 0));
    return hs_ret(hs_sock_write(SYS_sendmsg, fd, m->msg_iov, (int)m->msg_iovlen, (long)m, flags,
                                0, 0, 0));
}

/* ---- epoll ------------------------------------------------------------------ */

/* Tried with a zero timeout; when nothing is ready and the program would
 * wait, the wait itself is traced. */
static long hs_epoll(long nr, int epfd, struct epoll_event *ev, int max, int timeout,
                     const sigset_t *mask) {
    long a5 = nr == SYS_epoll_pwait ? (long)mask : 0, a6 = nr == SYS_epoll_pwait ? 8 : 0;
    struct hs_hdr *h = (max > 0 && max <= 1024 && (nr == SYS_epoll_wait || !mask)) ? hs_enter() : NULL;
    if (!h)
        return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
    long ret;
    if (h->mode == MODE_RECORD && h->eager && h->wrote) {
        /* Replies wait in the output rule for this batch: log it now. */
        hs_leave(h);
        return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
    }
    if (h->mode == MODE_RECORD) {
        size_t cap = (size_t)max * sizeof *ev;
        struct hs_rec *r = hs_reserve(h, nr, epfd, cap);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
        }
        ret = hs_untraced(SYS_epoll_wait, epfd, (long)ev, max, 0, 0, 0);
        r->ret = ret;
        if (ret == 0 && timeout != 0) {
            r->flags = F_FALLBACK;
            hs_commit(h, r);
            hs_leave(h);
            return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
        }
        if (ret > 0) {
            memcpy(r->data, ev, (size_t)ret * sizeof *ev);
            r->data_len = (uint32_t)(ret * sizeof *ev);
        }
        hs_commit(h, r);
    } else {
        struct hs_rec *r = hs_next(h, nr, epfd);
        if (!r) {
            hs_leave(h);
            return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
        }
        ret = r->ret;
        if (r->flags & F_FALLBACK) {
            hs_leave(h);
            return hs_traced(nr, epfd, (long)ev, max, timeout, a5, a6);
        }
        if (ret > 0)
            memcpy(ev, r->data, r->data_len);
    }
    hs_leave(h);
    return ret;
}

int epoll_wait(int epfd, struct epoll_event *ev, int max, int timeout) {
    return (int)hs_ret(hs_epoll(SYS_epoll_wait, epfd, ev, max, timeout, NULL));
}

int epoll_pwait(int epfd, struct epoll_event *ev, int max, int timeout, const sigset_t *mask) {
    return (int)hs_ret(hs_epoll(SYS_epoll_pwait, epfd, ev, max, timeout, mask));
}
