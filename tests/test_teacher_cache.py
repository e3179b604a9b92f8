"""The offline top-k teacher cache: what fairseq-kd-cache-teacher stores equals the teacher's own
top-k, builds resume shard by shard, and the dataset wrapper lines the cache up with the target."""

import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from conftest import cli, empty_split_data
from fairseq_kd.cli.cache_teacher import cache_teacher, get_parser
from fairseq_kd.data.teacher_cache_dataset import TeacherCacheDataset
from fairseq_kd.teacher import Teacher
from fairseq_kd.fileio import DiskFullError, temporary_path
from fairseq_kd.teacher_cache import CacheError, TeacherCache

SHARD_SIZE = 30  # valid has 100 sentences: shards of 30, 30, 30 and 10


def load_task(tiny_data, left_pad_target=False, splits=("valid",)):
    cfg = TranslationConfig(data=str(tiny_data / "bin"), dataset_impl=None, train_subset="train",
                            required_seq_len_multiple=1, left_pad_target=left_pad_target)
    task = TranslationTask.setup_task(cfg)
    for split in splits:
        task.load_dataset(split)
    return task


def build(tiny_data, teacher, out, *extra, k=8, split="valid"):
    """Run the cache builder in this process; its summary."""
    args = get_parser().parse_args([
        "--teacher-path", str(teacher), str(tiny_data / "bin"), "--split", split, "--k", str(k),
        "--destdir", str(out), "--shard-size", str(SHARD_SIZE), "--max-tokens", "300", "--cpu",
        "--teacher-precision", "fp32", *extra,
    ])
    return cache_teacher(args)


def cache_arrays(cache_dir):
    return {name: (cache_dir / name).read_bytes() for name in ("offsets.npy", "ids.npy", "lprobs.npy")}


@pytest.fixture(scope="module")
def valid_cache(tiny_data, tiny_teacher, tmp_path_factory):
    """A k=8 cache of the valid split; (directory, the builder's summary)."""
    out = tmp_path_factory.mktemp("cache") / "valid"
    return out, build(tiny_data, tiny_teacher, out)


@pytest.fixture(scope="module")
def task(tiny_data):
    return load_task(tiny_data, splits=("valid", "test", "train"))


def check_against_direct(cache, dataset, sample_ids, direct_lprobs):
    """The cached rows of ``sample_ids`` equal the top-k of ``direct_lprobs(batch)`` (B x T x V, fp32),
    computed here on one batch of those sentences, within float16 rounding."""
    batch = dataset.collater([dataset[i] for i in sample_ids])
    lprobs = direct_lprobs(batch)
    top_lprobs, _ = lprobs.topk(cache.k, dim=-1)
    for row, sample_id in enumerate(batch["id"].tolist()):
        n = int(dataset.tgt_sizes[sample_id])
        assert batch["target"][row, n:].eq(dataset.tgt_dict.pad()).all()
        ids, cached = cache.get(sample_id)
        assert ids.dtype == torch.int64 and cached.dtype == torch.float16
        assert ids.shape == cached.shape == (n, cache.k)
        cached = cached.float()
        # the cached log-probs are the k best, best first ...
        torch.testing.assert_close(cached, top_lprobs[row, :n], rtol=1e-3, atol=1e-3)
        # ... and belong to the cached ids (robust to the order of near-ties)
        torch.testing.assert_close(cached, lprobs[row, :n].gather(-1, ids), rtol=1e-3, atol=1e-3)


