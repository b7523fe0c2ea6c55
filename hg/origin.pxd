# The compiled origin.py (na/accel.py) makes Handle a C type, so forward() and the answer's
# path read and set the handle's fields in a struct. origin.py stays plain Python, its twin;
# the fields are the names of its __slots__.
cdef class Handle:
    cdef public object _exposure, _flow, _overflow, _pull, _recv, addr, callback, context
    cdef public object deadline, error, rpc, state, tag, timeout, value, waiter
