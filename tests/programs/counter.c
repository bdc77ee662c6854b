// Appends its next number to counter.txt (in the working directory) every
// few milliseconds, and prints "done N" after N numbers. Its state can be
// checked exactly: the file must hold 1..N, no gap, no repetition.
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long delay_us = argc > 2 ? atol(argv[2]) : 2000;
    for (long i = 1; i <= n; i++) {
        int fd = open("counter.txt", O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0) return 2;
        dprintf(fd, "%ld\n", i);
        close(fd);
        struct timespec ts = {0, delay_us * 1000};
        nanosleep(&ts, NULL);
    }
    printf("done %ld\n", n);
    return 0;
}
