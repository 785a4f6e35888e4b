/* consulate native relay engine.
 *
 * Python hands the engine pairs of connected, non-blocking sockets; one epoll
 * thread (no GIL, no Python objects) moves the bytes both ways until both
 * directions have ended, then reports the connection's counters back through an
 * eventfd the asyncio loop watches.
 *
 * Each direction starts in copy mode (recv/send through a 16 KiB buffer): for
 * small request/response traffic one recv + one send is cheaper than two
 * splices. When a recv fills the whole buffer the flow is bulk, and the direction
 * switches to splice(2) through a pipe (taken from a pool, sized with
 * F_SETPIPE_SZ), so the payload never crosses into user space. A splice read
 * that returns less than the threshold switches it back. HAProxy makes the same
 * choice (raw_sock_to_pipe, 4 KiB); the crossover on these machines is measured
 * by bench/splice_crossover.py and documented in bench/results/splice-crossover.md.
 * That is the adaptive policy (the default); the engine can also be told to
 * always copy or always splice (see enum below), which is what the benchmark
 * compares it with, and an escape hatch where splice(2) misbehaves.
 *
 * Half-close: when one side reaches EOF and its data is flushed, the other side
 * gets shutdown(SHUT_WR); the connection ends when both directions have. An
 * error (ECONNRESET, EPIPE, ...) on either side resets the other (SO_LINGER 0),
 * so a reset is propagated rather than turned into a clean close.
 *
 * Accepting: the proxy can also give the engine its listening socket and a route
 * table (VIP -> service id and upstream endpoints), computed in Python from the
 * RouteTable and replaced whenever it changes. The engine then accepts, reads
 * the original destination (the accepted socket's own address when BPF sk_lookup
 * steered it, proxy/sklookup.py; SO_ORIGINAL_DST after an iptables REDIRECT), looks
 * the VIP up, picks the candidates with the service's balancer and connects, with
 * no Python on the per-connection path: connection rate is bounded by syscalls,
 * not the interpreter. It keeps per-service counters Python reads when asked, and
 * reports only what Python must log (rejections, failed connects, ejections).
 *
 * Balancing and outlier detection mirror proxy/balance.py and proxy/outlier.py
 * (the Python relay's, tested there by exact sequences): same orders, same hash,
 * same ejection rules. Each endpoint's live state (open connections, consecutive
 * connect failures, ejection, smooth-WRR weight) is a struct upstream shared by
 * the route tables that list it and the connections that use it (reference
 * counted), so it survives the table being replaced at every registry change.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <linux/netfilter_ipv4.h>
#include <time.h>
#include <unistd.h>

#define COPY_BUF_SIZE 16384
#define MAX_EVENTS 256
#define PIPE_POOL_MAX 1024

enum { MODE_COPY = 0, MODE_SPLICE = 1 };
/* Engine-wide policy for switching a direction's mode (values are the API):
 * adaptive = copy first, upgrade on a full recv, drop back below the threshold;
 * copy = never splice; splice = splice from the first read, never drop back. */
enum { POLICY_ADAPTIVE = 0, POLICY_COPY = 1, POLICY_SPLICE = 2 };
enum { REASON_DONE = 0, REASON_ERROR = 1, REASON_IDLE = 2, REASON_STOPPED = 3,
       REASON_CONNECT_FAILED = 4, REASON_UNROUTED = 5, REASON_NO_ENDPOINTS = 6,
       REASON_ACCEPT_FAILED = 7, REASON_EJECTED = 8, REASON_RETURNED = 9,
       REASON_LIMIT_REACHED = 10, REASON_LIMIT_CLEARED = 11 };
/* Which limit a REASON_LIMIT_* result is about (its error field; proxy/limits.py). */
enum { LIMIT_MAX_CONNECTIONS = 0, LIMIT_MAX_PENDING = 1, LIMIT_DESCRIPTORS = 2 };
/* Balancers, in the order of proxy/balance.py's LB_NAMES (values are the API). */
enum { LB_ROUND_ROBIN = 0, LB_LEAST_CONN = 1, LB_P2C = 2, LB_HASH = 3, LB_WEIGHTED = 4 };
#define MAX_CANDIDATES 8
#define ACCEPTS_PER_EVENT 64        /* drain the backlog in batches, then serve the rest */
#define ACCEPT_PAUSE_SECONDS 0.1    /* after EMFILE/ENFILE, instead of spinning */
/* Accepts failing (EMFILE...) are one episode until one works this long after the
 * last failure: descriptors hovering at the limit make a single report. */
#define ACCEPT_EPISODE_QUIET 1.0
#define ACCEPTED_ID_BASE (1ull << 63) /* ids the engine gives connections it accepted */

typedef struct consulate_relay_result {
    uint64_t id;
    uint64_t bytes[2];   /* [0] a->b, [1] b->a */
    uint64_t spliced[2]; /* of which moved by splice(2) */
    int reason;
    int error;            /* errno for REASON_ERROR, last one for REASON_CONNECT_FAILED */
    uint32_t failed_mask; /* bit i: candidate i was tried and failed */
    /* Connections the engine accepted itself (addresses/ports in network order): */
    uint32_t service;     /* the route's service id */
    uint32_t client_addr, dest_addr; /* the client, and the original destination */
    uint16_t client_port, dest_port;
    int ncandidates;      /* the candidates, in the order they were to be tried */
    uint32_t candidate_addr[MAX_CANDIDATES];
    uint16_t candidate_port[MAX_CANDIDATES];
    /* REASON_EJECTED (candidate 0 is the endpoint; REASON_RETURNED sets only it): */
    uint32_t failures, ejections, ejection_ms;
} consulate_relay_result;

typedef struct consulate_relay_stats {
    uint64_t active;
    uint64_t pipes_pooled;
    uint64_t pipes_open;
    uint64_t accepted;
    uint64_t unrouted; /* accepted connections to no VIP in the route table */
    uint64_t overflow; /* accepted connections refused over max_connections */
} consulate_relay_stats;

/* Counters of one service, for the connections the engine accepted. */
typedef struct consulate_service_counters {
    uint64_t connections_total, connections_active, connect_failures, rejected;
    uint64_t bytes_to_upstream, bytes_to_client;
    uint64_t ejections, ejections_active; /* active: counted when read */
    uint64_t bytes_spliced_to_upstream, bytes_spliced_to_client; /* of the bytes above */
    uint64_t pending_active;   /* accepted, connecting to an endpoint now */
    uint64_t pending_overflow; /* refused over max_pending */
    uint64_t pending_refusing; /* refused in the current episode (0: none running) */
} consulate_service_counters;

/* One route as Python gives it: endpoints [first, first + count) of the arrays
 * passed alongside. */
typedef struct consulate_route {
    uint32_t vip; /* network order; 0 is not a VIP */
    uint32_t service;
    uint32_t first, count;
    uint32_t lb; /* LB_* */
} consulate_route;

/* One endpoint of one service and what the engine learned using it. */
struct upstream {
    struct sockaddr_in addr;
    uint32_t service;
    uint32_t refs;           /* route tables listing it + connections holding it */
    uint32_t weight;         /* lb=weighted */
    int64_t current_weight;  /* smooth weighted round robin (nginx) */
    uint32_t active;         /* connections open or connecting to it */
    uint32_t failures;       /* consecutive failed connects */
    uint32_t ejections;      /* multiplier of the next ejection time */
    double ejected_until;    /* > 0: out of the pool until then */
    double returned_at;      /* > 0: when it last came back */
};

struct route {
    uint32_t vip, service, first, count, lb;
    uint32_t next_pick; /* round-robin cursor, carried over when the table changes */
};

/* Open addressing keyed by VIP, at most half full. */
struct route_table {
    struct route *slots;
    uint32_t mask;
    struct upstream **upstreams; /* routes[i] lists [first, first + count) */
    size_t nupstreams;
};

