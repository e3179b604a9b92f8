"""Pure tensor math for knowledge distillation losses.

Nothing here imports fairseq: every function takes plain tensors and returns a summed (not
averaged) loss, so that criterions can normalise it the way fairseq does (sum over tokens,
divided by ``sample_size``). All probabilities are computed in float32, whatever the precision
of the incoming logits.

Notation: ``z`` are logits over a vocabulary of size V, ``T`` is the distillation temperature,
``p_T = softmax(z_student / T)`` the student's and ``q_T`` the teacher's softened distribution.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def check_alpha(name: str, value: float) -> None:
    """Refuse an interpolation weight outside [0, 1], naming the flag to change."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"--{name.replace('_', '-')} must lie in [0, 1] (it weights the distillation term "
            f"against the gold NLL term), got {value}"
        )


def check_temperature(value: float) -> None:
    """Refuse a non-positive temperature, which would make the softmax undefined or inverted."""
    if not value > 0.0:
        raise ValueError(
            f"--temperature must be > 0 (T=1 is the plain softmax; Hinton et al. 2015 soften "
            f"with T > 1, NVIDIA's NMT study found T in [0.5, 1] best), got {value}"
        )


def label_smoothed_nll_loss(
    lprobs: torch.Tensor, target: torch.Tensor, epsilon: float, pad_mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed negative log-likelihood, summed over non-pad positions.

    For one position with gold token y over V classes (Szegedy et al. 2016, as in fairseq)::

        nll    = -log p(y)
        smooth = -sum_v log p(v)
        loss   = (1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * smooth

    Args:
        lprobs: (N, V) log-probabilities.
        target: (N,) gold token ids.
        epsilon: label smoothing in [0, 1).
        pad_mask: (N,) bool, True where the position is padding and must not count.

    Returns:
        (loss, nll_loss): both summed over non-pad positions.
    """
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    nll = nll.masked_fill(pad_mask, 0.0)
    nll_loss = nll.sum()
    if epsilon == 0.0:
        return nll_loss, nll_loss
    smooth = -lprobs.sum(dim=-1).masked_fill(pad_mask, 0.0)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth.sum()
    return loss, nll_loss


def teacher_log_probs(teacher_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Log of the teacher distribution q_T, averaged over an ensemble in probability space.

    ``log q_T = log( (1/K) * sum_k softmax(z_k / T) )`` for K teachers, accumulated with logaddexp
    (no probability underflows, at most two full distributions alive at once). With one teacher
    it is ``log_softmax(z / T)``.

    Args:
        teacher_logits: K tensors of shape (..., V); any float dtype, computed in float32.
        temperature: T > 0.

    Returns:
        float32 tensor of shape (..., V).
    """
    total = None
    for z in teacher_logits:
        log_probs = F.log_softmax(z.float() / temperature, dim=-1)
        total = log_probs if total is None else torch.logaddexp(total, log_probs)
    if len(teacher_logits) > 1:
        total -= math.log(len(teacher_logits))
    return total


def teacher_target_log_probs(teacher_logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``log q(y_t)`` at T = 1 for the given target ids, ensemble-averaged in probability space.

    Args:
        teacher_logits: K tensors of shape (N, V).
        target: (N,) token ids.

    Returns:
        (N,) float32.
    """
    per_teacher = [
        z.gather(-1, target.unsqueeze(-1)).squeeze(-1).float() - torch.logsumexp(z.float(), dim=-1)
        for z in teacher_logits
    ]
    return torch.logsumexp(torch.stack(per_teacher), dim=0) - math.log(len(per_teacher))


def topk_teacher_log_probs(topk_lprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher distribution from its k most probable tokens only, renormalised over them::

        log q_T(v_i) = l_i / T - log sum_{j=1..k} exp(l_j / T)      for the stored top-k v_i
        q_T(v) = 0                                                   for every other token

    where l_i are the stored log-probabilities at T = 1. Since ``l_i = z_i - c`` for a constant c
    per position, this is exactly the full softmax at temperature T restricted to the top k and
    renormalised.
    """
    return F.log_softmax(topk_lprobs.float() / temperature, dim=-1)


# Positions per chunk are chosen so that one chunk of one distribution holds about this many values.
_CHUNK_ELEMENTS = 1 << 22


class _ChunkedDistillation(torch.autograd.Function):
    """sum over kept positions of KL(q_T || p_T) or H(q_T, p_T), computed chunk by chunk.

    Forward and backward hold at most one chunk of the student's softened distribution at a time;
    for autograd only the student logits and the teacher distribution are kept. The gradient with
    respect to the student logits is the same for KL and CE (q sums to 1 at every position):
    ``d/dz = (p_T - q_T) / T`` at kept positions, 0 at padding.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_lprobs, teacher_ids, keep, temperature, kind):
        ctx.temperature = temperature
        ctx.save_for_backward(student_logits, teacher_lprobs, teacher_ids, keep)
        dtype = _compute_dtype(student_logits)
        total = student_logits.new_zeros((), dtype=dtype)
        for rows in _chunks(student_logits):
            log_p = F.log_softmax(student_logits[rows].to(dtype) / temperature, dim=-1)
            log_q = teacher_lprobs[rows]
            if teacher_ids is not None:
                log_p = log_p.gather(-1, teacher_ids[rows])
            q = log_q.exp()
            # where q = 0 the term is 0 (0 * log 0 = 0), even against a student log-prob of -inf
            log_ratio = log_q - log_p if kind == "kl" else -log_p
            per_position = (q * torch.where(q > 0, log_ratio, 0.0)).sum(-1)
            total += per_position[keep[rows]].sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student_logits, teacher_lprobs, teacher_ids, keep = ctx.saved_tensors
        temperature = ctx.temperature
        dtype = _compute_dtype(student_logits)
        grad = torch.empty_like(student_logits)
        for rows in _chunks(student_logits):
            g = F.softmax(student_logits[rows].to(dtype) / temperature, dim=-1)
            q = teacher_lprobs[rows].exp()
            if teacher_ids is None:
                g -= q
            else:
                g.scatter_add_(-1, teacher_ids[rows], -q)
            g *= grad_total / temperature
            g.masked_fill_(~keep[rows].unsqueeze(-1), 0.0)
            grad[rows] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits, else their own dtype (float64 stays float64)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _chunks(logits: torch.Tensor):
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.size(-1)))
    return [slice(start, start + step) for start in range(0, logits.size(0), step)]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_lprobs: torch.Tensor,
    temperature: float,
    pad_mask: torch.Tensor,
    kind: str = "kl",
    teacher_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Word-level distillation term, summed over non-pad positions (not yet multiplied by T^2).

    Hinton et al. 2015; Kim & Rush 2016 (word-level KD)::

        kl: KL(q_T || p_T) = sum_v q_T(v) * (log q_T(v) - log p_T(v))
        ce: H(q_T, p_T)    = -sum_v q_T(v) * log p_T(v)

    Both have the same gradient in the student; KL is zero when the student matches the teacher,
    CE adds the (constant) teacher entropy. Vocabulary entries where q_T is exactly zero add
    nothing (0 * log 0 = 0). Computed in chunks of positions in float32 (see
    :class:`_ChunkedDistillation`), so memory holds the teacher's distribution and one chunk of the
    student's at a time.

    Args:
        student_logits: (N, V) raw student logits, any float dtype.
        teacher_lprobs: (N, V) log q_T, as returned by :func:`teacher_log_probs`; or, with
            ``teacher_ids``, (N, k) log q_T of a sparse teacher (:func:`topk_teacher_log_probs`).
        temperature: T > 0, applied to the student logits.
        pad_mask: (N,) bool, True at padding positions.
        kind: ``"kl"`` or ``"ce"``.
        teacher_ids: (N, k) vocabulary ids of a sparse (top-k) teacher; every other token has
            q_T = 0.
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss kind {kind!r}; use 'kl' or 'ce'")
    return _ChunkedDistillation.apply(
        student_logits, teacher_lprobs.to(_compute_dtype(student_logits)).detach(), teacher_ids, ~pad_mask,
        temperature, kind,
    )


def cosine_distance_loss(student_states: torch.Tensor, teacher_states: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Hidden-state alignment of DistilBERT (Sanh et al. 2019), summed over non-pad positions::

        sum_t (1 - cos(h_s,t, h_t,t)),   cos(a, b) = a.b / (|a| |b|)

    Args:
        student_states: (N, C) student hidden states (already projected to the teacher's width
            if the widths differ).
        teacher_states: (N, C) teacher hidden states, no gradient needed.
        pad_mask: (N,) bool, True at padding positions.
    """
    cos = F.cosine_similarity(student_states.float(), teacher_states.float().detach(), dim=-1)
    return (1.0 - cos).masked_fill(pad_mask, 0.0).sum()
