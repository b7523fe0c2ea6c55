# The compiled aio_driver.py (na/accel.py): the driver as a C type, its fields a struct's (and a
# __dict__, as the class had). aio_driver.py stays plain Python, its twin.
cdef class AsyncioDriver:
    cdef public object _after, _awaits, _held, _held_lock, _pending, _spin_until, _stop, _streak
    cdef public object _timer, batch, clock, closed, inline_turn, keep, loop, source, spin
    cdef public object polling, thread
    cdef dict __dict__
    cdef object __weakref__
