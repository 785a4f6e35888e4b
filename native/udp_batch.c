/* Batched UDP for the DNS responder: recvmmsg(2) in, sendmmsg(2) out.
 *
 * A Python loop that reads one datagram per callback spends most of its time
 * in the event loop and in two syscalls per query. Here one call fills up to
 * `slots` datagrams into one buffer (Python reads them through one memoryview),
 * and one call sends every reply of the batch, each to the address its query
 * came from; the addresses never leave C.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <arpa/inet.h>
#include <netinet/in.h>

typedef struct consulate_udp_batch {
    int fd;
    int slots;
    uint32_t slot_size;
    uint8_t *buf;   /* slots * slot_size bytes: datagram i at i * slot_size */
    uint32_t *lens; /* length of datagram i of the last receive (0: dropped, too long) */
    struct sockaddr_storage *addrs;
    struct mmsghdr *msgs;
    struct iovec *iovs;
    struct mmsghdr *out;
    struct iovec *out_iovs;
    uint64_t truncated, send_dropped;
} consulate_udp_batch;

static void consulate_udp_batch_free(consulate_udp_batch *b)
{
    if (b == NULL)
        return;
    free(b->buf);
    free(b->lens);
    free(b->addrs);
    free(b->msgs);
    free(b->iovs);
    free(b->out);
    free(b->out_iovs);
    free(b);
}

/* fd stays the caller's. NULL with errno set when out of memory or the sizes
 * are unusable (EINVAL). */
static consulate_udp_batch *consulate_udp_batch_new(int fd, int slots, uint32_t slot_size)
{
    consulate_udp_batch *b;
    if (slots < 1 || slots > 1024 || slot_size < 512 || slot_size > 65536) {
        errno = EINVAL;
        return NULL;
    }
    if ((b = calloc(1, sizeof(*b))) == NULL)
        return NULL;
    b->fd = fd;
    b->slots = slots;
    b->slot_size = slot_size;
    b->buf = malloc((size_t)slots * slot_size);
    b->lens = calloc((size_t)slots, sizeof(*b->lens));
    b->addrs = calloc((size_t)slots, sizeof(*b->addrs));
    b->msgs = calloc((size_t)slots, sizeof(*b->msgs));
    b->iovs = calloc((size_t)slots, sizeof(*b->iovs));
    b->out = calloc((size_t)slots, sizeof(*b->out));
    b->out_iovs = calloc((size_t)slots, sizeof(*b->out_iovs));
    if (!b->buf || !b->lens || !b->addrs || !b->msgs || !b->iovs || !b->out || !b->out_iovs) {
        consulate_udp_batch_free(b);
        errno = ENOMEM;
        return NULL;
    }
    return b;
}

/* Receive what is waiting, up to `slots` datagrams, without blocking. Returns
 * how many (0 when none), or -errno. A datagram longer than a slot is counted
 * in `truncated` and reported with length 0. */
static int consulate_udp_recv(consulate_udp_batch *b)
{
    int i, n;
    for (i = 0; i < b->slots; i++) {
        b->iovs[i].iov_base = b->buf + (size_t)i * b->slot_size;
        b->iovs[i].iov_len = b->slot_size;
        memset(&b->msgs[i].msg_hdr, 0, sizeof(b->msgs[i].msg_hdr));
        b->msgs[i].msg_hdr.msg_iov = &b->iovs[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
        b->msgs[i].msg_hdr.msg_name = &b->addrs[i];
        b->msgs[i].msg_hdr.msg_namelen = sizeof(b->addrs[i]);
    }
    n = recvmmsg(b->fd, b->msgs, (unsigned)b->slots, MSG_DONTWAIT, NULL);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
    for (i = 0; i < n; i++) {
        if (b->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
            b->lens[i] = 0;
            b->truncated++;
        } else {
            b->lens[i] = b->msgs[i].msg_len;
        }
    }
    return n;
}

/* Send count replies: reply k is data[offsets[k], offsets[k] + lens[k]) to the
 * sender of datagram slots[k] of the last receive. A reply the socket refuses
 * (a full buffer, an unreachable client) is dropped, as the network would drop
 * it, and counted; the others still go. Returns how many were sent. */
static int consulate_udp_send(consulate_udp_batch *b, const char *data, const uint32_t *offsets,
                              const uint32_t *lens, const int *slots, int count)
{
    int k, done = 0, sent = 0, n;
    if (count < 0 || count > b->slots)
        return -EINVAL;
    for (k = 0; k < count; k++) {
        if (slots[k] < 0 || slots[k] >= b->slots)
            return -EINVAL;
        b->out_iovs[k].iov_base = (void *)(data + offsets[k]);
        b->out_iovs[k].iov_len = lens[k];
        memset(&b->out[k].msg_hdr, 0, sizeof(b->out[k].msg_hdr));
        b->out[k].msg_hdr.msg_iov = &b->out_iovs[k];
        b->out[k].msg_hdr.msg_iovlen = 1;
        b->out[k].msg_hdr.msg_name = &b->addrs[slots[k]];
        b->out[k].msg_hdr.msg_namelen = b->msgs[slots[k]].msg_hdr.msg_namelen;
    }
    while (done < count) {
        n = sendmmsg(b->fd, b->out + done, (unsigned)(count - done), MSG_DONTWAIT);
        if (n > 0) {
            done += n;
            sent += n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            b->send_dropped += (uint64_t)(count - done);
            break;
        }
        b->send_dropped++; /* this one reply failed: skip it, send the rest */
        done++;
    }
    return sent;
}

/* The IPv4 address and port (host order) of datagram `slot` of the last receive:
 * for the rare reply that cannot go in the batch (a forwarded query). 0 or
 * -errno (EINVAL: no such slot, EAFNOSUPPORT: not IPv4). */
static int consulate_udp_peer(consulate_udp_batch *b, int slot, uint32_t *addr, uint16_t *port)
{
    const struct sockaddr_in *sin;
    if (slot < 0 || slot >= b->slots)
        return -EINVAL;
    sin = (const struct sockaddr_in *)&b->addrs[slot];
    if (sin->sin_family != AF_INET)
        return -EAFNOSUPPORT;
    *addr = ntohl(sin->sin_addr.s_addr);
    *port = ntohs(sin->sin_port);
    return 0;
}