/* Envoy's outlier detection for connect failures (proxy/outlier.py). */
struct outlier_policy {
    uint32_t consecutive_failures;
    double base_ejection_time, max_ejection_time;
    uint32_t max_ejection_percent;
};

struct conn;

struct side { /* epoll cookie: which socket of which connection */
    struct conn *conn;
    int index;
};

struct direction {
    int src, dst;
    int pipe_r, pipe_w;
    size_t in_pipe;
    char *buf;
    size_t buf_off, buf_len;
    int mode, eof, shut;
    /* A recv returned less than asked, so src's queue was empty then; new input
     * brings a new edge-triggered event, so no recv to see EAGAIN is needed
     * (nginx's ready flag). Splice reads cannot tell: a pipe may run out of
     * slots before the socket runs out of bytes. */
    int drained;
    int hangup_seen; /* the last event on src carried RDHUP/HUP/ERR: read on to the end */
    /* That event carried RDHUP without ERR: the peer's FIN was in, behind all of
     * its data, so a read that does not fill the buffer has read up to it and
     * the recv that would return 0 is skipped. */
    int fin_seen;
    uint64_t bytes, spliced;
};

struct conn {
    uint64_t id;
    int fd[2];
    struct side sides[2];
    struct direction dir[2];
    int out_armed[2]; /* EPOLLOUT requested on fd[i]: only while a write is blocked */
    double last_active;
    /* Connecting (fd[1] is the attempt in flight; fd[0] not polled until it succeeds). */
    int connecting;
    struct sockaddr_in candidates[MAX_CANDIDATES];
    struct upstream *ups[MAX_CANDIDATES]; /* accepted: the candidates' state (held) */
    struct upstream *open_up;             /* the one counted active, while it is */
    int ncandidates, attempt;
    uint32_t mark, failed_mask;
    int last_error;
    double attempt_started;
    /* Accepted by the engine: counted per service, reported only when Python
     * must log something. */
    int accepted;
    uint32_t service;
    struct sockaddr_in client, dest;
    struct conn *prev, *next;
};

typedef struct consulate_relay_engine {
    int epfd, wake_fd, notify_fd;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock;
    volatile int stopping;
    struct conn *conns;
    struct conn *dead; /* finished during the current batch, freed after it */
    uint64_t active;
    uint64_t connecting;
    double connect_timeout;
    consulate_relay_result *results;
    size_t results_len, results_cap;
    int pool[PIPE_POOL_MAX][2];
    size_t pool_len;
    uint64_t pipes_open;
    int pipe_size;
    size_t splice_threshold;
    int policy; /* POLICY_*, fixed at creation */
    double idle_timeout;
    /* Accepting (listen_fd < 0: not listening). */
    int listen_fd;
    struct side listen_side; /* its epoll cookie */
    uint32_t listen_mark;
    uint32_t mark_net, mark_mask; /* the VIP network: only upstreams there get the mark */
    int steered; /* sk_lookup, not REDIRECT, brings connections (proxy/sklookup.py) */
    int attempts;
    double accept_paused_until; /* > 0 while paused after EMFILE */
    /* Limits (proxy/limits.py): over them an accepted connection is reset. */
    uint64_t max_connections, max_pending;
    uint64_t overflow, overflow_refusing; /* refusing: in the current episode */
    uint64_t accept_failing; /* accept(2) failures (EMFILE...) in the current episode */
    double accept_failed_at; /* the last one */
    uint64_t next_accepted_id, accepted, unrouted;
    struct route_table *routes;
    consulate_service_counters *services;
    size_t nservices;
    struct outlier_policy outlier;
    double next_return; /* > 0: the first ejected upstream is due back then */
    uint64_t rng;       /* xorshift64* state (p2c) */
} consulate_relay_engine;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Returns 0 when splice(2) can move bytes from a socket into a pipe on this
 * kernel (some seccomp profiles and old kernels refuse it), else an errno. */
static int consulate_splice_probe(void)
{
    int sv[2], pipefd[2], rc = 0;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return errno;
    if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
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

/* -- pipe pool (engine lock held) ------------------------------------------ */

static int pipe_take(consulate_relay_engine *e, struct direction *d)
{
    int p[2];
    if (e->pool_len > 0) {
        e->pool_len--;
        d->pipe_r = e->pool[e->pool_len][0];
        d->pipe_w = e->pool[e->pool_len][1];
        return 0;
    }
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0)
        return -1;
    /* A larger pipe moves more per splice; refusals (pipe-max-size) keep 64 KiB. */
    (void)fcntl(p[1], F_SETPIPE_SZ, e->pipe_size);
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    e->pipes_open++;
    return 0;
}

static void pipe_give_back(consulate_relay_engine *e, struct direction *d)
{
    if (d->pipe_r < 0)
        return;
    if (d->in_pipe == 0 && e->pool_len < PIPE_POOL_MAX && !e->stopping) {
        e->pool[e->pool_len][0] = d->pipe_r;
        e->pool[e->pool_len][1] = d->pipe_w;
        e->pool_len++;
    } else { /* holds stale bytes, or the pool is full: not reusable */
        close(d->pipe_r);
        close(d->pipe_w);
        e->pipes_open--;
    }
    d->pipe_r = d->pipe_w = -1;
}

/* -- one direction ----------------------------------------------------------- */

/* Move what can be moved now (other: the opposite direction of the same
 * connection). Returns 1 when blocked writing to dst (wait for EPOLLOUT there),
 * 0 when waiting for input (or done), -errno on a socket error. */
static int pump(consulate_relay_engine *e, struct direction *d, const struct direction *other,
                int *moved)
{
    ssize_t n;
    for (;;) {
        if (d->in_pipe > 0) {
            n = splice(d->pipe_r, NULL, d->dst, NULL, d->in_pipe,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0)
                return errno == EAGAIN ? 1 : -errno;
            d->in_pipe -= (size_t)n;
            d->bytes += (uint64_t)n;
            d->spliced += (uint64_t)n;
            *moved = 1;
            continue;
        }
        if (d->buf_len > 0) {
            n = send(d->dst, d->buf + d->buf_off, d->buf_len, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0)
                return errno == EAGAIN ? 1 : -errno;
            d->buf_off += (size_t)n;
            d->buf_len -= (size_t)n;
            d->bytes += (uint64_t)n;
            *moved = 1;
            continue;
        }
        if (d->eof) {
            /* When the other way is over too, the connection ends now and closing
             * dst sends its FIN (its input was read to the end, so no RST): one
             * syscall less per connection. */
            if (!d->shut) {
                if (!(other->eof && other->shut) && shutdown(d->dst, SHUT_WR) != 0 &&
                    errno != ENOTCONN)
                    return -errno;
                d->shut = 1;
            }
            return 0;
        }
        /* Forced splice: take the pipe lazily at the first read (here, where the
         * engine lock is held); if none can be had, this read copies and the next
         * one tries again. */
        if (d->mode == MODE_COPY && e->policy == POLICY_SPLICE &&
            (d->pipe_r >= 0 || pipe_take(e, d) == 0))
            d->mode = MODE_SPLICE;
        if (d->mode == MODE_SPLICE) {
            n = splice(d->src, NULL, d->pipe_w, NULL, (size_t)e->pipe_size,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0)
                return errno == EAGAIN ? 0 : -errno;
            if (n == 0) {
                d->eof = 1;
                continue;
            }
            d->in_pipe = (size_t)n;
            if ((size_t)n < e->splice_threshold && e->policy == POLICY_ADAPTIVE)
                d->mode = MODE_COPY; /* trickling again: copying is cheaper */
            *moved = 1;
            continue;
        }
        if (d->drained && !d->hangup_seen)
            return 0;
        if (d->buf == NULL && (d->buf = malloc(COPY_BUF_SIZE)) == NULL)
            return -ENOMEM;
        n = recv(d->src, d->buf, COPY_BUF_SIZE, MSG_DONTWAIT);
        if (n < 0)
            return errno == EAGAIN ? 0 : -errno;
        if (n == 0) {
            d->eof = 1;
            continue;
        }
        d->buf_off = 0;
        d->buf_len = (size_t)n;
        d->drained = n < COPY_BUF_SIZE;
        d->eof = d->drained && d->fin_seen;
        *moved = 1;
        if (n == COPY_BUF_SIZE && e->policy == POLICY_ADAPTIVE &&
            (d->pipe_r >= 0 || pipe_take(e, d) == 0))
            d->mode = MODE_SPLICE; /* bulk: splice from the next read on */
    }
}

