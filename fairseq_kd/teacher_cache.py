"""Offline top-k teacher cache: the teacher's k most probable next tokens, and their
log-probabilities, at every target position of a binarized split, computed once and memory-mapped.

What is stored. For sentence ``i`` with source ``x`` and target ``y = (y_1, ..., y_n)`` (the
positions of fairseq's ``sample["target"]``, the last one being EOS), the teacher is run
teacher-forced, exactly as in training (``prev_output_tokens = (eos, y_1, ..., y_{n-1})``), and
for every position ``t`` the ``k`` largest entries of the teacher distribution at T = 1 are kept,
best first::

    log q(v | y_<t, x) = log_softmax(z_t)_v                          (one teacher)
    log q(v | y_<t, x) = log( (1/K) * sum_m softmax(z_t^m)_v )         (ensemble of K teachers:
                                                                        probabilities averaged)

The target is whatever the data directory holds: the gold translation, or the teacher's own
translation when the directory is a ``fairseq-kd-distill-data`` output. Build the cache for the
directory the student trains on.

Layout of a cache directory::

    header.json   format, version, k, vocab_size, id_dtype, lprob_dtype, num_sentences,
                  num_tokens, shard_size, data, split, source_lang, target_lang,
                  dictionary_sha256, teachers, teacher_precision, temperature (1.0), complete
    offsets.npy   int64 [num_sentences + 1]; sentence i owns rows offsets[i]:offsets[i+1]
    ids.npy       [num_tokens, k] token ids, best first; the smallest unsigned integer type
                  that holds vocab_size - 1 (uint8, uint16 or uint32)
    lprobs.npy    float16 [num_tokens, k] log q of those ids (descending)
    shards/       only while building: shard-NNNNN.npz for sentence ids
                  [N * shard_size, (N + 1) * shard_size)

The ``.npy`` files are standard numpy arrays, opened with ``mmap_mode="r"`` like fairseq's
indexed datasets. Storage is ``k * (2 + itemsize(id_dtype))`` bytes per target token (k = 8 with
uint16 ids: 32 bytes) plus 8 bytes per sentence.

Building is resumable and atomic: ``header.json`` is written first with ``complete: false`` and
the build's settings; each shard and each final array is written to a temporary file and moved
into place with :func:`os.replace`; ``complete`` becomes true only after all arrays are in place.
A rerun with the same settings computes only the missing shards; a rerun with other settings is
refused, and so is a non-empty directory that holds no cache (the merge deletes only the shard
files the build wrote). Non-finite log-probabilities are refused when a shard is written, damaged
shards when they are merged, and a damaged cache when it is opened (:class:`TeacherCache`).
"""

import contextlib
import hashlib
import json
import logging
import math
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from fairseq_kd.cli.errors import UserError
from fairseq_kd.fileio import atomic_output, disk_full_error, is_temporary, refuse_other_settings, write_file, write_json
from fairseq_kd.losses import teacher_log_probs

FORMAT = "fairseq-kd-teacher-cache"
VERSION = 1
HEADER = "header.json"
OFFSETS = "offsets.npy"
IDS = "ids.npy"
LPROBS = "lprobs.npy"
SHARDS = "shards"
LPROB_DTYPE = np.float16

logger = logging.getLogger(__name__)
SCAN_ROWS = 1 << 20  # rows per chunk when the ids and log-probabilities are checked on open


class CacheError(UserError, ValueError):
    """A teacher cache that cannot be built or read as asked; the message names the file and the fix
    (a ValueError too, as the cache's errors always were)."""


