"""Side-by-side step benchmark, the framework-free part: alternating timing, peak memory, ratios, table, JSON.

Methods are zero-argument callables doing one optimizer step. Timing runs every method in turn, round after round
(the order rotates each round), so that a change of machine load hits all methods alike; the median per method is
reported. Ratios are taken to the non-private row (`BASELINE`) of the same configuration.

Peak memory:
- CUDA: torch.cuda.max_memory_allocated over one step, with only that method's model, optimizer and batch alive
  (the caching allocator's exact count of tensor bytes; counts the model, optimizer state, batch and the step).
- CPU: the peak resident set size (VmHWM) of a fresh process that builds the model, optimizer and batch and runs
  two steps, minus its resident size before (after the imports and one SGD step of a tiny conv net, so that the
  libraries' one-off costs, oneDNN, the autograd engine, torch.optim's lazy imports, are in the baseline). torch has
  no allocator statistics on CPU, and tracemalloc does not see its allocations; a fresh process per method keeps one
  method's peak from hiding another's. It counts the same things as on CUDA, plus allocator slack of glibc malloc.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

BASELINE = "nnunet"  # nnU-Net's own non-private train step
ROW_FIELDS = ("config", "method", "time_s", "peak_mem_mb", "time_ratio", "mem_ratio")


@dataclass
class Row:
    config: str
    method: str
    time_s: float | None  # median seconds per optimizer step; None: the method did not run
    peak_mem_mb: float | None
    time_ratio: float | None = None  # to the BASELINE row of the same config
    mem_ratio: float | None = None
    times_s: list[float] = field(default_factory=list)
    batch_size: int = 0
    patch_size: list[int] = field(default_factory=list)
    strategy: str | None = None  # the per-case strategy a DP row ran (auto: the one it chose)
    overhead_share: float | None = None  # DP rows: noise + scaling + accountant / step time
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(methods: dict[str, Callable[[], Any]], *, rounds: int, warmup: int, device: torch.device,
              log: Callable[[str], None] = lambda s: None) -> dict[str, list[float]]:
    """Seconds per call of each method: `warmup` untimed calls each, then `rounds` rounds over all methods, the
    order rotated by one each round."""
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(methods[name], device))
            log(f"  round {r + 1}/{rounds} {name}: {times[name][-1]:.3f} s")
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def add_ratios(rows: list[Row]) -> list[Row]:
    """time_ratio / mem_ratio of each row to the BASELINE row of its config (None where either is missing)."""
    base = {r.config: r for r in rows if r.method == BASELINE}
    for r in rows:
        b = base.get(r.config)
        if b is None:
            continue
        r.time_ratio = _ratio(r.time_s, b.time_s)
        r.mem_ratio = _ratio(r.peak_mem_mb, b.peak_mem_mb)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process's memory map so far (VmHWM; Linux /proc). Not ru_maxrss: a child
    started by fork + exec reports its parent's peak there when that was larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def warm_libraries(dim: int) -> None:
    """One forward/backward of a tiny conv net (conv, InstanceNorm, LeakyReLU, ConvTranspose), so that one-off
    library buffers land in a memory probe's baseline, not in the first method's peak."""
    conv, tconv, norm = ((torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.InstanceNorm2d) if dim == 2 else
                         (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.InstanceNorm3d))
    net = torch.nn.Sequential(conv(1, 4, 3, padding=1), norm(4, affine=True), torch.nn.LeakyReLU(inplace=True),
                              conv(4, 4, 3, stride=2, padding=1), tconv(4, 2, 2, stride=2))
    x = torch.randn((2, 1) + (8,) * dim)
    opt = torch.optim.SGD(net.parameters(), 1e-3, momentum=0.9, nesterov=True)
    net(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    opt.step()


def run_json_subprocess(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python argv...` in a fresh process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[Row], header: str) -> str:
    width = max([12, *(len(r.config) for r in rows)])
    lines = [header, (f"{'config':<{width}} {'method':<10} {'runs':<5} {'B':>4} {'time/step s':>11} {'x nnU-Net':>9} "
                      f"{'peak MB':>9} {'x nnU-Net':>9} {'noise+acct':>10}  note")]
    for r in rows:
        share = "-" if r.overhead_share is None else f"{100 * r.overhead_share:.1f}%"
        lines.append(f"{r.config:<{width}} {r.method:<10} {r.strategy or '':<5} {r.batch_size:>4} {fmt(r.time_s, '.3f'):>11} "
                     f"{fmt(r.time_ratio, '.2f'):>9} {fmt(r.peak_mem_mb, '.0f'):>9} {fmt(r.mem_ratio, '.2f'):>9} "
                     f"{share:>10}  {r.note}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, device, load."""
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                            "cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
