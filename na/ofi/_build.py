"""cffi builder of ``petasus.na.ofi._fabric`` (out-of-line API mode), run by setup.py.

``setup.py`` lists this file in ``cffi_modules`` only when libfabric's headers are installed
(``apt-get install libfabric-dev`` on Debian), so installing petasus never fails without them;
the plugin then says what is missing when an ``ofi+...`` URI is opened.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_cdefs.h").read_text())
ffibuilder.set_source(
    "petasus.na.ofi._fabric",
    (HERE / "_glue.c").read_text(),
    libraries=["fabric"],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE / "_build"), verbose=True)