def dictionary_sha256(dictionary) -> str:
    """SHA-256 of a fairseq Dictionary's symbols in index order (counts do not matter)."""
    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def id_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index of a ``vocab_size`` vocabulary."""
    return np.min_scalar_type(max(vocab_size - 1, 0))


def bytes_per_token(k: int, id_dtype) -> int:
    """Cache storage per target token: ``k * (itemsize(float16) + itemsize(id_dtype))``."""
    return k * (np.dtype(LPROB_DTYPE).itemsize + np.dtype(id_dtype).itemsize)


def rebuild_hint(header: dict) -> str:
    """How to rebuild the cache that ``header`` describes for other data (for error messages)."""
    return (
        "rebuild the cache for the data the student trains on: fairseq-kd-cache-teacher "
        f"--teacher-path {':'.join(t['path'] for t in header['teachers'])} <that data directory> "
        f"--split <that split> --k {header['k']} --destdir <new cache dir>"
    )


@torch.no_grad()
def teacher_topk(teacher, sample: dict, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-k (ids, log-probs) of the teacher distribution at T = 1, each B x T x k.

    ``sample`` is a fairseq translation batch; the teacher is fed its ``net_input`` (source and
    teacher-forced target prefix). An ensemble's probabilities are averaged (see the module doc).
    """
    net_input = sample["net_input"]
    logits = teacher.logits(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
    lprobs, ids = teacher_log_probs(logits, 1.0).topk(k, dim=-1)
    return ids, lprobs


def rows_by_sentence(
    sample: dict, ids: torch.Tensor, lprobs: torch.Tensor, pad: int
) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """Split B x T x k batch outputs into ``(sample id, ids [n, k], lprobs [n, k])`` per sentence,
    keeping the n non-pad positions of that sentence's ``sample["target"]`` row (either padding side)."""
    keep = sample["target"].ne(pad).cpu().numpy()
    ids, lprobs = ids.cpu().numpy(), lprobs.cpu().numpy()
    for row, sample_id in enumerate(sample["id"].tolist()):
        yield sample_id, ids[row, keep[row]], lprobs[row, keep[row]]


def _read_header(path: str) -> dict:
    """A cache's ``header.json``, refused unless it is this format's."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not a teacher cache header ({err}); pass another --destdir or delete it") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        found = header if isinstance(header, dict) else {}
        raise CacheError(
            f"{path} is not a {FORMAT} version {VERSION} header (format {found.get('format')!r}, version "
            f"{found.get('version')!r}); "
            "pass another --destdir, or rebuild the cache there after deleting the directory"
        )
    return header


def check_ids(ids: np.ndarray, vocab_size: int, where: str, fix: str, first_row: int = 0) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` (unsigned: only too large ones), naming ``where``."""
    if len(ids) and int(ids.max()) >= vocab_size:
        row = first_row + int(np.flatnonzero((ids >= vocab_size).any(axis=1))[0])
        raise CacheError(f"{where}: token id {int(ids.max())} (first in row {row}) is outside the vocabulary of "
                         f"{vocab_size} symbols; {fix}")


def check_lprobs(lprobs: np.ndarray, where: str, fix: str, first_row: int = 0) -> None:
    """Refuse non-finite log-probabilities, naming ``where``."""
    finite = np.isfinite(lprobs).all(axis=1)
    if not finite.all():
        row = first_row + int(np.flatnonzero(~finite)[0])
        raise CacheError(f"{where}: non-finite log-probability (NaN or inf) in row {row}; {fix}")


class TeacherCacheWriter:
    """Builds a cache in ``cache_dir`` shard by shard (see the module doc for the layout).

    Creating the writer records the build's settings in ``header.json``, or, when the directory
    already holds a build, checks that its settings are the same (else ValueError).

    Args:
        cache_dir: the cache directory (created if needed).
        settings: what determines the cached values: ``k``, ``vocab_size``, the data directory,
            split, languages, dictionary checksum, teachers and their precision.
        target_sizes: target tokens per sentence of the split, indexed by sentence id.
        shard_size: sentences per shard.
    """

    def __init__(self, cache_dir: str, settings: dict, target_sizes: Sequence[int], shard_size: int):
        if shard_size < 1:
            raise CacheError(f"--shard-size must be >= 1, got {shard_size}")
        self.cache_dir = cache_dir
        self.target_sizes = np.asarray(target_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.target_sizes)]).astype(np.int64)
        self.shard_size = shard_size
        self.k = settings["k"]
        self.id_dtype = id_dtype_for(settings["vocab_size"])
        self.settings = json.loads(json.dumps(dict(
            settings,
            format=FORMAT,
            version=VERSION,
            id_dtype=self.id_dtype.name,
            lprob_dtype=np.dtype(LPROB_DTYPE).name,
            temperature=1.0,
            num_sentences=len(self.target_sizes),
            num_tokens=int(self.offsets[-1]),
            shard_size=shard_size,
        )))
        self._refuse_foreign_directory()
        os.makedirs(cache_dir, exist_ok=True)
        self._record_or_check_settings()

    def _refuse_foreign_directory(self) -> None:
        """Refuse a non-empty ``cache_dir`` that holds no teacher cache: its files are not ours to
        overwrite or delete (the merge removes ``shards/`` files it wrote, nothing else)."""
        if not os.path.isdir(self.cache_dir) or os.path.isfile(os.path.join(self.cache_dir, HEADER)):
            return
        entries = sorted(name for name in os.listdir(self.cache_dir) if not is_temporary(name))
        if entries:
            raise CacheError(
                f"--destdir {self.cache_dir} is not empty ({', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}) and holds no teacher cache ({HEADER} missing): "
                "its files are not this tool's to overwrite or delete; pass a new or empty --destdir"
            )

    def _record_or_check_settings(self) -> None:
        path = os.path.join(self.cache_dir, HEADER)
        if not os.path.isfile(path):
            self._write_header(complete=False)
            return
        refuse_other_settings(
            {key: value for key, value in _read_header(path).items() if key != "complete"}, self.settings,
            "the existing build", f"{self.cache_dir} holds a teacher cache built with other settings",
            "Rerun with the original arguments to resume or keep it, or pass another --destdir (or delete this "
            "directory) to build a new cache", CacheError,
        )

    def _write_header(self, complete: bool) -> None:
        """``header.json``: the build's settings and whether the final arrays are all in place."""
        write_json(os.path.join(self.cache_dir, HEADER), dict(self.settings, complete=complete), indent=2,
                   sort_keys=True, durable=True)

    @property
    def complete(self) -> bool:
        return _read_header(os.path.join(self.cache_dir, HEADER))["complete"]

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.target_sizes) / self.shard_size)

    def shard_range(self, index: int) -> Tuple[int, int]:
        """Sentence ids ``[start, end)`` of shard ``index``."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, len(self.target_sizes))

    def shard_path(self, index: int) -> str:
        return os.path.join(self.cache_dir, SHARDS, f"shard-{index:05d}.npz")

    def missing_shards(self) -> List[int]:
        """Shards not yet written (none once the cache is complete)."""
        if self.complete:
            return []
        return [i for i in range(self.num_shards) if not os.path.isfile(self.shard_path(i))]

    def write_shard(self, index: int, rows: Dict[int, Tuple[np.ndarray, np.ndarray]]) -> None:
        """Write shard ``index`` from ``rows``: sentence id -> (ids [n, k], lprobs [n, k]).

        Every sentence of the shard must be there with exactly its target length in rows, and
        every log-probability must be finite.
        """
        start, end = self.shard_range(index)
        missing = [i for i in range(start, end) if i not in rows]
        if missing:
            raise ValueError(
                f"shard {index}: no teacher output for {len(missing)} sentences (first id {missing[0]}); "
                "batching must not drop sentences"
            )
        for i in range(start, end):
            if len(rows[i][0]) != self.target_sizes[i]:
                raise ValueError(
                    f"sentence id {i}: the teacher scored {len(rows[i][0])} target positions, the "
                    f"binarized target has {self.target_sizes[i]} tokens"
                )
        ids = np.concatenate([rows[i][0] for i in range(start, end)]).astype(self.id_dtype)
        lprobs = np.concatenate([rows[i][1] for i in range(start, end)]).astype(LPROB_DTYPE)
        bad = np.flatnonzero(~np.isfinite(lprobs).all(axis=1))
        if len(bad) > 0:
            sentence = int(np.searchsorted(self.offsets, self.offsets[start] + bad[0], side="right")) - 1
            teachers = ":".join(t["path"] for t in self.settings["teachers"])
            raise CacheError(
                f"the teacher ({teachers}) gave non-finite log-probabilities (NaN or inf in {len(bad)} target "
                f"positions, the first in sentence id {sentence}); nothing was written for shard {index}. "
                "Check the checkpoint for NaN/inf weights, or rerun with --teacher-precision fp32 if the "
                f"{self.settings['teacher_precision']} forward pass overflowed"
            )
        lengths = self.target_sizes[start:end]
        os.makedirs(os.path.join(self.cache_dir, SHARDS), exist_ok=True)
        write_file(self.shard_path(index), lambda f: np.savez(f, lengths=lengths, ids=ids, lprobs=lprobs),
                   binary=True, durable=True)

    def read_shard(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Shard ``index``'s (ids, lprobs), checked to be what :meth:`write_shard` wrote for this data."""
        path = self.shard_path(index)
        start, end = self.shard_range(index)
        rows = (int(self.offsets[end] - self.offsets[start]), self.k)
        redo = f"delete {path} and rerun the same fairseq-kd-cache-teacher command to compute that shard again"
        try:
            with np.load(path) as shard:
                lengths, ids, lprobs = shard["lengths"], shard["ids"], shard["lprobs"]
        except Exception as err:  # a truncated or overwritten file: zipfile, pickle or format errors
            raise CacheError(f"shard file {path} is damaged ({type(err).__name__}: {err}); {redo}") from err
        if not np.array_equal(lengths, self.target_sizes[start:end]):
            raise CacheError(
                f"{path} was built for other data (its sentence lengths differ from the data's); {redo}"
            )
        if ids.shape != rows or lprobs.shape != rows or ids.dtype != self.id_dtype or lprobs.dtype != LPROB_DTYPE:
            raise CacheError(
                f"shard file {path} is damaged: ids {ids.dtype} {ids.shape} and log-probabilities {lprobs.dtype} "
                f"{lprobs.shape}, expected {self.id_dtype.name} and {np.dtype(LPROB_DTYPE).name} {rows}; {redo}"
            )
        check_ids(ids, self.settings["vocab_size"], path, redo)
        check_lprobs(lprobs, path, redo)
        return ids, lprobs

    def merge(self) -> None:
        """Concatenate all shards into the final arrays, mark the cache complete, drop the shards.

        The arrays are written sequentially (a full disk is an error naming the file, where a
        memory map would crash the process); each shard is checked as it is read.
        """
        missing = self.missing_shards()
        if missing:
            raise ValueError(f"cannot merge: shards {missing} are missing")
        write_file(os.path.join(self.cache_dir, OFFSETS), lambda f: np.save(f, self.offsets), binary=True, durable=True)
        shape = (int(self.offsets[-1]), self.k)
        paths = [os.path.join(self.cache_dir, name) for name in (IDS, LPROBS)]
        with contextlib.ExitStack() as stack:
            outputs = []
            for path, dtype in zip(paths, (self.id_dtype, LPROB_DTYPE)):
                f = stack.enter_context(open(stack.enter_context(atomic_output(path, durable=True)), "wb"))
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                outputs.append(f)
            for index in range(self.num_shards):
                for f, path, array in zip(outputs, paths, self.read_shard(index)):
                    try:
                        f.write(np.ascontiguousarray(array).tobytes())
                    except OSError as err:  # named here: the other file's context would claim it first
                        raise disk_full_error(err, path) or err
        self._write_header(complete=True)
        self._remove_shards()

    def _remove_shards(self) -> None:
        """Delete the shard files this build wrote, and ``shards/`` if nothing else is left in it."""
        shards = os.path.join(self.cache_dir, SHARDS)
        for index in range(self.num_shards):
            os.remove(self.shard_path(index))
        for name in os.listdir(shards):  # temporary files of killed runs
            if is_temporary(name) and name.startswith(".shard-"):
                os.remove(os.path.join(shards, name))
        left = os.listdir(shards)
        if left:
            logger.warning(f"{shards} holds files this build did not write ({', '.join(sorted(left)[:5])}); left there")
        else:
            os.rmdir(shards)

    def total_bytes(self) -> int:
        """Bytes of the final arrays (offsets, ids, lprobs)."""
        return self.offsets.nbytes + int(self.offsets[-1]) * bytes_per_token(self.k, self.id_dtype)


