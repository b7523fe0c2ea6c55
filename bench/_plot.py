"""The benchmarks' pictures: PNGs drawn from the summarized rows (``--plot DIR``), with the rows
themselves beside them (``rpc.jsonl``, ``bulk.jsonl``) so a picture can be checked against its
numbers. petasus is drawn in solid lines, the peers and raw limits dashed, so that which line is
ours reads at a glance; each line is a system's best client at each point (the client may
differ from point to point; the rows say which).

matplotlib is imported here only, with the file-only Agg backend: the benchmarks run without a
display and without matplotlib when no plot is asked for.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_rows(rows: Iterable[Row], path: Path) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def _footer(fig: Any, note: str) -> None:
    command = " ".join(["python", "bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    fig.text(0.01, 0.005, f"{command} · {os.cpu_count()} CPUs · {note}", fontsize=7,
             color="0.4", ha="left", va="bottom")


QUICK = "quick run: one short round, noisy; it shows the layout, not the figures"


def _finish(fig: Any, axes: Any, note: str) -> None:
    """One legend for both panels, right of them (it would hide lines inside), the footer,
    and a warning on the picture itself when it comes from a --quick run."""
    labels: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    _footer(fig, note)
    if "--quick" in sys.argv:
        fig.text(0.5, 0.905, QUICK, color="firebrick", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 0.84, 0.95))
    fig.legend(list(labels.values()), list(labels), loc="center left",
               bbox_to_anchor=(0.845, 0.5), fontsize=8)


def _best(rows: list[Row], **match: Any) -> Row | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda r: r["value"]) if hits else None


# (label, row filter, solid?) for the rate and CPU pictures
RPC_LINES: list[tuple[str, dict[str, Any], bool]] = [
    ("petasus tcp blocking", {"plugin": "tcp", "api": "blocking", "spin_us": 200}, True),
    ("petasus tcp asyncio", {"plugin": "tcp", "api": "asyncio", "spin_us": 200}, True),
    ("petasus sm blocking", {"plugin": "sm", "api": "blocking", "spin_us": 200}, True),
    ("petasus sm asyncio", {"plugin": "sm", "api": "asyncio", "spin_us": 200}, True),
    ("pyzmq", {"plugin": "pyzmq"}, False),
    ("grpcio blocking", {"plugin": "grpcio", "api": "blocking"}, False),
    ("grpcio asyncio", {"plugin": "grpcio", "api": "asyncio"}, False),
    ("Pyro5", {"plugin": "Pyro5"}, False),
    ("aio-msgpack-rpc", {"plugin": "aio-msgpack-rpc"}, False),
]


def _rpc_series(rows: list[Row], match: dict[str, Any], pattern: str,
                field: str) -> tuple[list[int], list[float]]:
    """(in-flight counts, values) of one line: at each count the fastest matching row; the
    burst line starts from the one-in-flight point, where both patterns are one loop."""
    counts = sorted({r["concurrency"] for r in rows if r["op"] == "sum"})
    xs, ys = [], []
    for conc in counts:
        want = "window" if conc == 1 else pattern
        row = _best(rows, op="sum", concurrency=conc, pattern=want, placement="default",
                    **match)
        if row is not None and field in row:
            xs.append(conc)
            ys.append(row[field])
    return xs, ys


def rpc(results: list[Row], out: Path, note: str) -> list[Path]:
    """rpc-rate.png (calls/s against calls in flight, window and burst) and rpc-cpu.png (CPU
    microseconds per call of each side, window)."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results if r.get("bench") == "rpc"]
    _save_rows(rows, out / "rpc.jsonl")
    colors = plt.get_cmap("tab10").colors
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, pattern in zip(axes, ("window", "burst")):
        for (label, match, ours), color in zip(RPC_LINES, colors):
            xs, ys = _rpc_series(rows, match, pattern, "value")
            if xs:
                ax.plot(xs, [y / 1e3 for y in ys], "-o" if ours else "--s", color=color,
                        label=label, linewidth=2.2 if ours else 1.3, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list({r["concurrency"] for r in rows if r["op"] == "sum"}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("calls in flight")
        ax.set_title(f"{pattern}: " + ("a new call as each returns" if pattern == "window"
                                       else "N sent, N awaited"))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("thousand calls/s (sum of two int32, one client)")
    fig.suptitle("RPC rate: petasus beside the Python RPC libraries, same run, same machine")
    _finish(fig, axes, note)
    written.append(out / "rpc-rate.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, (field, side) in zip(axes, (("cpu_us_client", "client"),
                                        ("cpu_us_server", "server"))):
        for (label, match, ours), color in zip(RPC_LINES, colors):
            xs, ys = _rpc_series(rows, match, "window", field)
            if xs:
                ax.plot(xs, ys, "-o" if ours else "--s", color=color, label=label,
                        linewidth=2.2 if ours else 1.3, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list({r["concurrency"] for r in rows if r["op"] == "sum"}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("calls in flight (window)")
        ax.set_title(f"{side} process, all threads")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("CPU microseconds per call")
    fig.suptitle("CPU per call (the fastest client's row at each count; spin included)")
    _finish(fig, axes, note)
    written.append(out / "rpc-cpu.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def bulk(results: list[Row], out: Path, note: str) -> list[Path]:
    """bulk-bandwidth.png: pull and push GB/s against size per plugin (1 and 16 in flight)
    beside the raw limits and grpcio measured in the same run."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results if r.get("bench") == "bulk"]
    _save_rows(rows, out / "bulk.jsonl")
    colors = plt.get_cmap("tab10").colors
    plugins = [p for p in ("tcp", "sm", "ofi-tcp", "ofi-shm")
               if any(r["plugin"] == p for r in rows)]
    limits = [("raw socket stream", "raw", "socket-stream"),
              ("raw process_vm_readv", "raw", "process_vm_readv"),
              ("raw memcpy", "raw", "memcpy"), ("grpcio unary get", "grpcio", "get")]

    def series(plugin: str, op: str, conc: int | None) -> tuple[list[int], list[float]]:
        got = sorted((r["size"], r["value"]) for r in rows
                     if r["plugin"] == plugin and r["op"] == op and r["unit"] == "GB/s" and
                     (conc is None or r["concurrency"] == conc))
        return [s for s, _ in got], [v for _, v in got]

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, op in zip(axes, ("pull", "push")):
        for plugin, color in zip(plugins, colors):
            for conc, style in ((1, ":o"), (16, "-^")):
                xs, ys = series(plugin, op, conc)
                if xs:
                    ax.plot(xs, ys, style, color=color, linewidth=2.2 if conc == 16 else 1.6,
                            markersize=4, label=f"petasus {plugin} x{conc}")
        for (label, plugin, raw_op), color in zip(limits, colors[len(plugins):]):
            xs, ys = series(plugin, raw_op, None)
            if xs:
                ax.plot(xs, ys, "--s" if len(xs) > 1 else "s", color=color, linewidth=1.2,
                        markersize=6, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # 4 KiB and 64 MiB differ by orders of magnitude
        sizes = sorted({r["size"] for r in rows if r["op"] in ("pull", "push")})
        ax.set_xticks(sizes)
        ax.set_xticklabels([_size(s) for s in sizes])
        ax.set_xlabel("transfer size")
        ax.set_title(f"{op} (x1, x16: transfers in flight)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s")
    fig.suptitle("Bulk bandwidth: petasus beside the raw limits, same run, same machine")
    _finish(fig, axes, note)
    path = out / "bulk-bandwidth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n >> shift} {unit}"
    return f"{n} B"
