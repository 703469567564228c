/* The sender's inner loop for small writes, in C: at 64 or 512 bytes per
 * write a Python call per write made the sender the bottleneck (one core,
 * bench/README.md). bench/gen.py builds this with cc and loads it via ctypes. */
#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Write buf[0:block] to fd `count` times; each write is completed before the
 * next starts, as an application writing one message at a time would.
 * Returns 0, or -errno of the write that failed. */
long send_loop(int fd, const char *buf, size_t block, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        size_t off = 0;
        while (off < block) {
            ssize_t k = send(fd, buf + off, block - off, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            off += (size_t)k;
        }
    }
    return 0;
}