/* -- connection lifecycle (engine lock held) --------------------------------- */

/* A zeroed result at the end of the queue, or NULL when none can be had (what it
 * would have reported is lost; the relay is not). */
static consulate_relay_result *result_slot(consulate_relay_engine *e)
{
    consulate_relay_result *r;
    if (e->results_len == e->results_cap) {
        size_t cap = e->results_cap ? e->results_cap * 2 : 64;
        consulate_relay_result *grown = realloc(e->results, cap * sizeof(*grown));
        if (grown == NULL)
            return NULL;
        e->results = grown;
        e->results_cap = cap;
    }
    r = &e->results[e->results_len++];
    memset(r, 0, sizeof(*r));
    return r;
}

static void push_result(consulate_relay_engine *e, struct conn *c, int reason, int error)
{
    consulate_relay_result *r = result_slot(e);
    if (r == NULL)
        return;
    r->id = c->id;
    r->bytes[0] = c->dir[0].bytes;
    r->bytes[1] = c->dir[1].bytes;
    r->spliced[0] = c->dir[0].spliced;
    r->spliced[1] = c->dir[1].spliced;
    r->reason = reason;
    r->error = error;
    r->failed_mask = c->failed_mask;
    r->service = c->service;
    r->client_addr = c->client.sin_addr.s_addr;
    r->client_port = c->client.sin_port;
    r->dest_addr = c->dest.sin_addr.s_addr;
    r->dest_port = c->dest.sin_port;
    r->ncandidates = c->ncandidates;
    for (int i = 0; i < c->ncandidates; i++) {
        r->candidate_addr[i] = c->candidates[i].sin_addr.s_addr;
        r->candidate_port[i] = c->candidates[i].sin_port;
    }
}

static void upstream_put(struct upstream *u)
{
    if (u != NULL && --u->refs == 0)
        free(u);
}

/* The connection no longer counts as open to the upstream it held. */
static void upstream_release(struct conn *c)
{
    if (c->open_up != NULL) {
        c->open_up->active--;
        c->open_up = NULL;
    }
}

static void finish(consulate_relay_engine *e, struct conn *c, int reason, int error)
{
    int i;
    if (c->connecting) {
        e->connecting--;
        if (c->accepted)
            e->services[c->service].pending_active--;
    }
    for (i = 0; i < 2; i++) {
        if (c->fd[i] < 0)
            continue;
        if (reason == REASON_ERROR || reason == REASON_CONNECT_FAILED) {
            /* Reset the peer instead of a clean FIN: it must see the failure. */
            struct linger lg = {1, 0};
            (void)setsockopt(c->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        close(c->fd[i]); /* also removes it from the epoll set */
    }
    for (i = 0; i < 2; i++) {
        pipe_give_back(e, &c->dir[i]);
        free(c->dir[i].buf);
    }
    if (c->accepted) {
        consulate_service_counters *sc = &e->services[c->service];
        sc->connections_active--;
        sc->bytes_to_upstream += c->dir[0].bytes;
        sc->bytes_to_client += c->dir[1].bytes;
        sc->bytes_spliced_to_upstream += c->dir[0].spliced;
        sc->bytes_spliced_to_client += c->dir[1].spliced;
        if (reason == REASON_CONNECT_FAILED)
            sc->rejected++;
        /* Python hears of an accepted connection only when it has to log. */
        if (reason == REASON_CONNECT_FAILED || c->failed_mask != 0)
            push_result(e, c, reason, error);
        upstream_release(c);
        for (i = 0; i < c->ncandidates; i++)
            upstream_put(c->ups[i]);
    } else {
        push_result(e, c, reason, error);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        e->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    e->active--;
    /* Events for the other socket may still be in this epoll batch: mark the
     * cookies dead and free the connection after the batch. */
    c->sides[0].conn = c->sides[1].conn = NULL;
    c->next = e->dead;
    e->dead = c;
}

static void bury(consulate_relay_engine *e)
{
    while (e->dead != NULL) {
        struct conn *c = e->dead;
        e->dead = c->next;
        free(c);
    }
}

/* EPOLLOUT is armed only while a write to that socket is blocked: left on, every
 * ACK that frees send-buffer space would wake the engine for nothing. */
static int arm_out(consulate_relay_engine *e, struct conn *c, int i, int on)
{
    struct epoll_event ev;
    if (c->out_armed[i] == on)
        return 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (on ? EPOLLOUT : 0);
    ev.data.ptr = &c->sides[i];
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, c->fd[i], &ev) != 0)
        return -errno;
    c->out_armed[i] = on;
    return 0;
}

/* -- connecting to the upstream (engine lock held) --------------------------------- */

static void outlier_failed(consulate_relay_engine *e, struct conn *c, struct upstream *u);

/* The current candidate failed with err; blame: it was the endpoint's doing (its
 * connect failed), which outlier detection counts, not ours (no socket left). */
static void candidate_failed(consulate_relay_engine *e, struct conn *c, int err, int blame)
{
    c->last_error = err;
    c->failed_mask |= 1u << c->attempt;
    upstream_release(c);
    if (c->accepted) {
        e->services[c->service].connect_failures++;
        if (blame)
            outlier_failed(e, c, c->ups[c->attempt]);
    }
}

/* Start the next candidate's connect; 0 when one is in flight, -1 when none is left. */
static int start_attempt(consulate_relay_engine *e, struct conn *c, double now)
{
    struct epoll_event ev;
    int one = 1, fd, blame;
    for (; c->attempt < c->ncandidates; c->attempt++) {
        /* With sk_lookup nothing exempts our own connection to a VIP-range address
         * from being steered back to us: refuse it as the local route would. */
        if (e->steered &&
            (c->candidates[c->attempt].sin_addr.s_addr & e->mark_mask) == e->mark_net) {
            candidate_failed(e, c, ECONNREFUSED, 1);
            continue;
        }
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            candidate_failed(e, c, errno, 0);
            continue;
        }
        /* The mark exempts a connection from the REDIRECT rules, which match VIP
         * destinations only: an endpoint outside the VIP range needs no mark
         * (and the connection one syscall less). */
        if (c->mark != 0 &&
            (c->candidates[c->attempt].sin_addr.s_addr & e->mark_mask) == e->mark_net)
            (void)setsockopt(fd, SOL_SOCKET, SO_MARK, &c->mark, sizeof(c->mark));
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (c->accepted) { /* open (connecting) to it from now: least_conn, p2c */
            c->open_up = c->ups[c->attempt];
            c->open_up->active++;
        }
        /* Refused at once (loopback does that) is the endpoint's failure. */
        blame = connect(fd, (struct sockaddr *)&c->candidates[c->attempt],
                        sizeof(c->candidates[0])) != 0 && errno != EINPROGRESS;
        if (!blame) {
            memset(&ev, 0, sizeof(ev));
            /* Input too, from the start: once connected, nothing needs changing
             * (EPOLLOUT stays until a spurious wakeup clears it, see serve). */
            ev.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP | EPOLLET;
            ev.data.ptr = &c->sides[1];
            if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == 0) {
                c->fd[1] = fd;
                c->attempt_started = now;
                return 0;
            }
        }
        candidate_failed(e, c, errno, blame);
        close(fd);
    }
    return -1;
}

