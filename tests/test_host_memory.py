"""``train.host_memory``: a kept heap serves a repeated large allocation without page faults."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ricefm import host_memory
from ricefm.errors import RiceFMInputError
from ricefm.host_memory import apply_host_memory, check_host_memory

# One 4096 x 4096 fp32 array (64 MiB = 16,384 pages of 4 KiB) made and freed per step: by torch on the main
# thread (its third step's page faults are printed) and by JAX (XLA's output buffer, from its own threads).
# Then glibc's malloc_stats (to stderr): how many heaps ("Arena N"), and the most bytes ever held by mmap.
PROBE = """
import resource, sys
from ricefm.host_memory import apply_host_memory, glibc
applied = apply_host_memory(sys.argv[1])
import jax, jax.numpy as jnp, torch
square = jax.jit(lambda x: x @ x.T)
x = jnp.ones((4096, 8), jnp.float32)
for _ in range(6):
    square(x).block_until_ready().delete()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(4096, 4096).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[-1], flush=True)
glibc().malloc_stats()
"""
PAGES = 4096 * 4096 * 4 // 4096

glibc = pytest.mark.skipif(host_memory.glibc() is None, reason="mallopt settings exist in glibc only")


def probe(mode: str) -> tuple[str, int, int, int]:
    """(applied, torch's page faults at its third 64 MiB tensor, glibc heaps, most bytes ever mmapped)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    applied, torch_faults = out.stdout.split()
    heaps = len(re.findall(r"^Arena \d+:", out.stderr, re.M))
    mmapped = int(re.search(r"^max mmap bytes\s*=\s*(\d+)", out.stderr, re.M).group(1))
    return applied, int(torch_faults), heaps, mmapped


@glibc
def test_kept_heap_reuses_large_buffers_without_page_faults():
    # every thread (XLA's pool included) allocates from the one main heap, never by mmap (Python's own
    # start-up made a few small maps first), and a repeated buffer costs no page faults
    applied, torch_faults, heaps, mmapped = probe("keep")
    assert applied == "True"
    assert heaps == 1 and mmapped < PAGES * 4096 // 16
    assert torch_faults < PAGES // 16


@glibc
def test_released_heap_faults_every_large_buffer_in_again():
    # glibc's default (what ``keep`` changes): each 64 MiB buffer is a fresh mmap, every page faulted in
    applied, torch_faults, heaps, mmapped = probe("release")
    assert applied == "False"
    assert mmapped >= PAGES * 4096 and torch_faults >= PAGES


def test_unknown_mode_names_the_field_and_choices():
    with pytest.raises(RiceFMInputError, match=r"--config.train.host_memory='forever': choose one of keep, release"):
        check_host_memory("forever")
    with pytest.raises(RiceFMInputError, match="train.host_memory"):
        apply_host_memory("")
