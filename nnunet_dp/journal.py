"""Write-ahead step journal: every private step that ever ran in an output folder, crashed runs included.

A checkpoint's ledger only knows the steps up to the moment it was written; a run that crashes after its last
checkpoint has still released noisy updates (e.g. in a checkpoint_best written later, or in a model someone copied).
The journal is appended and fsynced *before* each step draws its noise, so that the epsilon reported for a folder
covers every step whose noise may have been used (docs/invariants.md, invariant 6).

Format (text, one record per line, append-only):
  {"session": ..., "noise_multiplier": s, "sampling_rate": q, ...}   a start or resume of training (JSON)
  {"imported": [[s, q, n], ...]}                                    steps known from a checkpoint's ledger only
  s                                                                  one step under the last session's (s, q)
Reading is conservative: a line cut short by a crash ("s" without newline) is a step; a session line cut short
(nothing after it can have run, since a session line is synced before its first step) is ignored; a step line
before any session line is an error.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from nnunet_dp.errors import DPLedgerError

JOURNAL_FILE = "dp_journal.txt"
History = list[tuple[float, float, int]]


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(path: str) -> History:
    """[(sigma, q, steps), ...] of every step recorded in the journal at `path` (empty if there is none)."""
    if not os.path.isfile(path):
        return []
    history: History = []
    current: tuple[float, float] | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a session line cut short: no step of that session can have run
                if "imported" in record:
                    history.extend((float(s), float(q), int(n)) for s, q, n in record["imported"])
                    current = None
                else:
                    current = (float(record["noise_multiplier"]), float(record["sampling_rate"]))
                continue
            if current is None:
                raise DPLedgerError(f"privacy journal {path!r}, line {number}: a step before any session record. "
                                    "The journal is damaged; epsilon for this folder cannot be reported reliably.")
            history.append((*current, 1))
    return _merge(history)


def session_modes(path: str) -> list[bool | None]:
    """`private_randomness` of every session recorded in the journal at `path`, in order (None: a session line that
    does not say, written by an older version; an `imported` record counts as None too: how those steps drew their
    noise is unknown)."""
    if not os.path.isfile(path):
        return []
    modes: list[bool | None] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short: nothing of that session ran
            value = record.get("private_randomness") if "imported" not in record else None
            modes.append(value if isinstance(value, bool) else None)
    return modes


def ever_seeded(path: str) -> bool:
    """Whether any session of the journal at `path` was seeded ("reproducible, not private", docs/invariants.md, invariant 8).
    A folder that was ever seeded stays not private: its released weights carry that session's noise, which the
    seed regenerates."""
    return any(mode is False for mode in session_modes(path))


def _merge(history: History) -> History:
    """Adjacent runs with the same (sigma, q) as one entry (the accountant's result is the same)."""
    out: History = []
    for s, q, n in history:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + n)
        elif n > 0:
            out.append((s, q, n))
    return out


def total_steps(history: Sequence[tuple[float, float, int]]) -> int:
    return sum(int(n) for _, _, n in history)


class StepJournal:
    """The journal of one output folder, open for appending by the process that trains (rank 0)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, JOURNAL_FILE)
        existed = os.path.isfile(self.path)
        self._f = open(self.path, "ab")  # noqa: SIM115 (held open for the whole training; closed in close())
        if existed and self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":  # the last line was cut short by a crash: keep it on a line of its own
                    self._write(b"\n")
        if not existed:
            self._sync()
            _fsync_dir(folder)

    def history(self) -> History:
        return read_history(self.path)

    def import_history(self, history: Sequence[tuple[float, float, int]]) -> None:
        """Record steps known only from a checkpoint's ledger (a folder without journal, or an older version)."""
        self._write((json.dumps({"imported": [list(h) for h in history]}) + "\n").encode())
        self._sync()

    def start_session(self, *, noise_multiplier: float, sampling_rate: float, **info: object) -> None:
        record = {"session": time.strftime("%Y-%m-%dT%H:%M:%S"), "noise_multiplier": float(noise_multiplier),
                  "sampling_rate": float(sampling_rate), **info}
        self._write((json.dumps(record) + "\n").encode())
        self._sync()

    def record_step(self) -> None:
        """Called before a step's noise is drawn: once this returns, the step counts even if the process dies."""
        self._write(b"s\n")
        self._sync()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def _write(self, data: bytes) -> None:
        self._f.write(data)

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
