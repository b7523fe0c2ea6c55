# The compiled _loop.py (na/accel.py): the socket plugins' event loop as a C type, its fields
# a struct's (and a __dict__, as the class had). _loop.py stays plain Python, its twin.
cdef class EventLoop:
    cdef public object closed, cq, ep, handlers, lock, on_timer, outbox, policy, spin, timer
    cdef public object first_hits, waits, woken
    cdef dict __dict__
    cdef object __weakref__
