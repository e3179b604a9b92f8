"""The resumable layout of a distillation output directory.

The split's sentences are cut by id into shards of ``--shard-size`` consecutive sentences. Each
shard is translated as a unit and saved as ``SPLIT.kd.shards/NNNNNN.jsonl`` (one JSON record per
source sentence) only once complete: it is written under a temporary name and renamed into place
(``os.replace`` is atomic on POSIX), so a shard file either holds the whole shard or does not
exist. A killed run restarted with the same arguments therefore redoes exactly the shards whose
files are missing. Shards depend only on the arguments and on their own sentence ids, never on
which worker computed them or in which order, so the merged output is byte-identical however the
work was split or interrupted.

``SPLIT.kd.args.json`` records the arguments that determine the output; a run that finds a
different record refuses to add to the directory. Every file of a split's state starts with
``SPLIT.kd.``, so one directory can hold several distilled splits (e.g. train and valid).
"""

import contextlib
import glob
import json
import os
import socket
from typing import Dict, Iterator, List, Optional, Sequence

from fairseq_kd.distill_bitext.selection import Hypothesis


class DistillDataError(Exception):
    """A problem the user must fix (arguments, inputs, an incomplete directory); no traceback."""


class CountMismatchError(DistillDataError):
    """Fewer or more sentences or pairs than the input promises: never written as a shorter file."""


class SentenceRecord:
    """A source sentence of the split and the pairs selected for it.

    ``skipped`` names why a sentence has no pairs (it was too long for the teacher and the user
    allowed skipping); otherwise ``pairs`` holds exactly the number the selection makes.
    """

    __slots__ = ("id", "src", "pairs", "skipped")

    def __init__(self, id: int, src: str, pairs: Sequence[Hypothesis], skipped: Optional[str] = None):
        self.id, self.src, self.pairs, self.skipped = id, src, list(pairs), skipped

    def to_json(self) -> str:
        record = {"id": self.id, "src": self.src, "hyps": [[h.text, h.score, h.rank] for h in self.pairs]}
        if self.skipped:
            record["skipped"] = self.skipped
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "SentenceRecord":
        record = json.loads(line)
        pairs = [Hypothesis(text, score, rank) for text, score, rank in record["hyps"]]
        return cls(record["id"], record["src"], pairs, record.get("skipped"))


def split_state_path(destdir: str, split: str, name: str) -> str:
    """``DESTDIR/SPLIT.kd.NAME``: where a split's shards, arguments and summary live."""
    return os.path.join(destdir, f"{split}.kd.{name}")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` to write to; on success rename it to ``path``.

    The temporary name starts with a dot and carries the host name and process id, so concurrent
    writers (two workers merging at once, on one machine or on several sharing the directory) never
    share one, and a killed writer leaves no half-written ``path``.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_records(records: Sequence[SentenceRecord], ids: range, pairs_per_sentence: int, where: str) -> None:
    """Raise :class:`CountMismatchError` unless ``records`` are exactly the sentences ``ids``, in
    order, each with ``pairs_per_sentence`` pairs (or none, if skipped)."""
    got = [r.id for r in records]
    if got != list(ids):
        missing = sorted(set(ids) - set(got))
        extra = sorted(set(got) - set(ids))
        raise CountMismatchError(
            f"{where}: expected the {len(ids)} sentences {ids.start}..{ids.stop - 1} in order, got "
            f"{len(got)} (missing ids {missing[:10]}, unexpected ids {extra[:10]})"
        )
    for r in records:
        expected = 0 if r.skipped else pairs_per_sentence
        if len(r.pairs) != expected:
            raise CountMismatchError(f"{where}: sentence {r.id} has {len(r.pairs)} pairs, expected {expected}")


class ShardLayout:
    """Shard ``k`` holds sentences ``k * shard_size`` up to the next shard's first id."""

    def __init__(self, destdir: str, split: str, num_sentences: int, shard_size: int, pairs_per_sentence: int):
        if shard_size < 1:
            raise DistillDataError(f"--shard-size must be >= 1, got {shard_size}")
        self.dir = split_state_path(destdir, split, "shards")
        self.pairs_per_sentence = pairs_per_sentence
        self.ranges = [
            range(start, min(start + shard_size, num_sentences)) for start in range(0, num_sentences, shard_size)
        ]

    def __len__(self) -> int:
        return len(self.ranges)

    def path(self, k: int) -> str:
        return os.path.join(self.dir, f"{k:06d}.jsonl")

    def missing(self, shards: Optional[Sequence[int]] = None) -> List[int]:
        """Those of ``shards`` (default: all) whose file does not exist yet."""
        return [k for k in (range(len(self)) if shards is None else shards) if not os.path.exists(self.path(k))]

    def write(self, k: int, records: Sequence[SentenceRecord]) -> None:
        """Check that ``records`` are the whole shard ``k`` and save them atomically."""
        check_records(records, self.ranges[k], self.pairs_per_sentence, f"shard {k}")
        os.makedirs(self.dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self.dir, f".{k:06d}.jsonl.*.tmp")):  # left by a killed run
            os.remove(stale)
        with atomic_output(self.path(k)) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.writelines(r.to_json() + "\n" for r in records)

    def read(self, k: int) -> List[SentenceRecord]:
        """The records of shard ``k``, checked to be the whole shard."""
        with open(self.path(k), encoding="utf-8") as f:
            records = [SentenceRecord.from_json(line) for line in f]
        check_records(records, self.ranges[k], self.pairs_per_sentence, self.path(k))
        return records


def worker_shards(num_shards: int, num_workers: int, worker_id: int) -> List[int]:
    """The shards worker ``worker_id`` of ``num_workers`` owns: every ``num_workers``-th one,
    starting at ``worker_id``, so that each worker gets a mix of the corpus."""
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise DistillDataError(
            f"need --num-workers >= 1 and 0 <= --worker-id < --num-workers, got {num_workers} and {worker_id}"
        )
    return list(range(worker_id, num_shards, num_workers))


def check_or_create_manifest(path: str, manifest: Dict) -> None:
    """Record ``manifest`` at ``path``, or, when a record exists, refuse to go on unless it is
    identical. Creation uses ``os.link``, which fails if the file exists, so that concurrent
    workers starting together agree on one record."""
    manifest = json.loads(json.dumps(manifest))  # compare as JSON sees it (tuples become lists)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        tmp = os.path.join(directory, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=1, sort_keys=True)
            out.write("\n")
        try:
            os.link(tmp, path)
        except FileExistsError:  # another worker was first: compare with its record below
            pass
        finally:
            os.remove(tmp)
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored != manifest:
        diffs = [
            f"  {key}: {stored.get(key, '(unset)')!r} in {path}, {manifest.get(key, '(unset)')!r} now"
            for key in sorted(set(stored) | set(manifest))
            if stored.get(key) != manifest.get(key)
        ]
        raise DistillDataError(
            f"{path}: this split was started with different arguments:\n" + "\n".join(diffs)
            + "\nResume with the same arguments, or write to a new --destdir (shards made with other settings "
            "cannot be mixed)."
        )
