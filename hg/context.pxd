# The compiled context.py (na/accel.py): the context as a C type, its fields a struct's (and a
# __dict__, as the class had). context.py stays plain Python, its twin.
cdef class Context:
    cdef public object _bufs, _tags, bulk_allow, clock, closing, driver, exposed, hg, landing
    cdef public object max_expected, max_overflow, max_unexpected, na, overflow_timeout, stats
    cdef public object target, timers
    cdef dict __dict__
    cdef object __weakref__
