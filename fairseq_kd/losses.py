"""Pure tensor math for knowledge distillation losses.

Nothing here imports fairseq: every function takes plain tensors and returns a summed (not
averaged) loss, so that criterions can normalise it the way fairseq does (sum over tokens,
divided by ``sample_size``). All probabilities are computed in float32, whatever the precision
of the incoming logits.

Notation: ``z`` are logits over a vocabulary of size V, ``T`` is the distillation temperature,
``p_T = softmax(z_student / T)`` the student's and ``q_T`` the teacher's softened distribution.
"""

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


def check_finite(values: dict) -> None:
    """Refuse a NaN or infinite value of any flag in ``values`` ({"--flag": value}), naming the
    flag: such a value would end in NaN gradients, or silently disable its term (NaN > 0 is False)."""
    for flag, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")


def check_weights(criterion: str, weights: dict) -> None:
    """Refuse loss weights ({"--flag": value}) that are not finite, negative, or all 0."""
    check_finite(weights)
    negative = [f"{flag} {value}" for flag, value in weights.items() if value < 0]
    if negative or not any(weights.values()):
        raise ValueError(f"{criterion} weights must be >= 0 and not all 0, got {negative or weights}")


def check_alpha(name: str, value: float) -> None:
    """Refuse an interpolation weight outside [0, 1] (NaN included), naming the flag to change."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"--{name.replace('_', '-')} must lie in [0, 1] (it weights the distillation term "
            f"against the gold NLL term), got {value}"
        )


def check_temperature(value: float) -> None:
    """Refuse a temperature that is not a positive finite number: the softmax would be undefined,
    inverted, or uniform (T = inf, whose KD term is then 0 * inf = NaN)."""
    if not value > 0.0:
        raise ValueError(
            f"--temperature must be > 0 (T=1 is the plain softmax; Hinton et al. 2015 soften "
            f"with T > 1, NVIDIA's NeMo NMT-distillation guide found T in [0.5, 1] best), got {value}"
        )
    check_finite({"--temperature": value})


@dataclass
class TeacherDistribution:
    """The teacher's softened distribution q_T at N positions, as :func:`student_losses` takes it.

    Either stored probabilities: ``probs`` (N, V) over the whole vocabulary, or (N, k) with ``ids``
    for a sparse teacher whose other tokens have q_T = 0, each row summing to 1, and
    ``neg_entropy`` (N,), ``sum_v q_T(v) log q_T(v)``; or an online teacher's K members' raw
    ``logits`` (N, V), from which :func:`student_losses` computes q_T chunk by chunk::

        q_T = (1/K) * sum_k softmax(z_k / T)

    (probabilities averaged, not logits), so that no (N, V) float32 distribution is allocated next
    to the logits.
    """

    probs: Optional[torch.Tensor] = None
    neg_entropy: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    logits: Sequence[torch.Tensor] = ()

    @classmethod
    def from_logits(cls, logits: Sequence[torch.Tensor]) -> "TeacherDistribution":
        """An online teacher (one or an ensemble) from each member's (N, V) logits, any float dtype."""
        return cls(logits=list(logits))

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, ids: Optional[torch.Tensor] = None) -> "TeacherDistribution":
        """From log q_T, (N, V), or (N, k) with ``ids``; -inf marks a token with no teacher mass."""
        log_probs = log_probs.to(_compute_dtype(log_probs))
        probs = log_probs.exp()
        return cls(probs, torch.where(probs > 0, probs * log_probs, 0.0).sum(-1), ids)


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

    where l_i are the stored log-probabilities at T = 1. For one teacher ``l_i = z_i - c`` with a
    constant c per position, so this is exactly its full softmax at temperature T restricted to the
    top k and renormalised. For an ensemble the stored l_i are log-probabilities averaged in
    probability space, and at T != 1 this is the softened average, not the average of the softened
    members that the online teacher computes (docs/teacher-cache.md).

    Args:
        topk_lprobs: (N, k) stored log-probabilities, any float dtype.
        ids: (N, k) their vocabulary ids.
    """
    return TeacherDistribution.from_log_probs(F.log_softmax(topk_lprobs.float() / temperature, dim=-1), ids)


# Positions per chunk are chosen so that one chunk of one distribution holds about this many values.
# On CPU the few chunk-sized buffers kept per thread are 1 MiB each in float32 (docs/performance.md:
# steps as fast as with 16 MiB chunks, peak memory 20-25 MB lower); elsewhere (CUDA) 16 MiB chunks
# keep kernel launches few.
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, else their own dtype (float64 stays float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS) // max(1, vocab))


def _chunks(n: int, vocab: int, device: torch.device):
    step = _chunk_rows(vocab, device)
    return [slice(start, start + step) for start in range(0, n, step)]


_SCRATCH = threading.local()  # per thread: (device, dtype, name) -> a chunk-sized tensor


class _Scratch:
    """Scratch tensors of one chunk's shape, reused by every chunk (the last, shorter chunk takes a
    view of the first rows) and kept from step to step, per thread, device and dtype, as long as the
    chunk shape stays (a few chunk-sized tensors, 1 MiB each in float32 on CPU). Allocating
    (N, V)-sized temporaries chunk after chunk, step after step, is paid for in page faults and in
    a fragmented heap on CPU."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (_chunk_rows(vocab, device), vocab), dtype, device
        if not hasattr(_SCRATCH, "buffers"):
            _SCRATCH.buffers = {}
        self.size = 0

    def chunk(self, rows: slice, n: int) -> "_Scratch":
        """Set the current chunk; :meth:`__getitem__` then gives views of its number of rows."""
        self.size = len(range(n)[rows])
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        key = (self.device, self.dtype, name)
        buffer = _SCRATCH.buffers.get(key)
        if buffer is None or buffer.shape != self.shape:
            buffer = _SCRATCH.buffers[key] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buffer[: self.size]


