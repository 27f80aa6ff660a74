/* Preloaded before libfaketime by tests/integration/test_clock.py.
 *
 * libfaketime 0.9.10 (Debian bookworm) with DONT_FAKE_MONOTONIC=1 answers EINVAL to
 * clock_nanosleep() on CLOCK_MONOTONIC, which is how Python's time.sleep() sleeps: every
 * time.sleep() in the gateway (and in pynetdicom) would raise OSError.  The monotonic clock
 * is not faked, so sleeping on it goes straight to the kernel; any other clock is left to
 * libfaketime.  Built by the test with `cc -shared -fPIC`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req,
                    struct timespec *rem) {
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (clock == CLOCK_MONOTONIC || clock == CLOCK_BOOTTIME) {
        return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == 0 ? 0 : errno;
    }
    if (next == NULL) {
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))dlsym(
            RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock, flags, req, rem);
}
