"""The resumable layout of a distillation output directory.

The split's sentences are cut by id into shards of ``--shard-size`` consecutive sentences. Each
shard is translated as a unit and saved as ``SPLIT.kd.shards/NNNNNN.jsonl`` (one JSON record per
source sentence) only once complete: it is written under a temporary name and renamed into place
(``os.replace`` is atomic on POSIX), so a shard file either holds the whole shard or does not
exist. A killed run restarted with the same arguments therefore redoes exactly the shards whose
files are missing. Shards depend only on the arguments and on their own sentence ids, never on
which worker computed them or in which order, so the merged output is byte-identical however the
work was split or interrupted.

``SPLIT.kd.args.json`` records the arguments that determine the output (the teacher by its
checkpoints' SHA-256), written just before the first shard; a run that finds a different record
refuses to add to the directory, and a non-empty directory without such a record is not written to. Every file of a split's state starts with
``SPLIT.kd.``, so one directory can hold several distilled splits (e.g. train and valid).
"""

import filecmp
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

from fairseq_kd.cli.errors import UserError
from fairseq_kd.distill_bitext.selection import Hypothesis
from fairseq_kd.fileio import changed_teacher, is_temporary, refuse_other_settings, write_file, write_json


class DistillDataError(UserError):
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

    def __init__(self, destdir: str, split: str, num_sentences: int, shard_size: int, pairs_per_sentence: int,
                 manifest: Optional[Dict] = None):
        if shard_size < 1:
            raise DistillDataError(f"--shard-size must be >= 1, got {shard_size}")
        self.dir = split_state_path(destdir, split, "shards")
        self.pairs_per_sentence = pairs_per_sentence
        # recorded in SPLIT.kd.args.json just before the first shard is saved: a run refused while
        # starting (a wrong teacher, too long sentences) leaves no record to refuse its fix
        self.manifest_path = split_state_path(destdir, split, "args.json")
        self.manifest = manifest
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
        if self.manifest is not None:
            check_or_create_manifest(self.manifest_path, self.manifest)
            self.manifest = None
        os.makedirs(self.dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self.dir, f".{k:06d}.jsonl.*.tmp")):  # left by a killed run
            os.remove(stale)
        write_file(self.path(k), lambda out: out.writelines(r.to_json() + "\n" for r in records))

    def read(self, k: int) -> List[SentenceRecord]:
        """The records of shard ``k``, checked to be the whole shard, each text one line."""
        path = self.path(k)
        redo = f"delete {path} and rerun the same command: only that shard is translated again"
        records = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    records.append(SentenceRecord.from_json(line))
        except (ValueError, KeyError, TypeError) as err:  # a truncated or edited line; bad UTF-8 is a ValueError
            raise DistillDataError(f"shard file {path} is damaged at line {len(records) + 1} ({err}); {redo}") from err
        try:
            check_records(records, self.ranges[k], self.pairs_per_sentence, path)
        except CountMismatchError as err:
            raise CountMismatchError(f"{err}; {redo}") from err
        for r in records:
            if any("\n" in text or "\r" in text for text in [r.src, *(h.text for h in r.pairs)]):
                raise DistillDataError(
                    f"shard file {path}: sentence {r.id} has a line break inside its text, which would shift every "
                    f"later line of the aligned outputs; {redo}"
                )
        return records


def worker_shards(num_shards: int, num_workers: int, worker_id: int) -> List[int]:
    """The shards worker ``worker_id`` of ``num_workers`` owns: every ``num_workers``-th one,
    starting at ``worker_id``, so that each worker gets a mix of the corpus."""
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise DistillDataError(
            f"need --num-workers >= 1 and 0 <= --worker-id < --num-workers, got {num_workers} and {worker_id}"
        )
    return list(range(worker_id, num_shards, num_workers))


def check_destdir(destdir: str, data: str, langs: Sequence[str]) -> None:
    """Refuse a ``destdir`` whose files this tool did not write: a non-empty directory with no
    ``SPLIT.kd.args.json`` (e.g. another data directory, whose binarized splits the outputs would
    overwrite), or one whose dictionaries, copied there by an earlier split, differ from ``data``'s."""
    if not os.path.isdir(destdir):
        return
    # a teacher converted by --engine ctranslate2 is written before the run's args are recorded
    entries = sorted(name for name in os.listdir(destdir)
                     if not is_temporary(name) and not os.path.isfile(os.path.join(destdir, name, "export.json")))
    if entries and not glob.glob(os.path.join(glob.escape(destdir), "*.kd.args.json")):
        raise DistillDataError(
            f"--destdir {destdir} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}) and "
            "holds no fairseq-kd-distill-data output (no SPLIT.kd.args.json): this run would overwrite files it did "
            "not write; pass a new or empty --destdir"
        )
    for lang in langs:
        ours, theirs = os.path.join(destdir, f"dict.{lang}.txt"), os.path.join(data, f"dict.{lang}.txt")
        if os.path.exists(ours) and os.path.exists(theirs) and not filecmp.cmp(ours, theirs, shallow=False):
            raise DistillDataError(
                f"{ours} differs from {theirs}: the splits already distilled into {destdir} were binarized with "
                "other dictionaries, which this run would replace; pass a new --destdir"
            )


def read_manifest(path: str) -> Optional[Dict]:
    """The recorded arguments at ``path``, or None when the split has not been started."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise DistillDataError(f"{path} is damaged ({err}); write to a new --destdir") from err


def check_manifest(path: str, manifest: Dict) -> None:
    """Refuse to go on when ``path`` records other arguments than ``manifest`` (nothing recorded: fine)."""
    manifest = json.loads(json.dumps(manifest))  # compare as JSON sees it (tuples become lists)
    stored = read_manifest(path)
    if stored is None or stored == manifest:
        return
    if "teachers" in stored:
        changed = changed_teacher(stored["teachers"], manifest["teachers"])
        if changed:
            raise DistillDataError(
                f"{path}: {changed}. The finished shards of this split hold the other teacher's translations, "
                "which must not be mixed with this one's: write to a new --destdir for this teacher (or put the "
                "original checkpoint back to resume)"
            )
    refuse_other_settings(
        stored, manifest, path, f"{path}: this split was started with different arguments",
        "Resume with the same arguments, or write to a new --destdir (shards made with other settings cannot be "
        "mixed).", DistillDataError,
    )


def check_or_create_manifest(path: str, manifest: Dict) -> None:
    """Record ``manifest`` at ``path``, or, when a record exists, refuse to go on unless it is
    identical. The record is created exclusively (it fails if the file exists), so that concurrent
    workers starting together agree on one record."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(path):
        try:
            write_json(path, manifest, indent=1, sort_keys=True, exclusive=True)
        except FileExistsError:  # another worker was first: compare with its record below
            pass
    check_manifest(path, manifest)
