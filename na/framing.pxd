# The compiled framing.py (na/accel.py): the frame reader as a C type, its fields a struct's.
# framing.py stays plain Python, its twin; the fields are the names of its __slots__.
cdef class FrameReader:
    cdef public object _buf, _cap, _dest, _dest_pos, _discard, _end, _filled, _handler
    cdef public object _max_direct, _max_msg, _pending, _scratch, _size, _start, _view, peer
