"""Bad inputs and faults of the data tools that need no teacher: a tiny teacher cache built with
the writer's own functions and then damaged, a foreign --destdir, and outputs refused before they
replace anything. The rows of docs/troubleshooting.md's "Bad input and faults: data tools" table
that need the tiny teacher are tested in test_teacher_cache.py and test_distill_data.py."""

import os

import numpy as np
import pytest

from fairseq_kd.distill_bitext.merge import write_lines
from fairseq_kd.distill_bitext.shards import CountMismatchError, DistillDataError, check_destdir
from fairseq_kd.fileio import DiskFullError, atomic_output, temporary_path
from fairseq_kd.teacher_cache import IDS, LPROBS, OFFSETS, CacheError, TeacherCache, TeacherCacheWriter

VOCAB = 40
K = 4
LENGTHS = [3, 1, 4, 2, 5]  # target tokens per sentence
SHARD_SIZE = 2  # shards of sentences {0, 1}, {2, 3}, {4}


def settings(teacher="/nowhere/teacher.pt"):
    return {
        "k": K, "vocab_size": VOCAB, "data": "/nowhere/data-bin", "split": "train", "source_lang": "src",
        "target_lang": "tgt", "dictionary_sha256": "0" * 64, "teacher_precision": "fp32",
        "teachers": [{"path": teacher, "bytes": 1, "sha256": "1" * 64}],
    }


def teacher_rows(seed=0):
    """Sentence id -> (ids [n, K], descending log-probabilities [n, K]), as the teacher gives them."""
    rng = np.random.default_rng(seed)
    rows = {}
    for i, n in enumerate(LENGTHS):
        ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(n)])
        lprobs = -np.sort(rng.uniform(0.01, 8, (n, K)), axis=1)
        rows[i] = (ids, lprobs.astype(np.float32))
    return rows


def write_shards(cache_dir, rows, merge=True):
    writer = TeacherCacheWriter(str(cache_dir), settings(), LENGTHS, SHARD_SIZE)
    for index in range(writer.num_shards):
        start, end = writer.shard_range(index)
        writer.write_shard(index, {i: rows[i] for i in range(start, end)})
    if merge:
        writer.merge()
    return writer


@pytest.fixture
def cache(tmp_path):
    """A complete tiny cache; its directory."""
    write_shards(tmp_path / "cache", teacher_rows())
    return tmp_path / "cache"


def test_a_sound_cache_opens_and_reads_back(cache):
    cache_reader = TeacherCache(str(cache))
    rows = teacher_rows()
    assert list(cache_reader.lengths) == LENGTHS
    ids, lprobs = cache_reader.get(2)
    assert ids.tolist() == rows[2][0].tolist()
    assert np.allclose(lprobs.float().numpy(), rows[2][1], atol=1e-2)


def overwrite(path, array):
    with open(path, "wb") as f:
        np.save(f, array)


@pytest.mark.parametrize("damage,file,problem", [
    ("shifted_offsets", OFFSETS, "offsets must start at 0, never decrease and end at the 15 rows"),
    ("decreasing_offsets", OFFSETS, "decrease after sentence id 1"),
    ("ids_dtype", IDS, "damaged: uint16 (15, 4), expected uint8 (15, 4)"),
    ("id_beyond_vocabulary", IDS, "token id 45 (first in row 7) is outside the vocabulary of 40 symbols"),
    ("nan_lprob", LPROBS, "non-finite log-probability (NaN or inf) in row 11"),
    ("missing_file", IDS, "is missing although header.json says the cache is complete"),
    ("truncated_file", LPROBS, "is damaged (ValueError"),
])
def test_a_damaged_cache_is_refused_on_open_naming_the_file(cache, damage, file, problem):
    path = cache / file
    if damage == "shifted_offsets":  # every sentence's rows moved by one: misaligned targets
        overwrite(path, np.load(path) + 1)
    elif damage == "decreasing_offsets":  # same total, sentence 1 "ends" before it starts
        offsets = np.load(path)
        offsets[2] = offsets[1] - 1
        overwrite(path, offsets)
    elif damage == "ids_dtype":
        overwrite(path, np.load(path).astype(np.uint16))
    elif damage == "id_beyond_vocabulary":
        ids = np.load(path)
        ids[7, 2] = 45
        overwrite(path, ids)
    elif damage == "nan_lprob":
        lprobs = np.load(path)
        lprobs[11, 0] = np.nan
        overwrite(path, lprobs)
    elif damage == "missing_file":
        path.unlink()
    elif damage == "truncated_file":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CacheError) as error:
        TeacherCache(str(cache))
    message = str(error.value)
    assert f"{path}" in message and problem in message
    assert f"delete {cache} and build it again: fairseq-kd-cache-teacher --teacher-path" in message


def test_a_nan_from_the_teacher_is_refused_when_building(tmp_path):
    rows = teacher_rows()
    rows[3][1][1, 2] = np.nan  # sentence 3, in shard 1
    writer = TeacherCacheWriter(str(tmp_path / "cache"), settings("/models/teacher.pt"), LENGTHS, SHARD_SIZE)
    writer.write_shard(0, {i: rows[i] for i in (0, 1)})
    with pytest.raises(CacheError, match=r"the teacher \(/models/teacher.pt\) gave non-finite log-probabilities "
                       r"\(NaN or inf in 1 target positions, the first in sentence id 3\); nothing was written "
                       r"for shard 1"):
        writer.write_shard(1, {i: rows[i] for i in (2, 3)})
    assert writer.missing_shards() == [1, 2]


