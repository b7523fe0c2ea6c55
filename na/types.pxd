# The compiled types.py (na/accel.py) makes Op a C type: its fields are a struct's, so setting
# them in __init__ (twice a call) is a store, not a descriptor lookup. types.py stays plain
# Python, its twin; the fields are the names of its __slots__.
cdef class Op:
    cdef object __weakref__
    cdef public object addr, buffer, callback, done, error, kind, length, local, local_off
    cdef public object op_id, remaining, remote, remote_off, size, source, state, tag
