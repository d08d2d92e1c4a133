/*
 * slow_fsync.so: an LD_PRELOAD shim that makes every fsync(2) and
 * fdatasync(2) of the process take SLOW_FSYNC_US microseconds longer
 * (default 1000): it sleeps, then calls the real function (dlsym
 * RTLD_NEXT). It models a disk without a volatile write cache, where a sync
 * waits for the media.
 *
 *   cc -O2 -Wall -shared -fPIC -o slow_fsync.so slow_fsync.c -ldl
 *   LD_PRELOAD=./slow_fsync.so SLOW_FSYNC_US=1000 logd serve
 *
 * With SLOW_FSYNC_COUNT_FILE set, the number of delayed calls is written to
 * that file when the process exits normally (proof the shim was active).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static sync_fn real_fsync, real_fdatasync;
static long delay_us = 1000;
static unsigned long calls;

static void resolve(void)
{
    if (!real_fsync)
        real_fsync = (sync_fn)dlsym(RTLD_NEXT, "fsync");
    if (!real_fdatasync)
        real_fdatasync = (sync_fn)dlsym(RTLD_NEXT, "fdatasync");
}

__attribute__((constructor)) static void slow_fsync_init(void)
{
    const char *s = getenv("SLOW_FSYNC_US");
    if (s && *s)
        delay_us = atol(s);
    resolve();
}

__attribute__((destructor)) static void slow_fsync_fini(void)
{
    const char *path = getenv("SLOW_FSYNC_COUNT_FILE");
    if (!path || !*path)
        return;
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%lu\n", __atomic_load_n(&calls, __ATOMIC_RELAXED));
        fclose(f);
    }
}

static void delay(void)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    if (delay_us <= 0)
        return;
    struct timespec ts = {.tv_sec = delay_us / 1000000, .tv_nsec = (delay_us % 1000000) * 1000};
    int saved = errno;
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd)
{
    resolve();
    delay();
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    resolve();
    delay();
    return real_fdatasync(fd);
}
