"""What a pipeline run prints: a quiet terminal, one ``[k/N] stage`` line per stage, step progress.

``quiet_logs`` keeps Ray's own output off the terminal (its log files keep everything) and filters
third-party warnings; ``ConsoleReporter`` prints each stage's pasteable command, its outcome with
its time, and, for training stages, the step count with an ETA read from the trainer's
``train_log.jsonl`` (rank 0 appends a row every ``log_every`` steps), so nothing needs the workers'
logs relayed to the driver.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
from typing import TextIO

# Libraries whose warnings (deprecations, "this will change in v5") are for their own developers,
# not for someone running the quickstart; `-v` shows them again.
NOISY_WARNING_MODULES = r"(ray|accelerate|transformers|diffusers|huggingface_hub|torch|mlflow|pydantic)(\.|$)"
# Loggers that print INFO chatter at start-up (MLflow's "Creating initial MLflow database tables").
# diffusers and transformers log through their own library loggers ("Cannot initialize model with low
# cpu memory usage because `accelerate` was not found", once per model load).
NOISY_LOGGERS = (
    "mlflow",
    "alembic",
    "ray",
    "filelock",
    "urllib3",
    "httpx",
    "torch",
    "diffusers",
    "transformers",
    "huggingface_hub",
)


def quiet_logs(verbose: bool = False) -> None:
    """Quiet terminal for a pipeline run (``verbose`` keeps Ray's and the libraries' output).

    Errors still reach the terminal: a failing stage raises in the driver (Ray Train's
    ``TrainingFailedError`` carries the worker's traceback), and WARNING and above of vitdit's own
    loggers are kept.
    """
    from pipelines import runtime

    runtime.set_ray_verbosity(verbose)
    if verbose:
        return
    # Ray Data reads this when its DataContext is created; runtime.init_ray also sets the live one.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # MLflow sets its loggers' level from this when it is imported ("Creating initial MLflow database
    # tables" at INFO), overriding a level set before; already imported, the loop below applies.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # diffusers and transformers likewise read their verbosity from the environment at import.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torch.compile's inductor and Ray Train log through Python logging at INFO in the driver.
    logging.getLogger().setLevel(logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=NOISY_WARNING_MODULES)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class StepProgress:
    """Follows a trainer's ``train_log.jsonl`` in a thread and prints ``step k/N · loss · ETA`` lines.

    A line at most every ``every_s`` seconds (and the last step), so a long stage prints a few dozen
    lines, not thousands. The ETA extrapolates the rate seen since the first row of this run (a
    resumed run's earlier rows, and its compile and start-up time, do not count).
    """

    def __init__(self, path: str, total: int, prefix: str, out: TextIO | None = None, every_s: float = 15.0):
        self.path, self.total, self.prefix = path, int(total), prefix
        self.out = out or sys.stdout
        self.every_s = every_s
        self._stop = threading.Event()
        self._offset = os.path.getsize(path) if os.path.exists(path) else 0  # rows of an earlier run
        self._first: tuple[float, int] | None = None
        self._last_print = 0.0
        self._thread = threading.Thread(target=self._follow, name=f"progress-{prefix}", daemon=True)

    def start(self) -> StepProgress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll(final=True)

    def _follow(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """Read rows appended since the last call; print a line when one is due."""
        rows = self._read_new_rows()
        steps = [r for r in rows if "train/loss" in r and "step" in r]
        if not steps:
            return
        now = time.monotonic()
        row = steps[-1]
        step = int(row["step"])
        if self._first is None:
            self._first = (now, step)
        due = now - self._last_print >= self.every_s or step >= self.total or self._last_print == 0.0
        if due or final:
            self._last_print = now
            print(self.line(step, float(row["train/loss"]), now), file=self.out, flush=True)

    def line(self, step: int, loss: float, now: float) -> str:
        """``vit step 300/1200 · loss 0.0421 · 11.2 steps/s · ETA 1 min 20 s``."""
        text = f"      {self.prefix} step {step}/{self.total} · loss {loss:.4f}"
        t0, s0 = self._first or (now, step)
        if step > s0 and now > t0:
            rate = (step - s0) / (now - t0)
            text += f" · {rate:.1f} steps/s"
            if step < self.total:
                text += f" · ETA {format_seconds((self.total - step) / rate)}"
        return text

    def _read_new_rows(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind("\n") + 1]  # a row being written is read next time
        self._offset += len(complete.encode())
        rows = []
        for line in complete.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


class ConsoleReporter:
    """Prints ``[k/N] stage  <command>``, then ``[k/N] stage  done in 12 s`` (or FAILED, or skipped)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, progress_every_s: float = 15.0):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress_every_s = progress_every_s
        self._progress: StepProgress | None = None

    def stage_started(
        self, index: int, total: int, name: str, command: str, train_log: tuple[str, int] | None
    ):
        """``train_log``: (path of the trainer's train_log.jsonl, total steps) for training stages."""
        print(f"[{index}/{total}] {name:8s} {command}", file=self.out, flush=True)
        if train_log is not None:
            path, steps = train_log
            self._progress = StepProgress(path, steps, name, self.out, self.progress_every_s).start()

    def stage_finished(self, index: int, total: int, name: str, status: str, seconds: float, exit_code: int):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if status == "skipped":
            print(f"[{index}/{total}] {name:8s} output complete, skipped", file=self.out, flush=True)
        elif status == "done":
            print(f"[{index}/{total}] {name:8s} done in {format_seconds(seconds)}", file=self.out, flush=True)
        elif status == "failed":
            print(
                f"[{index}/{total}] {name:8s} FAILED (exit {exit_code}) after {format_seconds(seconds)}",
                file=self.err,
                flush=True,
            )