/* The attempt in flight failed with err: try the next candidate, or give up. */
static void attempt_failed(consulate_relay_engine *e, struct conn *c, int err, double now)
{
    candidate_failed(e, c, err, 1);
    close(c->fd[1]);
    c->fd[1] = -1;
    c->attempt++;
    if (start_attempt(e, c, now) != 0)
        finish(e, c, REASON_CONNECT_FAILED, c->last_error);
}

/* The upstream accepted: poll the client too from now on (registering it
 * reports what it sent while we were connecting). */
static int connected(consulate_relay_engine *e, struct conn *c)
{
    struct epoll_event ev;
    c->connecting = 0;
    e->connecting--;
    if (c->accepted)
        e->services[c->service].pending_active--;
    if (c->open_up != NULL)
        c->open_up->failures = 0; /* consecutive failures only */
    c->out_armed[1] = 1; /* registered with EPOLLOUT by start_attempt */
    for (int i = 0; i < 2; i++) {
        c->dir[i].src = c->fd[i];
        c->dir[i].dst = c->fd[1 - i];
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = &c->sides[0];
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd[0], &ev) != 0)
        return -errno;
    return 0;
}

/* Move what the readiness says can move: direction j reads when bit j of
 * input is set (hangup: that event saw RDHUP/HUP/ERR; fin: RDHUP without ERR),
 * and socket k that became writable (bit k of writable) drains direction 1-k.
 * Returns 1 when the connection ended. */
static int serve(consulate_relay_engine *e, struct conn *c, unsigned input, unsigned hangup,
                 unsigned fin, unsigned writable, double now)
{
    int j, rc, moved = 0;
    for (j = 0; j < 2; j++) {
        struct direction *d = &c->dir[j];
        int out = 1 - j; /* the socket direction j writes to */
        if (input & (1u << j)) {
            d->drained = 0;
            d->hangup_seen = (hangup >> j) & 1u;
            d->fin_seen = (fin >> j) & 1u;
        } else if (!(writable & (1u << out))) {
            continue;
        }
        rc = pump(e, d, &c->dir[1 - j], &moved);
        if (rc == 1)
            rc = arm_out(e, c, out, 1);
        else if (rc == 0 && (writable & (1u << out)) && !(input & (1u << out)))
            /* Woken only for room no write needs any more. An event that brought
             * input too leaves it armed: a short connection then never pays the
             * epoll_ctl, and a later pure write-space wakeup disarms it. */
            rc = arm_out(e, c, out, 0);
        if (rc < 0) {
            finish(e, c, REASON_ERROR, -rc);
            return 1;
        }
    }
    if (moved)
        c->last_active = now;
    if (c->dir[0].shut && c->dir[1].shut) {
        finish(e, c, REASON_DONE, 0);
        return 1;
    }
    return 0;
}

/* Serve an event on socket i of c. Returns 1 when the connection ended. */
static int service(consulate_relay_engine *e, struct conn *c, int i, uint32_t events,
                   double now)
{
    int rc, err = 0;
    socklen_t len = sizeof(err);
    const uint32_t hangup_events = EPOLLRDHUP | EPOLLHUP | EPOLLERR;
    const int fin = (events & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP;
    if (c->connecting) { /* only the upstream socket is polled while connecting */
        if (events & (EPOLLERR | EPOLLHUP)) {
            if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) != 0)
                err = errno;
            if (err != 0) {
                attempt_failed(e, c, err, now);
                return c->sides[1].conn == NULL;
            }
        }
        /* Writable without an error: a non-blocking connect has completed. */
        if (!(events & EPOLLOUT))
            return 0;
        if ((rc = connected(e, c)) != 0) {
            finish(e, c, REASON_ERROR, -rc);
            return 1;
        }
        c->last_active = now;
        /* The client's request is usually waiting already: relay it now, not
         * after another epoll_wait; the upstream's input edge is this event. */
        return serve(e, c, 1u | ((events & EPOLLIN) ? 2u : 0u),
                     (events & hangup_events) ? 2u : 0u, fin ? 2u : 0u, 0, now);
    }
    if (events & EPOLLERR) {
        /* Nothing may be pending in either direction to surface it: ask. */
        if (getsockopt(c->fd[i], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
            finish(e, c, REASON_ERROR, err);
            return 1;
        }
    }
    return serve(e, c, (events & (EPOLLIN | hangup_events)) ? 1u << i : 0u,
                 (events & hangup_events) ? 1u << i : 0u, fin ? 1u << i : 0u,
                 (events & EPOLLOUT) ? 1u << i : 0u, now);
}

static void notify(consulate_relay_engine *e)
{
    uint64_t one = 1;
    ssize_t w = write(e->notify_fd, &one, sizeof(one));
    (void)w; /* EAGAIN means the counter is already non-zero: Python will look */
}

static void accept_ready(consulate_relay_engine *e, double now);
static void release_due(consulate_relay_engine *e, double now);
static void accept_resume(consulate_relay_engine *e);

