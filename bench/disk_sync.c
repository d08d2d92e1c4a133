/*
 * disk_sync: what the disk allows for synchronous commits. A loop of
 * write(BYTES) + fdatasync for a fixed duration, either appending to a new
 * file (every sync also commits a size change: the journal) or overwriting
 * a preallocated, already-synced region in place (-o).
 *
 *   disk_sync -b BYTES -d SECONDS -f FILE [-o] [-r REGION_BYTES]
 *
 * Prints one JSON object: syncs/s, MB/s and the write+fdatasync latency
 * percentiles.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SUB 16
#define NBUCKETS (SUB * 48)

static uint64_t hist[NBUCKETS];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int bucket_of(uint64_t v)
{
    if (v < SUB)
        return (int)v;
    int e = 63 - __builtin_clzll(v);
    int i = (e - 3) * SUB + (int)(v >> (e - 4)) - SUB;
    return i < NBUCKETS ? i : NBUCKETS - 1;
}

static double bucket_value(int i)
{
    if (i < SUB)
        return i;
    int e = i / SUB + 3, sub = i % SUB;
    return (double)((uint64_t)(SUB + sub) << (e - 4)) + (double)(1ull << (e - 4)) / 2.0;
}

static double quantile_ms(uint64_t total, double q)
{
    if (total == 0)
        return 0.0;
    uint64_t want = (uint64_t)(q * (double)total), seen = 0;
    if (want < 1)
        want = 1;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen >= want)
            return bucket_value(i) / 1e6;
    }
    return bucket_value(NBUCKETS - 1) / 1e6;
}

static void usage(void)
{
    fprintf(stderr, "usage: disk_sync -b BYTES -d SECONDS -f FILE [-o] [-r REGION_BYTES]\n");
    exit(2);
}

static int write_all(int fd, const char *buf, size_t len, off_t off, int positional)
{
    while (len > 0) {
        ssize_t w = positional ? pwrite(fd, buf, len, off) : write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

int main(int argc, char **argv)
{
    size_t bytes = 4096;
    double seconds = 3.0;
    const char *path = NULL;
    int overwrite = 0, opt;
    size_t region = 64u << 20;
    while ((opt = getopt(argc, argv, "b:d:f:or:")) != -1) {
        switch (opt) {
        case 'b': bytes = (size_t)atol(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'f': path = optarg; break;
        case 'o': overwrite = 1; break;
        case 'r': region = (size_t)atol(optarg); break;
        default: usage();
        }
    }
    if (!path || bytes == 0 || seconds <= 0 || region < bytes)
        usage();
    char *buf;
    if (posix_memalign((void **)&buf, 4096, bytes) != 0)
        return 1;
    for (size_t i = 0; i < bytes; i++)
        buf[i] = (char)('a' + i % 26);

    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    size_t slots = region / bytes;
    if (overwrite) {
        /* Preallocate by writing the region once, then sync it: later
         * writes change no size and allocate no block. */
        for (size_t i = 0; i < slots; i++)
            if (write_all(fd, buf, bytes, (off_t)(i * bytes), 1) < 0) {
                perror("write");
                return 1;
            }
        if (fsync(fd) < 0) {
            perror("fsync");
            return 1;
        }
    }
    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9), n = 0, t0;
    while ((t0 = now_ns()) < deadline) {
        if (write_all(fd, buf, bytes, (off_t)((n % slots) * bytes), overwrite) < 0) {
            perror("write");
            return 1;
        }
        if (fdatasync(fd) < 0) {
            perror("fdatasync");
            return 1;
        }
        hist[bucket_of(now_ns() - t0)]++;
        n++;
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    close(fd);
    printf("{\"tool\":\"disk_sync\",\"mode\":\"%s\",\"block_bytes\":%zu,\"seconds\":%.3f,"
           "\"ops\":%llu,\"ops_per_sec\":%.1f,\"mb_per_sec\":%.2f,"
           "\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,\"max_ms\":%.4f}\n",
           overwrite ? "overwrite" : "append", bytes, elapsed, (unsigned long long)n,
           (double)n / elapsed, (double)n * (double)bytes / elapsed / 1e6, quantile_ms(n, 0.5),
           quantile_ms(n, 0.99), quantile_ms(n, 0.999), quantile_ms(n, 1.0));
    return 0;
}
