"""The RPC handle state machine, as one table.

Origin (the caller's handle)::

    CREATED --forward--> FORWARDED --response--> COMPLETED
                         FORWARDED --error-----> FAILED
                         FORWARDED --timeout---> TIMED_OUT
                         FORWARDED --cancel----> CANCELED
    any finished state --forward--> FORWARDED   (a handle may be forwarded again)

Target (the handler's handle)::

    RECEIVED --respond--> RESPONDED

Events that arrive after the call has finished (a response after a timeout, a cancel after
completion) are expected on a network and are ignored; any other pair is a bug and raises
``StateError`` naming the event, the role and the state.
"""

from __future__ import annotations

CREATED, FORWARDED, COMPLETED, FAILED, TIMED_OUT, CANCELED, RECEIVED, RESPONDED = range(8)
NAMES = ("created", "forwarded", "completed", "failed", "timed out", "canceled", "received",
         "responded")
FINISHED = frozenset((COMPLETED, FAILED, TIMED_OUT, CANCELED))

ORIGIN = {
    (CREATED, "forward"): FORWARDED,
    **{(state, "forward"): FORWARDED for state in FINISHED},
    (FORWARDED, "response"): COMPLETED,
    (FORWARDED, "error"): FAILED,
    (FORWARDED, "timeout"): TIMED_OUT,
    (FORWARDED, "cancel"): CANCELED,
}
TARGET = {(RECEIVED, "respond"): RESPONDED}
LATE = frozenset((state, event) for state in FINISHED
                 for event in ("response", "error", "timeout", "cancel"))


class StateError(RuntimeError):
    """An event the table has no transition for: a bug, named by role, state and event."""

    def __init__(self, role: str, state: int | str, event: str) -> None:
        name = NAMES[state] if isinstance(state, int) else state
        super().__init__(f"{role} handle: event {event!r} is not allowed in state {name!r}")


def next_state(table: dict[tuple[int, str], int], role: str, state: int, event: str) -> int | None:
    """The state after ``event``; None for a late event to ignore; StateError otherwise."""
    new = table.get((state, event))
    if new is not None:
        return new
    if (state, event) in LATE:
        return None
    raise StateError(role, state, event)
