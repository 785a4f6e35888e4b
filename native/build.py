"""cffi build script (API mode, out of line) for ``consulate.native._relay``.

The C declarations below are the whole contract between Python and relay.c;
``consulate.native.engine`` wraps them so that nothing else touches ``ffi``.
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
} consulate_relay_result;

typedef struct consulate_relay_stats {
    uint64_t active;
    uint64_t pipes_pooled;
    uint64_t pipes_open;
} consulate_relay_stats;

typedef struct consulate_relay_engine consulate_relay_engine;

int consulate_splice_probe(void);
consulate_relay_engine *consulate_relay_new(int pipe_size, size_t splice_threshold,
                                            double idle_timeout, double connect_timeout,
                                            int policy);
int consulate_relay_notify_fd(consulate_relay_engine *e);
int consulate_relay_add(consulate_relay_engine *e, uint64_t id, int fd_a, int fd_b);
int consulate_relay_connect(consulate_relay_engine *e, uint64_t id, int client_fd,
                            const uint32_t *addrs, const uint16_t *ports, int count,
                            uint32_t mark);
size_t consulate_relay_poll(consulate_relay_engine *e, consulate_relay_result *out,
                            size_t max);
void consulate_relay_stats_get(consulate_relay_engine *e, consulate_relay_stats *out);
void consulate_relay_stop(consulate_relay_engine *e);
void consulate_relay_free(consulate_relay_engine *e);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "consulate.native._relay",
    (HERE / "relay.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
