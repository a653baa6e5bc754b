"""nnUNetv2_dp_experiment, progress: the ETA from the first run's measured epochs, the remaining time of the grid, and
the last error message of a failed run's log.

The first estimate comes from the first epochs of the first DP run (the public pretraining, if any, is timed but not
used: it has no DP step and no test work). A run is estimated as
- its start-up (launch to nnU-Net's first `Epoch 0` line),
- num_epochs x the wall time of an epoch: the time between nnU-Net's timestamped `Epoch N` lines, which holds the
  end-of-epoch work (checkpoint, privacy ledger) that nnU-Net's own `Epoch time` leaves out (falls back to it when
  the log has no timestamps),
- the work after training: one more start-up (nnUNetv2_predict's), the process pools it starts (nnU-Net's exports and
  evaluations, two per DP-Morph search; each measured once before the first run by `pool_start_seconds`) and
  INFERENCE_FACTOR x the voxels the sliding window feeds the network (mirroring included) x the measured training
  time per voxel.
From the first finished run on, a run is estimated by the mean of the finished ones.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

# Sliding-window inference per fed voxel (mirrored copies included), in units of the measured DP training time per
# voxel: 0.70-0.75 on 2 CPU cores both for Dataset961 (192x192 RGB, 25 windows per image) and Dataset902 (one window
# per slice) in the issue-14 timings (docs/results.md); the ETA is revised with measured times after the first run.
INFERENCE_FACTOR = 0.75
ETA_AFTER_EPOCHS = 2  # the first ETA is printed after this many epochs of the first run (fewer if it has fewer)
_EPOCH = re.compile(r"(?:^|: )Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?): ")


def pools_per_run(refinements: tuple[str, ...] | list[str]) -> int:
    """Process pools a run starts after training: nnU-Net's export of the validation and of the test predictions,
    the test evaluation, and per DP-Morph mode its search's two (scoring, checking), nnU-Net's apply and the
    evaluation."""
    return 3 + 4 * sum(1 for mode in refinements if mode != "none")


def _import_nnunet(_: int) -> None:
    import nnunetv2.evaluation.evaluate_predictions  # noqa: F401 - what the harness's pool workers import


def pool_start_seconds(num_processes: int) -> float:
    """Wall time to start a spawn pool of num_processes workers that import nnU-Net, as the harness's evaluations and
    DP-Morph searches do (on 2 CPU cores about 5 s: each spawned worker imports torch)."""
    t0 = time.time()
    with multiprocessing.get_context("spawn").Pool(max(1, num_processes)) as pool:
        pool.map(_import_nnunet, range(max(1, num_processes)))
    return time.time() - t0


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many CPU cores other processes keep busy: the non-idle share of all cores over `seconds` of /proc/stat,
    measured while this process sleeps. None where /proc/stat cannot be read (not Linux)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(fields), fields[3] + fields[4]
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


BUSY_WARN_CORES = 0.5  # other processes' load (in cores) above which a CPU grid is warned about


def busy_warning(busy: float | None, cores: int) -> str | None:
    """The warning for a CPU grid started beside other work (None when the cores are idle or unmeasured)."""
    if busy is None or busy < BUSY_WARN_CORES:
        return None
    return (f"WARNING: other processes keep {busy:.1f} of {cores} CPU cores busy. nnU-Net's CPU training and "
            "prediction take every core, and next to other work they slow down many-fold, not 2-fold (OpenMP "
            "spin-waits at every barrier: README, 'On a CPU, set OMP_NUM_THREADS'). The ETA assumes the cores stay "
            "as they are now; stop the other work, or give each process OMP_NUM_THREADS so that the threads add up to "
            "the cores.")


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f" if "." in m.group(1) else "%Y-%m-%d %H:%M:%S"
                             ).timestamp() if m else None


def last_error(text: str, max_lines: int = 6, max_chars: int = 1200) -> str:
    """The last exception of a log: the lines after the frames of its last traceback (up to a blank line or
    max_lines), else its last non-empty lines. Never empty."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    message: list[str] = []
    if starts:
        for line in lines[starts[-1] + 1:]:
            if not message and (not line.strip() or line.startswith((" ", "\t"))):
                continue  # frames, source lines, ^^^ markers
            if message and (not line.strip() or line.startswith("Traceback")):
                break
            message.append(line.rstrip())
            if len(message) >= max_lines:
                break
    if not message:
        message = [line.rstrip() for line in lines if line.strip() and not line.startswith("$ ")][-3:]
    out = "\n".join(message)
    return (out[:max_chars] + " ...") if len(out) > max_chars else (out or "(the log is empty)")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@dataclass
class _Watch:
    name: str
    started: float
    measure: bool = True  # False: the public pretraining (timed, not an estimate of a run)
    first_epoch_at: float | None = None
    epoch_times: list[float] = field(default_factory=list)  # nnU-Net's `Epoch time` values
    epoch_starts: list[float] = field(default_factory=list)  # timestamps of its `Epoch N` lines
    buffer: str = ""


