/*
 * fcntl_writers: the old design logd replaces. N forked writer processes
 * append fixed-size lines to ONE shared file, each line under an exclusive
 * fcntl(F_SETLKW) lock on the whole file, optionally with fdatasync before
 * the lock is released (the only way such a line is durable when its
 * writer returns).
 *
 *   fcntl_writers -n WRITERS -d SECONDS -f FILE [-s] [-b LINE_BYTES]
 *
 * Runs for a fixed duration, then prints one JSON object: ops/s, MB/s,
 * per-line latency percentiles (lock + write [+ fdatasync] + unlock), the
 * writers' CPU time (getrusage of the children) and their peak RSS, and
 * whether the file holds exactly ops * LINE_BYTES bytes (no torn or lost
 * line).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SUB 16                 /* sub-buckets per power of two (~6% error) */
#define NBUCKETS (SUB * 48)

struct slot {
    uint64_t ops;
    uint64_t hist[NBUCKETS];
    int failed;
};

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
    int e = 63 - __builtin_clzll(v); /* e >= 4 */
    int sub = (int)(v >> (e - 4)) - SUB;
    int i = (e - 3) * SUB + sub;
    return i < NBUCKETS ? i : NBUCKETS - 1;
}

static double bucket_value(int i)
{
    if (i < SUB)
        return i;
    int e = i / SUB + 3, sub = i % SUB;
    double lo = (double)((uint64_t)(SUB + sub) << (e - 4));
    return lo + (double)(1ull << (e - 4)) / 2.0;
}

static double quantile_ms(const uint64_t *h, uint64_t total, double q)
{
    if (total == 0)
        return 0.0;
    uint64_t want = (uint64_t)(q * (double)total);
    if (want < 1)
        want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += h[i];
        if (seen >= want)
            return bucket_value(i) / 1e6;
    }
    return bucket_value(NBUCKETS - 1) / 1e6;
}

static void usage(void)
{
    fprintf(stderr, "usage: fcntl_writers -n WRITERS -d SECONDS -f FILE [-s] [-b LINE_BYTES]\n");
    exit(2);
}

static int writer(int id, const char *path, int sync, size_t line_bytes, uint64_t deadline,
                  struct slot *slot)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    char *line = malloc(line_bytes);
    if (!line)
        return 1;
    memset(line, 'x', line_bytes);
    line[line_bytes - 1] = '\n';
    for (uint64_t n = 0;; n++) {
        uint64_t t0 = now_ns();
        if (t0 >= deadline)
            break;
        char prefix[48];
        int k = snprintf(prefix, sizeof prefix, "w%02d %012llu ", id, (unsigned long long)n);
        if (k > 0 && (size_t)k < line_bytes)
            memcpy(line, prefix, (size_t)k);
        struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        while (fcntl(fd, F_SETLKW, &lk) < 0) {
            if (errno != EINTR) {
                perror("fcntl(F_SETLKW)");
                return 1;
            }
        }
        ssize_t w = write(fd, line, line_bytes);
        if (w != (ssize_t)line_bytes) {
            perror("write");
            return 1;
        }
        if (sync && fdatasync(fd) < 0) {
            perror("fdatasync");
            return 1;
        }
        lk.l_type = F_UNLCK;
        if (fcntl(fd, F_SETLK, &lk) < 0) {
            perror("fcntl(F_UNLCK)");
            return 1;
        }
        slot->hist[bucket_of(now_ns() - t0)]++;
        slot->ops++;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    int n = 1, sync = 0, opt;
    double seconds = 3.0;
    size_t line_bytes = 256;
    const char *path = NULL;
    while ((opt = getopt(argc, argv, "n:d:f:sb:")) != -1) {
        switch (opt) {
        case 'n': n = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'f': path = optarg; break;
        case 's': sync = 1; break;
        case 'b': line_bytes = (size_t)atol(optarg); break;
        default: usage();
        }
    }
    if (!path || n < 1 || n > 4096 || seconds <= 0 || line_bytes < 2)
        usage();

    /* Start from an empty file. */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    close(fd);

    size_t shm_bytes = sizeof(struct slot) * (size_t)n;
    struct slot *slots = mmap(NULL, shm_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (slots == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(slots, 0, shm_bytes);

    /* Children block on the pipe until every one is forked. */
    int gate[2];
    if (pipe(gate) < 0) {
        perror("pipe");
        return 1;
    }
    uint64_t *deadline = mmap(NULL, sizeof *deadline, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (deadline == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids)
        return 1;
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("fork");
            return 1;
        }
        if (p == 0) {
            close(gate[1]);
            char c;
            while (read(gate[0], &c, 1) < 0 && errno == EINTR) {
            }
            int rc = writer(i, path, sync, line_bytes, *deadline, &slots[i]);
            slots[i].failed = rc;
            _exit(rc);
        }
        pids[i] = p;
    }
    uint64_t start = now_ns();
    *deadline = start + (uint64_t)(seconds * 1e9);
    close(gate[1]); /* open the gate */
    close(gate[0]);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        int st;
        while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            failed++;
    }
    double elapsed = (double)(now_ns() - start) / 1e9;

    static uint64_t hist[NBUCKETS];
    uint64_t ops = 0;
    for (int i = 0; i < n; i++) {
        ops += slots[i].ops;
        for (int b = 0; b < NBUCKETS; b++)
            hist[b] += slots[i].hist[b];
    }
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    struct stat sb;
    long long file_bytes = stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
    int file_ok = file_bytes == (long long)(ops * line_bytes);

    printf("{\"tool\":\"fcntl_writers\",\"writers\":%d,\"fdatasync\":%s,\"line_bytes\":%zu,"
           "\"seconds\":%.3f,\"ops\":%llu,\"ops_per_sec\":%.1f,\"mb_per_sec\":%.2f,"
           "\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,\"max_ms\":%.4f,"
           "\"cpu_seconds\":%.3f,\"max_rss_kb\":%ld,\"file_bytes\":%lld,\"file_ok\":%s,"
           "\"failed_writers\":%d}\n",
           n, sync ? "true" : "false", line_bytes, elapsed, (unsigned long long)ops,
           (double)ops / elapsed, (double)ops * (double)line_bytes / elapsed / 1e6,
           quantile_ms(hist, ops, 0.5), quantile_ms(hist, ops, 0.99), quantile_ms(hist, ops, 0.999),
           quantile_ms(hist, ops, 1.0), cpu, ru.ru_maxrss, file_bytes, file_ok ? "true" : "false",
           failed);
    return failed || !file_ok ? 1 : 0;
}
