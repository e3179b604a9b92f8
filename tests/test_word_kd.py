"""Tests of the word_kd criterion on real (tiny, randomly initialised) fairseq transformers.

The task, the student and the teachers are built in-process from dictionaries written to a
temporary directory; the batch is collated by fairseq's LanguagePairDataset and has padding on
both sides. Reference losses are recomputed independently: the models are run directly and the
losses are written out in float64 with loops over target positions.
"""

import copy
import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss as fairseq_ls_nll_loss
from fairseq.data import Dictionary, LanguagePairDataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics

import fairseq_kd  # noqa: F401  (registers translation_distill and word_kd)
from fairseq_kd.criterions.word_kd import WordKDCriterion
from fairseq_kd.tasks.translation_distill import TranslationDistillTask
from fairseq_kd.teacher import Teacher
from reference import kd_terms64, label_smoothed_nll64, non_pad_positions, softmax64

ARCH = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
N_WORDS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("word_kd_dicts")
    for lang, prefix in (("src", "a"), ("tgt", "b")):
        d = Dictionary()
        for i in range(N_WORDS):
            d.add_symbol(f"{prefix}{i}")
        d.save(str(root / f"dict.{lang}.txt"))
    return root


def parse(data_dir, *extra, task="translation_distill", criterion="word_kd"):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data_dir), "--task", task, "-s", "src", "-t", "tgt", *ARCH, "--criterion", criterion, "--cpu", *extra],
    )
    return convert_namespace_to_omegaconf(args)


def make_sample(task, seed=0):
    """Four pairs of different lengths, collated (source left-padded, target right-padded)."""
    g = torch.Generator().manual_seed(seed)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    lo, hi = src_dict.nspecial, len(src_dict)

    def sentence(n):
        return torch.cat([torch.randint(lo, hi, (n,), generator=g), torch.tensor([src_dict.eos()])])

    src = [sentence(n) for n in (5, 3, 7, 2)]
    tgt = [sentence(n) for n in (4, 6, 2, 5)]
    dataset = LanguagePairDataset(
        src, torch.tensor([len(s) for s in src]), src_dict, tgt, torch.tensor([len(t) for t in tgt]), tgt_dict,
        shuffle=False,
    )
    return dataset.collater([dataset[i] for i in range(len(src))])


@pytest.fixture(scope="module")
def setup(data_dir):
    """(task, student, [teacher1, teacher2], sample); student without dropout, teachers with."""
    cfg = parse(data_dir, "--dropout", "0.0")
    task = tasks.setup_task(cfg.task)
    assert isinstance(task, TranslationDistillTask)
    torch.manual_seed(0)
    student = task.build_model(cfg.model)
    teacher_cfg = parse(data_dir, "--dropout", "0.3", "--attention-dropout", "0.2")
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(task.build_model(teacher_cfg.model))  # built in train mode, with dropout
    sample = make_sample(task)
    return task, student, teachers, sample


def with_teachers(task, models):
    """Hand the task an in-memory teacher."""
    task.set_teacher(Teacher(models, precision="fp32"))
    return task


def criterion(task, alpha=0.5, temperature=2.0, kd_loss="kl", label_smoothing=0.1, sentence_avg=False):
    return WordKDCriterion(task, alpha, temperature, kd_loss, label_smoothing, sentence_avg)


def reference(student, teachers, sample, temperature, eps, pad):
    """Independent float64 recomputation: sums over non-pad target positions of the label-smoothed
    gold loss (cross-entropy against the smoothed one-hot target), the plain NLL, KL(q_T||p_T),
    H(q_T, p_T) and the teacher ensemble's NLL at T = 1."""
    net_input = sample["net_input"]
    with torch.no_grad():
        z_student = student(**net_input)[0].double()
        z_teachers = []
        for m in teachers:
            assert not m.training
            z_teachers.append(m(**net_input)[0].double())
    target = sample["target"]
    out = dict(ls=0.0, nll=0.0, kl=0.0, ce=0.0, teacher_nll=0.0)
    n_positions = 0
    for b, t, y in non_pad_positions(target, pad):
        n_positions += 1
        logp = torch.log(softmax64(z_student[b, t]))
        out["ls"] += label_smoothed_nll64(logp, y, eps)
        out["nll"] += float(-logp[y])
        p_t = softmax64(z_student[b, t], temperature)
        q_t = sum(softmax64(z[b, t], temperature) for z in z_teachers) / len(z_teachers)
        kl, ce, _ = kd_terms64(q_t, p_t)
        out["kl"] += kl
        out["ce"] += ce
        q_1 = sum(softmax64(z[b, t]) for z in z_teachers) / len(z_teachers)
        out["teacher_nll"] += -math.log(float(q_1[y]))
    assert n_positions == int(target.ne(pad).sum())
    return out


def close(actual, expected, rel=1e-5):
    a = float(actual)
    assert a == pytest.approx(expected, rel=rel, abs=1e-5), (a, expected)


