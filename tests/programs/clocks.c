// Reads the time-stamp counter, clocks and getrandom in a loop.
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <sys/random.h>
#include <x86intrin.h>

int main(void) {
    for (int i = 0; i < 20; i++) {
        unsigned aux = 0;
        uint64_t a = __rdtsc();
        uint64_t b = __rdtscp(&aux);
        struct timespec rt, mono;
        clock_gettime(CLOCK_REALTIME, &rt);
        clock_gettime(CLOCK_MONOTONIC, &mono);
        unsigned char r[16];
        if (getrandom(r, sizeof r, 0) != sizeof r) return 1;
        printf("%d tsc=%llu tscp=%llu aux=%u rt=%lld.%09ld mono=%lld.%09ld rnd=", i, (unsigned long long)a,
               (unsigned long long)b, aux, (long long)rt.tv_sec, rt.tv_nsec, (long long)mono.tv_sec, mono.tv_nsec);
        for (int k = 0; k < 16; k++) printf("%02x", r[k]);
        printf("\n");
    }
    return 0;
}
