"""A run's output folder, held by one run at a time.

``RunDir`` takes an exclusive lock on ``<output_dir>/.lock`` (``fcntl.flock``: released by the
kernel when the process dies, so a crash never leaves a stale lock) and owns ``metrics.jsonl``:
a fresh run starts it empty, a resumed run keeps the rows up to the step it resumes from (rows
logged after that checkpoint, by the run that crashed, would otherwise appear twice).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class RunDir:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.enabled = enabled       # only rank 0 of a job writes
        self._lock = None
        self._log = None

    def __enter__(self) -> "RunDir":
        if not self.enabled:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output_dir {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(f"output_dir {self.path} is in use by another run (pid {holder}); "
                               f"wait for it or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd
        return self

    def start_metrics(self, resume_step: int | None) -> None:
        """Fresh run (``None``): an empty metrics file. Resume at step s: the rows of steps <= s."""
        keep = []
        if resume_step is not None and self.metrics.is_file():
            for line in self.metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue         # a line cut short by the crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    keep.append(line)
        tmp = self.metrics.with_name(self.metrics.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics)
        self._log = open(self.metrics, "a")

    def log(self, row: dict) -> None:
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()

    def __exit__(self, *exc) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None
