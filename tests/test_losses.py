"""Unit tests for fairseq_kd.losses.

Every reference value below is computed independently of the code under test: by hand for tiny
cases, or in float64 with explicit loops over positions and explicit exp/sum/log, never by calling
the function being tested.
"""

import math

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss as fairseq_ls_nll

from fairseq_kd import losses
from fairseq_kd.criterions import flag_checks
from reference import kd_rows64, label_smoothed_rows64, softmax64

PAD = 1


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# inputs, and the code under test as the tests call it (references: tests/reference.py)
# ---------------------------------------------------------------------------------------------


def make_kd_inputs(n=7, vocab=9, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g) * scale
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, -1).float()
    pad_mask = torch.zeros(n, dtype=torch.bool)
    pad_mask[[2, n - 1]] = True
    return student, teacher, pad_mask


def label_smoothed(logits, target, eps, pad_mask):
    """(smoothed, nll) of losses.student_losses without a teacher."""
    terms = losses.student_losses(logits, target, pad_mask, eps)
    assert terms.kd is None
    return terms.smoothed, terms.nll


def distillation_loss(student_logits, teacher_lprobs, temperature, pad_mask, kind="kl", teacher_ids=None):
    """The KD term alone of losses.student_losses, against a teacher given by its log-probabilities."""
    target = torch.zeros(pad_mask.shape, dtype=torch.long)
    teacher = losses.StoredTeacher.from_log_probs(teacher_lprobs, teacher_ids)
    return losses.student_losses(student_logits, target, pad_mask, 0.0, teacher, temperature, kind).kd


# ---------------------------------------------------------------------------------------------
# check_alpha / check_temperature (fairseq_kd.criterions.flag_checks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.5, 1.0000001, float("inf"), float("nan")])
def test_check_alpha_rejects_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"--alpha must lie in \[0, 1\]"):
        flag_checks.check_alpha("alpha", value)


def test_check_alpha_names_the_flag_with_dashes():
    with pytest.raises(ValueError, match="--kd-alpha") as info:
        flag_checks.check_alpha("kd_alpha", 2.0)
    assert "2.0" in str(info.value)


@pytest.mark.parametrize("value", [0.0, 0.25, 1.0])
def test_check_alpha_accepts_unit_interval(value):
    assert flag_checks.check_alpha("alpha", value) is None


@pytest.mark.parametrize("value", [0.0, -0.0, -1.0, float("nan"), float("-inf")])
def test_check_temperature_rejects_non_positive(value):
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        flag_checks.check_temperature(value)


@pytest.mark.parametrize("value", [1e-3, 0.5, 1.0, 2.0])
def test_check_temperature_accepts_positive(value):
    assert flag_checks.check_temperature(value) is None


# ---------------------------------------------------------------------------------------------
# label smoothing (student_losses without a teacher)
# ---------------------------------------------------------------------------------------------


def test_label_smoothed_nll_by_hand():
    # p = (1/2, 1/4, 1/4), gold 0, eps = 0.2 -> weights (0.8, 0.1, 0.1):
    # loss = 0.8 ln 2 + 0.2 * 2 ln 2 = 1.2 ln 2, nll = ln 2. The pad row must not count.
    lprobs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    target = torch.tensor([0, PAD])
    loss, nll = label_smoothed(lprobs, target, 0.2, target.eq(PAD))
    assert loss.item() == pytest.approx(1.2 * math.log(2), rel=1e-6)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-6)

    loss0, nll0 = label_smoothed(lprobs, target, 0.0, target.eq(PAD))
    assert loss0.item() == pytest.approx(math.log(2), rel=1e-6)
    assert nll0.item() == pytest.approx(math.log(2), rel=1e-6)