def test_a_truncated_cache_shard_names_the_shard_and_how_to_recompute_it(tmp_path):
    writer = write_shards(tmp_path / "cache", teacher_rows(), merge=False)
    shard = writer.shard_path(1)
    with open(shard, "rb+") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CacheError, match=f"shard file {shard} is damaged .*; delete {shard} and rerun the same "
                       "fairseq-kd-cache-teacher command to compute that shard again"):
        writer.merge()
    assert not (tmp_path / "cache" / IDS).exists() and writer.missing_shards() == []


def test_cache_destdir_of_other_files_is_refused_and_kept(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=f"--destdir {foreign} is not empty \\(shards\\) and holds no teacher "
                       "cache .*pass a new or empty --destdir"):
        TeacherCacheWriter(str(foreign), settings(), LENGTHS, SHARD_SIZE)
    assert sorted(p.name for p in foreign.rglob("*")) == ["notes.txt", "shards"]


def test_cache_merge_deletes_only_its_own_shards(tmp_path):
    writer = write_shards(tmp_path / "cache", teacher_rows(), merge=False)
    kept = tmp_path / "cache" / "shards" / "notes.txt"
    kept.write_text("not the builder's")
    writer.merge()
    assert kept.read_text() == "not the builder's"
    assert sorted(p.name for p in kept.parent.iterdir()) == ["notes.txt"]
    assert TeacherCache(str(tmp_path / "cache")).num_sentences == len(LENGTHS)


def test_distill_destdir_of_another_data_directory_is_refused(tmp_path):
    data, other = tmp_path / "data-bin", tmp_path / "other-bin"
    for directory in (data, other):
        directory.mkdir()
        (directory / "dict.src.txt").write_text("a 1\n")
        (directory / "dict.tgt.txt").write_text("b 1\n")
    (other / "train.src-tgt.tgt.bin").write_bytes(b"gold")
    with pytest.raises(DistillDataError, match=f"--destdir {other} is not empty \\(dict.src.txt, dict.tgt.txt, "
                       "train.src-tgt.tgt.bin\\) and holds no fairseq-kd-distill-data output"):
        check_destdir(str(other), str(data), ("src", "tgt"))
    check_destdir(str(tmp_path / "new"), str(data), ("src", "tgt"))  # absent or empty: fine
    (tmp_path / "empty").mkdir()
    check_destdir(str(tmp_path / "empty"), str(data), ("src", "tgt"))
    # a distill-data output whose other split was binarized with another dictionary
    (other / "valid.kd.args.json").write_text("{}")
    (other / "dict.tgt.txt").write_text("c 1\n")
    with pytest.raises(DistillDataError, match=f"{other}/dict.tgt.txt differs from {data}/dict.tgt.txt"):
        check_destdir(str(other), str(data), ("src", "tgt"))
    (other / "dict.tgt.txt").write_text("b 1\n")
    check_destdir(str(other), str(data), ("src", "tgt"))


def test_output_lines_are_counted_before_they_replace_a_file(tmp_path):
    path = tmp_path / "train.kd.tgt"
    path.write_text("old 1\nold 2\n")
    with pytest.raises(CountMismatchError, match="would have 3 lines, expected 2 .*nothing was replaced"):
        write_lines(str(path), ["new 1", "new\n2"])
    assert path.read_text() == "old 1\nold 2\n"
    assert os.listdir(tmp_path) == ["train.kd.tgt"]  # no temporary file left
    write_lines(str(path), ["new 1", "new 2"])
    assert path.read_text() == "new 1\nnew 2\n"


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("before\n")
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {path}: nothing was lost"):
        with atomic_output(str(path)) as tmp:
            os.symlink("/dev/full", tmp)  # writes to /dev/full fail with ENOSPC
            with open(tmp, "w") as f:
                f.write("after\n" * 1000)
    assert path.read_text() == "before\n" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("name", [IDS, LPROBS])
def test_a_full_disk_while_merging_a_cache_names_the_array_that_did_not_fit(tmp_path, name):
    lengths = [3000, 2000]  # arrays larger than a file buffer: the write itself fails, not the close
    rng = np.random.default_rng(0)
    writer = TeacherCacheWriter(str(tmp_path / "cache"), settings(), lengths, 1)
    for i, n in enumerate(lengths):
        lprobs = -np.sort(rng.uniform(0.01, 8, (n, K)), axis=1).astype(np.float32)
        writer.write_shard(i, {i: (rng.integers(0, VOCAB, (n, K)), lprobs)})
    path = tmp_path / "cache" / name
    os.symlink("/dev/full", temporary_path(str(path)))
    with pytest.raises(DiskFullError, match=f"while writing {path}: nothing was lost"):
        writer.merge()
    assert sorted(os.listdir(tmp_path / "cache")) == ["header.json", OFFSETS, "shards"]
    assert writer.missing_shards() == [] and not writer.complete
