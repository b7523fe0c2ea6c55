/* C glue of petasus.na.ofi, compiled into the cffi extension with the declarations of _cdefs.h.
 *
 * The libfabric calls themselves need no glue: in API mode cffi compiles a call site for each
 * static inline function declared in _cdefs.h. What lives here is what the headers spell only
 * as macros, and the one system call Python 3.11's os module lacks.
 */
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_tagged.h>
#include <string.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* The API version petasus was written against (mr_mode bits, FI_CONTEXT2: 1.5 and later). */
static int petasus_fi_version(void)
{
    return FI_VERSION(1, 9);
}

/* A periodic timer descriptor: the poll_fd of providers with no wait object (see plugin.py). */
static int petasus_timerfd(long interval_us)
{
    struct itimerspec spec;
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0)
        return -1;
    spec.it_interval.tv_sec = interval_us / 1000000;
    spec.it_interval.tv_nsec = (interval_us % 1000000) * 1000;
    spec.it_value = spec.it_interval;
    if (timerfd_settime(fd, 0, &spec, NULL) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}
