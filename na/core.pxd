# The compiled core.py (na/accel.py) makes the completion queue and the matcher C types, so
# their methods, which run for every message, read their own fields from a struct. core.py
# stays plain Python, its twin; the fields are the names of its __slots__.
cdef class CompletionQueue:
    cdef public object callback_errors, completed, ops, polling, reported, wake_fd

cdef class Matcher:
    cdef public object by_peer, cq, exp_posted, held, log, max_peer, max_queued, on_drained
    cdef public object queued, stats, throttled, unexp_posted, unexp_queue
