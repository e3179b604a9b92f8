"""fairseq-kd-distill-data: hypothesis selection and filters on hand-built inputs, then end to end
through the real console script on the tiny teacher: parity with fairseq-generate, resuming a
killed run, workers sharing the shards, refusing changed arguments or incomplete shards, and
training on the result with plain fairseq-train."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import COMMON_TRAIN, USER_DIR, cli, empty_split_data, run
from fairseq_kd.cli import distill_data
from fairseq_kd.distill_bitext.filters import FilterConfig, Pair, apply_filters, max_ngram_count
from fairseq_kd.distill_bitext.selection import Hypothesis, Selection, parse_selection, select, sentence_similarity
from fairseq_kd.distill_bitext.shards import CountMismatchError, SentenceRecord, check_records, worker_shards
from fairseq_kd.fileio import temporary_path

N_TEST = 100  # sentences in the fixture's test split
SHARD_SIZE = 10

STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
    "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


# ---------------------------------------------------------------- selection, filters, counts


def hyps(*texts):
    return [Hypothesis(text, -0.1 * (rank + 1), rank) for rank, text in enumerate(texts)]


def test_closest_compares_de_subworded_text():
    # Reference "the cat sat", BPE-segmented. Rank 2 is the reference itself under another
    # segmentation (BLEU 100 once "@@ " is removed); rank 1 shares more raw subword tokens with it
    # ("the c@@ at") and wins only if the segmentation is (wrongly) left in place.
    nbest = hyps("a dog runs", "the c@@ at sits", "the ca@@ t sat")
    reference = "the c@@ at sat"
    assert select(nbest, Selection("closest"), reference, "bleu", "bpe") == [nbest[2]]
    assert select(nbest, Selection("closest"), reference, "bleu", "none") == [nbest[1]]
    # the same with sentencepiece's word-start marks
    nbest = hyps("\u2581a \u2581dog", "\u2581the \u2581c at \u2581sat")
    assert select(nbest, Selection("closest"), "\u2581the \u2581cat \u2581sat", "chrf", "sentencepiece") == [nbest[1]]


def test_closest_metric_flag_and_ties():
    # Reference "the cats sat". "the cats" matches every n-gram it has, so its sentence BLEU is the
    # brevity penalty alone: 100 * exp(1 - 3/2) = 60.65, above "the cat sat" (two unigrams of three,
    # no bigram). chrF, a character F-score weighting recall twice, prefers "the cat sat", which
    # misses one character of the reference instead of a whole word.
    assert sentence_similarity("the cats", "the cats sat", "bleu") == pytest.approx(100 * math.exp(-0.5))
    nbest = hyps("the cat sat", "the cats")
    assert select(nbest, Selection("closest"), "the cats sat", "bleu") == [nbest[1]]
    assert select(nbest, Selection("closest"), "the cats sat", "chrf") == [nbest[0]]
    # equal similarity: the better-ranked hypothesis wins
    nbest = hyps("x y", "the cats sat", "the cats sat")
    assert select(nbest, Selection("closest"), "the cats sat", "bleu") == [nbest[1]]
    with pytest.raises(ValueError, match="no target side"):
        select(nbest, Selection("closest"), None)


def test_top1_and_nbest_k():
    nbest = hyps("a", "b", "c")
    assert select(nbest, parse_selection("top1")) == [nbest[0]]
    assert select(nbest, parse_selection("nbest-2")) == nbest[:2]
    assert select(nbest, parse_selection("nbest-3")) == nbest
    with pytest.raises(ValueError, match="needs 4 hypotheses"):
        select(nbest, parse_selection("nbest-4"))
    for bad in ("nbest-0", "nbest", "best2"):
        with pytest.raises(Exception, match="expected top1, closest or nbest-K"):
            parse_selection(bad)


def test_filters_count_each_removed_pair_once():
    src4 = "s1 s2 s3 s4"
    pairs = [
        Pair(0, src4, "", -0.5, 0),  # empty
        Pair(1, src4, "x y x y x y x y", -0.1, 0),  # "x y" 4 times (> 3); its length ratio 2 is allowed
        Pair(2, src4, "x", -0.1, 0),  # ratio 0.25 < 0.5
        Pair(3, "s1 s2", "a b c d e", -0.1, 0),  # ratio 2.5 > 2
        Pair(4, src4, "a b c", -0.9, 0),  # the two lowest scores of the six left
        Pair(5, src4, "a b c d", -0.2, 0),
        Pair(6, src4, "a b c d", -0.7, 0),
        Pair(7, src4, "a b c e", -0.3, 0),
        Pair(8, src4, "a b c f", -0.3, 0),
        Pair(9, src4, "a a a a", -0.05, 0),  # "a a" 3 times: not more than 3
    ]
    cfg = FilterConfig(drop_empty=True, max_ngram_repeats=3, repeat_ngram_order=2, min_len_ratio=0.5,
                       max_len_ratio=2.0, drop_lowest_score_percent=40)
    kept, removed = apply_filters(pairs, cfg)
    assert removed == {"empty": 1, "repeats": 1, "length_ratio": 2, "low_score": 2}
    assert [p.id for p in kept] == [5, 7, 8, 9]
    # filters are off by default; without --drop-empty the empty hypothesis stays
    assert apply_filters(pairs, FilterConfig()) == (pairs, dict.fromkeys(removed, 0))
    assert apply_filters(pairs[:1], FilterConfig(max_ngram_repeats=1))[0] == pairs[:1]
    assert max_ngram_count("a b a b a".split(), 2) == 2 and max_ngram_count([], 2) == 0
    # equal scores: the earlier pair goes first, so the result does not depend on the tie
    tied = [Pair(i, "s", "h", -1.0, 0) for i in range(4)]
    assert [p.id for p in apply_filters(tied, FilterConfig(drop_lowest_score_percent=50))[0]] == [2, 3]
    with pytest.raises(ValueError, match="--min-len-ratio 3.0 is above --max-len-ratio 2.0"):
        FilterConfig(min_len_ratio=3.0, max_len_ratio=2.0).check()


def test_count_mismatches_raise():
    one = [Hypothesis("h", -0.1, 0)]
    records = [SentenceRecord(i, "s", one) for i in (10, 11, 13)]
    with pytest.raises(CountMismatchError, match=r"missing ids \[12\]"):
        check_records(records, range(10, 14), 1, "shard 1")
    records = [SentenceRecord(10, "s", one), SentenceRecord(11, "s", one * 2)]
    with pytest.raises(CountMismatchError, match="sentence 11 has 2 pairs, expected 1"):
        check_records(records, range(10, 12), 1, "shard 1")
    # a sentence skipped as too long carries no pairs and is no mismatch
    check_records([SentenceRecord(10, "s", [], skipped="too long")], range(10, 11), 2, "shard 1")


def test_workers_own_disjoint_shards_covering_all():
    owned = [worker_shards(10, 3, i) for i in range(3)]
    assert owned == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert worker_shards(2, 4, 3) == []


# ---------------------------------------------------------------- end to end


def distill_cmd(data_bin, teacher, destdir, *extra):
    return [
        cli("fairseq-kd-distill-data"), data_bin, "--teacher-path", teacher, "--split", "test", "--destdir", destdir,
        "--beam", "4", "--batch-size", "4", "--shard-size", str(SHARD_SIZE), "--cpu", "--log-interval", "0", *extra,
    ]


def tree(directory):
    """Every file under ``directory``, by relative path, with its bytes."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def translated_shards(output):
    return sorted(int(k) for k in re.findall(r"translated shard (\d+) ", output))