static void *engine_main(void *arg)
{
    consulate_relay_engine *e = arg;
    struct epoll_event events[MAX_EVENTS];
    double last_scan = now_seconds();
    int i, n;

    while (!e->stopping) {
        /* Connect timeouts and accept pauses need a finer clock than idle ones. */
        int fine = e->connecting > 0 || e->accept_paused_until > 0;
        int timeout = fine ? 50 : 1000;
        if (e->next_return > 0) { /* wake up when an ejected endpoint is due back */
            double wait_ms = (e->next_return - now_seconds()) * 1000 + 1;
            if (wait_ms < timeout)
                timeout = wait_ms > 0 ? (int)wait_ms : 0;
        }
        n = epoll_wait(e->epfd, events, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&e->lock);
        double now = now_seconds();
        size_t results_before = e->results_len;
        for (i = 0; i < n; i++) {
            struct side *s = events[i].data.ptr;
            if (s == NULL) { /* the wake eventfd: stop, or nothing */
                uint64_t v;
                ssize_t r = read(e->wake_fd, &v, sizeof(v));
                (void)r;
                continue;
            }
            if (s == &e->listen_side) {
                if (e->listen_fd >= 0) /* not unlistened since epoll_wait returned */
                    accept_ready(e, now);
                continue;
            }
            if (s->conn == NULL) /* its connection ended earlier in this batch */
                continue;
            service(e, s->conn, s->index, events[i].events, now);
        }
        if (e->connecting > 0) {
            struct conn *c = e->conns, *next;
            for (; c != NULL; c = next) {
                next = c->next;
                if (c->connecting && now - c->attempt_started >= e->connect_timeout)
                    attempt_failed(e, c, ETIMEDOUT, now);
            }
        }
        if (e->accept_paused_until > 0 && now >= e->accept_paused_until)
            accept_resume(e);
        if (e->next_return > 0 && now >= e->next_return)
            release_due(e, now);
        if (e->idle_timeout > 0 && now - last_scan >= 1.0) {
            struct conn *c = e->conns, *next;
            for (; c != NULL; c = next) {
                next = c->next;
                if (!c->connecting && now - c->last_active >= e->idle_timeout)
                    finish(e, c, REASON_IDLE, 0);
            }
            last_scan = now;
        }
        bury(e);
        if (e->results_len > results_before)
            notify(e);
        pthread_mutex_unlock(&e->lock);
    }

    pthread_mutex_lock(&e->lock);
    while (e->conns != NULL)
        finish(e, e->conns, REASON_STOPPED, 0);
    bury(e);
    notify(e);
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

/* -- public API ---------------------------------------------------------------- */

/* policy is one of POLICY_*; anything else fails with EINVAL. */
static consulate_relay_engine *consulate_relay_new(int pipe_size, size_t splice_threshold,
                                                   double idle_timeout, double connect_timeout,
                                                   int policy)
{
    struct epoll_event ev;
    int err;
    consulate_relay_engine *e;
    if (policy < POLICY_ADAPTIVE || policy > POLICY_SPLICE) {
        errno = EINVAL;
        return NULL;
    }
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    e->epfd = e->wake_fd = e->notify_fd = e->listen_fd = -1;
    e->listen_side.index = -1; /* a cookie of no connection */
    e->pipe_size = pipe_size;
    e->splice_threshold = splice_threshold;
    e->policy = policy;
    e->idle_timeout = idle_timeout;
    e->connect_timeout = connect_timeout;
    e->rng = ((uint64_t)(now_seconds() * 1e9) ^ (uint64_t)(uintptr_t)e) | 1;
    e->outlier.consecutive_failures = 5; /* consulate_relay_listen sets the policy */
    e->outlier.base_ejection_time = 30;
    e->outlier.max_ejection_time = 300;
    e->outlier.max_ejection_percent = 50;
    pthread_mutex_init(&e->lock, NULL);
    if ((e->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
        (e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
        (e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
        goto fail;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &ev) != 0)
        goto fail;
    if ((err = pthread_create(&e->thread, NULL, engine_main, e)) != 0) {
        errno = err;
        goto fail;
    }
    e->thread_started = 1;
    return e;
fail:
    err = errno;
    if (e->epfd >= 0) close(e->epfd);
    if (e->wake_fd >= 0) close(e->wake_fd);
    if (e->notify_fd >= 0) close(e->notify_fd);
    pthread_mutex_destroy(&e->lock);
    free(e);
    errno = err;
    return NULL;
}

static int consulate_relay_notify_fd(consulate_relay_engine *e)
{
    return e->notify_fd;
}

static struct conn *conn_new(uint64_t id, int fd_a, int fd_b)
{
    int i;
    struct conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->id = id;
    c->fd[0] = fd_a;
    c->fd[1] = fd_b;
    for (i = 0; i < 2; i++) {
        c->sides[i].conn = c;
        c->sides[i].index = i;
        c->dir[i].src = c->fd[i];
        c->dir[i].dst = c->fd[1 - i];
        c->dir[i].pipe_r = c->dir[i].pipe_w = -1;
    }
    c->last_active = now_seconds();
    return c;
}

/* Engine lock held. */
static void conn_link(consulate_relay_engine *e, struct conn *c)
{
    c->next = e->conns;
    if (e->conns)
        e->conns->prev = c;
    e->conns = c;
    e->active++;
}

/* Takes ownership of both sockets on success (returns 0); on failure returns
 * -errno and the caller still owns them. */
static int consulate_relay_add(consulate_relay_engine *e, uint64_t id, int fd_a, int fd_b)
{
    struct epoll_event ev;
    int i, err;
    struct conn *c = conn_new(id, fd_a, fd_b);
    if (c == NULL)
        return -ENOMEM;
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->lock);
        free(c);
        return -ESHUTDOWN;
    }
    for (i = 0; i < 2; i++) {
        memset(&ev, 0, sizeof(ev));
        /* Registering reports data that is already waiting (and EOF). */
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = &c->sides[i];
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd[i], &ev) != 0) {
            err = errno;
            if (i == 1)
                (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[0], NULL);
            pthread_mutex_unlock(&e->lock);
            free(c);
            return -err;
        }
    }
    conn_link(e, c);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

/* -- accepting (engine lock held) --------------------------------------------- */

static uint32_t vip_hash(uint32_t vip)
{
    /* VIPs differ mostly in their low octets, the high bits of s_addr: mix all. */
    vip ^= vip >> 16;
    vip *= 0x7feb352dU;
    vip ^= vip >> 15;
    vip *= 0x846ca68bU;
    return vip ^ (vip >> 16);
}

static struct route *route_find(struct route_table *t, uint32_t vip)
{
    uint32_t i;
    if (t == NULL)
        return NULL;
    for (i = vip_hash(vip) & t->mask; t->slots[i].vip != 0; i = (i + 1) & t->mask)
        if (t->slots[i].vip == vip)
            return &t->slots[i];
    return NULL;
}

/* -- balancing (engine lock held): proxy/balance.py's balancers, same orders ---- */

static int ejected(const struct upstream *u)
{
    return u->ejected_until > 0;
}

/* Every endpoint of the pool is ejected: use them all (Envoy's panic mode). */
static int all_ejected(struct upstream **ups, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (!ejected(ups[i]))
            return 0;
    return 1;
}

static int taken(const uint32_t *out, uint32_t got, uint32_t i)
{
    for (uint32_t k = 0; k < got; k++)
        if (out[k] == i)
            return 1;
    return 0;
}

/* After out[0 .. got), the usable endpoints in ring order after pick, not taken. */
static uint32_t ring_after(struct upstream **ups, uint32_t n, int panic, uint32_t pick,
                           uint32_t *out, uint32_t got, uint32_t want)
{
    for (uint32_t k = 1; k < n && got < want; k++) {
        uint32_t i = (pick + k) % n;
        if ((panic || !ejected(ups[i])) && !taken(out, got, i))
            out[got++] = i;
    }
    return got;
}

