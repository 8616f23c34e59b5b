"""Print the OpenBLAS core type `make test` runs the evaluation tests under a second time.

Evaluation ranks hinge on the last bit of float32 distances, and OpenBLAS kernels round
differently (issue 12: tests passed with SkylakeX kernels and failed with Haswell ones), so
the evaluation tests run under the kernel this process uses AND another one. Prints nothing
(no second pass) where numpy does not use OpenBLAS or the CPU is not x86-64.
"""

import platform

import numpy  # noqa: F401  (loads numpy's OpenBLAS, so threadpoolctl sees it)
from threadpoolctl import threadpool_info

# only numpy is imported here, so an OpenBLAS loaded is numpy's: its wheel's copy (under numpy.libs)
# or, for a system numpy, the system's libopenblas. MKL or Accelerate list none: nothing printed.
kernels = [i.get("architecture") or "" for i in threadpool_info() if i.get("internal_api") == "openblas"]
if kernels and platform.machine().lower() in ("x86_64", "amd64"):
    # Haswell (AVX2) runs on every x86-64 CPU of the last decade; Sandybridge (AVX) if Haswell is the default
    print("Sandybridge" if kernels[0].lower() == "haswell" else "Haswell")
