"""How the process's C allocator treats freed host memory: the fit's ``host_memory`` setting.

An update allocates and frees the same buffers (activations, gradients, Adam's temporaries) again and again. With
glibc's default settings, freed blocks at the top of the heap beyond its trim threshold go back to the system, and
the next update page-faults them in again, zeroed by the kernel: 3,300–3,800 minor page faults per env step at CPU
size (Ant-v5 shapes, widths 256, batch 256), ≈ 6 % of a learning step on one core (BENCHMARKS.md). ``keep`` asks
glibc (``mallopt``) to serve blocks up to ``KEEP_BLOCKS_UP_TO`` from the heap and to keep what is freed there for
reuse. The resident memory then stays at its high-water mark, which for a fit is what its next update needs anyway.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Literal, get_args

from dime_lightning.errors import BadInputError

HostMemory = Literal["keep", "system"]
HOST_MEMORY = get_args(HostMemory)
# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BLOCKS_UP_TO = 32 * 2**20  # glibc's largest mmap threshold on 64-bit machines (half its heap size)
TRIM_ABOVE = 2**31 - 1  # an int: freed memory at the heap's top is returned only beyond 2 GiB


def apply(setting: HostMemory) -> bool:
    """``keep``: glibc keeps freed blocks (up to ``KEEP_BLOCKS_UP_TO``) for reuse; ``system``: its defaults, untouched.
    Returns whether anything changed: false for ``system``, and where the C library is not glibc (macOS,
    musl), whose defaults are left alone. Process-wide; called once, at the start of a fit."""
    if setting not in HOST_MEMORY:
        raise BadInputError(f"host_memory must be one of {HOST_MEMORY}, got {setting!r}")
    if setting == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; a refused value leaves glibc's default in place, which is only slower
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