static uint64_t next_random(consulate_relay_engine *e)
{
    uint64_t x = e->rng; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    e->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t mix64(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL; /* splitmix64's finalizer */
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Rendezvous score of an upstream for a client (host order), as balance.hash_score. */
static uint64_t hash_score(uint32_t client, const struct upstream *u)
{
    uint64_t key = ((uint64_t)client << 32) | ntohl(u->addr.sin_addr.s_addr);
    return mix64(key ^ ((uint64_t)ntohs(u->addr.sin_port) * 0x9E3779B97F4A7C15ULL));
}

/* Round robin from the cursor, stepping over ejected endpoints. */
static uint32_t pick_round_robin(struct route *r, struct upstream **ups, uint32_t want,
                                 uint32_t *out)
{
    uint32_t n = r->count, start = r->next_pick % n, got = 0, k;
    for (k = 0; k < n && got < want; k++)
        if (!ejected(ups[(start + k) % n]))
            out[got++] = (start + k) % n;
    for (k = 0; got == 0 && k < want; k++) /* all ejected */
        out[k] = (start + k) % n;
    if (got == 0)
        got = want;
    r->next_pick = out[0] + 1;
    return got;
}

/* Fewest open connections first; ties in round-robin order from the cursor. */
static uint32_t pick_least_conn(struct route *r, struct upstream **ups, uint32_t want,
                                uint32_t *out)
{
    uint32_t n = r->count, start = r->next_pick % n, got, k;
    int panic = all_ejected(ups, n);
    for (got = 0; got < want; got++) {
        int64_t best = -1;
        for (k = 0; k < n; k++) {
            uint32_t i = (start + k) % n;
            if ((!panic && ejected(ups[i])) || taken(out, got, i))
                continue;
            if (best < 0 || ups[i]->active < ups[best]->active)
                best = i;
        }
        if (best < 0)
            break;
        out[got] = (uint32_t)best;
    }
    r->next_pick = out[0] + 1;
    return got;
}

/* Two drawn at random, the one with fewer open connections first, then the other. */
static uint32_t pick_p2c(consulate_relay_engine *e, struct route *r, struct upstream **ups,
                         uint32_t want, uint32_t *out)
{
    uint32_t n = r->count, usable = 0, k, x, y, first = 0, second = 0, seen = 0;
    int panic = all_ejected(ups, n);
    for (k = 0; k < n; k++)
        usable += panic || !ejected(ups[k]);
    if (usable == 1) {
        for (k = 0; !(panic || !ejected(ups[k])); k++)
            ;
        out[0] = k;
        return 1;
    }
    x = (uint32_t)(next_random(e) % usable);
    y = (uint32_t)(next_random(e) % (usable - 1));
    if (y >= x)
        y++;
    for (k = 0; k < n; k++) { /* the x-th and y-th usable endpoints */
        if (!panic && ejected(ups[k]))
            continue;
        if (seen == x)
            first = k;
        if (seen == y)
            second = k;
        seen++;
    }
    if (ups[second]->active < ups[first]->active) {
        out[0] = second;
        out[1] = first;
    } else {
        out[0] = first;
        out[1] = second;
    }
    return want < 2 ? 1 : ring_after(ups, n, panic, out[0], out, 2, want);
}

/* The highest rendezvous scores for this client, in order (ties: lower index). */
static uint32_t pick_hash(struct route *r, struct upstream **ups, uint32_t client,
                          uint32_t want, uint32_t *out)
{
    uint64_t best[MAX_CANDIDATES];
    uint32_t n = r->count, got = 0, i, pos;
    int panic = all_ejected(ups, n);
    for (i = 0; i < n; i++) {
        uint64_t score;
        if (!panic && ejected(ups[i]))
            continue;
        score = hash_score(client, ups[i]);
        if (got == want && score <= best[got - 1])
            continue;
        pos = got < want ? got++ : want - 1;
        for (; pos > 0 && best[pos - 1] < score; pos--) {
            best[pos] = best[pos - 1];
            out[pos] = out[pos - 1];
        }
        best[pos] = score;
        out[pos] = i;
    }
    return got;
}

/* nginx's smooth weighted round robin; retries in ring order after the pick. */
static uint32_t pick_weighted(struct route *r, struct upstream **ups, uint32_t want,
                              uint32_t *out)
{
    uint32_t n = r->count, i;
    int64_t total = 0, best = -1;
    int panic = all_ejected(ups, n);
    for (i = 0; i < n; i++) {
        if (!panic && ejected(ups[i]))
            continue;
        ups[i]->current_weight += ups[i]->weight ? ups[i]->weight : 1;
        total += ups[i]->weight ? ups[i]->weight : 1;
        if (best < 0 || ups[i]->current_weight > ups[best]->current_weight)
            best = i;
    }
    ups[best]->current_weight -= total;
    out[0] = (uint32_t)best;
    return ring_after(ups, n, panic, out[0], out, 1, want);
}

/* Up to want (1 .. count) distinct endpoint indices of r for this client, in order. */
static uint32_t pick(consulate_relay_engine *e, struct route *r, uint32_t client,
                     uint32_t want, uint32_t *out)
{
    struct upstream **ups = e->routes->upstreams + r->first;
    switch (r->lb) {
    case LB_LEAST_CONN: return pick_least_conn(r, ups, want, out);
    case LB_P2C: return pick_p2c(e, r, ups, want, out);
    case LB_HASH: return pick_hash(r, ups, client, want, out);
    case LB_WEIGHTED: return pick_weighted(r, ups, want, out);
    default: return pick_round_robin(r, ups, want, out);
    }
}

/* -- outlier detection (engine lock held): proxy/outlier.py's rules ------------- */

static void push_upstream_event(consulate_relay_engine *e, const struct upstream *u,
                                int reason, double seconds)
{
    consulate_relay_result *r = result_slot(e);
    if (r == NULL)
        return;
    r->reason = reason;
    r->service = u->service;
    r->ncandidates = 1;
    r->candidate_addr[0] = u->addr.sin_addr.s_addr;
    r->candidate_port[0] = u->addr.sin_port;
    r->failures = u->failures;
    r->ejections = u->ejections;
    r->ejection_ms = (uint32_t)(seconds * 1000 + 0.5);
}

/* A connect to u (a candidate of c) failed: count it, eject u at the threshold
 * if it is still in c's pool and at most max_ejection_percent of it is out. */
static void outlier_failed(consulate_relay_engine *e, struct conn *c, struct upstream *u)
{
    const struct outlier_policy *p = &e->outlier;
    struct upstream **ups;
    struct route *r;
    uint32_t k, out = 0, listed = 0;
    double now, seconds, longest;
    if (ejected(u) || ++u->failures < p->consecutive_failures)
        return; /* a connect begun before it was ejected changes nothing */
    r = route_find(e->routes, c->dest.sin_addr.s_addr);
    if (r == NULL || r->service != u->service)
        return;
    ups = e->routes->upstreams + r->first;
    for (k = 0; k < r->count; k++) {
        listed |= ups[k] == u;
        out += ejected(ups[k]);
    }
    if (!listed || (uint64_t)(out + 1) * 100 > (uint64_t)r->count * p->max_ejection_percent)
        return;
    now = now_seconds();
    if (u->returned_at > 0) { /* one off per base time it behaved since it came back */
        uint64_t behaved = (uint64_t)((now - u->returned_at) / p->base_ejection_time);
        u->ejections = behaved >= u->ejections ? 0 : u->ejections - (uint32_t)behaved;
    }
    u->ejections++;
    longest = p->max_ejection_time > p->base_ejection_time ? p->max_ejection_time
                                                           : p->base_ejection_time;
    seconds = p->base_ejection_time * u->ejections;
    if (seconds > longest)
        seconds = longest;
    u->ejected_until = now + seconds;
    if (e->next_return == 0 || u->ejected_until < e->next_return)
        e->next_return = u->ejected_until;
    e->services[u->service].ejections++;
    push_upstream_event(e, u, REASON_EJECTED, seconds);
}

/* Put back every upstream of the table whose ejection is over; find the next. */
static void release_due(consulate_relay_engine *e, double now)
{
    struct route_table *t = e->routes;
    double next = 0;
    for (size_t i = 0; t != NULL && i < t->nupstreams; i++) {
        struct upstream *u = t->upstreams[i];
        if (u == NULL || !ejected(u))
            continue;
        if (u->ejected_until <= now) {
            u->ejected_until = 0;
            u->returned_at = now;
            u->failures = 0;
            push_upstream_event(e, u, REASON_RETURNED, 0);
        } else if (next == 0 || u->ejected_until < next) {
            next = u->ejected_until;
        }
    }
    e->next_return = next;
}

/* Refuse an accepted connection with a reset and tell Python why. */
static void refuse(consulate_relay_engine *e, int fd, const struct sockaddr_in *client,
                   const struct sockaddr_in *dest, uint32_t service, int reason, int error)
{
    struct conn c;
    struct linger lg = {1, 0};
    if (fd >= 0) {
        (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(fd);
    }
    memset(&c, 0, sizeof(c));
    c.service = service;
    if (client != NULL)
        c.client = *client;
    if (dest != NULL)
        c.dest = *dest;
    push_result(e, &c, reason, error);
}

/* A limit refused an accepted connection (reset): only the first refusal of an
 * episode is reported, so a flood does not flood Python. */
static void limit_refused(consulate_relay_engine *e, int fd, const struct sockaddr_in *client,
                          const struct sockaddr_in *dest, uint32_t service, int limit,
                          uint64_t *refusing)
{
    struct linger lg = {1, 0};
    if ((*refusing)++ == 0) {
        refuse(e, fd, client, dest, service, REASON_LIMIT_REACHED, limit);
        return;
    }
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

/* A connection passed the limit: an episode running ends, reported with its count. */
static void limit_admitted(consulate_relay_engine *e, uint32_t service, int limit,
                           uint64_t *refusing)
{
    consulate_relay_result *r;
    if (*refusing == 0)
        return;
    if ((r = result_slot(e)) != NULL) {
        r->reason = REASON_LIMIT_CLEARED;
        r->error = limit;
        r->service = service;
        r->failures = *refusing > UINT32_MAX ? UINT32_MAX : (uint32_t)*refusing;
    }
    *refusing = 0;
}

static void accept_pause(consulate_relay_engine *e, double now)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.data.ptr = &e->listen_side;
    (void)epoll_ctl(e->epfd, EPOLL_CTL_MOD, e->listen_fd, &ev);
    e->accept_paused_until = now + ACCEPT_PAUSE_SECONDS;
}

static void accept_resume(consulate_relay_engine *e)
{
    struct epoll_event ev;
    e->accept_paused_until = 0;
    if (e->listen_fd < 0)
        return;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = &e->listen_side;
    (void)epoll_ctl(e->epfd, EPOLL_CTL_MOD, e->listen_fd, &ev);
}

/* Route one accepted client: look its VIP up, pick the candidates, connect. */
static void route_accepted(consulate_relay_engine *e, int fd, const struct sockaddr_in *client,
                           double now)
{
    struct sockaddr_in dest;
    socklen_t len = sizeof(dest);
    struct route *r;
    struct conn *c;
    consulate_service_counters *sc;
    uint32_t k, ncand, picked[MAX_CANDIDATES] = {0};

    memset(&dest, 0, sizeof(dest));
    if (e->steered ? getsockname(fd, (struct sockaddr *)&dest, &len) != 0
                   : getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dest, &len) != 0) {
        e->unrouted++; /* not REDIRECTed: someone connected to the proxy port itself */
        refuse(e, fd, client, NULL, 0, REASON_UNROUTED, errno);
        return;
    }
    if (e->steered && (dest.sin_addr.s_addr & e->mark_mask) != e->mark_net) {
        e->unrouted++; /* not steered: someone connected to the proxy port itself */
        refuse(e, fd, client, NULL, 0, REASON_UNROUTED, ENOENT);
        return;
    }
    if ((r = route_find(e->routes, dest.sin_addr.s_addr)) == NULL) {
        e->unrouted++;
        refuse(e, fd, client, &dest, 0, REASON_UNROUTED, 0);
        return;
    }
    sc = &e->services[r->service];
    sc->connections_total++;
    if (r->count == 0) {
        sc->rejected++;
        refuse(e, fd, client, &dest, r->service, REASON_NO_ENDPOINTS, 0);
        return;
    }
    if (sc->pending_active >= e->max_pending) {
        sc->pending_overflow++;
        limit_refused(e, fd, client, &dest, r->service, LIMIT_MAX_PENDING, &sc->pending_refusing);
        return;
    }
    limit_admitted(e, r->service, LIMIT_MAX_PENDING, &sc->pending_refusing);
    if ((c = conn_new(ACCEPTED_ID_BASE | e->next_accepted_id++, fd, -1)) == NULL) {
        sc->rejected++;
        refuse(e, fd, client, &dest, r->service, REASON_ACCEPT_FAILED, ENOMEM);
        return;
    }
    c->accepted = 1;
    c->service = r->service;
    c->client = *client;
    c->dest = dest;
    c->mark = e->listen_mark;
    /* The balancer's pick, then the retry order; each candidate's state is held. */
    ncand = pick(e, r, ntohl(client->sin_addr.s_addr),
                 r->count < (uint32_t)e->attempts ? r->count : (uint32_t)e->attempts, picked);
    for (k = 0; k < ncand; k++) {
        struct upstream *u = e->routes->upstreams[r->first + picked[k]];
        u->refs++;
        c->ups[k] = u;
        c->candidates[k] = u->addr;
    }
    c->ncandidates = (int)ncand;
    sc->connections_active++;
    sc->pending_active++;
    conn_link(e, c);
    c->connecting = 1;
    e->connecting++;
    if (start_attempt(e, c, now) != 0)
        finish(e, c, REASON_CONNECT_FAILED, c->last_error);
}

static void accept_ready(consulate_relay_engine *e, double now)
{
    int n, fd;
    for (n = 0; n < ACCEPTS_PER_EVENT; n++) {
        struct sockaddr_in client;
        socklen_t len = sizeof(client);
        fd = accept4(e->listen_fd, (struct sockaddr *)&client, &len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN) {
                /* EMFILE and friends: the backlog keeps the clients, and a
                 * level-triggered listener would spin; pause, report, go on. */
                accept_pause(e, now);
                if (e->accept_failing++ == 0) /* reported once per episode */
                    refuse(e, -1, NULL, NULL, 0, REASON_ACCEPT_FAILED, errno);
                e->accept_failed_at = now;
            }
            return;
        }
        e->accepted++;
        if (e->accept_failing > 0 && now - e->accept_failed_at >= ACCEPT_EPISODE_QUIET)
            limit_admitted(e, 0, LIMIT_DESCRIPTORS, &e->accept_failing);
        if (e->active >= e->max_connections) {
            e->overflow++;
            limit_refused(e, fd, &client, NULL, 0, LIMIT_MAX_CONNECTIONS,
                          &e->overflow_refusing);
            continue;
        }
        limit_admitted(e, 0, LIMIT_MAX_CONNECTIONS, &e->overflow_refusing);
        route_accepted(e, fd, &client, now);
    }
}

/* Accept on listen_fd (a bound, listening, non-blocking socket the caller keeps
 * owning) and route by the table of consulate_relay_set_routes; upstream sockets
 * carry mark, up to attempts candidates are tried per connection, and endpoints
 * are ejected by the outlier policy given. Over max_connections relayed at once,
 * or max_pending of one service connecting, an accepted connection is reset
 * (limit_refused; proxy/limits.py says why a reset rather than the backlog). */
static int consulate_relay_listen(consulate_relay_engine *e, int listen_fd, uint32_t mark,
                                  int attempts, uint32_t mark_net, uint32_t mark_mask,
                                  int consecutive_failures, double base_ejection_time,
                                  double max_ejection_time, int max_ejection_percent,
                                  uint64_t max_connections, uint64_t max_pending, int steered)
{
    struct epoll_event ev;
    int rc = 0, one = 1;
    if (attempts < 1 || attempts > MAX_CANDIDATES || consecutive_failures < 1 ||
        !(base_ejection_time > 0) || !(max_ejection_time >= 0) ||
        max_ejection_percent < 0 || max_ejection_percent > 100 || max_connections < 1 ||
        max_pending < 1)
        return -EINVAL;
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        rc = -ESHUTDOWN;
    } else if (e->listen_fd >= 0) {
        rc = -EBUSY;
    } else {
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN; /* level-triggered: a batch may leave clients waiting */
        ev.data.ptr = &e->listen_side;
        /* Without TCP_NODELAY, a response split over two writes waits for the
         * client's delayed ACK (40 ms). Accepted sockets inherit it from the
         * listener: set once here, not once per connection (the upstream
         * sockets get it in start_attempt). */
        if (setsockopt(listen_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0 ||
            epoll_ctl(e->epfd, EPOLL_CTL_ADD, listen_fd, &ev) != 0) {
            rc = -errno;
        } else {
            e->listen_fd = listen_fd;
            e->listen_mark = mark;
            e->mark_net = mark_net & mark_mask;
            e->mark_mask = mark_mask;
            e->steered = steered != 0;
            e->attempts = attempts;
            e->outlier.consecutive_failures = (uint32_t)consecutive_failures;
            e->outlier.base_ejection_time = base_ejection_time;
            e->outlier.max_ejection_time = max_ejection_time;
            e->outlier.max_ejection_percent = (uint32_t)max_ejection_percent;
            e->max_connections = max_connections;
            e->max_pending = max_pending;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return rc;
}

/* Stop accepting; once it returns the engine never touches the listener again. */
static void consulate_relay_unlisten(consulate_relay_engine *e)
{
    pthread_mutex_lock(&e->lock);
    if (e->listen_fd >= 0) {
        (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, e->listen_fd, NULL);
        e->listen_fd = -1;
        e->accept_paused_until = 0;
    }
    pthread_mutex_unlock(&e->lock);
}

/* Frees a table; its upstreams must have been released (or never bound). */
static void route_table_free(struct route_table *t)
{
    if (t == NULL)
        return;
    free(t->slots);
    free(t->upstreams);
    free(t);
}

/* Engine lock held (or the engine stopped): the table lets go of its upstreams. */
static void route_table_release(struct route_table *t)
{
    for (size_t i = 0; t != NULL && i < t->nupstreams; i++)
        upstream_put(t->upstreams[i]);
    route_table_free(t);
}

/* The upstream of route before (of the old table) at addr, or NULL; the same index
 * first, as a republished route mostly lists its endpoints where they were. */
static struct upstream *upstream_match(struct route_table *old, const struct route *before,
                                       const struct sockaddr_in *addr, uint32_t j)
{
    struct upstream **ups = old->upstreams + before->first;
    for (uint32_t k = 0; k < before->count; k++) {
        struct upstream *u = ups[(j + k) % before->count];
        if (u->addr.sin_addr.s_addr == addr->sin_addr.s_addr &&
            u->addr.sin_port == addr->sin_port)
            return u;
    }
    return NULL;
}

#define MAX_SERVICE_ID (1u << 20)

/* Replace the route table: routes[i] names endpoints [first, first + count) of
 * addrs/ports (network order) and weights; ranges do not overlap. Service ids
 * index the counters, so they must be stable per service and small. An endpoint
 * listed again for the same VIP and service keeps its state (open connections,
 * failures, ejection). Returns 0 or -errno (EINVAL: a bad entry). */
static int consulate_relay_set_routes(consulate_relay_engine *e, const consulate_route *routes,
                                      size_t count, const uint32_t *addrs,
                                      const uint16_t *ports, const uint32_t *weights,
                                      size_t nendpoints)
{
    struct route_table *t, *old;
    struct upstream **fresh;
    uint8_t *listed;
    size_t cap = 16, i, nservices = 0;
    struct route *slot;
    int rc = 0;
    if (count > MAX_SERVICE_ID)
        return -EINVAL;
    while (cap < count * 2)
        cap <<= 1;
    if ((t = calloc(1, sizeof(*t))) == NULL)
        return -ENOMEM;
    t->mask = (uint32_t)cap - 1;
    t->slots = calloc(cap, sizeof(*t->slots));
    t->upstreams = calloc(nendpoints ? nendpoints : 1, sizeof(*t->upstreams));
    t->nupstreams = nendpoints;
    /* Allocated here, outside the lock; those an old upstream replaces are freed. */
    fresh = calloc(nendpoints ? nendpoints : 1, sizeof(*fresh));
    listed = calloc(nendpoints ? nendpoints : 1, 1);
    if (t->slots == NULL || t->upstreams == NULL || fresh == NULL || listed == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    for (i = 0; i < nendpoints; i++) {
        if ((fresh[i] = calloc(1, sizeof(**fresh))) == NULL) {
            rc = -ENOMEM;
            goto out;
        }
        fresh[i]->addr.sin_family = AF_INET;
        fresh[i]->addr.sin_addr.s_addr = addrs[i];
        fresh[i]->addr.sin_port = ports[i];
        fresh[i]->weight = weights[i];
        fresh[i]->refs = 1;
    }
    for (i = 0; i < count; i++) {
        const consulate_route *r = &routes[i];
        if (r->vip == 0 || r->service >= MAX_SERVICE_ID || r->first > nendpoints ||
            r->count > nendpoints - r->first || r->lb > LB_WEIGHTED ||
            route_find(t, r->vip) != NULL) {
            rc = -EINVAL;
            goto out;
        }
        for (uint32_t k = r->first; k < r->first + r->count; k++) {
            if (listed[k]++) { /* in two routes: one state cannot serve both */
                rc = -EINVAL;
                goto out;
            }
            fresh[k]->service = r->service;
        }
        for (slot = &t->slots[vip_hash(r->vip) & t->mask]; slot->vip != 0;
             slot = &t->slots[(size_t)(slot - t->slots + 1) & t->mask])
            ;
        slot->vip = r->vip;
        slot->service = r->service;
        slot->first = r->first;
        slot->count = r->count;
        slot->lb = r->lb;
        if (r->service + 1 > nservices)
            nservices = r->service + 1;
    }
    pthread_mutex_lock(&e->lock);
    if (nservices > e->nservices) {
        consulate_service_counters *grown = realloc(e->services, nservices * sizeof(*grown));
        if (grown == NULL) {
            pthread_mutex_unlock(&e->lock);
            rc = -ENOMEM;
            goto out;
        }
        memset(grown + e->nservices, 0, (nservices - e->nservices) * sizeof(*grown));
        e->services = grown;
        e->nservices = nservices;
    }
    old = e->routes;
    for (i = 0; i <= t->mask; i++) { /* keep each service's turn and endpoints' state */
        struct route *now = &t->slots[i];
        struct route *before = now->vip ? route_find(old, now->vip) : NULL;
        if (before != NULL && before->service != now->service)
            before = NULL;
        if (before != NULL)
            now->next_pick = before->next_pick;
        for (uint32_t j = 0; now->vip != 0 && j < now->count; j++) {
            size_t k = now->first + j;
            struct upstream *u = before ? upstream_match(old, before, &fresh[k]->addr, j)
                                        : NULL;
            if (u != NULL) {
                u->refs++;
                u->weight = fresh[k]->weight;
            } else {
                u = fresh[k];
                fresh[k] = NULL;
            }
            t->upstreams[k] = u;
        }
    }
    e->routes = t;
    t = NULL;
    route_table_release(old);
    pthread_mutex_unlock(&e->lock);
out:
    for (i = 0; fresh != NULL && i < nendpoints; i++)
        free(fresh[i]); /* not used (NULL when it was) */
    free(fresh);
    free(listed);
    route_table_free(t); /* NULL once published; else none of its upstreams was bound */
    return rc;
}

/* Copies the counters of services [0, max) out; returns how many exist (<= max). */
static size_t consulate_relay_service_counters(consulate_relay_engine *e,
                                               consulate_service_counters *out, size_t max)
{
    size_t n;
    pthread_mutex_lock(&e->lock);
    n = e->nservices < max ? e->nservices : max;
    memcpy(out, e->services, n * sizeof(*out));
    for (size_t i = 0; e->routes != NULL && i < e->routes->nupstreams; i++) {
        const struct upstream *u = e->routes->upstreams[i];
        if (u != NULL && ejected(u) && u->service < n)
            out[u->service].ejections_active++;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* Copies up to max finished connections' results out; returns how many. */
static size_t consulate_relay_poll(consulate_relay_engine *e, consulate_relay_result *out,
                                   size_t max)
{
    uint64_t v;
    size_t n;
    ssize_t r = read(e->notify_fd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&e->lock);
    n = e->results_len < max ? e->results_len : max;
    memcpy(out, e->results, n * sizeof(*out));
    memmove(e->results, e->results + n, (e->results_len - n) * sizeof(*out));
    e->results_len -= n;
    if (e->results_len > 0)
        notify(e); /* more than max were waiting: come back */
    pthread_mutex_unlock(&e->lock);
    return n;
}

static void consulate_relay_stats_get(consulate_relay_engine *e, consulate_relay_stats *out)
{
    pthread_mutex_lock(&e->lock);
    out->active = e->active;
    out->pipes_pooled = e->pool_len;
    out->pipes_open = e->pipes_open;
    out->accepted = e->accepted;
    out->unrouted = e->unrouted;
    out->overflow = e->overflow;
    pthread_mutex_unlock(&e->lock);
}

/* Ends every connection (results reported as stopped) and joins the thread.
 * The engine can still be polled; free it with consulate_relay_free. */
static void consulate_relay_stop(consulate_relay_engine *e)
{
    uint64_t one = 1;
    ssize_t w;
    if (!e->thread_started)
        return;
    e->stopping = 1;
    w = write(e->wake_fd, &one, sizeof(one));
    (void)w;
    pthread_join(e->thread, NULL);
    e->thread_started = 0;
    while (e->pool_len > 0) {
        e->pool_len--;
        close(e->pool[e->pool_len][0]);
        close(e->pool[e->pool_len][1]);
        e->pipes_open--;
    }
}

static void consulate_relay_free(consulate_relay_engine *e)
{
    consulate_relay_stop(e);
    close(e->epfd);
    close(e->wake_fd);
    close(e->notify_fd);
    free(e->results);
    route_table_release(e->routes);
    free(e->services);
    pthread_mutex_destroy(&e->lock);
    free(e);
}
