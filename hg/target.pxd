# The compiled target.py (na/accel.py): the target and its handles as C types, their fields a
# struct's. target.py stays plain Python, its twin; TargetHandle's fields are its __slots__.
cdef class Target:
    cdef public object _trim, clock, ctx, landing, max_expected, na, overflow_timeout, rpcs
    cdef public object stats, timers
    cdef dict __dict__
    cdef object __weakref__

cdef class TargetHandle:
    cdef public object args, one_way, rpc, source, state, tag, target