def _ls_inputs(seed=0, n=10, vocab=8):
    g = torch.Generator().manual_seed(seed)
    lprobs = torch.log_softmax(torch.randn(n, vocab, generator=g) * 2, dim=-1)
    target = torch.randint(2, vocab, (n,), generator=g)
    target[[0, 4, 9]] = PAD
    return lprobs, target


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_nll_matches_loop(eps):
    lprobs, target = _ls_inputs()
    loss, nll = label_smoothed(lprobs, target, eps, target.eq(PAD))
    ref_loss, ref_nll = label_smoothed_rows64(lprobs, target, eps, PAD)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert nll.item() == pytest.approx(ref_nll, rel=1e-6)
    if eps > 0:
        assert abs(loss.item() - nll.item()) > 1e-3  # smoothing must actually change the loss


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_nll_matches_fairseq(eps):
    lprobs, target = _ls_inputs(seed=1)
    loss, nll = label_smoothed(lprobs, target, eps, target.eq(PAD))
    fs_loss, fs_nll = fairseq_ls_nll(lprobs.clone(), target.clone(), eps, ignore_index=PAD)
    torch.testing.assert_close(loss, fs_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll, fs_nll, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothed_nll_ignores_padding(eps):
    lprobs, target = _ls_inputs(seed=2)
    pad_mask = target.eq(PAD)
    loss, nll = label_smoothed(lprobs, target, eps, pad_mask)

    wild = lprobs.clone()
    wild[pad_mask] = -1e4 * torch.rand(int(pad_mask.sum()), lprobs.size(-1))
    loss_w, nll_w = label_smoothed(wild, target, eps, pad_mask)
    assert torch.equal(loss, loss_w) and torch.equal(nll, nll_w)

    # and it equals the loss over the non-pad rows alone
    keep = ~pad_mask
    loss_k, nll_k = label_smoothed(lprobs[keep], target[keep], eps, pad_mask[keep])
    torch.testing.assert_close(loss, loss_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll, nll_k, rtol=1e-6, atol=1e-6)


def test_label_smoothed_nll_gradient_is_closed_form_and_zero_on_pad_rows():
    """d smoothed / dz = softmax(z) - t, t the smoothed one-hot target: 1 - eps on the gold token,
    eps / (V - 1) elsewhere; d nll / dz = softmax(z) - one-hot; 0 on pad rows."""
    logits, target = _ls_inputs(seed=3)
    logits = (logits * 1.7).requires_grad_(True)  # raw logits, not normalised
    pad_mask = target.eq(PAD)
    vocab = logits.size(-1)
    for eps, pick in ((0.1, 0), (0.0, 0), (0.1, 1)):
        logits.grad = None
        label_smoothed(logits, target, eps, pad_mask)[pick].backward()
        for i in range(target.numel()):
            if pad_mask[i]:
                expected = torch.zeros(vocab, dtype=torch.float64)
            else:
                smoothing = eps if pick == 0 else 0.0
                t = torch.full((vocab,), smoothing / (vocab - 1), dtype=torch.float64)
                t[target[i]] = 1.0 - smoothing
                expected = softmax64(logits[i].detach()) - t
            torch.testing.assert_close(logits.grad[i].double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# teacher_log_probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_teacher_log_probs_single_teacher_temperature(temperature):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 11, generator=g) * 4
    out = losses.teacher_log_probs([z], temperature)
    assert out.dtype == torch.float32 and out.shape == z.shape
    for b in range(2):
        for t in range(3):
            ref = torch.log(softmax64(z[b, t], temperature))
            torch.testing.assert_close(out[b, t].double(), ref, rtol=1e-5, atol=1e-5)
    if temperature != 1.0:  # the temperature is really applied
        plain = losses.teacher_log_probs([z], 1.0)
        assert (out - plain).abs().max() > 0.1


def test_teacher_ensemble_by_hand_averages_probabilities_not_logits():
    # teacher 1: (0.9, 0.1); teacher 2: (0.5, 0.5). Mean probability (0.7, 0.3);
    # the mean of the logits, (ln 3, 0), would give (0.75, 0.25) instead.
    z1 = torch.tensor([[math.log(9.0), 0.0]])
    z2 = torch.tensor([[0.0, 0.0]])
    out = losses.teacher_log_probs([z1, z2], 1.0)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.7, 0.3]]), rtol=1e-6, atol=1e-6)
    assert abs(out.exp()[0, 0].item() - 0.75) > 0.04


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_teacher_ensemble_matches_loop_and_differs_from_logit_average(temperature):
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 10, generator=g) * 3
    z2 = torch.randn(6, 10, generator=g) * 3
    out = losses.teacher_log_probs([z1, z2], temperature)
    for i in range(6):
        ref = torch.log(0.5 * (softmax64(z1[i], temperature) + softmax64(z2[i], temperature)))
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6), rtol=1e-6, atol=1e-6)
    logit_average = torch.log_softmax((z1 + z2) / 2 / temperature, dim=-1)
    assert (out - logit_average).abs().max() > 0.1