class Progress:
    """Elapsed and remaining time of the grid. `start_run`, `on_log` (new text of the run's training log) and
    `end_run` feed it; `status()` is the text the progress lines carry."""

    def __init__(self, names: list[str], *, num_epochs: int, iterations: int, val_iterations: int,
                 voxels_per_step: float, predicted_voxels: float, pools: int = 0, pool_seconds: float = 0.0,
                 clock: Callable[[], float] = time.time, out: Callable[[str], None] = print) -> None:
        """predicted_voxels: what the sliding window feeds the network per run (validation and test cases, mirrored
        copies included); pools, pool_seconds: process pools a run starts after training and the measured start of
        one."""
        self.pending, self.finished = list(names), {}
        self.num_epochs, self.iterations, self.val_iterations = num_epochs, iterations, val_iterations
        self.voxels_per_step, self.predicted_voxels = voxels_per_step, predicted_voxels
        self.pools, self.pool_seconds = pools, pool_seconds
        self.clock, self.out, self.t0 = clock, out, clock()
        self.current: _Watch | None = None
        self.first_estimate: float | None = None  # seconds per run, from the first epochs
        self.announced: float | None = None  # total grid seconds announced by the first ETA

    def start_run(self, name: str, measure: bool = True) -> None:
        """measure=False: timed and counted as done, but neither the first estimate nor the mean per run (the public
        pretraining)."""
        self.current = _Watch(name, self.clock(), measure)

    def on_log(self, text: str) -> None:
        run = self.current
        if run is None:
            return
        run.buffer += text
        *complete, run.buffer = run.buffer.split("\n")
        for line in complete:
            if _EPOCH.search(line.strip()) is not None:
                run.first_epoch_at = run.first_epoch_at or self.clock()
                if (stamp := _stamp(line.strip())) is not None:
                    run.epoch_starts.append(stamp)
            elif (m := _EPOCH_TIME.search(line)) is not None:
                run.epoch_times.append(float(m.group(1)))
        if self.first_estimate is None and run.measure and (epoch := self._epoch_seconds(run)) is not None:
            self._first_eta(run, *epoch)

    def _epoch_seconds(self, run: _Watch) -> tuple[float, int, str] | None:
        """(seconds per epoch, epochs measured, what was measured) once ETA_AFTER_EPOCHS epochs are complete (the
        first, with its warm-up, only when it is the only one), else None."""
        walls = [b - a for a, b in zip(run.epoch_starts, run.epoch_starts[1:])]
        need = min(ETA_AFTER_EPOCHS, self.num_epochs - 1)
        if run.epoch_starts and need > 0:
            if len(walls) < need:
                return None
            times, what = walls[1:] or walls, "wall time between nnU-Net's Epoch lines"
        elif len(run.epoch_times) >= min(ETA_AFTER_EPOCHS, self.num_epochs):
            times, what = run.epoch_times[1:] or run.epoch_times, "nnU-Net's Epoch time"
        else:
            return None
        return sum(times) / len(times), len(times), what

    def _first_eta(self, run: _Watch, epoch: float, measured: int, what: str) -> None:
        startup = (run.first_epoch_at or run.started) - run.started
        per_voxel = epoch / max(1.0, self.iterations * self.voxels_per_step)
        inference = INFERENCE_FACTOR * self.predicted_voxels * per_voxel
        post = startup + self.pools * self.pool_seconds + inference
        self.first_estimate = startup + self.num_epochs * epoch + post
        left = self.remaining()
        self.announced = self.clock() - self.t0 + left
        self.out(f"ETA: {run.name} measured {epoch:.2f} s per epoch over {measured} epoch(s) ({what}), i.e. "
                 f"{epoch / self.iterations:.3f} s per step ({self.iterations} steps + {self.val_iterations} "
                 f"validation steps per epoch), after a {startup:.0f} s start. A run ~ {minutes(self.first_estimate)} "
                 f"(training {minutes(startup + self.num_epochs * epoch)}, then validation, test predictions, "
                 f"evaluation and DP-Morph ~ {minutes(post)}: a {startup:.0f} s start, {self.pools} process pools of "
                 f"{self.pool_seconds:.1f} s, {self.predicted_voxels / 1e6:.1f} M voxels through the sliding window "
                 f"~ {inference:.0f} s; estimated until the first run ends). The {len(self.pending)} runs left "
                 f"~ {minutes(left)}, the whole grid ~ {minutes(self.announced)}, done about {self._at(left)}.")

    def end_run(self, name: str, seconds: float, failed: bool = False) -> None:
        if name in self.pending:
            self.pending.remove(name)
        measure = self.current is None or self.current.name != name or self.current.measure
        if not failed and measure:
            first = not self.finished
            self.finished[name] = seconds
            if first and self.pending:
                left = self.remaining()
                self.out(f"ETA revised after {name} ({minutes(seconds)}): a run ~ {minutes(self._per_run() or 0)}; "
                         f"the {len(self.pending)} runs left ~ {minutes(left)}, done about {self._at(left)}.")
        self.current = None

    def _per_run(self) -> float | None:
        if self.finished:
            return sum(self.finished.values()) / len(self.finished)
        return self.first_estimate

    def remaining(self) -> float | None:
        """Seconds until the last pending run ends (the current one counted from its start), or None before the
        first estimate."""
        per_run = self._per_run()
        if per_run is None:
            return None
        current = self.current.name if self.current and self.current.name in self.pending else None
        left = per_run * (len(self.pending) - (current is not None))
        if current is not None:
            left += max(0.0, per_run - (self.clock() - self.current.started))
        return left

    def _at(self, seconds: float) -> str:
        return time.strftime("%H:%M", time.localtime(time.time() + seconds))

    def status(self) -> str:
        left = self.remaining()
        elapsed = f"{minutes(self.clock() - self.t0)} elapsed"
        return elapsed if left is None else f"{elapsed}, ~{minutes(left)} left"

    def summary(self) -> str:
        total = self.clock() - self.t0
        if self.announced is None:
            return f"Runs took {minutes(total)}."
        return (f"Runs took {minutes(total)}; the first ETA announced {minutes(self.announced)} "
                f"({100 * (total - self.announced) / self.announced:+.0f} %).")
