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
refused.
"""

import hashlib
import json
import math
import os
import shutil
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from fairseq_kd.losses import teacher_log_probs

FORMAT = "fairseq-kd-teacher-cache"
VERSION = 1
HEADER = "header.json"
OFFSETS = "offsets.npy"
IDS = "ids.npy"
LPROBS = "lprobs.npy"
SHARDS = "shards"
LPROB_DTYPE = np.float16


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


def _atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file, make it durable, then move it to ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")))


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
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
        os.makedirs(cache_dir, exist_ok=True)
        self._record_or_check_settings()

    def _record_or_check_settings(self) -> None:
        path = os.path.join(self.cache_dir, HEADER)
        if not os.path.isfile(path):
            _write_json(path, dict(self.settings, complete=False))
            return
        previous = {key: value for key, value in _read_json(path).items() if key != "complete"}
        differences = [
            f"  {key}: {previous.get(key)!r} in the existing build, {self.settings.get(key)!r} now"
            for key in sorted(set(previous) | set(self.settings))
            if previous.get(key) != self.settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"{self.cache_dir} holds a teacher cache built with other settings:\n" + "\n".join(differences)
                + "\nRerun with the original arguments to resume or keep it, or pass another --destdir "
                "(or delete this directory) to build a new cache"
            )

    @property
    def complete(self) -> bool:
        return _read_json(os.path.join(self.cache_dir, HEADER))["complete"]

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

        Every sentence of the shard must be there with exactly its target length in rows.
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
        lengths = self.target_sizes[start:end]
        os.makedirs(os.path.join(self.cache_dir, SHARDS), exist_ok=True)
        _atomic_write(self.shard_path(index), lambda f: np.savez(f, lengths=lengths, ids=ids, lprobs=lprobs))

    def merge(self) -> None:
        """Concatenate all shards into the final arrays, mark the cache complete, drop the shards."""
        missing = self.missing_shards()
        if missing:
            raise ValueError(f"cannot merge: shards {missing} are missing")
        _atomic_write(os.path.join(self.cache_dir, OFFSETS), lambda f: np.save(f, self.offsets))
        shape = (int(self.offsets[-1]), self.k)
        files = {"ids": (IDS, self.id_dtype), "lprobs": (LPROBS, LPROB_DTYPE)}
        arrays = {
            key: np.lib.format.open_memmap(os.path.join(self.cache_dir, name + ".tmp"), "w+", dtype, shape)
            for key, (name, dtype) in files.items()
        }
        for index in range(self.num_shards):
            start, end = self.shard_range(index)
            with np.load(self.shard_path(index)) as shard:
                if not np.array_equal(shard["lengths"], self.target_sizes[start:end]):
                    raise ValueError(
                        f"{self.shard_path(index)} was built for other data (its sentence lengths "
                        "differ from the data's); delete it and rerun to recompute it"
                    )
                for key, array in arrays.items():
                    array[self.offsets[start]:self.offsets[end]] = shard[key]
        for array in arrays.values():
            array.flush()
        arrays.clear()  # unmaps them
        for name, _ in files.values():
            tmp = os.path.join(self.cache_dir, name + ".tmp")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.cache_dir, name))
        _write_json(os.path.join(self.cache_dir, HEADER), dict(self.settings, complete=True))
        shutil.rmtree(os.path.join(self.cache_dir, SHARDS))

    def total_bytes(self) -> int:
        """Bytes of the final arrays (offsets, ids, lprobs)."""
        return self.offsets.nbytes + int(self.offsets[-1]) * bytes_per_token(self.k, self.id_dtype)


class TeacherCache:
    """Read access to a complete teacher cache (see the module doc for the format).

    Attributes:
        k: entries per position.
        vocab_size: size of the target dictionary the cache was built with.
        num_sentences: sentences in the cached split.
        lengths: int64 array, target tokens per sentence id.
        header: the whole ``header.json``.
    """

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        path = os.path.join(cache_dir, HEADER)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no teacher cache in {cache_dir} ({HEADER} missing); build one with fairseq-kd-cache-teacher"
            )
        header = _read_json(path)
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT} version {VERSION} header (format {header.get('format')!r}, "
                f"version {header.get('version')!r})"
            )
        if not header["complete"]:
            raise ValueError(
                f"the teacher cache in {cache_dir} is incomplete (its build was interrupted); rerun the "
                "same fairseq-kd-cache-teacher command to finish it"
            )
        self.header = header
        self.k = header["k"]
        self.vocab_size = header["vocab_size"]
        self.num_sentences = header["num_sentences"]
        self.offsets = np.load(os.path.join(cache_dir, OFFSETS))
        self.lengths = np.diff(self.offsets)
        self._ids = np.load(os.path.join(cache_dir, IDS), mmap_mode="r")
        self._lprobs = np.load(os.path.join(cache_dir, LPROBS), mmap_mode="r")
        expected = (header["num_tokens"], self.k)
        if len(self.offsets) != self.num_sentences + 1 or self._ids.shape != expected or self._lprobs.shape != expected:
            raise ValueError(
                f"the teacher cache in {cache_dir} is damaged: offsets {self.offsets.shape}, ids "
                f"{self._ids.shape}, lprobs {self._lprobs.shape} for a header of {self.num_sentences} "
                f"sentences and {expected} rows; {rebuild_hint(header)}"
            )

    def __len__(self) -> int:
        return self.num_sentences

    def __getstate__(self):
        # Reopen the memory maps in DataLoader workers rather than pickling the arrays.
        return {"cache_dir": self.cache_dir}

    def __setstate__(self, state):
        self.__init__(state["cache_dir"])

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
            raise ValueError(
                f"{where} was built with another target dictionary ({self.vocab_size} symbols) than "
                f"this data's ({len(dictionary)} symbols); {rebuild_hint(self.header)}"
            )
        target_sizes = np.asarray(target_sizes)
        if len(target_sizes) != self.num_sentences:
            raise ValueError(
                f"{where} holds {self.num_sentences} sentences, the data has {len(target_sizes)}; "
                f"{rebuild_hint(self.header)}"
            )
        differing = np.flatnonzero(target_sizes != self.lengths)
        if len(differing) > 0:
            first = differing[0]
            raise ValueError(
                f"{where} does not match the data: sentence id {first} has {target_sizes[first]} target "
                f"tokens, the cache {self.lengths[first]} ({len(differing)} sentences differ); "
                f"{rebuild_hint(self.header)}"
            )
