"""nnUNetv2_dp_experiment, progress: the ETA from the first run's measured epochs, the remaining time of the grid, and
the last error message of a failed run's log.

The first estimate comes from the first epochs of the first run (nnU-Net's `Epoch time: X s` lines): its start-up,
num_epochs x the epoch time, and the work after training (final validation, test predictions, DP-Morph, evaluation)
estimated as one more start-up (nnUNetv2_predict's) plus POST_TRAINING_FACTOR x the voxels nnU-Net's sliding window
predicts x the measured time per training voxel. From the first finished run on, a run is estimated by the mean of the finished ones.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The work after training per predicted voxel, in units of the measured time per voxel of a training epoch (whose
# time also holds the validation steps). Rough, from Dataset902 2d under `tiny` (docs/results.md: ~1.5 of ~5 minutes
# per DP run after training); the ETA is revised with measured times as soon as the first run has finished.
POST_TRAINING_FACTOR = 2.5
ETA_AFTER_EPOCHS = 2  # the first ETA is printed after this many epochs of the first run (fewer if it has fewer)
_EPOCH = re.compile(r"(?:^|: )Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")


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
    first_epoch_at: float | None = None
    epoch_times: list[float] = field(default_factory=list)
    buffer: str = ""


class Progress:
    """Elapsed and remaining time of the grid. `start_run`, `on_log` (new text of the run's training log) and
    `end_run` feed it; `status()` is the text the progress lines carry."""

    def __init__(self, names: list[str], *, num_epochs: int, iterations: int, val_iterations: int,
                 voxels_per_step: float, predicted_voxels: float, clock: Callable[[], float] = time.time,
                 out: Callable[[str], None] = print) -> None:
        self.pending, self.finished = list(names), {}
        self.num_epochs, self.iterations, self.val_iterations = num_epochs, iterations, val_iterations
        self.voxels_per_step, self.predicted_voxels = voxels_per_step, predicted_voxels
        self.clock, self.out, self.t0 = clock, out, clock()
        self.current: _Watch | None = None
        self.first_estimate: float | None = None  # seconds per run, from the first epochs
        self.announced: float | None = None  # total grid seconds announced by the first ETA

    def start_run(self, name: str) -> None:
        self.current = _Watch(name, self.clock())

    def on_log(self, text: str) -> None:
        run = self.current
        if run is None:
            return
        run.buffer += text
        *complete, run.buffer = run.buffer.split("\n")
        for line in complete:
            if _EPOCH.search(line.strip()) is not None:
                run.first_epoch_at = run.first_epoch_at or self.clock()
            elif (m := _EPOCH_TIME.search(line)) is not None:
                run.epoch_times.append(float(m.group(1)))
        if self.first_estimate is None and len(run.epoch_times) >= min(ETA_AFTER_EPOCHS, self.num_epochs):
            self._first_eta(run)

    def _first_eta(self, run: _Watch) -> None:
        times = run.epoch_times[1:] or run.epoch_times  # the first epoch includes warm-up
        epoch = sum(times) / len(times)
        startup = (run.first_epoch_at or run.started) - run.started
        per_voxel = epoch / max(1.0, self.iterations * self.voxels_per_step)
        post = startup + POST_TRAINING_FACTOR * self.predicted_voxels * per_voxel
        self.first_estimate = startup + self.num_epochs * epoch + post
        left = self.remaining()
        self.announced = self.clock() - self.t0 + left
        self.out(f"ETA: {run.name} measured {epoch:.2f} s per epoch over {len(times)} epoch(s), i.e. "
                 f"{epoch / self.iterations:.3f} s per step ({self.iterations} steps + {self.val_iterations} "
                 f"validation steps per epoch), after a {startup:.0f} s start. A run ~ {minutes(self.first_estimate)} "
                 f"(training {minutes(startup + self.num_epochs * epoch)}, then validation, test predictions and "
                 f"DP-Morph ~ {minutes(post)}: estimated until the first run ends). The {len(self.pending)} runs left "
                 f"~ {minutes(left)}, the whole grid ~ {minutes(self.announced)}, done about {self._at(left)}.")

    def end_run(self, name: str, seconds: float, failed: bool = False) -> None:
        if name in self.pending:
            self.pending.remove(name)
        if not failed:
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