def test_batch_has_padding(setup):
    task, _, _, sample = setup
    pad = task.target_dictionary.pad()
    assert sample["target"].eq(pad).any()
    assert sample["net_input"]["src_tokens"].eq(pad).any()
    assert sample["ntokens"] == int(sample["target"].ne(pad).sum())


@pytest.mark.parametrize("n_teachers", [1, 2])
@pytest.mark.parametrize("kd_loss", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_matches_independent_computation(setup, alpha, temperature, kd_loss, n_teachers):
    task, student, teachers, sample = setup
    models = teachers[:n_teachers]
    with_teachers(task, models)
    eps = 0.1
    crit = criterion(task, alpha, temperature, kd_loss, eps)
    loss, sample_size, log = crit(student, sample)

    ref = reference(student, models, sample, temperature, eps, task.target_dictionary.pad())
    kd = ref[kd_loss]
    close(loss, (1 - alpha) * ref["ls"] + alpha * temperature**2 * kd)
    close(log["loss"], (1 - alpha) * ref["ls"] + alpha * temperature**2 * kd)
    close(log["nll_loss"], ref["nll"])
    close(log["kd_loss"], kd)
    close(log["teacher_nll_loss"], ref["teacher_nll"])
    assert sample_size == sample["ntokens"] == log["sample_size"]
    # the case is not degenerate: the two terms really differ
    assert abs(ref["ls"] - temperature**2 * kd) > 0.5
    assert ref["kl"] > 0.1


def test_ensemble_differs_from_each_teacher(setup):
    task, student, teachers, sample = setup
    kds = []
    for models in ([teachers[0]], [teachers[1]], teachers):
        with_teachers(task, models)
        kds.append(float(criterion(task, 1.0, 2.0, "kl")(student, sample)[2]["kd_loss"]))
    assert min(abs(kds[2] - kds[0]), abs(kds[2] - kds[1])) > 1e-3


def test_ensemble_of_two_copies_equals_single_teacher(setup):
    task, student, teachers, sample = setup
    with_teachers(task, [teachers[0]])
    _, _, single = criterion(task, 0.5, 2.0, "kl")(student, sample)
    with_teachers(task, [teachers[0], copy.deepcopy(teachers[0])])
    _, _, double = criterion(task, 0.5, 2.0, "kl")(student, sample)
    for key in ("loss", "kd_loss", "teacher_nll_loss"):
        close(double[key], float(single[key]), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_alpha_zero_equals_fairseq_label_smoothed_cross_entropy(setup, eps):
    """Loss, logging and gradients of alpha = 0 against fairseq's label smoothing. In float64: our
    loss is one fused pass, fairseq's criterion a float32 log-softmax and autograd, so they agree
    to float32 rounding only; here fairseq's formula runs on float64 log-probabilities."""
    task, student, teachers, sample = setup
    with_teachers(task, teachers)
    student = copy.deepcopy(student).double()
    ours = criterion(task, alpha=0.0, temperature=2.0, kd_loss="kl", label_smoothing=eps)
    theirs = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=eps)

    student.zero_grad()
    loss, size, log = ours(student, sample)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    lprobs = torch.log_softmax(student(**sample["net_input"])[0], dim=-1)
    loss_fs, nll_fs = fairseq_ls_nll_loss(
        lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), eps, ignore_index=task.target_dictionary.pad()
    )
    loss_fs.backward()
    grads_fs = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    _, size_fs, log_fs = theirs(student, sample)

    assert loss.dtype == lprobs.dtype == torch.float64
    torch.testing.assert_close(loss, loss_fs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log["nll_loss"], nll_fs.detach(), rtol=1e-12, atol=1e-12)
    assert size == size_fs
    for key in ("ntokens", "nsentences", "sample_size"):
        assert log[key] == log_fs[key]
    for g, g_fs in zip(grads, grads_fs):
        torch.testing.assert_close(g, g_fs, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_logging_outputs_and_sample_size(setup, sentence_avg):
    task, student, teachers, sample = setup
    with_teachers(task, teachers)
    temperature = 2.0
    loss, sample_size, log = criterion(task, 0.5, temperature, "ce", 0.1, sentence_avg)(student, sample)
    pad = task.target_dictionary.pad()
    n_sentences = sample["target"].size(0)
    n_tokens = int(sample["target"].ne(pad).sum())
    expected_size = n_sentences if sentence_avg else n_tokens
    assert sample_size == log["sample_size"] == expected_size
    assert log["ntokens"] == n_tokens
    assert log["nsentences"] == n_sentences == 4
    assert {"loss", "nll_loss", "kd_loss", "teacher_nll_loss", "ntokens", "nsentences", "sample_size"} <= set(log)
    for key in ("loss", "nll_loss", "kd_loss", "teacher_nll_loss"):
        assert not log[key].requires_grad

    ref = reference(student, teachers, sample, temperature, 0.1, pad)
    close(log["nll_loss"], ref["nll"])
    close(log["kd_loss"], ref["ce"])
    close(log["teacher_nll_loss"], ref["teacher_nll"])
    close(loss, 0.5 * ref["ls"] + 0.5 * temperature**2 * ref["ce"])  # the loss does not depend on sentence_avg

    # reduce_metrics reports per-token losses in bits, the loss per sample_size unit
    with metrics.aggregate(new_root=True) as agg:
        WordKDCriterion.reduce_metrics([log, log])
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(round(float(loss) / expected_size / math.log(2), 3), abs=1e-9)
    assert values["kd_loss"] == pytest.approx(round(ref["ce"] / n_tokens / math.log(2), 3), abs=1e-3)
    assert values["teacher_nll_loss"] == pytest.approx(round(ref["teacher_nll"] / n_tokens / math.log(2), 3), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["nll_loss"], rel=1e-2)


def test_parsed_criterion_with_ce_enum(data_dir, setup):
    """Built from the command line (kd_loss arrives as fairseq's ChoiceEnum, sentence_avg resolved)."""
    _, student, teachers, sample = setup
    cfg = parse(data_dir, "--dropout", "0.0", "--alpha", "0.5", "--temperature", "2", "--kd-loss", "ce",
                "--label-smoothing", "0.1", "--sentence-avg")
    task = tasks.setup_task(cfg.task)
    with_teachers(task, teachers)
    crit = task.build_criterion(cfg.criterion)
    assert isinstance(crit, WordKDCriterion)
    assert (crit.alpha, crit.temperature, crit.eps, crit.sentence_avg) == (0.5, 2.0, 0.1, True)
    loss, sample_size, log = crit(student, sample)
    ref = reference(student, teachers, sample, 2.0, 0.1, task.target_dictionary.pad())
    close(log["kd_loss"], ref["ce"])
    close(loss, 0.5 * ref["ls"] + 0.5 * 4.0 * ref["ce"])
    assert sample_size == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha", "1.5"], r"--alpha must lie in \[0, 1\].*1\.5"),
        (["--alpha", "-0.5"], r"--alpha must lie in \[0, 1\]"),
        (["--temperature", "0"], r"--temperature must be > 0.*got 0"),
        (["--temperature", "-2"], r"--temperature must be > 0"),
        (["--label-smoothing", "-0.1"], r"--label-smoothing must lie in \[0, 1\)"),
    ],
)
def test_bad_flags_fail_at_construction(data_dir, flags, message):
    # a teacher path is given (never loaded: no model is built) so that only the bad flag is wrong
    cfg = parse(data_dir, "--teacher-path", "in-memory-teacher.pt", *flags)
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match=message):
        task.build_criterion(cfg.criterion)


