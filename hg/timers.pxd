# The compiled timers.py (na/accel.py) makes the timers C types: arm() runs for every call.
# timers.py stays plain Python, its twin (Timers has no __slots__ there: a __dict__ here).
cdef class Deadline:
    cdef public object deadline, live, on_expire

cdef class Timers:
    cdef public object hook, _heap, _lanes, _trim_at, _seq, _lock
    cdef dict __dict__
    cdef object __weakref__
