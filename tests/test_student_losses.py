"""The fused student loss (label smoothing + NLL + KD in one pass) and the dense teacher
distribution, against float64 references written with plain torch ops, and finite differences."""

import math

import pytest
import torch

from fairseq_kd import losses
from reference import student_terms64

PAD = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def case(n=9, vocab=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    target = torch.randint(2, vocab, (n,), generator=g)
    target[[1, n - 1]] = PAD
    return student, teacher, target, target.eq(PAD)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_three_terms_match_reference(temperature, eps, kind):
    student, teacher, target, pad_mask = case(seed=1)
    dist = losses.OnlineTeacher([teacher.float()])
    got = losses.student_losses(student, target, pad_mask, eps, dist, temperature, kind)
    want = student_terms64(student, torch.softmax(teacher / temperature, -1), target, pad_mask, eps, temperature, kind)
    for g, w in zip(got[:3], want):
        assert g.dtype == torch.float32
        assert float(g) == pytest.approx(float(w), rel=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("teacher_form", ["online", "stored", "sparse"])
def test_gradcheck_weighted_sum_of_all_terms(temperature, eps, teacher_form):
    """The backward combines the three outputs' incoming gradients: finite differences of
    0.7 * smoothed + 0.2 * nll + 1.3 * kd, in float64, with pad rows."""
    student, teacher, target, pad_mask = case(n=6, vocab=7, seed=2, dtype=torch.float64)
    if teacher_form == "sparse":
        top = torch.log_softmax(teacher, -1).topk(3, dim=-1)
        dist = losses.topk_teacher_distribution(top.values, top.indices, temperature)
    elif teacher_form == "stored":
        dist = losses.StoredTeacher.from_log_probs(torch.log_softmax(teacher / temperature, -1))
    else:
        dist = losses.OnlineTeacher([teacher, teacher.flip(-1)])  # a two-member ensemble

    def fn(z):
        smoothed, nll, kd, _ = losses.student_losses(z, target, pad_mask, eps, dist, temperature, "kl")
        return 0.7 * smoothed + 0.2 * nll + 1.3 * kd

    z = student.clone().requires_grad_(True)
    assert fn(z).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_closed_form_with_all_terms():
    """d/dz [a * smoothed + b * nll + c * kd] = a (p - t) + b (p - e_y) + c (p_T - q_T) / T on kept
    rows (t: the smoothed one-hot target), 0 on pad rows."""
    student, teacher, target, pad_mask = case(seed=3)
    eps, temperature, (a, b, c) = 0.2, 2.0, (0.6, 0.3, 0.9)
    q = torch.softmax(teacher / temperature, -1)
    dist = losses.StoredTeacher.from_log_probs(q.log().float())
    z = student.clone().requires_grad_(True)
    smoothed, nll, kd, _ = losses.student_losses(z, target, pad_mask, eps, dist, temperature, "ce")
    (a * smoothed + b * nll + c * kd).backward()
    vocab = z.size(-1)
    for i in range(z.size(0)):
        if pad_mask[i]:
            assert torch.all(z.grad[i] == 0)
            continue
        p = torch.softmax(student[i].double(), -1)
        p_t = torch.softmax(student[i].double() / temperature, -1)
        one_hot = torch.zeros(vocab, dtype=torch.float64)
        one_hot[target[i]] = 1.0
        t = one_hot * (1 - eps) + (1 - one_hot) * eps / (vocab - 1)
        expected = a * (p - t) + b * (p - one_hot) + c * (p_t - q[i]) / temperature
        torch.testing.assert_close(z.grad[i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_many_chunks_same_losses_and_gradients(monkeypatch, temperature):
    student, teacher, target, pad_mask = case(n=11, vocab=13, seed=4)

    def run():
        dist = losses.OnlineTeacher([teacher.float(), teacher.float() / 2])
        z = student.clone().requires_grad_(True)
        terms = losses.student_losses(z, target, pad_mask, 0.1, dist, temperature, "kl")
        (terms.smoothed + terms.nll + terms.kd).backward()
        return [*terms, z.grad]

    whole = run()
    monkeypatch.setitem(losses._CHUNK_ELEMENTS, "cpu", 3 * 13)  # 3 rows per chunk, the last chunk partial
    assert len(losses._chunks(11, 13, torch.device("cpu"))) == 4
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _sparse_teacher(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:3] for _ in range(n)])
    return losses.topk_teacher_distribution(torch.randn(n, 3, generator=g), ids, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_kind", ["online", "sparse"])
def test_reused_logits_memory_takes_the_same_gradient(monkeypatch, dtype, temperature, teacher_kind):
    """With reuse_logits the gradient is written into the logits' own memory (no new (N, V) tensor)
    and equals the gradient computed into fresh memory, over several chunks."""
    monkeypatch.setitem(losses._CHUNK_ELEMENTS, "cpu", 3 * 13)
    student, teacher, target, pad_mask = case(n=11, vocab=13, seed=9)

    def run(reuse):
        dist = (losses.OnlineTeacher([teacher.to(dtype), teacher.to(dtype) / 2])
                if teacher_kind == "online" else _sparse_teacher(11, 13, seed=10))
        leaf = student.to(dtype).clone().requires_grad_(True)
        logits = leaf * 1.0  # not a leaf, as the model's output is
        seen = {}
        logits.register_hook(lambda grad: seen.update(grad=grad, same_memory=grad.data_ptr() == logits.data_ptr()))
        terms = losses.student_losses(logits, target, pad_mask, 0.1, dist, temperature, "kl", reuse_logits=reuse)
        (terms.smoothed + 0.5 * terms.nll + 2.0 * terms.kd).backward()
        return seen, leaf.grad

    fresh, fresh_leaf_grad = run(False)
    reused, reused_leaf_grad = run(True)
    assert not fresh["same_memory"] and reused["same_memory"]
    torch.testing.assert_close(reused_leaf_grad, fresh_leaf_grad, rtol=0, atol=0)


@pytest.mark.parametrize("as_view", [False, True])
def test_reuse_never_overwrites_a_leaf(as_view):
    """Neither a leaf nor a view of one (which has a grad_fn of its own) is the loss's to overwrite."""
    student, _, target, pad_mask = case(seed=11)
    leaf = student.clone().requires_grad_(True)
    logits = leaf.view(student.shape) if as_view else leaf
    losses.student_losses(logits, target, pad_mask, 0.1, reuse_logits=True).nll.backward()
    torch.testing.assert_close(leaf.detach(), student, rtol=0, atol=0)
    assert leaf.grad.data_ptr() != leaf.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_fp32_math_and_gradient_dtype(dtype):
    student, teacher, target, pad_mask = case(seed=5, dtype=dtype)
    dist = losses.OnlineTeacher([teacher.to(dtype)])
    z = student.clone().requires_grad_(True)
    got = losses.student_losses(z, target, pad_mask, 0.1, dist, 2.0, "kl")
    want = student_terms64(student, torch.softmax(teacher.to(dtype).double() / 2.0, -1), target, pad_mask, 0.1, 2.0, "kl")
    for g, w in zip(got[:3], want):
        assert g.dtype == torch.float32
        assert float(g) == pytest.approx(float(w), rel=1e-5)
    sum(got[:3]).backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()


def test_without_teacher_kd_is_none_and_unknown_kind_refused():
    student, _, target, pad_mask = case(seed=6)
    terms = losses.student_losses(student, target, pad_mask, 0.1)
    assert terms.kd is None and terms.teacher_nll is None
    with pytest.raises(ValueError, match="unknown distillation loss kind 'mse'"):
        losses.student_losses(student, target, pad_mask, 0.1, kind="mse")


# ---------------------------------------------------------------------------------------------
# the online teacher: ensembles, its target NLL, zero mass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_online_teacher_single_and_ensemble(temperature, kind):
    """q_T is the average of the members' softmax(z_k / T) (not the softmax of averaged logits);
    the teacher NLL is -log of the averaged T = 1 probability of the target, pad rows excluded."""
    student, _, target, pad_mask = case(n=6, vocab=11, seed=7)
    g = torch.Generator().manual_seed(8)
    z1, z2 = (torch.randn(6, 11, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    keep = (~pad_mask).double()
    for logits in ([z1], [z1, z2]):
        terms = losses.student_losses(
            student, target, pad_mask, 0.0, losses.OnlineTeacher([z.float() for z in logits]), temperature, kind
        )
        q = sum(torch.softmax(z / temperature, -1) for z in logits) / len(logits)
        at_one = sum(torch.softmax(z, -1) for z in logits) / len(logits)
        want_kd = student_terms64(student, q, target, pad_mask, 0.0, temperature, kind)[2]
        want_teacher_nll = -(at_one.gather(-1, target[:, None]).squeeze(-1).log() * keep).sum()
        assert float(terms.kd) == pytest.approx(float(want_kd), rel=1e-5)
        assert float(terms.teacher_nll) == pytest.approx(float(want_teacher_nll), rel=1e-5)
    logit_average = [(z1 + z2) / 2]
    averaged = losses.student_losses(
        student, target, pad_mask, 0.0, losses.OnlineTeacher([z.float() for z in logit_average]), temperature, kind
    )
    assert abs(float(averaged.kd) - float(terms.kd)) > 1e-2


def test_online_teacher_zero_mass_and_underflow():
    """A token with teacher logit -inf has q = 0 and adds nothing (no NaN, in loss or gradient); a
    target whose probability underflows float32 still gets its exact teacher NLL (at T = 1 whatever
    the training temperature)."""
    z1 = torch.tensor([[0.0, -1000.0, float("-inf")]])
    z2 = torch.tensor([[0.0, -2000.0, float("-inf")]])
    student = torch.tensor([[0.5, -0.5, 1.0]], requires_grad=True)
    target, pad_mask = torch.tensor([1]), torch.tensor([False])
    terms = losses.student_losses(student, target, pad_mask, 0.0, losses.OnlineTeacher([z1, z2]), 1.0, "kl")
    log_p = torch.log_softmax(student.detach().double(), -1)
    assert float(terms.kd) == pytest.approx(-float(log_p[0, 0]), rel=1e-6)  # q = (1, 0, 0): KL = -log p(0)
    assert float(terms.teacher_nll) == pytest.approx(1000.0 + math.log(2.0), abs=1e-3)
    at_two = losses.student_losses(student, target, pad_mask, 0.0, losses.OnlineTeacher([z1, z2]), 2.0, "kl")
    assert float(at_two.teacher_nll) == pytest.approx(1000.0 + math.log(2.0), abs=1e-3)
    terms.kd.backward()
    torch.testing.assert_close(student.grad[0].double(), log_p[0].exp() - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