def _as_compute(z: torch.Tensor, dtype: torch.dtype, temperature: float, buf: _Scratch, name: str) -> torch.Tensor:
    """``z / T`` as ``dtype``: ``z`` itself when nothing changes (not to be modified), else in ``buf[name]``."""
    if z.dtype == dtype and temperature == 1.0:
        return z
    if z.dtype == dtype:
        return torch.div(z, temperature, out=buf[name])
    out = buf[name].copy_(z)
    return out if temperature == 1.0 else out.div_(temperature)


def _online_teacher_probs(logits, log_normalizers, rows, temperature, dtype, scratch) -> torch.Tensor:
    """q_T at ``rows`` from the members' logits and log-normalisers (K, N), in ``scratch["q"]``."""
    total = scratch["q"]
    for member, (z, log_normalizer) in enumerate(zip(logits, log_normalizers)):
        name = "q" if member == 0 else "member"
        z = z[rows]
        if z.dtype == dtype and temperature == 1.0:
            q = torch.sub(z, log_normalizer[rows].unsqueeze(-1), out=scratch[name])
        else:
            q = _as_compute(z, dtype, temperature, scratch, name).sub_(log_normalizer[rows].unsqueeze(-1))
        q.exp_()
        if member > 0:
            total.add_(q)
    if len(logits) > 1:
        total /= len(logits)
    return total


