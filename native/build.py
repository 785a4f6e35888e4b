"""cffi build script for ``consulate.native._relay``.

The relay engine proper (splice(2) through per-direction pipes, GIL released) is
built in its own issue; this script already carries the build so that packaging,
``pip install .`` and the import fallback are exercised from day one.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int consulate_splice_probe(void);
    """
)
ffibuilder.set_source(
    "consulate.native._relay",
    (HERE / "relay.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
