"""Progress for long jobs (loading, export, evaluation, distillation): a tqdm bar on a
terminal, plain lines at the start and every quarter elsewhere (a log, a pipe, CI), nothing
when disabled. Every kind has update / set_postfix / close and works as a context manager."""

from __future__ import annotations

import sys


class _Null:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Lines(_Null):
    """Plain progress lines: one at the start and one every quarter."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit = max(1, total), desc, unit
        self.done, self.next_quarter = initial, 1
        print(f"{self.desc}: {self.total} {unit}s", file=sys.stderr, flush=True)

    def update(self, n=1):
        self.done += n
        while self.next_quarter <= 4 and self.done * 4 >= self.next_quarter * self.total:
            print(f"{self.desc}: {self.next_quarter * 25}% ({self.done}/{self.total} {self.unit}s)",
                  file=sys.stderr, flush=True)
            self.next_quarter += 1


def progress(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0,
             transient: bool = False):
    """transient: the bar appears only after half a second and is erased at the end (loading)."""
    if not enabled:
        return _Null()
    if not sys.stderr.isatty():
        return _Lines(total, desc, unit, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, delay=0.5 if transient else 0,
                leave=not transient)
