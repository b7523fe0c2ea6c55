# The compiled _conn.py (na/accel.py): a connection as a C type, its fields a struct's (the
# Outbox stays a dataclass). _conn.py stays plain Python, its twin.
cdef class Conn:
    cdef public object accepted, active, addr, closed, connecting, dirty, fd, head_partial
    cdef public object held, hello, landing, last, name, paused, put_target, queued, reader
    cdef public object rma, routes, sendq, shake, sock, writing
