/* memhog N: allocate N MiB one MiB at a time, writing every page so that it is resident and
 * counted against the container's memory limit, then sleep. Prints its progress, so a test
 * can tell "killed while allocating" from "never started". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 0;
    if (mib <= 0) {
        fprintf(stderr, "usage: memhog MiB\n");
        return 2;
    }
    for (long i = 1; i <= mib; i++) {
        char *block = malloc(1 << 20);
        if (block == NULL) {
            fprintf(stderr, "malloc failed at %ld MiB\n", i);
            return 1;
        }
        memset(block, 1, 1 << 20);
        if (i % 16 == 0) {
            printf("allocated %ld MiB\n", i);
            fflush(stdout);
        }
    }
    printf("holding %ld MiB\n", mib);
    fflush(stdout);
    sleep(3600);
    return 0;
}