def test_plain_translation_task_is_refused(data_dir):
    cfg = parse(data_dir, task="translation")
    task = tasks.setup_task(cfg.task)
    assert not isinstance(task, TranslationDistillTask)
    with pytest.raises(ValueError, match=r"use --task translation_distill"):
        task.build_criterion(cfg.criterion)


def test_missing_teacher_path_fails_no_later_than_first_forward(data_dir, setup):
    _, student, _, sample = setup
    cfg = parse(data_dir, "--dropout", "0.0")
    task = tasks.setup_task(cfg.task)
    assert not task.cfg.teacher_path
    with pytest.raises(ValueError, match="--teacher-path"):
        crit = task.build_criterion(cfg.criterion)
        crit(student, sample)


def test_teacher_in_eval_mode_and_gets_no_gradients(setup):
    task, student, teachers, sample = setup
    # dropout is really active in these teachers when in train mode ...
    probe = copy.deepcopy(teachers[0]).train()
    a = probe(**sample["net_input"])[0]
    b = probe(**sample["net_input"])[0]
    assert not torch.allclose(a, b)

    # ... but the Teacher switches them to eval mode (even ones handed over in train mode)
    for m in teachers:
        m.train()
    with_teachers(task, teachers)
    for m in teachers:
        assert all(not mod.training for mod in m.modules())
        assert all(not p.requires_grad for p in m.parameters())
    teacher = task.teacher(torch.device("cpu"))
    net_input = sample["net_input"]
    first = teacher.logits(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
    second = teacher.logits(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
    assert len(first) == 2
    for x, y in zip(first, second):
        assert x.dtype == torch.float32 and not x.requires_grad
        assert torch.equal(x, y)

    student.train()
    student.zero_grad()
    crit = criterion(task, alpha=1.0, temperature=2.0, kd_loss="kl")
    loss1, _, _ = crit(student, sample)
    loss1.backward()
    loss2, _, _ = crit(student, sample)
    assert torch.equal(loss1.detach(), loss2.detach())
    for m in teachers:
        assert all(p.grad is None for p in m.parameters())
        assert not m.training
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    student.zero_grad()


def test_task_max_positions_are_narrowed_to_the_teachers(data_dir):
    """Batches are filtered by the teacher's position limits too, not only the student's."""
    short = parse(data_dir, "--max-source-positions", "16", "--max-target-positions", "12")
    teacher = tasks.setup_task(short.task).build_model(short.model)
    assert teacher.max_positions() == (16, 12)
    task = tasks.setup_task(parse(data_dir).task)
    assert task.max_positions() == (1024, 1024)
    task.set_teacher(Teacher([teacher], precision="fp32"))
    assert task.max_positions() == (16, 12)
