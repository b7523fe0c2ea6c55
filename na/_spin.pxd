# The compiled _spin.py (na/accel.py): the spin policy as a C type, consulted at every wait.
# _spin.py stays plain Python, its twin.
cdef class SpinPolicy:
    cdef public object adapt, block_avg, budget, cap, floor, hits, late, limit, miss_run
    cdef public object misses, probe_after, probes, probing, quick, spin_avg
