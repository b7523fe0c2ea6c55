"""How long progress spins before it blocks: spin only while spinning pays. No I/O.

After an event, progress polls without blocking (yielding the CPU between polls) for a budget
before it sleeps in epoll: on this VM a blocking wake-up costs ~70 us and a polled round trip
~6 us, so a spin that catches the answer is worth ~10x in latency (DESIGN.md). But where
another runnable task shares our CPU, a ``sched_yield()`` may hand it a whole time slice
(~1-3 ms under EEVDF), while a task woken from epoll preempts it at once. Measured with a busy
process on the CPU both ends were pinned to (one call in flight, ``bench/rpc.py``'s loop):
spinning 200 us did 390-420 calls/s, blocking at once 3,000-3,400.

So the policy compares what each way of waiting achieved: the time from going idle to having
an event in hand, averaged (1/8 weight per wait, each capped at ``4 * limit``) separately
for spins and for blocking waits. It spins unless spins do more than ``SLACK`` (2) times
worse than blocking:

- a spin that finds its event within ``limit`` is a *hit*; one that finds it only later is
  *late* (a yield kept us off the CPU): both update the spin average. When spins average
  more than ``SLACK`` times the blocking waits the budget drops to zero; a late catch also
  halves it;
- a spin that runs out (a *miss*) means the peer is slow rather than that spinning is: it
  does not touch the averages; the second in a row halves the budget (below ``limit / 8``:
  zero; a lone miss among hits is a slow call, not an idle peer), so an idle
  loop stops burning CPU, and a hit restores it;
- while the budget is zero, a blocking wait that ended within ``limit`` is one a spin could
  have caught: if spins average well enough, the budget is back to ``limit`` at once; otherwise,
  after ``probe_after`` of them in a row, one *probe* spins a full ``limit``.
  A probe weighs half the spin average (it is fresh news after a stretch of blocking); one
  that does not bring spinning back doubles ``probe_after`` (up to 256); spins that
  average no worse than the blocking waits reset it to 2.

Time comes in as arguments (seconds, the caller's clock); tested with made-up waits.
"""

from __future__ import annotations

import os

PROBE_MIN = 2
PROBE_MAX = 256
WEIGHT = 1 / 8  # of each new wait in its average
# Spins must average this many times the blocking waits before we stop spinning: a blocking
# wait costs more than its latency (the waker pays for the wake-up: an IPI, a VM exit here).
# At 1x, on this VM loaded by other jobs, the blocking API gave up spinning at x16 (spins
# averaged 1.8x the blocking waits) and did 25.5K/s where always spinning did 34.9K/s; with a
# busy process on the CPU, spins averaged 2.3-10x.
SLACK = 2.0
# Spins in a row that must run out before the budget halves. One miss among hits is a call
# that took longer than most (a handler that pulls, a page fault), not an idle peer: halving
# on it cost three more misses or blocking waits before the budget came back, and made
# handle RPCs over sm, both ends pinned apart, 0.5-0.7x the fixed budget (bench/handle_rpc.py).
MISS_RUN = 2
# PETASUS_SPIN_ADAPT=0: the fixed budget of before (spin the whole limit after every event),
# for comparison and for machines where the heuristic guesses wrong.
ADAPT = os.environ.get("PETASUS_SPIN_ADAPT", "1") != "0"


class SpinPolicy:
    """The spin budget (seconds) of one progress loop, and what moves it."""

    __slots__ = ("adapt", "block_avg", "budget", "cap", "floor", "hits", "late", "limit",
                 "miss_run", "misses", "probe_after", "probes", "probing", "quick", "spin_avg")

    def __init__(self, limit: float, adapt: bool = ADAPT) -> None:
        if limit < 0:
            raise ValueError(f"spin limit must be >= 0 seconds, not {limit!r}")
        self.adapt = adapt
        self.limit = limit
        self.floor = limit / 8
        self.cap = 4 * limit
        self.budget = limit
        # Until measured: a spin is taken to catch its event at once and a blocking wait to
        # cost the whole limit (a wake-up is ~70 us here), so a loop starts by spinning.
        self.spin_avg = 0.0
        self.block_avg = limit
        self.probe_after = PROBE_MIN
        self.probing = False
        self.quick = 0  # blocking waits in a row that a spin could have caught
        self.miss_run = 0  # spins in a row that ran out
        self.hits = self.late = self.misses = self.probes = 0

    def __repr__(self) -> str:
        return (f"<SpinPolicy budget={self.budget * 1e6:.0f}us of {self.limit * 1e6:.0f}us "
                f"spin_avg={self.spin_avg * 1e6:.0f}us block_avg={self.block_avg * 1e6:.0f}us "
                f"probe_after={self.probe_after} hits={self.hits} late={self.late} "
                f"misses={self.misses} probes={self.probes}>")

    def statistics(self) -> dict[str, int]:
        return {"spin_budget_us": round(self.budget * 1e6), "spin_hits": self.hits,
                "spin_late": self.late, "spin_misses": self.misses,
                "spin_probes": self.probes}

    def caught(self, waited: float) -> None:
        """A spin found an event ``waited`` seconds after it began."""
        if not self.adapt:
            self.hits += 1
            return
        # Once per event of a busy loop: each attribute read once (sm, one call in flight:
        # 40.2K -> 41.7K/s with the blocking driver's loop inlined in the same change).
        probing = self.probing
        if probing:
            self.probing = False
        self.miss_run = 0
        # A probe is fresh news after a stretch of blocking: it counts for half the average.
        avg = self.spin_avg = self.spin_avg + (min(waited, self.cap) - self.spin_avg) * (
            0.5 if probing else WEIGHT)
        block = self.block_avg
        limit = self.limit
        if avg > SLACK * block:
            if waited <= limit:
                self.hits += 1
            else:
                self.late += 1
            if probing:
                self.probe_after = min(PROBE_MAX, self.probe_after * 2)
            self.budget = 0.0
            return
        if avg <= block:
            self.probe_after = PROBE_MIN
        if waited <= limit:
            self.hits += 1
            self.budget = limit
        else:
            self.late += 1
            self._halve()

    def missed(self) -> None:
        """A spin used its whole budget and found nothing."""
        if not self.adapt:
            self.misses += 1
            return
        self.misses += 1
        self.miss_run += 1
        if self.probing:
            self.probing = False
            self.probe_after = min(PROBE_MAX, self.probe_after * 2)
            self.budget = 0.0
        elif self.miss_run >= MISS_RUN:
            self._halve()

    def woke(self, waited: float) -> None:
        """A wait that blocked from the start ended with an event after ``waited`` seconds."""
        if self.budget or not self.limit or not self.adapt:
            return
        self.block_avg += (min(waited, self.cap) - self.block_avg) * WEIGHT
        if waited <= self.limit:
            if self.spin_avg <= SLACK * self.block_avg:
                # Spins do better on the record (the budget ran down on misses or a late
                # catch), and this wait was one a spin could have caught.
                self.budget = self.limit
                return
            self.quick += 1
            if self.quick >= self.probe_after:
                self.quick = 0
                self.probes += 1
                self.probing = True
                self.budget = self.limit
        else:
            self.quick = 0

    def _halve(self) -> None:
        budget = self.budget / 2
        self.budget = budget if budget >= self.floor else 0.0

