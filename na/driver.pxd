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
