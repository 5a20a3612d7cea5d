"""The engine process's allocator settings (engine/llm/cpu_malloc.py): large blocks come from the
heap and stay mapped after they are freed."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHECK = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from engine.llm.cpu_malloc import retain_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "on":
        assert retain_freed_memory()
    block = libc.malloc(8 << 20)
    mapped = libc.mallinfo2().hblkhd          # bytes in blocks served by their own mmap
    libc.free(block)
    kept = libc.mallinfo2().fordblks          # free bytes the heap keeps
    print(mapped >= 8 << 20, kept >= 8 << 20)
""")


def has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("mode, expected", [("off", "True False"), ("on", "False True")])
def test_large_blocks_stay_in_the_heap_after_free(mode, expected):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, check=True,
                            env=env)
    assert result.stdout.strip() == expected