class _StudentLosses(torch.autograd.Function):
    """Label-smoothed NLL, NLL and word-level KD of the student from its logits, and the teacher's
    NLL, in one pass over the vocabulary per chunk of positions (formulas: :func:`student_losses`).

    For an online teacher the same chunk loop computes log q_T (one log-softmax per member), its
    entropy and the teacher's target log-probability. Only the logits and per-position
    log-normalisers are kept for the backward pass, which recomputes p and q_T chunk by chunk.
    With p = softmax(z), p_T = softmax(z / T), e_y the one-hot gold token and eps_i = eps / (V - 1),
    the gradients at a kept position are::

        d smoothed / dz = (1 - eps - eps_i) * (p - e_y) + eps_i * (V * p - 1)
        d nll / dz      = p - e_y
        d kd / dz       = (p_T - q_T) / T          (the same for KL and CE: q_T sums to 1)

    and 0 at padding.
    """

    @staticmethod
    def forward(ctx, logits, target, keep, epsilon, teacher, temperature, kind, reuse_logits):
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        eps_i = epsilon / (vocab - 1)
        with_kd, online = teacher is not None, teacher is not None and len(teacher.logits) > 0
        def rows_of():
            return logits.new_zeros(n, dtype=dtype)

        lse, nll, smooth, cross = rows_of(), rows_of(), rows_of(), rows_of()
        lse_t = rows_of() if with_kd and temperature != 1.0 else lse
        neg_entropy = rows_of() if online else (teacher.neg_entropy.to(dtype) if with_kd else None)
        teacher_target = rows_of() if online else None
        teacher_lse = logits.new_zeros(len(teacher.logits), n, dtype=dtype) if online else None
        scratch = _Scratch(vocab, dtype, logits.device)
        for rows in _chunks(n, vocab, logits.device):
            buf = scratch.chunk(rows, n)
            gold = target[rows].unsqueeze(-1)
            x = _as_compute(logits[rows], dtype, 1.0, buf, "x")
            log_p = torch.log_softmax(x, dim=-1, out=buf["log_p"])
            nll[rows] = -log_p.gather(-1, gold).squeeze(-1)
            # log sum_v exp(z_v) = z_y - log p(y), read off at the gold token, which is rarely far
            # below the top logit (a small |log p(y)| keeps this exact)
            lse[rows] = x.gather(-1, gold).squeeze(-1) + nll[rows]
            if epsilon > 0:
                smooth[rows] = -log_p.sum(-1)
            if not with_kd:
                continue
            if online:
                q = _online_teacher_log_probs(teacher.logits, rows, gold, temperature, teacher_lse, buf)
                if temperature == 1.0:
                    teacher_target[rows] = q.gather(-1, gold).squeeze(-1)
                else:
                    teacher_target[rows] = _teacher_gold_log_prob(teacher.logits, rows, gold, dtype, buf)
                # q log q, with 0 log 0 = 0 (a -inf teacher logit gives 0 * -inf = NaN: nansum)
                p_q = torch.exp(q, out=buf["q"])
                neg_entropy[rows] = q.mul_(p_q).nansum(-1)
                q = p_q
            else:
                q = teacher.probs[rows].to(dtype, copy=True)
            if temperature != 1.0:
                x_t = torch.div(x, temperature, out=buf["x_t"])
                torch.log_softmax(x_t, dim=-1, out=log_p)
                lse_t[rows] = (x_t.gather(-1, gold) - log_p.gather(-1, gold)).squeeze(-1)
            if teacher.ids is None:
                cross[rows] = q.mul_(log_p).sum(-1)
            else:
                cross[rows] = (q * log_p.gather(-1, teacher.ids[rows])).sum(-1)
        drop = ~keep
        nll_sum = nll.masked_fill_(drop, 0.0).sum()
        smoothed_sum = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth.masked_fill_(drop, 0.0).sum()
        kd_sum = teacher_nll_sum = logits.new_zeros((), dtype=dtype)
        if with_kd:
            kd_rows = -cross if kind == "ce" else neg_entropy - cross
            kd_sum = kd_rows.masked_fill_(drop, 0.0).sum()
        if online:
            teacher_nll_sum = -teacher_target.masked_fill_(drop, 0.0).sum()
        ctx.mark_non_differentiable(teacher_nll_sum)
        ctx.epsilon, ctx.temperature, ctx.with_kd = epsilon, temperature, with_kd
        # a leaf, or a view of one, is the caller's own tensor: never overwritten
        ctx.reuse_logits = reuse_logits and logits.grad_fn is not None and (
            logits._base is None or logits._base.grad_fn is not None
        )
        # saved through autograd, so that the teacher's tensors are freed as soon as the backward
        # pass is done, even while the caller still holds the loss
        teacher_tensors = () if not with_kd else (
            tuple(teacher.logits) if online else (teacher.probs, teacher.ids)
        )
        ctx.save_for_backward(logits, target, keep, lse, lse_t, teacher_lse, *teacher_tensors)
        return smoothed_sum, nll_sum, kd_sum, teacher_nll_sum

    @staticmethod
    def backward(ctx, grad_smoothed, grad_nll, grad_kd, _):
        logits, target, keep, lse, lse_t, teacher_lse, *teacher_tensors = ctx.saved_tensors
        epsilon, temperature, with_kd = ctx.epsilon, ctx.temperature, ctx.with_kd
        teacher = None
        if with_kd and teacher_lse is not None:
            teacher = TeacherDistribution(logits=teacher_tensors)
        elif with_kd:
            teacher = TeacherDistribution(probs=teacher_tensors[0], ids=teacher_tensors[1])
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        eps_i = epsilon / (vocab - 1)
        # gradient = coef_p * p - coef_gold * e_y - coef_const [+ kd_scale * (p_T - q_T)]
        coef_gold = (1.0 - epsilon - eps_i) * grad_smoothed + grad_nll
        coef_p = coef_gold + eps_i * vocab * grad_smoothed
        coef_const = eps_i * grad_smoothed
        kd_scale = grad_kd / temperature
        if with_kd and temperature == 1.0:
            coef_p = coef_p + kd_scale
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        converted = logits.dtype != dtype
        scratch = _Scratch(vocab, dtype, logits.device)
        for rows in _chunks(n, vocab, logits.device):
            buf = scratch.chunk(rows, n)
            x = _as_compute(logits[rows], dtype, 1.0, buf, "x")
            if with_kd and temperature != 1.0:  # p_T, read from x before g (which may be x) is written
                p_t = torch.div(x, temperature, out=buf["x_t"]).sub_(lse_t[rows].unsqueeze(-1)).exp_()
            g = buf["grad"] if converted else grad[rows]
            torch.sub(x, lse[rows].unsqueeze(-1), out=g).exp_().mul_(coef_p)
            if with_kd:
                if temperature != 1.0:
                    g.add_(p_t.mul_(kd_scale))
                if teacher.logits:
                    q = _online_teacher_probs(teacher.logits, teacher_lse, rows, temperature, dtype, buf)
                else:
                    q = teacher.probs[rows].to(dtype, copy=True)
                if teacher.ids is None:
                    g.sub_(q.mul_(kd_scale))
                else:
                    g.scatter_add_(-1, teacher.ids[rows], q.mul_(-kd_scale))
            if epsilon > 0:
                g.sub_(coef_const)
            g.scatter_add_(-1, target[rows].unsqueeze(-1), (-coef_gold).expand(buf.size, 1).to(dtype))
            g.masked_fill_(~keep[rows].unsqueeze(-1), 0.0)  # no host-device sync, unlike indexing
            if converted:
                grad[rows] = g
        return grad, None, None, None, None, None, None, None