class TeacherCache:
    """Read access to a complete teacher cache (see the module doc for the format).

    Opening checks the header, the offsets (start 0, non-decreasing, ending at the row count), the
    arrays' dtypes and shapes and, unless ``check_values=False``, every id (below the vocabulary
    size) and log-probability (finite), so that a damaged cache fails here, naming its file,
    instead of misaligning or crashing training later. The value scan reads the whole cache once
    (DataLoader workers, which reopen it, skip it).

    Attributes:
        k: entries per position.
        vocab_size: size of the target dictionary the cache was built with.
        num_sentences: sentences in the cached split.
        lengths: int64 array, target tokens per sentence id.
        header: the whole ``header.json``.
    """

    def __init__(self, cache_dir: str, check_values: bool = True):
        self.cache_dir = cache_dir
        path = os.path.join(cache_dir, HEADER)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no teacher cache in {cache_dir} ({HEADER} missing); build one with fairseq-kd-cache-teacher"
            )
        header = _read_header(path)
        if any(not isinstance(header.get(key), int) for key in ("k", "vocab_size", "num_sentences", "num_tokens")):
            raise CacheError(f"{path} is damaged: k, vocab_size, num_sentences and num_tokens must be integers; "
                             "delete the directory and build the cache again")
        if not header.get("complete"):
            raise CacheError(
                f"the teacher cache in {cache_dir} is incomplete (its build was interrupted); rerun the "
                "same fairseq-kd-cache-teacher command to finish it"
            )
        self.header = header
        self.k = header["k"]
        self.vocab_size = header["vocab_size"]
        self.num_sentences = header["num_sentences"]
        rows = (header["num_tokens"], self.k)
        self.offsets = self._load(OFFSETS, np.int64, (self.num_sentences + 1,), mmap_mode=None)
        self.lengths = np.diff(self.offsets)
        if self.offsets[0] != 0 or (self.lengths < 0).any() or self.offsets[-1] != rows[0]:
            decreasing = np.flatnonzero(self.lengths < 0)
            raise CacheError(
                f"{os.path.join(cache_dir, OFFSETS)} is damaged: offsets must start at 0, never decrease and end "
                f"at the {rows[0]} rows of the header; they start at {self.offsets[0]}, end at {self.offsets[-1]}"
                f"{f' and decrease after sentence id {decreasing[0]}' if len(decreasing) else ''}; "
                f"{self.damaged_hint()}"
            )
        self._ids = self._load(IDS, id_dtype_for(self.vocab_size), rows)
        self._lprobs = self._load(LPROBS, LPROB_DTYPE, rows)
        if check_values:
            for start in range(0, len(self._ids), SCAN_ROWS):
                chunk = slice(start, start + SCAN_ROWS)
                check_ids(self._ids[chunk], self.vocab_size, os.path.join(cache_dir, IDS), self.damaged_hint(), start)
                check_lprobs(self._lprobs[chunk], os.path.join(cache_dir, LPROBS), self.damaged_hint(), start)

    def damaged_hint(self) -> str:
        """How to build this (complete, hence shard-less) cache again, for damaged-file errors."""
        h = self.header
        teachers = ":".join(t.get("path", "?") for t in h.get("teachers", []))
        return (
            f"delete {self.cache_dir} and build it again: fairseq-kd-cache-teacher --teacher-path {teachers} "
            f"{h.get('data')} --split {h.get('split')} --k {h['k']} --shard-size {h.get('shard_size')} "
            f"--teacher-precision {h.get('teacher_precision')} --destdir {self.cache_dir}"
        )

    def _load(self, name: str, dtype, shape: tuple, mmap_mode="r") -> np.ndarray:
        """The array ``name``, refused with its path unless it has ``dtype`` and ``shape``."""
        path = os.path.join(self.cache_dir, name)
        try:
            array = np.load(path, mmap_mode=mmap_mode)
        except FileNotFoundError as err:
            raise CacheError(f"{path} is missing although {HEADER} says the cache is complete; "
                             f"{self.damaged_hint()}") from err
        except Exception as err:  # truncated or not an .npy file
            raise CacheError(f"{path} is damaged ({type(err).__name__}: {err}); {self.damaged_hint()}") from err
        if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
            raise CacheError(
                f"{path} is damaged: {array.dtype} {array.shape}, expected {np.dtype(dtype).name} {tuple(shape)} "
                f"as {HEADER} says; {self.damaged_hint()}"
            )
        return array

    def __len__(self) -> int:
        return self.num_sentences

    def __getstate__(self):
        # Reopen the memory maps in DataLoader workers rather than pickling the arrays.
        return {"cache_dir": self.cache_dir}

    def __setstate__(self, state):
        self.__init__(state["cache_dir"], check_values=False)  # the process that pickled it checked them

    def get(self, sample_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor [n, k], lprobs HalfTensor [n, k], as stored) of sentence ``sample_id``,
        row t belonging to position t of its target."""
        start, end = self.offsets[sample_id], self.offsets[sample_id + 1]
        ids = torch.from_numpy(self._ids[start:end].astype(np.int64))
        lprobs = torch.from_numpy(np.array(self._lprobs[start:end]))
        return ids, lprobs

    def check_matches(self, target_sizes: Sequence[int], dictionary) -> None:
        """Raise ValueError unless the cache was built for a target side with this dictionary, this
        number of sentences and these per-sentence lengths (``target_sizes``, indexed by id)."""
        where = f"the teacher cache in {self.cache_dir} (built for {self.header['data']} split {self.header['split']})"
        if dictionary_sha256(dictionary) != self.header["dictionary_sha256"]:
            raise CacheError(
                f"{where} was built with another target dictionary ({self.vocab_size} symbols) than "
                f"this data's ({len(dictionary)} symbols); {rebuild_hint(self.header)}"
            )
        target_sizes = np.asarray(target_sizes)
        if len(target_sizes) != self.num_sentences:
            raise CacheError(
                f"{where} holds {self.num_sentences} sentences, the data has {len(target_sizes)}; "
                f"{rebuild_hint(self.header)}"
            )
        differing = np.flatnonzero(target_sizes != self.lengths)
        if len(differing) > 0:
            first = differing[0]
            raise CacheError(
                f"{where} does not match the data: sentence id {first} has {target_sizes[first]} target "
                f"tokens, the cache {self.lengths[first]} ({len(differing)} sentences differ); "
                f"{rebuild_hint(self.header)}"
            )
