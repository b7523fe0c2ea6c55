"""The disk tier: one file per object, checksummed, renamed into place once complete.

A file is written under a temporary name and renamed when its bytes are all written, so a
crash (kill -9 mid-offload) leaves only temporary files, removed at the next open; the index
is the directory itself, rebuilt by reading each file's header, so it survives any restart
(Mooncake users lose SSD data on restart: #1196, #2306). The header and the data each carry
an xxh3-64 checksum (measured here at ~14 GiB/s against zlib.crc32's ~2.7 GiB/s): a damaged
object is reported lost, never returned.

File names are a hash of the key plus a generation number, so that a late copy of an older
version can never replace a newer one; the highest generation of a key wins at open.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import struct
import threading
from pathlib import Path

import xxhash

from .errors import ObjectLost, StoreError

log = logging.getLogger("petasus.store.disk")

MAGIC = b"PSO1"
VERSION = 1
# magic, version, flags, key length, data size, generation, data checksum, header checksum
HEADER = struct.Struct("<4sHHIQQQQ")
SUFFIX = ".obj"
TMP = ".tmp"
# Keys are bounded by the store's config; this bounds what a damaged header can make us read.
MAX_KEY_BYTES = 1 << 16


class DiskFull(OSError):
    """The disk tier's budget or the filesystem has no room for this copy."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


@dataclasses.dataclass(frozen=True)
class DiskEntry:
    key: str
    size: int
    gen: int
    path: str
    data_offset: int
    checksum: int

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.size


def _header(key_bytes: bytes, size: int, gen: int, checksum: int) -> bytes:
    fields = HEADER.pack(MAGIC, VERSION, 0, len(key_bytes), size, gen, checksum, 0)
    head_sum = xxhash.xxh3_64_intdigest(fields + key_bytes)
    return HEADER.pack(MAGIC, VERSION, 0, len(key_bytes), size, gen, checksum, head_sum)


