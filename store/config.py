"""Store configuration: one validated record, from keyword arguments or a JSON file.

The defaults are sized for one process on a workstation; part 2's master takes the same
fields from its CLI flags or a JSON file (DESIGN.md, "Master configuration by CLI flags or a
JSON file").
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


class Offload(str, enum.Enum):
    """When objects get a disk copy."""

    ON_PUT = "on_put"  # write-through: every put queues a disk copy
    ON_EVICT = "on_evict"  # only eviction candidates are written (Mooncake PR #1899)
    OFF = "off"  # DRAM only: eviction drops


class Pin(str, enum.Enum):
    """How eviction treats an object."""

    NONE = "none"
    SOFT = "soft"  # evicted only when nothing unpinned can be
    HARD = "hard"  # never evicted


MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Every knob of a store; ``validate()`` runs at construction."""

    dram_bytes: int = 256 * MiB
    # 4 KiB is one KV-cache block of a small model and the OS page: smaller pages waste bitmap
    # scans, larger ones waste tails of small objects.
    page_size: int = 4096
    high_watermark: float = 0.9
    low_watermark: float = 0.7
    offload: Offload = Offload.ON_EVICT
    force_evict: bool = False
    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 30
    # Objects waiting for their disk copy; past it eviction defers (or force-drops) candidates.
    offload_queue: int = 256
    offload_workers: int = 2
    put_timeout: float = 10.0
    promote_on_hit: bool = False
    # Disk tier budget in bytes (None: whatever the filesystem holds).
    disk_bytes: int | None = None
    # fsync each disk copy before it counts as complete: survives power loss, not only kill -9.
    disk_fsync: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.offload, Offload):
            try:
                object.__setattr__(self, "offload", Offload(self.offload))
            except ValueError:
                choices = ", ".join(o.value for o in Offload)
                raise ConfigError(
                    f"offload must be one of {choices}, not {self.offload!r}") from None
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(f"bad store configuration: {what}")

        for name in ("dram_bytes", "page_size", "max_key_bytes", "max_value_bytes",
                     "offload_queue", "offload_workers"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer, not {value!r}")
        need(self.page_size > 0 and self.page_size & (self.page_size - 1) == 0,
             f"page_size must be a power of two, not {self.page_size}")
        need(self.dram_bytes >= self.page_size,
             f"dram_bytes ({self.dram_bytes}) must hold at least one page ({self.page_size})")
        need(0.0 < self.low_watermark <= self.high_watermark <= 1.0,
             "watermarks must satisfy 0 < low <= high <= 1, "
             f"not low={self.low_watermark} high={self.high_watermark}")
        need(self.max_key_bytes > 0, f"max_key_bytes must be positive, not {self.max_key_bytes}")
        need(self.max_value_bytes >= 0, "max_value_bytes must not be negative")
        need(self.offload_queue > 0, f"offload_queue must be positive, not {self.offload_queue}")
        need(self.offload_workers > 0,
             f"offload_workers must be positive, not {self.offload_workers}")
        need(isinstance(self.put_timeout, (int, float)) and self.put_timeout >= 0,
             f"put_timeout must be a non-negative number, not {self.put_timeout!r}")
        need(self.disk_bytes is None or (isinstance(self.disk_bytes, int) and self.disk_bytes >= 0),
             f"disk_bytes must be None or a non-negative integer, not {self.disk_bytes!r}")

    @property
    def pages(self) -> int:
        return self.dram_bytes // self.page_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown store configuration keys: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad store configuration: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> StoreConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read store configuration {path}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"store configuration {path} must hold a JSON object")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["offload"] = self.offload.value
        return out
