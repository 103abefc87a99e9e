"""Progress of long loops: a bar on a terminal, plain periodic log lines everywhere else.

A tqdm bar redraws itself with carriage returns, which fills a CI or DVC log with thousands of
partial lines. When stderr is not a terminal, `Progress` instead logs one line every
`every_seconds` (and at the end): done/total, rate, ETA and the latest postfix values, e.g.
`precompute: 4096/10000 img (41%), 150.2 img/s, ETA 39s, loss=0.412`.
On a terminal it is a tqdm bar with a total; the CLI routes log records through tqdm
(`logging_redirect_tqdm`) so that log lines do not break an active bar.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from pipeline.distributed import is_main_process

log = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """`update(n)`, `set_postfix(**values)`, `close()`; usable as a context manager."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 every_seconds: float = 30.0, terminal: bool | None = None, leave: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.initial = initial, initial
        self.every_seconds = every_seconds
        self.postfix: dict[str, Any] = {}
        self.started = self.last_report = time.perf_counter()
        self.closed = False
        use_bar = stderr_is_terminal() if terminal is None else terminal
        # Under torchrun, rank 0 shows progress; the others stay quiet.
        self.quiet = not is_main_process()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                        dynamic_ncols=True) if use_bar and not self.quiet else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if not self.quiet and now - self.last_report >= self.every_seconds:
            self.last_report = now
            log.info("%s", self.line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The plain report: `desc: done/total unit (pct), rate, ETA, postfix`."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {format_seconds((self.total - self.done) / rate)}")
        elif self.done >= (self.total or 0) and self.total:
            parts.append(f"took {format_seconds(elapsed)}")
        parts.extend(f"{k}={v}" for k, v in self.postfix.items())
        return ", ".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.initial and not self.quiet:
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
