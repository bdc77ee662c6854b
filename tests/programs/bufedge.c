// The syscall buffer's edges, in one program whose output is a digest of
// everything the outside world told it (so replay must give it the same):
// - a TCP connection to itself over loopback (sockets are the outside
//   world: reads, writes and epoll go through the buffer), with one thread
//   writing while another waits in epoll and reads;
// - a thread blocked in a traced read of a pipe while the others run;
// - SIGALRM at 1 kHz arriving while threads are inside buffered calls,
//   with a handler that makes buffered calls itself;
// - syscall(2) made directly (the traced path, not the wrappers);
// - more buffered calls in a row than the buffer holds (70,000 clock
//   reads: the buffer fills and the library goes traced, then on);
// - vfork + exec from a process that uses the buffer.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t digest = 1469598103934665603ull;
static pthread_mutex_t dlock = PTHREAD_MUTEX_INITIALIZER;
static void mix(const void *p, size_t n) {
    const unsigned char *b = p;
    pthread_mutex_lock(&dlock);
    for (size_t i = 0; i < n; i++) {
        digest ^= b[i];
        digest *= 1099511628211ull;
    }
    pthread_mutex_unlock(&dlock);
}

static volatile sig_atomic_t ticks;
static struct timespec in_handler[64];
static void on_alarm(int sig) {
    (void)sig;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); // a buffered call in a handler
    if (ticks < 64)
        in_handler[ticks] = ts;
    ticks++;
}

static int srv, cli, pfd[2];
enum { MSGS = 3000 };

static void *writer(void *arg) {
    (void)arg;
    char msg[64];
    for (int i = 0; i < MSGS; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int n = snprintf(msg, sizeof msg, "%d:%ld\n", i, (long)(ts.tv_nsec % 1000));
        const char *p = msg;
        while (n > 0) {
            ssize_t w = write(cli, p, n);
            if (w < 0 && errno == EAGAIN) {
                usleep(100);
                continue;
            }
            if (w < 0)
                return (void *)1;
            p += w;
            n -= w;
        }
    }
    shutdown(cli, SHUT_WR);
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = srv};
    epoll_ctl(ep, EPOLL_CTL_ADD, srv, &ev);
    char buf[4096];
    long total = 0;
    for (;;) {
        struct epoll_event out[4];
        int n = epoll_wait(ep, out, 4, 1000);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        ssize_t r = read(srv, buf, sizeof buf);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r <= 0)
            break;
        mix(buf, (size_t)r);
        total += r;
    }
    close(ep);
    return (void *)total;
}

static void *piper(void *arg) {
    (void)arg;
    char c;
    // Blocks (traced) until main writes, while the others run.
    ssize_t r = read(pfd[0], &c, 1);
    mix(&c, r > 0 ? 1 : 0);
    return NULL;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);

    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&a, &al))
        return 2;
    cli = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(cli, (struct sockaddr *)&a, sizeof a))
        return 3;
    srv = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    fcntl(cli, F_SETFL, fcntl(cli, F_GETFL) | O_NONBLOCK);
    if (pipe(pfd))
        return 4;

    // More buffered calls in a row than one buffer holds (before any
    // other thread or timer could ask for a traced call).
    struct timespec ts, last = {0, 0};
    long back = 0;
    for (int i = 0; i < 70000; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if (ts.tv_sec < last.tv_sec || (ts.tv_sec == last.tv_sec && ts.tv_nsec < last.tv_nsec))
            back++;
        last = ts;
        if (i % 10000 == 0) {
            // A direct syscall(2): the traced path.
            struct timespec d;
            syscall(SYS_clock_gettime, CLOCK_REALTIME, &d);
            mix(&d, sizeof d);
        }
    }
    mix(&last, sizeof last);
    struct itimerval it = {{0, 1000}, {0, 1000}};
    setitimer(ITIMER_REAL, &it, NULL);

    pthread_t tw, tr, tp;
    pthread_create(&tp, NULL, piper, NULL);
    pthread_create(&tr, NULL, reader, NULL);
    pthread_create(&tw, NULL, writer, NULL);

    void *wr, *rd;
    pthread_join(tw, &wr);
    pthread_join(tr, &rd);
    if (write(pfd[1], "x", 1) != 1)
        return 5;
    pthread_join(tp, NULL);

    it.it_value.tv_usec = it.it_interval.tv_usec = 0;
    setitimer(ITIMER_REAL, &it, NULL);
    int t = ticks < 64 ? ticks : 64;
    mix(in_handler, sizeof(struct timespec) * (size_t)t);

    // vfork + exec from a process that uses the buffer.
    pid_t c = vfork();
    if (c == 0) {
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(c, &st, 0);
    gettimeofday((struct timeval *)&ts, NULL);

    printf("bytes=%ld writer=%ld monotonic-backwards=%ld vfork-child=%d ticks>0=%d digest=%016llx\n",
           (long)rd, (long)wr, back, WEXITSTATUS(st), ticks > 0, (unsigned long long)digest);
    return 0;
}
