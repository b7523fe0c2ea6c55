"""A timerfd: the socket plugins' own deadlines made visible through ``poll_fd()``.

Whatever waits on the plugin's epoll fd (the blocking driver, an asyncio loop through
``add_reader``, a user's selector) then wakes up for the connection deadlines too, with no
thread and no period of its own. ``os.timerfd_create`` exists from Python 3.13; before that,
the same three libc calls through ctypes.
"""

from __future__ import annotations

import ctypes
import math
import os
import time

_CLOCK_MONOTONIC = 1  # what time.monotonic() reads on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """One-shot, absolute deadlines on CLOCK_MONOTONIC; ``fd`` is readable once one passes."""

    def __init__(self) -> None:
        if hasattr(os, "timerfd_create"):
            self.fd = os.timerfd_create(time.CLOCK_MONOTONIC,
                                        flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)
            self._libc = None
        else:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self.fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if self.fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.at = math.inf

    def arm(self, at: float) -> None:
        """Fire at ``at`` (time.monotonic() seconds); inf disarms."""
        self.at = at
        # 0 would disarm: a deadline already passed fires in a nanosecond instead.
        value = 0.0 if at == math.inf else max(at, 1e-9)
        if self._libc is None:
            os.timerfd_settime(self.fd, flags=os.TFD_TIMER_ABSTIME, initial=value)
            return
        sec = int(value)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((value - sec) * 1e9)))
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec),
                                      None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def clear(self) -> None:
        """Consume the expiration that made ``fd`` readable."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
