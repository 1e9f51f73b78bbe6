"""Settings for the whole test session, in place before torch's first maths call."""

import os

# MKL chooses its code path per call by memory alignment and by how many threads are free, and with it
# the order of its sums: on a busy 2-core machine two identical training runs then differ by 1e-7.
# STRICT makes every run bit-identical for a fixed thread count, which the exact-resume and
# validation-loss tests assert. (A user's CPU run may set the same variable for the same guarantee.)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
