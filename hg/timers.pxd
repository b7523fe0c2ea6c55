# The compiled timers.py (na/accel.py) makes the timers C types: arm() runs for every call.
# timers.py stays plain Python, its twin.
cdef class Deadline:
    cdef public object deadline, live, on_expire

cdef class Timers:
    cdef public object hook, _heap, _lanes, _trim_at, _seq, _lock
