"""seq_kd_interp and hybrid_kd on real tiny fairseq transformers, against float64 loops.

Batches come from TeacherTargetDataset (gold pairs plus the teacher's translation of the same
source), so the collated teacher target and its net input are exercised too.
"""

import math

import pytest
import torch
from fairseq import tasks
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.data import LanguagePairDataset

from fairseq_kd.data.batch_keys import TEACHER_NET_INPUT, TEACHER_NTOKENS, TEACHER_TARGET
from fairseq_kd.data.teacher_target_dataset import TeacherTargetDataset, check_aligned
from fairseq_kd.teacher import Teacher
from reference import kd_terms64, label_smoothed_nll64, non_pad_positions, softmax64
from test_word_kd import data_dir, parse  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


def sentences(task, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    return [torch.cat([torch.randint(d.nspecial, len(d), (n,), generator=g), torch.tensor([d.eos()])]) for n in lengths]


def pairs(task, src, tgt):
    sizes = lambda xs: torch.tensor([len(x) for x in xs])  # noqa: E731
    return LanguagePairDataset(src, sizes(src), task.source_dictionary, tgt, sizes(tgt), task.target_dictionary,
                               shuffle=False)


@pytest.fixture(scope="module")
def setup(data_dir):  # noqa: F811
    cfg = parse(data_dir, "--dropout", "0.0", "--kd-data", str(data_dir))  # datasets built below
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    student = task.build_model(cfg.model)
    torch.manual_seed(1)
    teacher = task.build_model(cfg.model)
    task.set_teacher(Teacher([teacher], precision="fp32"))
    src = sentences(task, (5, 3, 7, 2), seed=0)
    gold = pairs(task, src, sentences(task, (4, 6, 2, 5), seed=1))
    kd = pairs(task, src, sentences(task, (3, 6, 8, 11), seed=2))  # longer than the gold targets in all
    check_aligned(gold, kd, "test")
    dataset = TeacherTargetDataset(gold, kd)
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    return task, student, teacher, sample, kd


def sums(student, teacher, net_input, target, temperature, pad):
    """float64 loops: label-smoothed NLL, NLL and KL(q_T || p_T) summed over non-pad positions."""
    with torch.no_grad():
        zs = student(**net_input)[0].double()
        zt = teacher(**net_input)[0].double()
    ls = nll = kl = 0.0
    for b, t, y in non_pad_positions(target, pad):
        logp = torch.log(softmax64(zs[b, t]))
        ls += label_smoothed_nll64(logp, y, EPS)
        nll += float(-logp[y])
        kl += kd_terms64(softmax64(zt[b, t], temperature), softmax64(zs[b, t], temperature))[0]
    return ls, nll, kl


def test_collated_teacher_targets_follow_the_batch_order(setup):
    task, _, _, sample, kd = setup
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    for row, sid in enumerate(sample["id"].tolist()):
        expected = kd.tgt[sid]
        got = sample[TEACHER_TARGET][row]
        assert torch.equal(got[got.ne(pad)], expected)
        prev = sample[TEACHER_NET_INPUT]["prev_output_tokens"][row]
        assert torch.equal(prev[: len(expected)], torch.cat([torch.tensor([eos]), expected[:-1]]))
    assert sample[TEACHER_NTOKENS] == sum(len(t) for t in kd.tgt)
    assert torch.equal(sample[TEACHER_NET_INPUT]["src_tokens"], sample["net_input"]["src_tokens"])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_seq_kd_interp_matches_independent_computation(setup, alpha):
    task, student, teacher, sample, _ = setup
    pad = task.target_dictionary.pad()
    crit = task.build_criterion(parse_criterion(task, "seq_kd_interp", "--alpha", str(alpha)))
    loss, size, log = crit(student, sample)
    gold_ls, gold_nll, _ = sums(student, teacher, sample["net_input"], sample["target"], 1.0, pad)
    kd_ls, kd_nll, _ = sums(student, teacher, sample[TEACHER_NET_INPUT], sample[TEACHER_TARGET], 1.0, pad)
    r = gold_over_teacher_tokens(sample, pad)
    assert float(loss) == pytest.approx((1 - alpha) * gold_ls + alpha * r * kd_ls, rel=1e-5)
    assert size == sample["ntokens"]
    if alpha < 1:
        assert float(log["nll_loss"]) == pytest.approx(gold_nll, rel=1e-5)
    if alpha > 0:
        assert float(log["seq_kd_nll_loss"]) == pytest.approx(kd_nll, rel=1e-5)
        assert log[TEACHER_NTOKENS] == sample[TEACHER_NTOKENS]
    assert abs(gold_ls - kd_ls) > 0.5  # the two targets really give different losses


def gold_over_teacher_tokens(sample, pad):
    """r = |y_gold| / |y_teacher|, the non-pad tokens of the batch's two targets."""
    r = int(sample["target"].ne(pad).sum()) / int(sample[TEACHER_TARGET].ne(pad).sum())
    assert abs(r - 1) > 0.05  # the fixture's targets differ in length: r matters
    return r


def test_seq_kd_interp_alpha_zero_equals_label_smoothed_cross_entropy(setup):
    task, student, _, sample, _ = setup
    ours = task.build_criterion(parse_criterion(task, "seq_kd_interp", "--alpha", "0"))
    theirs = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=EPS)
    loss, _, _ = ours(student, sample)
    loss_fs, _, _ = theirs(student, sample)
    torch.testing.assert_close(loss, loss_fs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prefix", ["teacher", "gold", "both"])
def test_hybrid_kd_matches_independent_computation(setup, prefix):
    task, student, teacher, sample, _ = setup
    pad, temperature = task.target_dictionary.pad(), 2.0
    weights = (0.4, 0.6, 0.5)
    crit = task.build_criterion(parse_criterion(
        task, "hybrid_kd", "--seq-nll-weight", "0.4", "--seq-kd-weight", "0.6", "--word-kd-weight", "0.5",
        "--word-kd-prefix", prefix, "--temperature", str(temperature),
    ))
    loss, _, log = crit(student, sample)
    gold_ls, gold_nll, gold_kl = sums(student, teacher, sample["net_input"], sample["target"], temperature, pad)
    kd_ls, kd_nll, kd_kl = sums(student, teacher, sample[TEACHER_NET_INPUT], sample[TEACHER_TARGET], temperature, pad)
    kl = {"teacher": kd_kl, "gold": gold_kl, "both": kd_kl + gold_kl}[prefix]
    r = gold_over_teacher_tokens(sample, pad)
    weighted_kl = {"teacher": r * kd_kl, "gold": gold_kl, "both": r * kd_kl + gold_kl}[prefix]
    expected = weights[0] * gold_ls + weights[1] * r * kd_ls + weights[2] * temperature**2 * weighted_kl
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(log["kd_loss"]) == pytest.approx(kl, rel=1e-5)
    assert float(log["nll_loss"]) == pytest.approx(gold_nll, rel=1e-5)
    assert float(log["seq_kd_nll_loss"]) == pytest.approx(kd_nll, rel=1e-5)
    n_gold, n_kd = int(sample["target"].ne(pad).sum()), int(sample[TEACHER_TARGET].ne(pad).sum())
    assert log["kd_positions"] == {"teacher": n_kd, "gold": n_gold, "both": n_kd + n_gold}[prefix]
    assert ("teacher_nll_loss" in log) == (prefix != "teacher")


def test_hybrid_kd_reduce_metrics_logs_each_term(setup):
    from fairseq.logging import metrics

    task, student, _, sample, _ = setup
    crit = task.build_criterion(parse_criterion(task, "hybrid_kd", "--word-kd-prefix", "both"))
    _, _, log = crit(student, sample)
    with metrics.aggregate(new_root=True) as agg:
        crit.__class__.reduce_metrics([log])
        values = agg.get_smoothed_values()
    for key, denominator in (("nll_loss", "ntokens"), ("seq_kd_nll_loss", TEACHER_NTOKENS), ("kd_loss", "kd_positions")):
        assert values[key] == pytest.approx(round(float(log[key]) / log[denominator] / math.log(2), 3), abs=1e-9)
    assert "teacher_ppl" in values and "ppl" in values


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_missing_teacher_targets_are_an_error_in_training(setup, alpha):
    task, student, _, sample, _ = setup
    crit = task.build_criterion(parse_criterion(task, "seq_kd_interp", "--alpha", str(alpha)))
    teacher_keys = (TEACHER_TARGET, TEACHER_NET_INPUT, TEACHER_NTOKENS)
    gold_only = {k: v for k, v in sample.items() if k not in teacher_keys}
    student.train()
    with pytest.raises(ValueError, match="--kd-data"):
        crit(student, gold_only)
    student.eval()
    try:
        # validation without teacher targets: the gold target takes both weights, as plain NLL would
        loss, _, log = crit(student, gold_only)
        loss_fs, _, log_fs = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=EPS)(
            student, gold_only
        )
    finally:
        student.train()
    assert "seq_kd_nll_loss" not in log
    torch.testing.assert_close(loss, loss_fs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log["nll_loss"], log_fs["nll_loss"], rtol=1e-6, atol=1e-6)