def test_teacher_ensemble_does_not_underflow():
    # the second token has probability ~e^-1000 under both teachers: the mean is
    # 0.5 * (e^-1000 + e^-2000), whose log is -1000 - ln 2 (exp() would underflow in fp32).
    z1 = torch.tensor([[0.0, -1000.0]])
    z2 = torch.tensor([[0.0, -2000.0]])
    out = losses.teacher_log_probs([z1, z2], 1.0)
    assert torch.isfinite(out).all()
    assert out[0, 1].item() == pytest.approx(-1000.0 - math.log(2.0), abs=1e-3)
    assert out[0, 0].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_teacher_log_probs_low_precision_logits_computed_in_fp32(dtype):
    temperature = 3.0
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(5, 12, generator=g) * 8).to(dtype)
    z2 = (torch.randn(5, 12, generator=g) * 8).to(dtype)
    for logits in ([z], [z, z2]):
        out = losses.teacher_log_probs(logits, temperature)
        assert out.dtype == torch.float32
        for i in range(5):
            probs = [softmax64(zk[i].double(), temperature) for zk in logits]
            ref = torch.log(sum(probs) / len(probs))
            torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)
    # the case is sensitive to precision: dividing by T in the low precision is visibly off
    naive = torch.log_softmax((z / temperature).double(), dim=-1)
    exact = torch.log_softmax(z.double() / temperature, dim=-1)
    assert (naive - exact).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the KD term of student_losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distillation_loss_matches_loop(kind, temperature):
    student, teacher, pad_mask = make_kd_inputs(seed=7)
    out = distillation_loss(student, teacher, temperature, pad_mask, kind)
    kl, ce, _ = kd_rows64(student, teacher, temperature, pad_mask)
    expected = kl if kind == "kl" else ce
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_by_hand():
    # student logits (0, ln 3) at T=1 -> p = (1/4, 3/4); teacher q = (1/2, 1/2):
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = ln 2 - 1/2 ln 3; CE = 1/2 ln 4 + 1/2 ln(4/3) = 2 ln 2 - 1/2 ln 3.
    # At T = 2 the student logits become (0, ln 3 / 2) -> p = (1, sqrt 3) / (1 + sqrt 3).
    student = torch.tensor([[0.0, math.log(3.0)]])
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    no_pad = torch.tensor([False])
    kl1 = distillation_loss(student, teacher, 1.0, no_pad, "kl").item()
    ce1 = distillation_loss(student, teacher, 1.0, no_pad, "ce").item()
    assert kl1 == pytest.approx(math.log(2) - 0.5 * math.log(3), rel=1e-6)
    assert ce1 == pytest.approx(2 * math.log(2) - 0.5 * math.log(3), rel=1e-6)
    s3 = math.sqrt(3.0)
    p2 = (1 / (1 + s3), s3 / (1 + s3))
    kl2 = distillation_loss(student, teacher, 2.0, no_pad, "kl").item()
    assert kl2 == pytest.approx(0.5 * math.log(0.5 / p2[0]) + 0.5 * math.log(0.5 / p2[1]), rel=1e-6)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distillation_loss_ignores_padding(kind, temperature):
    student, teacher, pad_mask = make_kd_inputs(seed=8)
    base = distillation_loss(student, teacher, temperature, pad_mask, kind)

    g = torch.Generator().manual_seed(9)
    n_pad = int(pad_mask.sum())
    wild_student = student.clone()
    wild_student[pad_mask] = torch.randn(n_pad, student.size(1), generator=g) * 1e4
    wild_teacher = teacher.clone()
    wild_teacher[pad_mask] = torch.log_softmax(torch.randn(n_pad, student.size(1), generator=g) * 1e3, -1)
    wild_student.requires_grad_(True)
    moved = distillation_loss(wild_student, wild_teacher, temperature, pad_mask, kind)
    assert torch.equal(base, moved.detach())

    moved.backward()
    assert torch.all(wild_student.grad[pad_mask] == 0)
    assert torch.all(wild_student.grad[~pad_mask].abs().sum(-1) > 0)

    # sanity: the same change on a non-pad row does move the loss
    unpadded = student.clone()
    unpadded[0] += 5 * torch.arange(student.size(1), dtype=torch.float32)
    assert abs(distillation_loss(unpadded, teacher, temperature, pad_mask, kind).item() - base.item()) > 1e-2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kl_zero_when_student_equals_teacher(temperature):
    student, _, pad_mask = make_kd_inputs(seed=10)
    teacher = torch.log_softmax(student.double() / temperature, dim=-1).float()
    kl = distillation_loss(student, teacher, temperature, pad_mask, "kl")
    assert abs(kl.item()) < 1e-5
    # while CE is then the teacher entropy, clearly non-zero
    ce = distillation_loss(student, teacher, temperature, pad_mask, "ce")
    _, _, ent = kd_rows64(student, teacher, temperature, pad_mask)
    assert ent > 0.1
    assert ce.item() == pytest.approx(ent, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_ce_minus_kl_is_teacher_entropy(temperature):
    student, teacher, pad_mask = make_kd_inputs(seed=11)
    kl = distillation_loss(student, teacher, temperature, pad_mask, "kl").item()
    ce = distillation_loss(student, teacher, temperature, pad_mask, "ce").item()
    _, _, ent = kd_rows64(student, teacher, temperature, pad_mask)
    assert ce - kl == pytest.approx(ent, rel=1e-5)
    assert kl > 0.1  # the student differs from the teacher in this case


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_zero_teacher_probabilities_finite_loss_and_gradients(kind, temperature):
    student, teacher, pad_mask = make_kd_inputs(seed=12)
    teacher = teacher.clone()
    teacher[0, [1, 4]] = float("-inf")
    teacher[3, 0] = float("-inf")
    teacher[2, :] = float("-inf")  # a pad row with no mass at all
    # renormalise the non-pad rows that lost mass (they must stay distributions)
    for i in (0, 3):
        teacher[i] = torch.log_softmax(teacher[i].double(), -1).float()
    student.requires_grad_(True)
    out = distillation_loss(student, teacher, temperature, pad_mask, kind)
    assert torch.isfinite(out)
    kl, ce, _ = kd_rows64(student.detach(), teacher, temperature, pad_mask)
    assert out.item() == pytest.approx(kl if kind == "kl" else ce, rel=1e-5)
    out.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gradient_is_closed_form(kind, temperature):
    """d/dz KL(q_T || softmax(z / T)) = (p_T - q_T) / T, the same for CE; zero on pad rows.
    Checked also with zero-probability teacher entries, where q_T = 0."""
    student, teacher, pad_mask = make_kd_inputs(seed=13)
    teacher = teacher.clone()
    teacher[1, 2] = float("-inf")
    teacher[1] = torch.log_softmax(teacher[1].double(), -1).float()
    student.requires_grad_(True)
    distillation_loss(student, teacher, temperature, pad_mask, kind).backward()
    for i in range(student.size(0)):
        if pad_mask[i]:
            expected = torch.zeros(student.size(1), dtype=torch.float64)
        else:
            p = softmax64(student[i].detach(), temperature)
            q = torch.exp(teacher[i].double())
            expected = (p - q) / temperature
        torch.testing.assert_close(student.grad[i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_distillation_loss_low_precision_student_computed_in_fp32(dtype):
    student, teacher, pad_mask = make_kd_inputs(seed=14)
    student = student.to(dtype)
    out = distillation_loss(student, teacher, 2.0, pad_mask, "kl")
    assert out.dtype == torch.float32
    kl, _, _ = kd_rows64(student.double(), teacher, 2.0, pad_mask)
    assert out.item() == pytest.approx(kl, rel=1e-5)


def test_distillation_loss_unknown_kind():
    student, teacher, pad_mask = make_kd_inputs()
    with pytest.raises(ValueError, match="unknown distillation loss kind 'mse'"):
        distillation_loss(student, teacher, 1.0, pad_mask, "mse")


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gradcheck_float64(kind, temperature):
    """Finite differences of the forward against the backward, in float64, with pad rows and a
    zero-probability teacher entry."""
    g = torch.Generator().manual_seed(15)
    student = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(5, 6, generator=g, dtype=torch.float64)
    teacher_logits[0, 3] = float("-inf")
    teacher = torch.log_softmax(teacher_logits, dim=-1)
    pad_mask = torch.tensor([False, True, False, False, True])

    def fn(s):
        return distillation_loss(s, teacher, temperature, pad_mask, kind)

    assert fn(student).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_distillation_loss_many_chunks(monkeypatch, kind):
    """Positions split over several chunks (the last one partial) give the same loss and gradient."""
    monkeypatch.setitem(losses._CHUNK_ELEMENTS, "cpu", 2 * 9)  # 2 positions of V = 9 per chunk
    student, teacher, pad_mask = make_kd_inputs(n=7, vocab=9, seed=16)
    student.requires_grad_(True)
    out = distillation_loss(student, teacher, 2.0, pad_mask, kind)
    kl, ce, _ = kd_rows64(student.detach(), teacher, 2.0, pad_mask)
    assert out.item() == pytest.approx(kl if kind == "kl" else ce, rel=1e-5)
    out.backward()
    for i in range(student.size(0)):
        p = softmax64(student[i].detach(), 2.0)
        q = torch.exp(teacher[i].double())
        expected = torch.zeros_like(p) if pad_mask[i] else (p - q) / 2.0
        torch.testing.assert_close(student.grad[i].double(), expected, rtol=1e-5, atol=1e-6)
