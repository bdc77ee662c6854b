// Driven by setitimer/SIGALRM: waits in pause(), then spins making
// syscalls while the timer keeps firing, and exits after N ticks.
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t ticks;
static volatile long spins_at_tick[64];
static volatile long spins;

static void on_alarm(int sig) {
    (void)sig;
    if (ticks < 64) spins_at_tick[ticks] = spins;
    ticks++;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &it, NULL);
    while (ticks < 10) pause();
    while (ticks < 30) {
        spins++;
        getppid();
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    printf("ticks=%d spins=%ld t=%lld.%09ld\n", (int)ticks, spins, (long long)ts.tv_sec, ts.tv_nsec);
    for (int i = 10; i < 30; i++) printf("tick %d after %ld spins\n", i, spins_at_tick[i]);
    return 0;
}
