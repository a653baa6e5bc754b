"""CPU threads of a training process: OMP_NUM_THREADS is honoured, and the log says how many threads a step uses.

`nnUNetv2_train -device cpu` calls torch.set_num_threads(multiprocessing.cpu_count()) before it builds the trainer, so
the OMP_NUM_THREADS a user sets is ignored. Two such trainings on one machine (or one beside a test suite or a
prediction) then run 2 x cores OpenMP threads, and libgomp's spin-waiting at every parallel region's barrier turns
that into a many-fold slowdown, not a 2-fold one: two processes of 2 threads on 2 cores ran a small conv training
loop in 13.0 s each, against 1.8 s alone, 2.7 s with 1 thread each and 2.6 s under OMP_WAIT_POLICY=PASSIVE
(2026-11-28, this repository's 2-core machine). Our trainers therefore set torch's threads to OMP_NUM_THREADS when it
is set (nnU-Net's choice, all cores, stays when it is not), and log the count. Threads change no result beyond
floating-point summation order, and nothing about privacy.
"""
from __future__ import annotations

import multiprocessing
import os

import torch

ENV = "OMP_NUM_THREADS"


def requested_threads(environ: dict[str, str] | None = None) -> int | None:
    """The thread count OMP_NUM_THREADS asks for: None when unset or empty; its first entry for an OpenMP list
    ('4,2' -> 4). Raises ValueError naming the variable for anything else."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    if not raw.strip():
        return None
    first = raw.split(",")[0].strip()
    try:
        n = int(first)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV} = {raw!r} is not allowed: a positive integer (the torch threads of each training "
                         "process; their sum over the processes on a machine should not exceed its cores), or unset "
                         f"(nnU-Net's default on a CPU: all {multiprocessing.cpu_count()} cores)")
    return n


def apply_cpu_threads(device: torch.device, environ: dict[str, str] | None = None) -> str | None:
    """On a CPU device, set torch's intra-op threads to OMP_NUM_THREADS if it is set; return the log line (None on
    other devices, where nnU-Net uses 1 thread and the GPU does the work)."""
    if torch.device(device).type != "cpu":
        return None
    n = requested_threads(environ)
    if n is None:
        return (f"CPU threads: {torch.get_num_threads()} (nnU-Net's default, all cores; {ENV} is not set). Other busy "
                f"processes on these cores slow every step many-fold while OpenMP spin-waits: set {ENV} so that the "
                "threads of all processes add up to at most the cores")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return (f"CPU threads: {torch.get_num_threads()} ({ENV}={n}; nnUNetv2_train alone would use all "
            f"{multiprocessing.cpu_count()} cores)")
