"""Run the harnesses: ``python -m fuzz.run [--seconds S] [NAME ...]`` (all of them by default).

Each harness runs in a child process of its own under atheris (libFuzzer, coverage-guided,
petasus instrumented), for S seconds, starting from its corpus: the seeds its encoders make
plus the inputs kept in ``fuzz/corpus/NAME/`` (regressions). New inputs it finds go to a
scratch directory, or to ``--corpus-out DIR/NAME`` to keep them between runs. A crash prints
the harness, the traceback and the input (hex and repr), saves it as
``fuzz/crashes/NAME-crash-<sha1>``, and makes the run exit 1.

``--replay NAME FILE...`` runs saved inputs through a harness, without atheris.
``--write-seeds DIR`` writes each harness's seeds to ``DIR/NAME/seed-*`` (a corpus to start
another fuzzer from; the runner makes its seeds afresh every run, so none are kept here).

Without atheris (it ships wheels for CPython on Linux only), a child falls back to a plain
mutation loop over the same corpus: not coverage-guided, but the same invariants.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ._kit import Harness

NAMES = ("frame", "conn", "handle", "header", "procs", "bulk", "ofi", "verbs", "store")
HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
# A harness input larger than this says nothing a smaller one would not, and costs time.
MAX_LEN = 4096


def load(name: str) -> Harness:
    return importlib.import_module(f"fuzz.{name}").HARNESS  # type: ignore[no-any-return]


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _child(name: str, workdir: str, seconds: float, seed: int) -> int:
    """The fuzzing process of one harness (argv: --child NAME WORKDIR)."""
    import logging

    # The plugins log every refused peer at WARNING: thousands of lines a second here.
    logging.disable(logging.CRITICAL)
    try:
        import atheris
    except ImportError:
        return _mutate(load(name), workdir, seconds, seed)
    # atheris sees coverage only in bytecode it instrumented: the compiled twins of petasus's
    # modules (na/accel.py) would leave it blind, so this process loads their sources.
    os.environ["PETASUS_PUREPYTHON"] = "1"
    with atheris.instrument_imports(include=["petasus"]):
        harness = load(name)
    one = harness.one_input

    def test_one_input(data: bytes) -> None:
        one(data)

    artifacts = str(CRASHES / f"{name}-")
    atheris.Setup([sys.argv[0], f"-max_total_time={max(1, int(seconds))}",
                   f"-max_len={MAX_LEN}", f"-seed={seed}", "-timeout=10",
                   "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}",
                   "-print_final_stats=1", workdir], test_one_input)
    atheris.Fuzz()
    return 0


def _mutate(harness: Harness, workdir: str, seconds: float, seed: int) -> int:
    """The fallback without atheris: random edits of the corpus, the same invariants."""
    rng = random.Random(seed)
    pool = [p.read_bytes() for p in Path(workdir).iterdir()] or [b""]
    deadline, runs = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            op, at = rng.randrange(5), rng.randint(0, len(data))
            if op == 0 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            elif op == 2:
                del data[at:at + rng.randint(1, 8)]
            elif op == 3:
                data = data[:at]
            else:
                other = rng.choice(pool)
                data[at:] = other[rng.randint(0, len(other)):]
        data = data[:MAX_LEN]
        runs += 1
        try:
            harness.one_input(bytes(data))
        except Exception:
            traceback.print_exc()
            path = CRASHES / f"{harness.name}-crash-{hashlib.sha1(data).hexdigest()}"
            CRASHES.mkdir(exist_ok=True)
            path.write_bytes(bytes(data))
            print(f"==ERROR== the input is in {path}")
            return 1
    print(f"stat::number_of_executed_units: {runs} (mutation fallback: atheris not installed)")
    return 0


def fuzz(name: str, seconds: float, seed: int, corpus_out: Path | None) -> bool:
    """One harness for ``seconds``; True if it found nothing."""
    harness = load(name)
    CRASHES.mkdir(exist_ok=True)
    before = set(CRASHES.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"petasus-fuzz-{name}-") as scratch:
        work = Path(scratch) if corpus_out is None else corpus_out / name
        work.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(harness.seeds()):
            (work / f"seed-{i:03d}").write_bytes(data)
        for path in corpus_files(name):
            shutil.copy(path, work / path.name)
        cmd = [sys.executable, "-m", "fuzz.run", "--child", name, str(work),
               "--seconds", str(seconds), "--random-seed", str(seed)]
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True,
                              errors="replace", check=False)
        took = time.monotonic() - started
    found = sorted(set(CRASHES.iterdir()) - before)
    execs = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines()
             if "number_of_executed_units" in line]
    if proc.returncode == 0 and not found:
        print(f"{name}: ok, {took:.0f} s, {execs[-1].split(':')[-1].strip() if execs else '?'}"
              f" inputs (seed {seed})")
        return True
    print(f"=== {name}: the harness failed (exit {proc.returncode}, seed {seed}) ===")
    print(_tail(proc.stdout + proc.stderr))
    for path in found:
        data = path.read_bytes()
        print(f"--- input {path.relative_to(HERE.parent)} ({len(data)} B) ---")
        print(f"hex: {data.hex()}")
        print(f"repr: {data!r}")
        print(f"replay: .venv/bin/python -m fuzz.run --replay {name} "
              f"{path.relative_to(HERE.parent)}")
    return False


def _tail(text: str, lines: int = 80) -> str:
    """The end of a child's output: the traceback, not libFuzzer's progress lines."""
    kept = [ln for ln in text.splitlines() if not ln.startswith(("#", "INFO:", "\tNEW_FUNC"))]
    return "\n".join(kept[-lines:])


def replay(name: str, files: list[str]) -> int:
    harness = load(name)
    for file in files:
        data = Path(file).read_bytes()
        verdict = harness.one_input(data)
        print(f"{file}: {'decoded' if verdict else 'refused'}, invariants hold")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"harnesses: {', '.join(NAMES)}")
    ap.add_argument("--seconds", type=float, default=10.0, help="per harness (default 10)")
    ap.add_argument("--random-seed", type=int, default=None,
                    help="libFuzzer's -seed (default: random, printed)")
    ap.add_argument("--corpus-out", type=Path, default=None,
                    help="keep each harness's grown corpus in DIR/NAME")
    ap.add_argument("--replay", action="store_true", help="run FILEs through harness NAME")
    ap.add_argument("--write-seeds", type=Path, default=None, metavar="DIR",
                    help="write each harness's seeds to DIR/NAME/")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.names[0], args.names[1], args.seconds, args.random_seed or 1)
    if args.replay:
        if len(args.names) < 2:
            ap.error("--replay needs NAME and at least one FILE")
        return replay(args.names[0], args.names[1:])
    names = args.names or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    if args.write_seeds is not None:
        for name in names:
            folder = args.write_seeds / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(load(name).seeds()):
                (folder / f"seed-{i:03d}").write_bytes(data)
        return 0
    seed = args.random_seed if args.random_seed is not None else random.randrange(1, 1 << 31)
    results = [fuzz(name, args.seconds, seed, args.corpus_out) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    # Children inherit it: with str hashing fixed, an input takes the same path every time,
    # which libFuzzer's corpus minimization and a replay both rely on.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
