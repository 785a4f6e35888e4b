"""cffi build script (API mode, out of line) for ``consulate.native._relay``.

The C declarations below are the whole contract between Python and the C files
(relay.c, udp_batch.c); ``consulate.native.engine`` and ``consulate.native.udp``
wrap them so that nothing else touches ``ffi``.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
typedef struct consulate_relay_result {
    uint64_t id;
    uint64_t bytes[2];
    uint64_t spliced[2];
    int reason;
    int error;
    uint32_t failed_mask;
    uint32_t service;
    uint32_t client_addr, dest_addr;
    uint16_t client_port, dest_port;
    int ncandidates;
    uint32_t candidate_addr[8];
    uint16_t candidate_port[8];
    uint32_t failures, ejections, ejection_ms;
} consulate_relay_result;

typedef struct consulate_relay_stats {
    uint64_t active;
    uint64_t pipes_pooled;
    uint64_t pipes_open;
    uint64_t accepted;
    uint64_t unrouted;
    uint64_t overflow;
} consulate_relay_stats;

typedef struct consulate_service_counters {
    uint64_t connections_total, connections_active, connect_failures, rejected;
    uint64_t bytes_to_upstream, bytes_to_client;
    uint64_t ejections, ejections_active;
    uint64_t bytes_spliced_to_upstream, bytes_spliced_to_client;
    uint64_t pending_active, pending_overflow, pending_refusing;
} consulate_service_counters;

typedef struct consulate_route {
    uint32_t vip;
    uint32_t service;
    uint32_t first, count;
    uint32_t lb;
} consulate_route;

typedef struct consulate_relay_engine consulate_relay_engine;

int consulate_splice_probe(void);
consulate_relay_engine *consulate_relay_new(int pipe_size, size_t splice_threshold,
                                            double idle_timeout, double connect_timeout,
                                            int policy);
int consulate_relay_notify_fd(consulate_relay_engine *e);
int consulate_relay_add(consulate_relay_engine *e, uint64_t id, int fd_a, int fd_b);
int consulate_relay_listen(consulate_relay_engine *e, int listen_fd, uint32_t mark,
                           int attempts, uint32_t mark_net, uint32_t mark_mask,
                           int consecutive_failures, double base_ejection_time,
                           double max_ejection_time, int max_ejection_percent,
                           uint64_t max_connections, uint64_t max_pending, int steered);
void consulate_relay_unlisten(consulate_relay_engine *e);
int consulate_relay_set_routes(consulate_relay_engine *e, const consulate_route *routes,
                               size_t count, const uint32_t *addrs, const uint16_t *ports,
                               const uint32_t *weights, size_t nendpoints);
size_t consulate_relay_service_counters(consulate_relay_engine *e,
                                        consulate_service_counters *out, size_t max);
size_t consulate_relay_poll(consulate_relay_engine *e, consulate_relay_result *out,
                            size_t max);
void consulate_relay_stats_get(consulate_relay_engine *e, consulate_relay_stats *out);
void consulate_relay_stop(consulate_relay_engine *e);
void consulate_relay_free(consulate_relay_engine *e);

typedef struct consulate_udp_batch {
    int fd;
    int slots;
    uint32_t slot_size;
    uint8_t *buf;
    uint32_t *lens;
    uint64_t truncated, send_dropped;
    ...;
} consulate_udp_batch;

consulate_udp_batch *consulate_udp_batch_new(int fd, int slots, uint32_t slot_size);
void consulate_udp_batch_free(consulate_udp_batch *b);
int consulate_udp_recv(consulate_udp_batch *b);
int consulate_udp_send(consulate_udp_batch *b, const char *data, const uint32_t *offsets,
                       const uint32_t *lens, const int *slots, int count);
int consulate_udp_peer(consulate_udp_batch *b, int slot, uint32_t *addr, uint16_t *port);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "consulate.native._relay",
    # One translation unit: the relay engine, then the batched UDP of the DNS responder.
    (HERE / "relay.c").read_text() + (HERE / "udp_batch.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