class DiskTier:
    def __init__(self, root: Path, capacity: int | None = None, fsync: bool = False) -> None:
        self.root = root
        self.capacity = capacity
        self.fsync = fsync
        self._lock = threading.Lock()
        self._dirs: set[str] = set()  # fan-out directories known to exist
        self.used = 0
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"disk tier directory {root} is not usable: {exc.strerror or exc}",
                             tier="disk") from None

    def _path(self, key_bytes: bytes, gen: int) -> Path:
        digest = hashlib.blake2b(key_bytes, digest_size=16).hexdigest()
        return self.root / digest[:2] / f"{digest}.{gen:016x}{SUFFIX}"

    # --- index --------------------------------------------------------------------------
    def scan(self) -> dict[str, DiskEntry]:
        """Rebuild the index from the files; drop temporaries, damaged headers and
        superseded generations (counted in the log, never raised: one bad file must not
        make the store unopenable)."""
        found: dict[str, DiskEntry] = {}
        dropped = 0
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                name = path.name
                if name.endswith(TMP):
                    path.unlink(missing_ok=True)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                entry = self._read_header(path)
                if entry is None:
                    dropped += 1
                    continue
                old = found.get(entry.key)
                if old is not None and old.gen > entry.gen:
                    entry, old = old, entry
                if old is not None:
                    Path(old.path).unlink(missing_ok=True)
                found[entry.key] = entry
        if dropped:
            log.warning("disk tier %s: %d object files with damaged headers left aside",
                        self.root, dropped)
        self.used = sum(e.file_bytes for e in found.values())
        return found

    def _read_header(self, path: Path) -> DiskEntry | None:
        try:
            with path.open("rb") as f:
                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    return None
                magic, version, _flags, key_len, size, gen, checksum, head_sum = HEADER.unpack(head)
                if magic != MAGIC or version != VERSION or key_len > MAX_KEY_BYTES:
                    return None
                key_bytes = f.read(key_len)
                file_size = os.fstat(f.fileno()).st_size
        except OSError:
            return None
        if len(key_bytes) != key_len:
            return None
        fields = HEADER.pack(magic, version, _flags, key_len, size, gen, checksum, 0)
        if xxhash.xxh3_64_intdigest(fields + key_bytes) != head_sum:
            return None
        offset = HEADER.size + key_len
        if file_size != offset + size:  # a truncated or extended copy: indexed, read as lost
            log.warning("disk tier: %s holds %d data bytes, its header says %d", path,
                        file_size - offset, size)
        try:
            key = key_bytes.decode()
        except UnicodeDecodeError:
            return None
        return DiskEntry(key, size, gen, str(path), offset, checksum)

    # --- data -----------------------------------------------------------------------------
    def write(self, key: str, gen: int, segments: list[memoryview], size: int) -> DiskEntry:
        """Write the object from its DRAM segments (one ``pwritev``), then rename it into
        place. Raises ``DiskFull`` (an ENOSPC ``OSError``) or another ``OSError``."""
        key_bytes = key.encode()
        file_bytes = HEADER.size + len(key_bytes) + size
        with self._lock:
            if self.capacity is not None and self.used + file_bytes > self.capacity:
                raise DiskFull(f"disk tier budget {self.capacity} bytes: {self.used} used, "
                               f"{file_bytes} more needed for {key!r}")
            self.used += file_bytes
        try:
            digest = xxhash.xxh3_64()
            for seg in segments:
                digest.update(seg)
            checksum = digest.intdigest()
            path = self._path(key_bytes, gen)
            if path.parent.name not in self._dirs:
                path.parent.mkdir(exist_ok=True)
                self._dirs.add(path.parent.name)
            tmp = path.with_name(path.name + TMP)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _pwrite_all(fd, [_header(key_bytes, size, gen, checksum), key_bytes, *segments])
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            os.rename(tmp, path)
        except BaseException as exc:
            with self._lock:
                self.used -= file_bytes
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space for {key!r} in {self.root}: {exc.strerror}") from None
            raise
        return DiskEntry(key, size, gen, str(path), HEADER.size + len(key_bytes), checksum)

    def open(self, entry: DiskEntry) -> int:
        """An fd on the object: a reader opens under the store's lock, so a concurrent remove
        (an unlink) cannot take the file from under it."""
        try:
            return os.open(entry.path, os.O_RDONLY)
        except OSError as exc:
            raise ObjectLost(f"disk copy unreadable: {exc.strerror}", key=entry.key,
                             tier="disk") from None

    def read_into(self, fd: int, entry: DiskEntry, dst: memoryview) -> None:
        """Read straight into ``dst`` (``preadv``), then verify the checksum."""
        pos = 0
        try:
            while pos < entry.size:
                n = os.preadv(fd, [dst[pos : entry.size]], entry.data_offset + pos)
                if n == 0:
                    break
                pos += n
        except OSError as exc:
            raise ObjectLost(f"disk read failed: {exc.strerror}", key=entry.key,
                             tier="disk") from None
        if pos != entry.size or xxhash.xxh3_64_intdigest(dst[: entry.size]) != entry.checksum:
            raise ObjectLost("disk copy is damaged (short or checksum mismatch)",
                             key=entry.key, tier="disk")

    def read(self, fd: int, entry: DiskEntry) -> bytes:
        try:
            data = os.pread(fd, entry.size, entry.data_offset)
        except OSError as exc:
            raise ObjectLost(f"disk read failed: {exc.strerror}", key=entry.key,
                             tier="disk") from None
        if len(data) < entry.size:  # a huge object may come back short: finish in place
            out = bytearray(entry.size)
            self.read_into(fd, entry, memoryview(out))
            return bytes(out)
        if xxhash.xxh3_64_intdigest(data) != entry.checksum:
            raise ObjectLost("disk copy is damaged (checksum mismatch)", key=entry.key,
                             tier="disk")
        return data

    def delete(self, entry: DiskEntry) -> None:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("disk tier: cannot remove %s for %r: %s", entry.path, entry.key, exc)
            return
        with self._lock:
            self.used -= entry.file_bytes


def _pwrite_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """``pwritev`` until every byte is written (a large vector may be written in pieces)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    offset = 0
    while views:
        n = os.pwritev(fd, views[:1024], offset)  # IOV_MAX is 1024 on Linux
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