def test_pure_sequence_level_kd_validates_on_the_gold_nll(setup):
    """alpha = 1 skips the gold pass in training only: validation logs the gold nll_loss that
    --best-checkpoint-metric nll_loss reads, while its loss stays the teacher-target term."""
    task, student, teacher, sample, _ = setup
    pad = task.target_dictionary.pad()
    crit = task.build_criterion(parse_criterion(task, "seq_kd_interp", "--alpha", "1"))
    assert "nll_loss" not in crit(student, sample)[2]
    student.eval()
    try:
        loss, _, log = crit(student, sample)
    finally:
        student.train()
    _, gold_nll, _ = sums(student, teacher, sample["net_input"], sample["target"], 1.0, pad)
    kd_ls, _, _ = sums(student, teacher, sample[TEACHER_NET_INPUT], sample[TEACHER_TARGET], 1.0, pad)
    assert float(log["nll_loss"]) == pytest.approx(gold_nll, rel=1e-5)
    assert float(loss) == pytest.approx(gold_over_teacher_tokens(sample, pad) * kd_ls, rel=1e-5)


@pytest.mark.parametrize("criterion, flags", [
    ("seq_kd_interp", ["--alpha", "0.5"]),
    ("hybrid_kd", []),
    ("hybrid_kd", ["--seq-kd-weight", "0", "--word-kd-prefix", "teacher"]),
])
def test_teacher_targets_are_required_at_start_up(data_dir, criterion, flags):  # noqa: F811
    cfg = parse(data_dir, "--teacher-path", "unused.pt", criterion=criterion)
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match="--kd-data DIR .* --kd-data-mode paired"):
        task.build_criterion(parse_criterion(task, criterion, *flags))


