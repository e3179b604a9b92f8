"""The sparse (top-k cached) teacher path of fairseq_kd.losses and the teacher's target NLL,
against float64 loops written independently of the code under test."""

import pytest
import torch

from fairseq_kd import losses
from reference import kd_terms64, softmax64


def sparse_kd(student, top, temperature, pad_mask, kind):
    """The KD term of losses.student_losses against the top-k teacher ``top`` (values, indices)."""
    teacher = losses.topk_teacher_distribution(top.values, top.indices, temperature)
    target = torch.zeros(pad_mask.shape, dtype=torch.long)
    return losses.student_losses(student, target, pad_mask, 0.0, teacher, temperature, kind).kd


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(3)
    n, vocab, k = 7, 30, 4
    student = torch.randn(n, vocab, generator=g) * 2
    teacher = torch.randn(n, vocab, generator=g) * 3
    pad_mask = torch.tensor([False, False, True, False, False, True, False])
    return student, teacher, pad_mask, k


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_topk_teacher_is_the_renormalised_restriction_of_the_full_softmax(case, temperature):
    _, teacher, _, k = case
    full_lprobs = torch.log_softmax(teacher, -1)  # what a cache stores (T = 1)
    top = full_lprobs.topk(k, dim=-1)
    got = losses.topk_teacher_distribution(top.values, top.indices, temperature).probs.log()
    for i in range(teacher.size(0)):
        q_full = softmax64(teacher[i], temperature)
        restricted = q_full[top.indices[i]]
        expected = restricted / restricted.sum()
        torch.testing.assert_close(got[i].double().exp(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sparse_distillation_loss_matches_loop(case, kind, temperature):
    student, teacher, pad_mask, k = case
    top = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    z = student.clone().requires_grad_(True)
    loss = sparse_kd(z, top, temperature, pad_mask, kind)
    loss.backward()

    expected, grad = 0.0, torch.zeros(student.shape, dtype=torch.float64)
    for i in range(student.size(0)):
        if pad_mask[i]:
            continue
        p = softmax64(student[i], temperature)
        weights = torch.exp(top.values[i].double() / temperature)
        q = torch.zeros_like(p)
        q[top.indices[i]] = weights / weights.sum()
        kl, ce, _ = kd_terms64(q, p)
        expected += kl if kind == "kl" else ce
        grad[i] = (p - q) / temperature
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(z.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_sparse_equals_dense_with_zero_mass_elsewhere(case):
    student, teacher, pad_mask, k = case
    top = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    q_lprobs = losses.topk_teacher_distribution(top.values, top.indices, 1.0).probs.log()
    dense = losses.StoredTeacher.from_log_probs(
        torch.full(teacher.shape, float("-inf")).scatter(1, top.indices, q_lprobs)
    )
    target = torch.zeros(pad_mask.shape, dtype=torch.long)
    for kind in ("kl", "ce"):
        sparse = sparse_kd(student, top, 1.0, pad_mask, kind)
        full = losses.student_losses(student, target, pad_mask, 0.0, dense, 1.0, kind).kd
        assert float(sparse) == pytest.approx(float(full), rel=1e-6)


def test_sparse_gradcheck_float64(case):
    student, teacher, pad_mask, k = case
    top = torch.log_softmax(teacher.double(), -1).topk(k, dim=-1)
    z = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sparse_kd(x, top, 2.0, pad_mask, "kl"), (z,))