@pytest.fixture(scope="module")
def reference_run(tiny_data, tiny_teacher, tmp_path_factory):
    destdir = tmp_path_factory.mktemp("distilled")
    output = run(distill_cmd(tiny_data / "bin", tiny_teacher, destdir))
    return destdir, output


def test_same_hypotheses_as_fairseq_generate(reference_run, tiny_data, tiny_teacher):
    destdir, output = reference_run
    generated = run([
        cli("fairseq-generate"), tiny_data / "bin", "--user-dir", USER_DIR, "--path", tiny_teacher,
        "--gen-subset", "test", "--beam", "4", "--batch-size", "4", "--required-batch-size-multiple", "1", "--cpu",
    ])
    by_id = {}
    for kind, i, rest in re.findall(r"^([SH])-(\d+)\t(.*)$", generated, flags=re.M):
        by_id.setdefault(int(i), {})[kind] = rest
    assert sorted(by_id) == list(range(N_TEST))
    hyp_scores = [float(by_id[i]["H"].split("\t")[0]) for i in range(N_TEST)]
    assert (destdir / "test.kd.src").read_text().splitlines() == [by_id[i]["S"] for i in range(N_TEST)]
    assert (destdir / "test.kd.tgt").read_text().splitlines() == [by_id[i]["H"].split("\t")[1] for i in range(N_TEST)]
    # the stored teacher scores are fairseq's, in nats (fairseq-generate prints bits)
    records = [SentenceRecord.from_json(line) for k in range(N_TEST // SHARD_SIZE)
               for line in (destdir / "test.kd.shards" / f"{k:06d}.jsonl").read_text().splitlines()]
    assert [r.pairs[0].score / math.log(2) for r in records] == pytest.approx(hyp_scores, abs=1e-4)
    assert "summary: 100 sentences (0 skipped as too long), 100 pairs selected" in output
    assert re.search(r"translated \d+/100 sentences \| [\d.]+ sentences/s \| ETA", output)
    assert translated_shards(output) == list(range(N_TEST // SHARD_SIZE))


def test_binarized_split_equals_fairseq_preprocess(reference_run, tmp_path):
    from fairseq import options
    from fairseq_cli import preprocess

    destdir, _ = reference_run
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "-s", "src", "-t", "tgt", "--srcdict", str(destdir / "dict.src.txt"), "--tgtdict", str(destdir / "dict.tgt.txt"),
        "--testpref", str(destdir / "test.kd"), "--destdir", str(tmp_path), "--workers", "1",
    ]))
    for name in ("test.src-tgt.src.bin", "test.src-tgt.src.idx", "test.src-tgt.tgt.bin", "test.src-tgt.tgt.idx"):
        assert (destdir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_killed_run_resumes_with_identical_output(reference_run, tiny_data, tiny_teacher, tmp_path):
    destdir = tmp_path / "killed"
    cmd = distill_cmd(tiny_data / "bin", tiny_teacher, destdir)
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    shards = destdir / "test.kd.shards"
    deadline = time.time() + 300
    while not (shards.is_dir() and any(p.suffix == ".jsonl" for p in shards.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before writing a shard"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat() for p in shards.iterdir() if p.suffix == ".jsonl"}
    assert 1 <= len(done) < N_TEST // SHARD_SIZE, "killed too late to test resuming"
    assert not (destdir / "test.kd.tgt").exists()

    output = run(cmd)
    assert translated_shards(output) == sorted(set(range(N_TEST // SHARD_SIZE)) - {int(n[:6]) for n in done})
    for name, stat in done.items():  # the shards finished before the kill were not rewritten
        assert (shards / name).stat().st_mtime_ns == stat.st_mtime_ns
    reference = tree(reference_run[0])
    assert tree(destdir) == reference  # no leftovers of the killed shard either


def test_workers_share_the_shards(reference_run, tiny_data, tiny_teacher, tmp_path):
    destdir = tmp_path / "workers"
    procs = [
        subprocess.Popen(
            [str(c) for c in distill_cmd(tiny_data / "bin", tiny_teacher, destdir,
                                         "--num-workers", "2", "--worker-id", str(i))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert translated_shards(outputs[0]) == [0, 2, 4, 6, 8]
    assert translated_shards(outputs[1]) == [1, 3, 5, 7, 9]
    assert any("summary: 100 sentences" in out for out in outputs)  # the last one to finish merged
    assert tree(destdir) == tree(reference_run[0])


def test_refuses_other_arguments_and_incomplete_shards(reference_run, tiny_data, tiny_teacher, tmp_path, capsys):
    destdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], destdir)
    args = [str(a) for a in distill_cmd(tiny_data / "bin", tiny_teacher, destdir)[1:]]
    with pytest.raises(SystemExit) as exit_info:
        distill_data.main(args + ["--lenpen", "1.5", "--select", "nbest-2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "test.kd.args.json: this split was started with different arguments" in err
    assert "lenpen: 1 in" in err and "1.5 now" in err and "select: 'top1' in" in err

    # a shard that lost a sentence is a count mismatch, never a shorter output
    shard = destdir / "test.kd.shards" / "000004.jsonl"
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:-1]))
    before = (destdir / "test.kd.tgt").read_bytes()
    with pytest.raises(SystemExit):
        distill_data.main(args + ["--merge", "only"])
    assert "expected the 10 sentences 40..49 in order, got 9 (missing ids [49]" in capsys.readouterr().err
    assert (destdir / "test.kd.tgt").read_bytes() == before


def test_nbest_pairs_with_a_filter_train_with_fairseq_train(tiny_data, tiny_teacher, tmp_path):
    destdir = tmp_path / "nbest2"
    output = run(distill_cmd(tiny_data / "bin", tiny_teacher, destdir, "--select", "nbest-2",
                             "--drop-lowest-score-percent", "10"))
    assert "removed: empty 0, repeats 0, length_ratio 0, low_score 20; wrote 180 pairs" in output
    records = [SentenceRecord.from_json(line) for p in sorted((destdir / "test.kd.shards").iterdir())
               for line in p.read_text().splitlines()]
    assert len(records) == N_TEST
    assert all([h.rank for h in r.pairs] == [0, 1] and r.pairs[0].text != r.pairs[1].text for r in records)
    # the written pairs are all the pairs in source order, less the 20 with the lowest scores
    pairs = [(r.src, h.text, h.score) for r in records for h in r.pairs]
    lowest = set(sorted(range(len(pairs)), key=lambda i: (pairs[i][2], i))[:20])
    kept = [p for i, p in enumerate(pairs) if i not in lowest]
    assert (destdir / "test.kd.src").read_text().splitlines() == [src for src, _, _ in kept]
    assert (destdir / "test.kd.tgt").read_text().splitlines() == [hyp for _, hyp, _ in kept]

    # the output directory is a fairseq data directory: plain fairseq-train reads it, the distilled
    # split as training data and the copied gold validation set
    gold_valid = (tiny_data / "bin" / "valid.src-tgt.tgt.bin").read_bytes()
    assert (destdir / "valid.src-tgt.tgt.bin").read_bytes() == gold_valid
    train_log = run([
        cli("fairseq-train"), destdir, "--task", "translation", "--train-subset", "test", *STUDENT_ARCH,
        *COMMON_TRAIN, "--max-update", "5", "--save-dir", tmp_path / "student", "--no-save",
    ])
    assert re.search(r"loaded 180 examples from: \S*nbest2/test\.src-tgt\.src", train_log)
    assert re.search(r"loaded 100 examples from: \S*nbest2/valid\.src-tgt\.src", train_log)
    assert re.search(r"num_updates[ =]5\b", train_log), train_log[-2000:]

    # a second split distilled into the same directory, greedily, with its own arguments, replaces
    # the gold copy; the first split's outputs stay as they were
    before = tree(destdir)
    output = run([*distill_cmd(tiny_data / "bin", tiny_teacher, destdir, "--beam", "1"), "--split", "valid"])
    assert "wrote 100 pairs" in output
    assert (destdir / "valid.src-tgt.tgt.bin").read_bytes() != gold_valid
    after = tree(destdir)
    def of_split_test(files):
        return {name: data for name, data in files.items() if name.startswith("test.")}

    assert of_split_test(after) == of_split_test(before)


# ---------------------------------------------------------------- bad input and faults (docs/troubleshooting.md)


def one_shard_cmd(tiny_data, teacher, destdir, *extra):
    """In-process arguments that translate shard 0 only (worker 0 of 10) and do not merge."""
    return [str(a) for a in distill_cmd(tiny_data / "bin", teacher, destdir, "--num-workers", "10", "--worker-id",
                                         "0", "--merge", "never", *extra)[1:]]


def edited_teacher(tiny_teacher, path, edit):
    """A copy of the tiny teacher's checkpoint at ``path``, changed by ``edit(state)``."""
    import torch

    state = torch.load(tiny_teacher, weights_only=False)  # the test's own checkpoint
    edit(state)
    torch.save(state, path)
    return path


def exit_status(argv, capsys):
    """distill_data.main's exit status (0 when it returns) and its stderr."""
    try:
        distill_data.main(argv)
        status = 0
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def test_resume_with_a_replaced_teacher_is_refused(tiny_data, tiny_teacher, tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(tiny_teacher, teacher)
    destdir = tmp_path / "kd"
    assert exit_status(one_shard_cmd(tiny_data, teacher, destdir), capsys)[0] == 0

    def retrain(state):
        weight = next(iter(state["model"].values()))
        weight.add_(0.01)

    edited_teacher(tiny_teacher, teacher, retrain)  # another teacher, written to the same path
    argv = one_shard_cmd(tiny_data, teacher, destdir)
    argv[argv.index("--worker-id") + 1] = "1"
    status, err = exit_status(argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert f"teacher checkpoint {teacher} is not the one this run was started with" in err
    assert "write to a new --destdir for this teacher" in err
    assert sorted(p.name for p in (destdir / "test.kd.shards").iterdir()) == ["000000.jsonl"]


def test_a_run_refused_at_start_does_not_lock_its_destdir(tiny_data, tiny_teacher, tmp_path, capsys):
    # a teacher dictionary directory that is not the teacher's: refused, then the same destdir
    # accepts the run without the wrong flag
    bad_dicts = tmp_path / "dicts"
    bad_dicts.mkdir()
    for lang in ("src", "tgt"):
        text = (tiny_data / "bin" / f"dict.{lang}.txt").read_text()
        (bad_dicts / f"dict.{lang}.txt").write_text(text.replace("a1 ", "zz ", 1))
    destdir = tmp_path / "kd"
    status, err = exit_status(one_shard_cmd(tiny_data, tiny_teacher, destdir, "--teacher-dict-dir", bad_dicts), capsys)
    assert status == 2 and "dictionary" in err and "differs from the student's" in err
    assert not (destdir / "test.kd.args.json").exists()
    assert exit_status(one_shard_cmd(tiny_data, tiny_teacher, destdir), capsys)[0] == 0
    assert (destdir / "test.kd.shards" / "000000.jsonl").exists()

    # sentences longer than the teacher accepts: refused for the whole split before any shard is
    # saved, then --skip-too-long, which the error suggests, runs in the same destdir
    def short_positions(state):
        state["cfg"]["model"].max_source_positions = 5

    (tmp_path / "short").mkdir()
    short = edited_teacher(tiny_teacher, tmp_path / "short" / "teacher.pt", short_positions)
    for name in ("dict.src.txt", "dict.tgt.txt"):  # the teacher's dictionaries, next to its checkpoint
        shutil.copyfile(tiny_data / "bin" / name, tmp_path / "short" / name)
    destdir = tmp_path / "kd_short"
    status, err = exit_status(one_shard_cmd(tiny_data, short, destdir), capsys)
    assert status == 2 and "longer than the teacher's 5 positions; pass --skip-too-long" in err
    assert exit_status(one_shard_cmd(tiny_data, short, destdir, "--skip-too-long"), capsys)[0] == 0
    records = [SentenceRecord.from_json(line) for line in (destdir / "test.kd.shards" / "000000.jsonl").open()]
    assert len(records) == SHARD_SIZE and any(r.skipped for r in records)


def test_foreign_destdir_is_refused_and_left_as_it_was(tiny_data, tiny_teacher, tmp_path, capsys):
    other = tmp_path / "other-bin"
    shutil.copytree(tiny_data / "bin", other)
    before = tree(other)
    status, err = exit_status(one_shard_cmd(tiny_data, tiny_teacher, other), capsys)
    assert status == 2 and f"--destdir {other} is not empty" in err and "pass a new or empty --destdir" in err
    assert tree(other) == before


def test_damaged_shards_name_the_file_and_the_fix(reference_run, tiny_data, tiny_teacher, tmp_path, capsys):
    destdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], destdir)
    argv = [str(a) for a in distill_cmd(tiny_data / "bin", tiny_teacher, destdir)[1:]]
    outputs = {name: data for name, data in tree(destdir).items() if not name.startswith("test.kd.shards")}

    # a truncated shard (a disk or copy fault): the same error on every rerun until it is recomputed
    shard = destdir / "test.kd.shards" / "000004.jsonl"
    shard.write_bytes(shard.read_bytes()[:-20])
    for _ in range(2):
        status, err = exit_status(argv + ["--merge", "only"], capsys)
        assert status == 2 and "Traceback" not in err
        assert f"shard file {shard} is damaged at line 10" in err
        assert f"delete {shard} and rerun the same command: only that shard is translated again" in err
    shard.unlink()
    assert exit_status(argv, capsys)[0] == 0
    assert tree(destdir) == tree(reference_run[0])

    # a line break injected into a shard's text would shift every later output line: refused
    # before any output is replaced
    shard = destdir / "test.kd.shards" / "000003.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["hyps"][0][0] = record["hyps"][0][0].replace(" ", "\n", 1)
    shard.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))
    status, err = exit_status(argv + ["--merge", "only"], capsys)
    assert status == 2 and f"shard file {shard}: sentence 30 has a line break inside its text" in err
    assert {name: data for name, data in tree(destdir).items() if not name.startswith("test.kd.shards")} == outputs


def test_a_full_disk_while_merging_loses_nothing(reference_run, tiny_data, tiny_teacher, tmp_path, capsys):
    destdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], destdir)
    argv = [str(a) for a in distill_cmd(tiny_data / "bin", tiny_teacher, destdir)[1:]] + ["--merge", "only"]
    target = destdir / "test.kd.tgt"
    tmp = temporary_path(str(target))  # the name the merge writes test.kd.tgt under, in this process
    os.symlink("/dev/full", tmp)  # every write to it fails with ENOSPC
    status, err = exit_status(argv, capsys)
    assert not os.path.lexists(tmp)
    assert status == 2 and "Traceback" not in err
    assert f"no space left on the device while writing {target}: nothing was lost" in err
    assert "free space on that file system and rerun the same command" in err
    assert tree(destdir) == tree(reference_run[0])  # the earlier outputs and every shard are intact
    assert exit_status(argv, capsys)[0] == 0
    assert tree(destdir) == tree(reference_run[0])


def test_an_empty_split_is_refused_naming_its_file(tiny_data, tiny_teacher, tmp_path, capsys):
    data = empty_split_data(tiny_data, tmp_path / "data-bin", "test")
    argv = [str(a) for a in distill_cmd(data, tiny_teacher, tmp_path / "kd")[1:]]
    status, err = exit_status(argv, capsys)
    assert status == 2 and f"split 'test' of {data} has no sentences ({data}/test.src-tgt.src.bin is empty)" in err
    assert not (tmp_path / "kd").exists()
