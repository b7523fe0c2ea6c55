# The compiled engine.py (na/accel.py): the engine as a C type, so that acall() and the wake-up
# of an awaited call read and set the engine's fields in a struct (and a __dict__ for the
# rest, as the class had). engine.py stays plain Python, its twin. Compiled, the class's own
# attributes cannot be set (Engine.acall = ... raises TypeError); a subclass's can.
cdef class Engine:
    cdef public object _aio, _async_ids, _awaiting, _closed, _declared, _driver, _inflight
    cdef public object _inflight_lock, _pool, _pool_size, _stop, _wake_awaited, context, hg
    cdef public object na, timeout
    cdef dict __dict__
    cdef object __weakref__
