/* A TCP relay whose bytes never leave the kernel: BPF sockmap, for bench/sockmap.py.
 *
 * The question it answers: would an SK_SKB verdict program that redirects each
 * socket's input to its peer's egress (no splice(2) calls, no wakeups of the
 * relay per window) beat the native engine's splice relay? It is a probe, not a
 * product: one thread per connection, loopback only.
 *
 *     sockmap_probe LISTEN_PORT UPSTREAM_PORT      (both on 127.0.0.1)
 *
 * Setup (exit status 2 when the kernel refuses any of it, 1 on other errors):
 * a BPF_MAP_TYPE_SOCKHASH keyed by socket cookie, whose value for socket S is
 * S's peer; a BPF_PROG_TYPE_SK_SKB program attached to the map as stream verdict:
 *
 *     if (skb->len == 0) return SK_DROP;   the FIN's empty skb: forwarding it
 *                                          fails the peer's egress with EPIPE
 *     key = bpf_get_socket_cookie(skb);
 *     return bpf_sk_redirect_hash(skb, map, &key, 0);   0: the peer's egress
 *
 * assembled here as instructions (no clang on these machines) and loaded with
 * bpf(2). Per connection: connect upstream, put both sockets in the map, kick
 * each (setting SO_RCVLOWAT runs sk_data_ready, so bytes that were queued before
 * the socket entered the map are redirected too; nothing else would), then only
 * watch for EOF and errors: a FIN does not go through the verdict program, so the
 * half-close is forwarded here, once TCP_INFO shows that every byte received
 * before the FIN has been written to the peer.
 *
 * When a connection ends it prints `backlog PEAK`: the most bytes seen received by
 * one socket and not yet written to its peer (sampled every 10 ms), i.e. what the
 * kernel was holding in the peer's psock queue: a splice relay holds at most its
 * pipe.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define INSN(c, d, s, o, i) \
    ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})

static int map_fd = -1;
static struct sockaddr_in upstream;

static long bpf(int cmd, union bpf_attr *attr)
{
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

/* 0, or the errno of the step that failed (printed). */
static int setup(void)
{
    static char log[65536];
    union bpf_attr a;
    int prog_fd;
    struct bpf_insn prog[] = {
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),                  /* r6 = skb */
        INSN(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(struct __sk_buff, len), 0),
        INSN(BPF_JMP | BPF_JNE | BPF_K, 2, 0, 2, 0),                    /* len != 0: on */
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_DROP),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),  /* r1 = skb */
        INSN(BPF_STX | BPF_MEM | BPF_DW, 10, 0, -8, 0),                 /* key on stack */
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
        INSN(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, 0),    /* r2 = map */
        INSN(0, 0, 0, 0, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),
        INSN(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -8),                 /* r3 = &key */
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),                  /* egress */
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };

    memset(&a, 0, sizeof(a));
    a.map_type = BPF_MAP_TYPE_SOCKHASH;
    a.key_size = sizeof(uint64_t);
    a.value_size = sizeof(uint32_t);
    a.max_entries = 65536;
    if ((map_fd = (int)bpf(BPF_MAP_CREATE, &a)) < 0) {
        perror("sockmap_probe: BPF_MAP_CREATE (SOCKHASH)");
        return errno;
    }
    prog[8].imm = map_fd;
    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_SK_SKB;
    a.insns = (uintptr_t)prog;
    a.insn_cnt = sizeof(prog) / sizeof(prog[0]);
    a.license = (uintptr_t)"GPL"; /* sk_redirect_hash is GPL-only */
    a.log_buf = (uintptr_t)log;
    a.log_size = sizeof(log);
    a.log_level = 1;
    if ((prog_fd = (int)bpf(BPF_PROG_LOAD, &a)) < 0) {
        int err = errno;
        fprintf(stderr, "sockmap_probe: BPF_PROG_LOAD: %s\n%s\n", strerror(err), log);
        return err;
    }
    memset(&a, 0, sizeof(a));
    a.target_fd = (uint32_t)map_fd;
    a.attach_bpf_fd = (uint32_t)prog_fd;
    a.attach_type = BPF_SK_SKB_STREAM_VERDICT;
    if (bpf(BPF_PROG_ATTACH, &a) != 0) {
        perror("sockmap_probe: BPF_PROG_ATTACH (stream verdict)");
        return errno;
    }
    return 0; /* the map holds the program; both live as long as the process */
}

