"""Pure tensor math for knowledge distillation losses.

Nothing here imports fairseq: every function takes plain tensors and returns a summed (not
averaged) loss, so that criterions can normalise it the way fairseq does (sum over tokens,
divided by ``sample_size``). All probabilities are computed in float32, whatever the precision
of the incoming logits.

Notation: ``z`` are logits over a vocabulary of size V, ``T`` is the distillation temperature,
``p_T = softmax(z_student / T)`` the student's and ``q_T`` the teacher's softened distribution.
"""

import math
from dataclasses import dataclass
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


@dataclass
class TeacherDistribution:
    """The teacher's softened distribution q_T at N positions, as :func:`student_losses` takes it.

    Either stored: ``probs`` (N, V) over the whole vocabulary, or (N, k) with ``ids`` for a sparse
    teacher whose other tokens have q_T = 0; or, for an online teacher, recomputed chunk by chunk
    from its K members' ``logits`` (N, V) and ``log_normalizers`` (K, N), ``log sum_v exp(z_v / T)``::

        q_T = (1/K) * sum_k exp(z_k / T - log_normalizer_k)

    so that no (N, V) float32 distribution is allocated next to the logits. Each row sums to 1.
    ``neg_entropy`` (N,) is ``sum_v q_T(v) log q_T(v)`` (with 0 log 0 = 0), what turns the
    cross-entropy H(q_T, p_T) into KL(q_T || p_T).
    """

    neg_entropy: torch.Tensor
    probs: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    logits: Sequence[torch.Tensor] = ()
    log_normalizers: Optional[torch.Tensor] = None
    temperature: float = 1.0

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, ids: Optional[torch.Tensor] = None) -> "TeacherDistribution":
        """From log q_T, (N, V), or (N, k) with ``ids``; -inf marks a token with no teacher mass."""
        log_probs = log_probs.to(_compute_dtype(log_probs))
        probs = log_probs.exp()
        return cls(torch.where(probs > 0, probs * log_probs, 0.0).sum(-1), probs, ids)

    def chunk_probs(self, rows: slice, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q_T at the positions ``rows`` as ``dtype``, a tensor the caller may modify: ``out`` (a
        scratch tensor of the chunk's shape) when q_T is recomputed from logits, else a new one."""
        if self.probs is not None:
            return self.probs[rows].to(dtype, copy=True)
        total = None
        for z, log_normalizer in zip(self.logits, self.log_normalizers):
            z, q = z[rows], out if total is None and out is not None else None
            q = torch.empty(z.shape, dtype=dtype, device=z.device) if q is None else q
            if z.dtype == dtype and self.temperature == 1.0:
                torch.sub(z, log_normalizer[rows].unsqueeze(-1), out=q)
            else:
                q.copy_(z).div_(self.temperature).sub_(log_normalizer[rows].unsqueeze(-1))
            q.exp_()
            total = q if total is None else total.add_(q)
        if len(self.logits) > 1:
            total /= len(self.logits)
        return total


def teacher_distribution(
    teacher_logits: Sequence[torch.Tensor], temperature: float, target: Optional[torch.Tensor] = None
) -> Tuple[TeacherDistribution, Optional[torch.Tensor]]:
    """q_T of K online teachers, averaged in probability space, and their log-probability of ``target``.

    ``q_T = (1/K) * sum_k softmax(z_k / T)`` for K teachers (one teacher: ``softmax(z / T)``).
    The result keeps the logits and each member's log-normaliser (see :class:`TeacherDistribution`);
    this pass, over chunks of positions in float32, computes those, the negative entropy and the
    target log-probability (accumulated in log space with logaddexp, so that a target probability
    below float32's range still has its exact log).

    Args:
        teacher_logits: K tensors of shape (N, V); any float dtype. They are kept, not copied.
        temperature: T > 0.
        target: (N,) token ids, or None.

    Returns:
        (q_T, ``log q(target)`` at T = 1 as (N,) float32, or None without ``target``).
    """
    n, vocab = teacher_logits[0].shape
    device = teacher_logits[0].device
    log_normalizers = torch.empty(len(teacher_logits), n, dtype=torch.float32, device=device)
    neg_entropy = torch.empty(n, dtype=torch.float32, device=device)
    target_lprobs = None if target is None else torch.empty(n, dtype=torch.float32, device=device)
    log_q_buffer, work_buffer, *member_buffer = _scratch(2 + (len(teacher_logits) > 1), n, vocab, torch.float32, device)
    for rows in _chunks(n, vocab):
        size = len(range(n)[rows])
        log_q, work = log_q_buffer[:size], work_buffer[:size]
        for member, z in enumerate(teacher_logits):
            x = _softened(z[rows], temperature, work)
            log_p = torch.log_softmax(x, dim=-1, out=log_q if member == 0 else member_buffer[0][:size])
            # log sum_v exp(x_v) = x_v - log p(v), read off at the most probable v (exact there)
            top, top_ids = log_p.max(dim=-1, keepdim=True)
            log_normalizers[member, rows] = (x.gather(-1, top_ids) - top).squeeze(-1)
            if member > 0:
                torch.logaddexp(log_q, log_p, out=log_q)
        if len(teacher_logits) > 1:
            log_q -= math.log(len(teacher_logits))
        if target is not None:
            at_one = log_q if temperature == 1.0 else teacher_log_probs([z[rows] for z in teacher_logits], 1.0)
            target_lprobs[rows] = at_one.gather(-1, target[rows].unsqueeze(-1)).squeeze(-1)
            del at_one
        q = torch.exp(log_q, out=work)
        log_q.clamp_(min=torch.finfo(log_q.dtype).min)  # q = 0 where log q = -inf: 0 * log 0 must be 0, not NaN
        neg_entropy[rows] = q.mul_(log_q).sum(-1)
    teacher = TeacherDistribution(
        neg_entropy, logits=list(teacher_logits), log_normalizers=log_normalizers, temperature=temperature
    )
    return teacher, target_lprobs


def teacher_log_probs(teacher_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Log of the teacher distribution q_T, averaged over an ensemble in probability space.

    ``log q_T = log( (1/K) * sum_k softmax(z_k / T) )`` for K teachers, accumulated with logaddexp
    (no probability underflows, at most two full distributions alive at once). With one teacher
    it is ``log_softmax(z / T)``.

    Args:
        teacher_logits: K tensors of shape (..., V); any float dtype, computed in float32.
        temperature: T > 0.

    Returns:
        a new float32 tensor of shape (..., V).
    """
    total = None
    for z in teacher_logits:
        z = z.float()
        log_probs = F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
        total = log_probs if total is None else torch.logaddexp(total, log_probs, out=total)
    if len(teacher_logits) > 1:
        total -= math.log(len(teacher_logits))
    return total


def topk_teacher_distribution(topk_lprobs: torch.Tensor, ids: torch.Tensor, temperature: float) -> TeacherDistribution:
    """Teacher distribution from its k most probable tokens only, renormalised over them::

        log q_T(v_i) = l_i / T - log sum_{j=1..k} exp(l_j / T)      for the stored top-k v_i
        q_T(v) = 0                                                   for every other token

    where l_i are the stored log-probabilities at T = 1. Since ``l_i = z_i - c`` for a constant c
    per position, this is exactly the full softmax at temperature T restricted to the top k and
    renormalised.

    Args:
        topk_lprobs: (N, k) stored log-probabilities, any float dtype.
        ids: (N, k) their vocabulary ids.
    """
    return TeacherDistribution.from_log_probs(F.log_softmax(topk_lprobs.float() / temperature, dim=-1), ids)


# Positions per chunk are chosen so that one chunk of one distribution holds about this many values.
_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, else their own dtype (float64 stays float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _chunks(n: int, vocab: int):
    step = _chunk_rows(vocab)
    return [slice(start, start + step) for start in range(0, n, step)]


def _scratch(count: int, n: int, vocab: int, dtype: torch.dtype, device: torch.device) -> list:
    """``count`` scratch tensors of one chunk's shape, allocated once per pass and reused by every
    chunk (the last, shorter chunk takes a view of the first rows). Fresh (N, V)-sized
    allocations per chunk would be paid for in page faults on CPU at every step."""
    return [torch.empty(min(n, _chunk_rows(vocab)), vocab, dtype=dtype, device=device) for _ in range(count)]


def _softened(z: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``z / T`` in ``out``'s dtype: ``z`` itself when nothing changes, else written into ``out``."""
    if z.dtype == out.dtype and temperature == 1.0:
        return z
    if z.dtype == out.dtype:
        return torch.div(z, temperature, out=out)
    return out.copy_(z) if temperature == 1.0 else out.copy_(z).div_(temperature)


class _StudentLosses(torch.autograd.Function):
    """Label-smoothed NLL, NLL and word-level KD of the student from its logits, in one pass over
    the vocabulary per chunk of positions (see :func:`student_losses` for the formulas).

    Only the logits and per-position log-normalisers are kept for the backward pass, which
    recomputes the student's softmax chunk by chunk. With p = softmax(z), p_T = softmax(z / T),
    e_y the one-hot gold token and eps_i = eps / (V - 1), the gradients at a kept position are::

        d smoothed / dz = (1 - eps - eps_i) * (p - e_y) + eps_i * (V * p - 1)
        d nll / dz      = p - e_y
        d kd / dz       = (p_T - q_T) / T          (the same for KL and CE: q_T sums to 1)

    and 0 at padding.
    """

    @staticmethod
    def forward(ctx, logits, target, keep, epsilon, teacher, temperature, kind):
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        eps_i = epsilon / (vocab - 1)
        with_kd = teacher is not None
        lse = logits.new_empty(n, dtype=dtype)
        lse_t = logits.new_empty(n, dtype=dtype) if with_kd and temperature != 1.0 else lse
        nll = logits.new_zeros(n, dtype=dtype)
        smooth = logits.new_zeros(n, dtype=dtype)
        cross = logits.new_zeros(n, dtype=dtype)
        dense_kd = with_kd and teacher.ids is None
        converted = logits.dtype != dtype
        log_p_buffer, work_buffer, *convert_buffer = _scratch(2 + converted, n, vocab, dtype, logits.device)
        for rows in _chunks(n, vocab):
            size = len(range(n)[rows])
            x = _softened(logits[rows], 1.0, convert_buffer[0][:size]) if converted else logits[rows]
            gold = target[rows].unsqueeze(-1)
            log_p = torch.log_softmax(x, dim=-1, out=log_p_buffer[:size])
            nll[rows] = -log_p.gather(-1, gold).squeeze(-1)
            # log sum_v exp(z_v) = z_y - log p(y), read off at the gold token, which is rarely far
            # below the top logit (a small |log p| keeps this exact)
            lse[rows] = x.gather(-1, gold).squeeze(-1) + nll[rows]
            if epsilon > 0:
                smooth[rows] = -log_p.sum(-1)
            if with_kd:
                if temperature != 1.0:
                    x_t = torch.div(x, temperature, out=work_buffer[:size])
                    torch.log_softmax(x_t, dim=-1, out=log_p)
                    lse_t[rows] = (x_t.gather(-1, gold) - log_p.gather(-1, gold)).squeeze(-1)
                if dense_kd:
                    cross[rows] = teacher.chunk_probs(rows, dtype, out=work_buffer[:size]).mul_(log_p).sum(-1)
                else:
                    cross[rows] = (teacher.chunk_probs(rows, dtype) * log_p.gather(-1, teacher.ids[rows])).sum(-1)
        drop = ~keep
        nll_sum = nll.masked_fill_(drop, 0.0).sum()
        smoothed_sum = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth.masked_fill_(drop, 0.0).sum()
        kd_sum = logits.new_zeros((), dtype=dtype)
        if with_kd:
            kd_rows = -cross if kind == "ce" else teacher.neg_entropy.to(dtype) - cross
            kd_sum = kd_rows.masked_fill_(drop, 0.0).sum()
        ctx.epsilon, ctx.temperature, ctx.teacher = epsilon, temperature, teacher
        ctx.save_for_backward(logits, target, keep, lse, lse_t)
        return smoothed_sum, nll_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_smoothed, grad_nll, grad_kd):
        logits, target, keep, lse, lse_t = ctx.saved_tensors
        epsilon, temperature, teacher = ctx.epsilon, ctx.temperature, ctx.teacher
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        eps_i = epsilon / (vocab - 1)
        # gradient = coef_p * p - coef_gold * e_y - coef_const [+ kd_scale * (p_T - q_T)]
        coef_gold = (1.0 - epsilon - eps_i) * grad_smoothed + grad_nll
        coef_p = coef_gold + eps_i * vocab * grad_smoothed
        coef_const = eps_i * grad_smoothed
        with_kd = teacher is not None
        kd_scale = grad_kd / temperature
        if with_kd and temperature == 1.0:
            coef_p = coef_p + kd_scale
        grad = torch.empty_like(logits)
        converted = logits.dtype != dtype
        work_buffer, *converted_buffers = _scratch(1 + 2 * converted, n, vocab, dtype, logits.device)
        for rows in _chunks(n, vocab):
            size = len(range(n)[rows])
            x = _softened(logits[rows], 1.0, converted_buffers[0][:size]) if converted else logits[rows]
            g = converted_buffers[1][:size] if converted else grad[rows]
            torch.sub(x, lse[rows].unsqueeze(-1), out=g).exp_().mul_(coef_p)
            if with_kd:
                work = work_buffer[:size]
                if temperature != 1.0:
                    g.add_(torch.div(x, temperature, out=work).sub_(lse_t[rows].unsqueeze(-1)).exp_().mul_(kd_scale))
                if teacher.ids is None:
                    g.sub_(teacher.chunk_probs(rows, dtype, out=work).mul_(kd_scale))
                else:
                    g.scatter_add_(-1, teacher.ids[rows], teacher.chunk_probs(rows, dtype).mul_(-kd_scale))
            if epsilon > 0:
                g.sub_(coef_const)
            g.scatter_add_(-1, target[rows].unsqueeze(-1), (-coef_gold).expand(size, 1).to(dtype))
            g.index_fill_(0, torch.nonzero(~keep[rows]).squeeze(-1), 0.0)
            if converted:
                grad[rows] = g
        return grad, None, None, None, None, None, None


def student_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    pad_mask: torch.Tensor,
    epsilon: float,
    teacher: Optional[TeacherDistribution] = None,
    temperature: float = 1.0,
    kind: str = "kl",
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The student's label-smoothed NLL, NLL and word-level KD term, each summed over non-pad positions.

    For one position with gold token y over V classes, p = softmax(z) (Szegedy et al. 2016 for the
    smoothing, as in fairseq's ``label_smoothed_cross_entropy``)::

        nll      = -log p(y)
        smoothed = (1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * sum_v -log p(v)

    and, against a teacher distribution q_T, with p_T = softmax(z / T) (Hinton et al. 2015; Kim &
    Rush 2016, word-level KD; not yet multiplied by T^2)::

        kl: KL(q_T || p_T) = sum_v q_T(v) * (log q_T(v) - log p_T(v))
        ce: H(q_T, p_T)    = -sum_v q_T(v) * log p_T(v)

    Both KD kinds have the same gradient in the student; KL is zero when the student matches the
    teacher, CE adds the (constant) teacher entropy; tokens where q_T is zero add nothing. All of it
    is computed in float32 (float64 stays float64) from one log-softmax of the logits per chunk of
    positions, and the gradient from one softmax per chunk (:class:`_StudentLosses`): no (N, V)
    log-probability tensor is kept for the backward pass.

    Args:
        logits: (N, V) raw student logits, any float dtype.
        target: (N,) gold token ids.
        pad_mask: (N,) bool, True at padding positions, which count nowhere.
        epsilon: label smoothing in [0, 1).
        teacher: q_T at the same N positions (:func:`teacher_distribution`,
            :func:`topk_teacher_distribution`), or None for no KD term.
        temperature: T > 0, applied to the student logits in the KD term.
        kind: ``"kl"`` or ``"ce"``.

    Returns:
        (smoothed, nll, kd), kd None without a teacher.
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss kind {kind!r}; use 'kl' or 'ce'")
    smoothed, nll, kd = _StudentLosses.apply(logits, target, ~pad_mask, epsilon, teacher, temperature, kind)
    return smoothed, nll, (kd if teacher is not None else None)


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
