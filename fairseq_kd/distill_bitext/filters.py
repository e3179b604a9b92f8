"""Filters that drop distilled pairs the student should not learn from.

A teacher's beam output is not uniformly good: it can be empty, loop on a phrase ("the the the
..."), come out far shorter or longer than its source, or be a low-confidence guess. Each filter
here is optional and off by default. They run in a fixed order, and a pair removed by one filter
is counted against that filter only, so the counts add up to the number of pairs removed:

1. ``empty``: the hypothesis has no tokens (``--drop-empty``);
2. ``repeats``: some n-gram of order ``--repeat-ngram-order`` occurs more than
   ``--max-ngram-repeats`` times in the hypothesis;
3. ``length_ratio``: hypothesis tokens / source tokens (subword units, without end-of-sentence)
   outside ``[--min-len-ratio, --max-len-ratio]``;
4. ``low_score``: the teacher's score (length-normalised log-probability) is among the lowest
   ``--drop-lowest-score-percent`` percent of the pairs still left; this one needs every pair of
   the split, so filtering happens when the shards are merged, never per shard.
"""

import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

FILTER_NAMES = ("empty", "repeats", "length_ratio", "low_score")


@dataclass(frozen=True)
class Pair:
    """One distilled training pair: source sentence ``id``, its text, and the chosen hypothesis."""

    id: int
    src: str
    hyp: str
    score: float
    rank: int


@dataclass(frozen=True)
class FilterConfig:
    drop_empty: bool = False
    max_ngram_repeats: Optional[int] = None
    repeat_ngram_order: int = 2
    min_len_ratio: Optional[float] = None
    max_len_ratio: Optional[float] = None
    drop_lowest_score_percent: float = 0.0

    def check(self) -> None:
        """Refuse settings that cannot mean what the user wants."""
        if self.max_ngram_repeats is not None and self.max_ngram_repeats < 1:
            raise ValueError(f"--max-ngram-repeats must be >= 1, got {self.max_ngram_repeats}")
        if self.repeat_ngram_order < 1:
            raise ValueError(f"--repeat-ngram-order must be >= 1, got {self.repeat_ngram_order}")
        for name in ("min_len_ratio", "max_len_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        bounds = (self.min_len_ratio, self.max_len_ratio)
        if None not in bounds and bounds[0] > bounds[1]:
            raise ValueError(f"--min-len-ratio {self.min_len_ratio} is above --max-len-ratio {self.max_len_ratio}")
        if not 0 <= self.drop_lowest_score_percent < 100:
            raise ValueError(f"--drop-lowest-score-percent must lie in [0, 100), got {self.drop_lowest_score_percent}")


def max_ngram_count(tokens: Sequence[str], order: int) -> int:
    """How often the most frequent n-gram of length ``order`` occurs in ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
    return max(counts.values(), default=0)


def length_ratio(src: str, hyp: str) -> float:
    """Hypothesis tokens per source token; an empty source counts as one token."""
    return len(hyp.split()) / max(len(src.split()), 1)


def _removed_by_pair_filters(pair: Pair, cfg: FilterConfig) -> Optional[str]:
    tokens = pair.hyp.split()
    if cfg.drop_empty and not tokens:
        return "empty"
    if cfg.max_ngram_repeats is not None and max_ngram_count(tokens, cfg.repeat_ngram_order) > cfg.max_ngram_repeats:
        return "repeats"
    ratio = length_ratio(pair.src, pair.hyp)
    if (cfg.min_len_ratio is not None and ratio < cfg.min_len_ratio) or (
        cfg.max_len_ratio is not None and ratio > cfg.max_len_ratio
    ):
        return "length_ratio"
    return None


def apply_filters(pairs: Sequence[Pair], cfg: FilterConfig) -> Tuple[List[Pair], Dict[str, int]]:
    """The pairs that pass every filter, in their input order, and how many each filter removed.

    ``low_score`` removes exactly ``floor(n * percent / 100)`` of the ``n`` pairs the other filters
    left, lowest scores first (among equal scores, the earlier pair), so the result does not
    depend on how scores tie.
    """
    removed = dict.fromkeys(FILTER_NAMES, 0)
    kept = []
    for pair in pairs:
        reason = _removed_by_pair_filters(pair, cfg)
        if reason is None:
            kept.append(pair)
        else:
            removed[reason] += 1
    n_low = math.floor(len(kept) * cfg.drop_lowest_score_percent / 100)
    if n_low:
        lowest = set(sorted(range(len(kept)), key=lambda i: (kept[i].score, i))[:n_low])
        kept = [pair for i, pair in enumerate(kept) if i not in lowest]
        removed["low_score"] = n_low
    return kept, removed