def test_hybrid_kd_on_the_gold_prefix_needs_no_teacher_targets(data_dir):  # noqa: F811
    cfg = parse(data_dir, criterion="hybrid_kd")
    task = tasks.setup_task(cfg.task)
    task.set_teacher(Teacher([task.build_model(cfg.model)], precision="fp32"))
    crit = task.build_criterion(parse_criterion(task, "hybrid_kd", "--seq-kd-weight", "0", "--word-kd-prefix", "gold"))
    assert not crit.uses_teacher_targets


@pytest.mark.parametrize("criterion, flags, message", [
    ("seq_kd_interp", ["--alpha", "1.2"], r"--alpha must lie in \[0, 1\]"),
    ("hybrid_kd", ["--seq-kd-weight", "-1"], "weights must be >= 0"),
    ("hybrid_kd", ["--seq-nll-weight", "0", "--seq-kd-weight", "0", "--word-kd-weight", "0"], "not all 0"),
    ("hybrid_kd", ["--temperature", "0"], "--temperature must be > 0"),
    ("seq_kd_interp", ["--label-smoothing", "1"], r"--label-smoothing must lie in \[0, 1\)"),
])
def test_bad_flags_are_refused(setup, criterion, flags, message):
    task = setup[0]
    with pytest.raises(ValueError, match=message):
        task.build_criterion(parse_criterion(task, criterion, *flags))


def parse_criterion(task, name, *flags):
    return parse(task.cfg.data, "--label-smoothing", str(EPS), *flags, criterion=name).criterion


def write_mmap(path, sentences):
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(str(path) + ".bin", impl="mmap", vocab_size=100)
    for s in sentences:
        builder.add_item(s)
    builder.finalize(str(path) + ".idx")
    return indexed_dataset.MMapIndexedDataset(str(path))


@pytest.mark.parametrize("block", [4, 1 << 24])
def test_check_aligned_compares_binarized_sources_in_blocks(tmp_path, monkeypatch, block):
    """The buffer comparison of binarized data finds the same sentences as a sentence-by-sentence one,
    also where a differing sentence spans two blocks."""
    from fairseq_kd.data import teacher_target_dataset

    monkeypatch.setattr(teacher_target_dataset, "_TOKENS_PER_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    gold = [torch.randint(4, 100, (n,), generator=g) for n in (3, 5, 2, 6, 4)]
    other = [s.clone() for s in gold]
    other[1][4] += 1  # tokens 3..7: spans the first two blocks of 4
    other[3][0] += 1
    a, b = write_mmap(tmp_path / "a", gold), write_mmap(tmp_path / "b", other)
    assert isinstance(a[0], torch.Tensor)
    assert teacher_target_dataset._differing_sentences(a, b).tolist() == [1, 3]
    assert teacher_target_dataset._differing_sentences(a, write_mmap(tmp_path / "c", gold)).tolist() == []
    in_memory = teacher_target_dataset._differing_sentences(gold, other)
    assert in_memory.tolist() == [1, 3]


def test_batches_count_the_longer_of_the_two_targets(data_dir):  # noqa: F811
    """A teacher translation far longer than its reference (a degenerate repetition) must not make a
    batch's second pass longer than --max-tokens allows: batching and ordering use both targets."""
    cfg = parse(data_dir)
    task = tasks.setup_task(cfg.task)
    n = 40
    lengths = [3 + i % 5 for i in range(n)]
    src = sentences(task, lengths, seed=0)
    gold = pairs(task, src, sentences(task, lengths, seed=1))
    kd_lengths = [60 if i % 10 == 0 else length for i, length in enumerate(lengths)]
    dataset = TeacherTargetDataset(gold, pairs(task, src, sentences(task, kd_lengths, seed=2)))
    max_tokens = 200
    batches = dataset.batch_by_size(dataset.ordered_indices(), max_tokens=max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(n))
    for batch in batches:
        longest = max(max(lengths[i], kd_lengths[i]) + 1 for i in batch)  # + eos
        assert len(batch) * longest <= max_tokens, (batch, longest)
        sample = dataset.collater([dataset[i] for i in batch])
        assert sample[TEACHER_TARGET].numel() <= max_tokens
    long_ones = [i for i in range(n) if kd_lengths[i] == 60]
    assert any(set(long_ones) <= set(b) or len(set(long_ones) & set(b)) > 1 for b in batches)  # kept together
