# The compiled driver.py (na/accel.py): the drivers as C types, their fields a struct's (and a
# __dict__, as the classes had). driver.py stays plain Python, its twin.
cdef class PluginSource:
    cdef public object plugin, poll_fd, progress, trigger
    cdef dict __dict__
    cdef object __weakref__

cdef class BlockingDriver:
    cdef public object _cond, _waiters, clock, lock, owner, shared, source
    cdef dict __dict__
    cdef object __weakref__

cdef class AsyncioDriver:
    cdef public object _after, _awaits, _held, _held_lock, _pending, _spin_until, _stop, _streak
    cdef public object _timer, batch, clock, closed, inline_turn, keep, loop, source, spin
    cdef public object polling, thread
    cdef dict __dict__
    cdef object __weakref__
