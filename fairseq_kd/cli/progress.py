"""Progress of a data tool's long loop over sentences: how many are done, how fast, and how long
the rest will take, logged at most every ``--log-interval`` seconds."""

import time
from datetime import timedelta


class Progress:
    """Counts the sentences (and target tokens) this run computes, out of ``total``, and says when
    a progress line is due: ``interval`` seconds after the last one, and when the last sentence is
    done."""

    def __init__(self, total: int, interval: float):
        self.total, self.interval = total, interval
        self.done = 0
        self.tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, sentences: int, tokens: int = 0) -> bool:
        """Count a finished batch; True when a progress line is due (the interval then restarts)."""
        self.done += sentences
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last < self.interval and self.done < self.total:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        """Sentences per second so far."""
        return self.done / max(self.elapsed(), 1e-9)

    def line(self) -> str:
        """``done/total sentences | rate sentences/s | ETA h:mm:ss``."""
        rate = self.rate()
        eta = timedelta(seconds=round((self.total - self.done) / rate)) if rate > 0 else "?"
        return f"{self.done}/{self.total} sentences | {rate:.1f} sentences/s | ETA {eta}"
