// A syscall-heavy loop for the recording benchmark: per iteration one
// clock_gettime (emulated on replay), one read of /dev/zero and one write
// to /dev/null (executed on replay).
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int z = open("/dev/zero", O_RDONLY), nul = open("/dev/null", O_WRONLY);
    char buf[64];
    struct timespec ts;
    long sum = 0;
    for (long i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        sum += read(z, buf, sizeof buf);
        sum += write(nul, buf, sizeof buf);
    }
    printf("%ld syscalls, checksum %ld\n", 3 * n, sum);
    return 0;
}
