"""Progress for long runs: a bar on a terminal, a few plain lines in a log file.

With stderr a terminal, tqdm draws its bar. Otherwise (``make demo > log``, a SLURM job) a bar
would print nothing until the end, so each stage prints a heading and about ten progress lines,
each a complete line that a log file keeps.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def stage(text: str, enabled: bool = True) -> None:
    """One line naming the stage that starts now."""
    if not enabled:
        return
    from tqdm.auto import tqdm

    tqdm.write(f"== {text}", file=sys.stderr)


def warn(text: str) -> None:
    """One line about a result the user must know of, printed also where progress is off."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {text}", file=sys.stderr)


class _LogLines:
    def __init__(self, total: int, description: str, initial: int, lines: int) -> None:
        self.total, self.description, self.done = total, description, initial
        self.every = max(1, total // lines)
        self.began, self.initial = time.perf_counter(), initial
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix = postfix
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.began
            rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
            remaining = f", {(self.total - self.done) / rate:.0f} s left" if rate > 0 and self.done < self.total else ""
            extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in postfix.items())
            print(f"{self.description}: {self.done}/{self.total}{extra}, {elapsed:.0f} s{remaining}", file=sys.stderr,
                  flush=True)  # fmt: skip

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int, description: str, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=description, leave=False, file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()})

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int, description: str, enabled: bool = True, initial: int = 0, heading: str | None = None, lines: int = 10
) -> _Bar | _LogLines | _Silent:
    """A progress reporter with ``update(n, **postfix)`` and ``close()``; ``heading`` is printed first."""
    if not enabled:
        return _Silent()
    if heading:
        stage(heading)
    if sys.stderr.isatty():
        return _Bar(total, description, initial)
    return _LogLines(total, description, initial, lines)
