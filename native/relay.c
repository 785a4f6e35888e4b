/* consulate native relay engine (C side).
 *
 * For now this file holds the kernel capability probe the Python side uses to
 * decide between the native engine and the pure-Python relay. The splice(2)
 * relay loop joins it in the native fast-path issue.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

/* Returns 0 when splice(2) can move bytes from a socket into a pipe on this
 * kernel (some seccomp profiles and old kernels refuse it), else an errno. */
static int consulate_splice_probe(void)
{
    int sv[2], pipefd[2], rc = 0;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return errno;
    if (pipe2(pipefd, O_NONBLOCK) != 0) {
        rc = errno;
        close(sv[0]);
        close(sv[1]);
        return rc;
    }
    if (write(sv[0], "x", 1) != 1)
        rc = errno ? errno : EIO;
    else if (splice(sv[1], NULL, pipefd[1], NULL, 1, SPLICE_F_NONBLOCK) != 1)
        rc = errno ? errno : EIO;
    close(sv[0]);
    close(sv[1]);
    close(pipefd[0]);
    close(pipefd[1]);
    return rc;
}