def _online_teacher_log_probs(logits, rows, gold, temperature, log_normalizers, buf) -> torch.Tensor:
    """log q_T at ``rows`` of an online teacher, in ``buf["log_q"]``; each member's log-normaliser
    ``log sum_v exp(z_v / T)`` goes into ``log_normalizers[member, rows]``."""
    log_q = buf["log_q"]
    for member, z in enumerate(logits):
        x = _as_compute(z[rows], log_q.dtype, temperature, buf, "q")
        log_p = torch.log_softmax(x, dim=-1, out=log_q if member == 0 else buf["member"])
        log_normalizers[member, rows] = (x.gather(-1, gold) - log_p.gather(-1, gold)).squeeze(-1)
        if member > 0:
            torch.logaddexp(log_q, log_p, out=log_q)
    if len(logits) > 1:
        log_q -= math.log(len(logits))
    return log_q


def _teacher_gold_log_prob(logits, rows, gold, dtype, buf) -> torch.Tensor:
    """log q_1(y) of the gold token at ``rows`` at T = 1, for the logged teacher NLL when training at
    another temperature: ``log( (1/K) sum_k exp(z_k,y - logsumexp(z_k)) )``, one reduction per
    member instead of a full log-softmax."""
    per_member = []
    for z in logits:
        x = _as_compute(z[rows], dtype, 1.0, buf, "member")
        per_member.append(x.gather(-1, gold).squeeze(-1) - torch.logsumexp(x, dim=-1))
    return torch.logsumexp(torch.stack(per_member), dim=0) - math.log(len(logits))


class StudentLosses(NamedTuple):
    """What :func:`student_losses` returns, each summed over the non-pad positions."""

    smoothed: torch.Tensor
    nll: torch.Tensor
    kd: Optional[torch.Tensor]
    teacher_nll: Optional[torch.Tensor]


def student_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    pad_mask: torch.Tensor,
    epsilon: float,
    teacher: Optional[TeacherDistribution] = None,
    temperature: float = 1.0,
    kind: str = "kl",
    reuse_logits: bool = False,
) -> StudentLosses:
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
    teacher, CE adds the (constant) teacher entropy; tokens where q_T is zero add nothing. An online
    teacher's own NLL of ``target`` at T = 1, ``-log q(y)``, comes with them (for logging). All of
    it is computed in float32 (float64 stays float64) from one log-softmax of the student's logits
    (and of each teacher member's) per chunk of positions, and the gradient from one softmax per
    chunk (:class:`_StudentLosses`): no (N, V) log-probability tensor is kept for the backward pass.

    Args:
        logits: (N, V) raw student logits, any float dtype.
        target: (N,) gold token ids.
        pad_mask: (N,) bool, True at padding positions, which count nowhere.
        epsilon: label smoothing in [0, 1).
        teacher: q_T at the same N positions (:meth:`TeacherDistribution.from_logits`,
            :func:`topk_teacher_distribution`), or None for no KD term.
        temperature: T > 0, applied to the student's and an online teacher's logits in the KD term.
        kind: ``"kl"`` or ``"ce"``.
        reuse_logits: write the gradient into ``logits``' own memory in the backward pass instead
            of a new (N, V) tensor (one (N, V) tensor less at the peak of the step). Only for logits
            that nothing else reads after this function, e.g. straight from the model's output
            projection (never applied to a leaf tensor).

    Returns:
        :class:`StudentLosses`; kd is None without a teacher, teacher_nll None unless it is online.
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown distillation loss kind {kind!r}; use 'kl' or 'ce'")
    smoothed, nll, kd, teacher_nll = _StudentLosses.apply(
        logits, target, ~pad_mask, epsilon, teacher, temperature, kind, reuse_logits
    )
    online = teacher is not None and len(teacher.logits) > 0
    return StudentLosses(smoothed, nll, kd if teacher is not None else None, teacher_nll if online else None)


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