def test_cache_holds_the_teachers_topk(valid_cache, task, tiny_teacher):
    cache_dir, summary = valid_cache
    assert summary["computed_shards"] == [0, 1, 2, 3] and summary["complete"]
    assert summary["bytes_per_token"] == 24  # k=8 x (2 B float16 + 1 B uint8 for a 48-symbol vocabulary)
    on_disk = sum(len(array) for array in cache_arrays(cache_dir).values())
    assert 0 <= on_disk - summary["total_bytes"] <= 3 * 128  # plus one .npy header per array
    cache = TeacherCache(str(cache_dir))
    dataset = task.dataset("valid")
    assert (cache.k, cache.vocab_size, cache.num_sentences) == (8, len(task.target_dictionary), len(dataset))
    assert cache.header["id_dtype"] == "uint8" and cache.header["split"] == "valid"
    np.testing.assert_array_equal(cache.lengths, dataset.tgt_sizes)
    assert not (cache_dir / "shards").exists()
    pickled = pickle.dumps(cache)  # for DataLoader workers: reopened there, not copied
    assert len(pickled) < 1000 and torch.equal(pickle.loads(pickled).get(99)[1], cache.get(99)[1])

    teacher = Teacher.load(str(tiny_teacher), task, "fp32").to(torch.device("cpu"))

    def direct(batch):
        net_input = batch["net_input"]
        (logits,) = teacher.logits(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
        return F.log_softmax(logits.float(), dim=-1)

    check_against_direct(cache, dataset, [0, 7, 31, 64, 65, 99], direct)


def test_interrupted_build_resumes_to_identical_arrays(tiny_data, tiny_teacher, valid_cache, tmp_path):
    out = tmp_path / "cache"
    summary = build(tiny_data, tiny_teacher, out, "--stop-after-shards", "3")
    assert summary["computed_shards"] == [0, 1, 2] and not summary["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(str(out))

    (out / "shards" / "shard-00001.npz").unlink()  # as if lost
    kept = {i: os.stat(out / "shards" / f"shard-0000{i}.npz") for i in (0, 2)}
    summary = build(tiny_data, tiny_teacher, out, "--stop-after-shards", "1")
    assert summary["computed_shards"] == [1]
    for i, before in kept.items():
        after = os.stat(out / "shards" / f"shard-0000{i}.npz")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    summary = build(tiny_data, tiny_teacher, out)
    assert summary["computed_shards"] == [3] and summary["complete"]
    assert cache_arrays(out) == cache_arrays(valid_cache[0])
    assert not (out / "shards").exists()
    assert build(tiny_data, tiny_teacher, out)["computed_shards"] == []  # complete: nothing to redo


@pytest.mark.parametrize("count", ["0", "-1"])
def test_stop_after_no_shards_is_refused(tiny_data, tiny_teacher, tmp_path, count):
    with pytest.raises(ValueError, match="--stop-after-shards must be >= 1"):
        build(tiny_data, tiny_teacher, tmp_path / "cache", "--stop-after-shards", count)
    assert not (tmp_path / "cache").exists()


def test_resuming_with_other_settings_is_refused(tiny_data, tiny_teacher, valid_cache, tmp_path):
    out = tmp_path / "cache"
    build(tiny_data, tiny_teacher, out, "--stop-after-shards", "1")
    # the teacher is known by its contents: a new modification time (a copy) is the same teacher
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(tiny_teacher, teacher)
    out_copy = tmp_path / "cache_copy"
    build(tiny_data, teacher, out_copy, "--stop-after-shards", "1")
    os.utime(teacher, (1e9, 1e9))
    assert build(tiny_data, teacher, out_copy)["computed_shards"]  # resumed, not refused
    with pytest.raises(ValueError, match=r"other settings:\n  k: 8 in the existing build, 4 now"):
        build(tiny_data, tiny_teacher, out, k=4)
    # the console script reports it as an error, also for a complete cache
    proc = subprocess.run(
        [cli("fairseq-kd-cache-teacher"), "--teacher-path", str(tiny_teacher), str(tiny_data / "bin"),
         "--split", "valid", "--k", "4", "--destdir", str(valid_cache[0]), "--shard-size", str(SHARD_SIZE), "--cpu",
         "--teacher-precision", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2  # the plugin's user-error status (fairseq_kd/cli/errors.py)
    assert "error:" in proc.stderr and "k: 8 in the existing build, 4 now" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("left_pad_target", [False, True])
def test_dataset_wrapper_aligns_with_target(tiny_data, valid_cache, left_pad_target):
    task = load_task(tiny_data, left_pad_target=left_pad_target)
    cache = TeacherCache(str(valid_cache[0]))
    dataset = TeacherCacheDataset(task.dataset("valid"), cache)
    pad = task.target_dictionary.pad()
    batches = task.get_batch_iterator(
        dataset, max_tokens=200, required_batch_size_multiple=1, disable_iterator_cache=True
    ).next_epoch_itr(shuffle=False)
    seen = []
    for batch in batches:
        target, ids, lprobs = batch["target"], batch["teacher_topk_ids"], batch["teacher_topk_lprobs"]
        assert ids.shape == lprobs.shape == (*target.shape, 8)
        # float16 as stored: fairseq's --bf16 recasts float32 batch tensors only, so the cache keeps its precision
        assert ids.dtype == torch.int64 and lprobs.dtype == torch.float16
        assert target[:, 0 if left_pad_target else -1].eq(pad).any()  # batches are padded on that side
        for row, sample_id in enumerate(batch["id"].tolist()):
            real = target[row].ne(pad)
            cached_ids, cached_lprobs = cache.get(sample_id)
            assert torch.equal(ids[row][real], cached_ids)
            assert torch.equal(lprobs[row][real], cached_lprobs)
            assert ids[row][~real].eq(pad).all() and lprobs[row][~real].eq(0).all()
            seen.append(sample_id)
    assert sorted(seen) == list(range(len(dataset)))


def test_cache_for_other_data_is_refused(valid_cache, task):
    cache = TeacherCache(str(valid_cache[0]))
    test = task.dataset("test")  # also 100 sentences, other lengths
    first = int(np.flatnonzero(test.tgt_sizes != cache.lengths)[0])
    with pytest.raises(ValueError, match=rf"sentence id {first} has {test.tgt_sizes[first]} target tokens, "
                                         rf"the cache {cache.lengths[first]} .*rebuild the cache"):
        TeacherCacheDataset(test, cache)
    with pytest.raises(ValueError, match="holds 100 sentences, the data has 2000"):
        TeacherCacheDataset(task.dataset("train"), cache)
    other_dict = Dictionary()
    other_dict.add_symbol("x")
    with pytest.raises(ValueError, match="another target dictionary"):
        cache.check_matches(cache.lengths, other_dict)


def test_ensemble_caches_averaged_probabilities(tiny_data, tiny_teacher, valid_cache, task, tmp_path):
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            state["model"][name] = tensor + 0.2 * torch.randn(tensor.shape, generator=generator)
    second = tmp_path / "teacher2" / "checkpoint.pt"  # dictionaries: from the data it was trained on
    second.parent.mkdir()
    torch.save(state, second)
    out = tmp_path / "cache"
    assert build(tiny_data, f"{tiny_teacher}:{second}", out)["complete"]
    cache = TeacherCache(str(out))
    assert len(cache.header["teachers"]) == 2

    teachers = [Teacher.load(str(path), task, "fp32").to(torch.device("cpu")) for path in (tiny_teacher, second)]

    def direct(batch):
        net_input = batch["net_input"]
        probs = [
            F.softmax(t.logits(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])[0], -1)
            for t in teachers
        ]
        return torch.log((probs[0] + probs[1]) / 2)

    check_against_direct(cache, task.dataset("valid"), [0, 13, 50, 99], direct)
    single = TeacherCache(str(valid_cache[0]))
    assert (cache.get(50)[1] - single.get(50)[1]).abs().max() > 0.05  # the second teacher matters


# ---------------------------------------------------------------- bad input and faults (docs/troubleshooting.md)


def test_batch_settings_change_fp32_values_by_at_most_one_float16_step(tiny_data, tiny_teacher, valid_cache, tmp_path):
    """What docs/teacher-cache.md says of --max-tokens / --batch-size: in fp32 another batch size
    leaves every id and changes a log-probability by at most one float16 rounding step (padding
    changes the matrix shapes and so the last float32 bits)."""
    reference = TeacherCache(str(valid_cache[0]))  # --max-tokens 300
    for extra in (["--max-tokens", "4096"], ["--batch-size", "1"]):
        out = tmp_path / extra[0].strip("-")
        build(tiny_data, tiny_teacher, out, *extra)
        other = TeacherCache(str(out))
        assert np.array_equal(other._ids, reference._ids)
        step = np.spacing(np.abs(np.asarray(reference._lprobs)))  # float16 spacing at each value
        assert (np.abs(other._lprobs.astype(np.float32) - reference._lprobs.astype(np.float32)) <= step).all()


def test_complete_cache_with_a_missing_array_is_refused(tiny_data, tiny_teacher, valid_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(valid_cache[0], out)
    (out / "ids.npy").unlink()
    for open_it in (lambda: build(tiny_data, tiny_teacher, out), lambda: TeacherCache(str(out))):
        with pytest.raises(CacheError, match=f"{out}/ids.npy is missing although header.json says the cache is "
                           f"complete; delete {out} and build it again: fairseq-kd-cache-teacher"):
            open_it()


def test_a_full_disk_while_merging_loses_nothing(tiny_data, tiny_teacher, valid_cache, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    tmp = temporary_path(str(out / "ids.npy"))  # the name the merge writes ids.npy under, in this process
    os.symlink("/dev/full", tmp)  # every write to it fails with ENOSPC
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {out}/ids.npy: nothing "
                       "was lost .*free space on that file system and rerun the same command"):
        build(tiny_data, tiny_teacher, out)
    assert not os.path.lexists(tmp) and not (out / "ids.npy").exists()
    assert len(list((out / "shards").iterdir())) == 4  # every computed shard kept
    assert build(tiny_data, tiny_teacher, out)["computed_shards"] == []  # only the merge is redone
    assert cache_arrays(out) == cache_arrays(valid_cache[0])


def test_an_empty_split_is_refused_without_a_traceback(tiny_data, tiny_teacher, tmp_path):
    data = empty_split_data(tiny_data, tmp_path / "data-bin", "valid")
    proc = subprocess.run(
        [cli("fairseq-kd-cache-teacher"), "--teacher-path", str(tiny_teacher), str(data), "--split", "valid",
         "--destdir", str(tmp_path / "cache"), "--cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2
    assert f"split 'valid' of {data} has no sentences ({data}/valid.src-tgt.src.bin is empty)" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert not (tmp_path / "cache").exists()