/* fd's input goes to peer from now on. */
static int redirect(int fd, int peer)
{
    uint64_t cookie;
    uint32_t value = (uint32_t)peer;
    socklen_t len = sizeof(cookie);
    union bpf_attr a;
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) != 0)
        return -1;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map_fd;
    a.key = (uintptr_t)&cookie;
    a.value = (uintptr_t)&value;
    a.flags = BPF_ANY;
    return (int)bpf(BPF_MAP_UPDATE_ELEM, &a);
}

/* Bytes received (the FIN counts one) or written so far (acked + still queued). */
static int counters(int fd, uint64_t *received, uint64_t *written)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    int queued = 0;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0 ||
        ioctl(fd, SIOCOUTQ, &queued) != 0)
        return -1;
    *received = info.tcpi_bytes_received;
    *written = info.tcpi_bytes_acked + (uint64_t)queued;
    return 0;
}

static void reset(int fd)
{
    struct linger lg = {1, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Relays until both directions ended (or one failed); *peak: see the top. */
static void relay(int fd[2], uint64_t *peak)
{
    uint64_t written_before[2], received, written, unused;
    int i, one = 1, done[2] = {0, 0};
    for (i = 0; i < 2; i++) {
        if (counters(fd[i], &unused, &written_before[i]) != 0 ||
            redirect(fd[i], fd[1 - i]) != 0) {
            perror("sockmap_probe: into the map");
            reset(fd[0]);
            reset(fd[1]);
            return;
        }
    }
    for (i = 0; i < 2; i++) /* kick: what was queued before goes through the map too */
        if (setsockopt(fd[i], SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one)) != 0)
            perror("sockmap_probe: SO_RCVLOWAT");
    while (!(done[0] && done[1])) {
        struct pollfd p[2] = {{fd[0], POLLRDHUP, 0}, {fd[1], POLLRDHUP, 0}};
        if (poll(p, 2, 10) < 0 && errno != EINTR)
            break;
        for (i = 0; i < 2; i++) {
            if (p[i].revents & POLLERR) { /* a reset: the other side gets one too */
                reset(fd[1 - i]);
                return;
            }
            if (counters(fd[i], &received, &unused) != 0 ||
                counters(fd[1 - i], &unused, &written) != 0)
                return;
            if (received > written - written_before[1 - i] + 1 &&
                received - (written - written_before[1 - i]) > *peak)
                *peak = received - (written - written_before[1 - i]);
            if (done[i] || !(p[i].revents & (POLLRDHUP | POLLHUP)))
                continue;
            if (written - written_before[1 - i] + 1 < received)
                continue; /* still on its way through the peer's egress queue */
            if (shutdown(fd[1 - i], SHUT_WR) != 0 && errno != ENOTCONN)
                return;
            done[i] = 1;
        }
    }
}

static void *connection(void *arg)
{
    int fd[2] = {(int)(intptr_t)arg, socket(AF_INET, SOCK_STREAM, 0)};
    uint64_t peak = 0;
    if (fd[1] < 0 || connect(fd[1], (struct sockaddr *)&upstream, sizeof(upstream)) != 0) {
        perror("sockmap_probe: upstream");
    } else {
        relay(fd, &peak);
        printf("backlog %llu\n", (unsigned long long)peak);
        fflush(stdout);
    }
    close(fd[0]);
    if (fd[1] >= 0)
        close(fd[1]);
    return NULL;
}

int main(int argc, char **argv)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    int listener, one = 1, err;
    if (argc != 3) {
        fprintf(stderr, "usage: sockmap_probe LISTEN_PORT UPSTREAM_PORT (on 127.0.0.1)\n");
        return 1;
    }
    if ((err = setup()) != 0)
        return err == EPERM || err == ENOSYS || err == EINVAL || err == EOPNOTSUPP ? 2 : 1;
    upstream.sin_family = AF_INET;
    upstream.sin_port = htons((uint16_t)atoi(argv[2]));
    upstream.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons((uint16_t)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if ((listener = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(listener, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(listener, 128) != 0) {
        perror("sockmap_probe: listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        pthread_t thread;
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            continue;
        if (pthread_create(&thread, NULL, connection, (void *)(intptr_t)fd) != 0) {
            close(fd);
            continue;
        }
        pthread_detach(thread);
    }
}
