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
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OnlineTeacher:
    """An online teacher's K members' raw logits, (N, V) each, any float dtype. Its distribution::

        q_T = (1/K) * sum_k softmax(z_k / T)

    (probabilities averaged, not logits) is computed by :func:`student_losses` chunk by chunk, so
    that no (N, V) float32 distribution is allocated next to the logits.
    """

    logits: Sequence[torch.Tensor]

    @property
    def ids(self) -> None:
        """Dense: the logits cover the whole vocabulary."""
        return None

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(self.logits)

    @classmethod
    def from_tensors(cls, tensors) -> "OnlineTeacher":
        return cls(tuple(tensors))


@dataclass(frozen=True)
class StoredTeacher:
    """A teacher distribution q_T given as probabilities: ``probs`` (N, V) over the whole vocabulary,
    or (N, k) over the tokens ``ids`` (N, k) of a sparse teacher whose other tokens have q_T = 0,
    each row summing to 1; ``neg_entropy`` (N,) is ``sum_v q_T(v) log q_T(v)``."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    ids: Optional[torch.Tensor] = None

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, ids: Optional[torch.Tensor] = None) -> "StoredTeacher":
        """From log q_T, (N, V), or (N, k) with ``ids``; -inf marks a token with no teacher mass."""
        log_probs = log_probs.to(_compute_dtype(log_probs))
        probs = log_probs.exp()
        return cls(probs, torch.where(probs > 0, probs * log_probs, 0.0).sum(-1), ids)

    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return self.probs, self.neg_entropy, self.ids

    @classmethod
    def from_tensors(cls, tensors) -> "StoredTeacher":
        return cls(*tensors)


#: the teacher's softened distribution at N positions, as :func:`student_losses` takes it
TeacherDistribution = Union[OnlineTeacher, StoredTeacher]


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


def topk_teacher_distribution(topk_lprobs: torch.Tensor, ids: torch.Tensor, temperature: float) -> StoredTeacher:
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
    return StoredTeacher.from_log_probs(F.log_softmax(topk_lprobs.float() / temperature, dim=-1), ids)


# Positions per chunk are chosen so that one chunk of one distribution holds about this many values:
# small chunk buffers on CPU (1 MiB in float32), few kernel launches elsewhere (docs/performance.md).
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
    chunk shape stays: fresh (N, V)-sized temporaries at every chunk and step would be paid for in
    page faults and a fragmented heap on CPU."""

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


@dataclass
class _PerPosition:
    """What the forward pass keeps per position, (N,) each: the student's log-normaliser at T = 1
    (``lse``) and at T (``lse_t``, the same tensor at T = 1), its NLL and smoothing term, the cross
    term ``sum_v q_T(v) log p_T(v)``; for an online teacher also its negative entropy, its
    log-probability of the gold token at T = 1 and its members' log-normalisers at T, (K, N)."""

    lse: torch.Tensor
    lse_t: torch.Tensor
    nll: torch.Tensor
    smooth: torch.Tensor
    cross: torch.Tensor
    neg_entropy: Optional[torch.Tensor] = None
    teacher_gold: Optional[torch.Tensor] = None
    teacher_lse: Optional[torch.Tensor] = None

    @classmethod
    def zeros(cls, logits: torch.Tensor, dtype, teacher: Optional[TeacherDistribution], temperature: float):
        n = logits.size(0)

        def rows_of():
            return logits.new_zeros(n, dtype=dtype)

        lse = rows_of()
        out = cls(lse, rows_of() if teacher is not None and temperature != 1.0 else lse, rows_of(), rows_of(), rows_of())
        if isinstance(teacher, OnlineTeacher):
            out.neg_entropy, out.teacher_gold = rows_of(), rows_of()
            out.teacher_lse = logits.new_zeros(len(teacher.logits), n, dtype=dtype)
        return out


def _student_chunk(z, gold, rows, epsilon, dtype, out: _PerPosition, buf) -> Tuple[torch.Tensor, torch.Tensor]:
    """The student's NLL, log-normaliser and smoothing term at ``rows`` into ``out``; returns its
    logits there in ``dtype`` and their log-softmax (in ``buf["log_p"]``)."""
    x = _as_compute(z, dtype, 1.0, buf, "x")
    log_p = torch.log_softmax(x, dim=-1, out=buf["log_p"])
    out.nll[rows] = -log_p.gather(-1, gold).squeeze(-1)
    # log sum_v exp(z_v) = z_y - log p(y), read off at the gold token, which is rarely far below the
    # top logit (a small |log p(y)| keeps this exact)
    out.lse[rows] = x.gather(-1, gold).squeeze(-1) + out.nll[rows]
    if epsilon > 0:
        out.smooth[rows] = -log_p.sum(-1)
    return x, log_p


def _softened_student_chunk(x, gold, rows, temperature, out: _PerPosition, buf) -> torch.Tensor:
    """log p_T at ``rows`` (overwriting ``buf["log_p"]``), its log-normaliser into ``out.lse_t``."""
    x_t = torch.div(x, temperature, out=buf["x_t"])
    log_p_t = torch.log_softmax(x_t, dim=-1, out=buf["log_p"])
    out.lse_t[rows] = (x_t.gather(-1, gold) - log_p_t.gather(-1, gold)).squeeze(-1)
    return log_p_t


def _online_teacher_chunk(logits, rows, gold, temperature, out: _PerPosition, buf) -> torch.Tensor:
    """q_T of an online teacher at ``rows`` (in ``buf["q"]``); its members' log-normalisers, negative
    entropy and gold-token log-probability at T = 1 go into ``out``."""
    log_q = _online_teacher_log_probs(logits, rows, gold, temperature, out.teacher_lse, buf)
    if temperature == 1.0:
        out.teacher_gold[rows] = log_q.gather(-1, gold).squeeze(-1)
    else:
        out.teacher_gold[rows] = _teacher_gold_log_prob(logits, rows, gold, log_q.dtype, buf)
    q = torch.exp(log_q, out=buf["q"])
    out.neg_entropy[rows] = log_q.mul_(q).nansum(-1)  # 0 log 0 = 0: a -inf logit gives 0 * -inf = NaN
    return q


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


def _teacher_probs(teacher: TeacherDistribution, log_normalizers, rows, temperature, dtype, buf) -> torch.Tensor:
    """q_T at ``rows``, a tensor the caller may overwrite: an online teacher's recomputed from its
    logits and members' log-normalisers (K, N), in ``buf["q"]``; a stored one copied."""
    if isinstance(teacher, StoredTeacher):
        return teacher.probs[rows].to(dtype, copy=True)
    total = buf["q"]
    for member, (z, log_normalizer) in enumerate(zip(teacher.logits, log_normalizers)):
        name = "q" if member == 0 else "member"
        z = z[rows]
        if z.dtype == dtype and temperature == 1.0:
            q = torch.sub(z, log_normalizer[rows].unsqueeze(-1), out=buf[name])
        else:
            q = _as_compute(z, dtype, temperature, buf, name).sub_(log_normalizer[rows].unsqueeze(-1))
        q.exp_()
        if member > 0:
            total.add_(q)
    if len(teacher.logits) > 1:
        total /= len(teacher.logits)
    return total


def _expected_log_prob(q, log_p, ids, rows) -> torch.Tensor:
    """``sum_v q(v) log p(v)`` per row (``q`` is overwritten); a sparse ``q`` covers the tokens ``ids``."""
    if ids is None:
        return q.mul_(log_p).sum(-1)
    return (q * log_p.gather(-1, ids[rows])).sum(-1)


def _subtract_teacher(grad, q, ids, rows, scale) -> None:
    """``grad -= scale * q`` (``q`` is overwritten); a sparse ``q`` covers the tokens ``ids``."""
    if ids is None:
        grad.sub_(q.mul_(scale))
    else:
        grad.scatter_add_(-1, ids[rows], q.mul_(-scale))


class _StudentLosses(torch.autograd.Function):
    """Label-smoothed NLL, NLL and word-level KD of the student from its logits, and an online
    teacher's NLL, in one pass over the vocabulary per chunk of positions (formulas:
    :func:`student_losses`).

    Only the logits and per-position log-normalisers are kept for the backward pass, which
    recomputes p and q_T chunk by chunk. With p = softmax(z), p_T = softmax(z / T), e_y the one-hot
    gold token and eps_i = eps / (V - 1), the gradients at a kept position are::

        d smoothed / dz = (1 - eps - eps_i) * (p - e_y) + eps_i * (V * p - 1)
        d nll / dz      = p - e_y
        d kd / dz       = (p_T - q_T) / T          (the same for KL and CE: q_T sums to 1)

    and 0 at padding.
    """

    @staticmethod
    def forward(ctx, logits, target, keep, epsilon, teacher, temperature, kind, reuse_logits):
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        online = isinstance(teacher, OnlineTeacher)
        out = _PerPosition.zeros(logits, dtype, teacher, temperature)
        scratch = _Scratch(vocab, dtype, logits.device)
        for rows in _chunks(n, vocab, logits.device):
            buf = scratch.chunk(rows, n)
            gold = target[rows].unsqueeze(-1)
            x, log_p = _student_chunk(logits[rows], gold, rows, epsilon, dtype, out, buf)
            if teacher is None:
                continue
            if online:
                q = _online_teacher_chunk(teacher.logits, rows, gold, temperature, out, buf)
            else:
                q = _teacher_probs(teacher, None, rows, temperature, dtype, buf)
            if temperature != 1.0:
                log_p = _softened_student_chunk(x, gold, rows, temperature, out, buf)
            out.cross[rows] = _expected_log_prob(q, log_p, teacher.ids, rows)
        drop = ~keep
        eps_i = epsilon / (vocab - 1)
        nll_sum = out.nll.masked_fill_(drop, 0.0).sum()
        smoothed_sum = (1.0 - epsilon - eps_i) * nll_sum + eps_i * out.smooth.masked_fill_(drop, 0.0).sum()
        kd_sum = teacher_nll_sum = logits.new_zeros((), dtype=dtype)
        if teacher is not None:
            neg_entropy = out.neg_entropy if online else teacher.neg_entropy.to(dtype)
            kd_rows = -out.cross if kind == "ce" else neg_entropy - out.cross
            kd_sum = kd_rows.masked_fill_(drop, 0.0).sum()
        if online:
            teacher_nll_sum = -out.teacher_gold.masked_fill_(drop, 0.0).sum()
        ctx.mark_non_differentiable(teacher_nll_sum)
        ctx.epsilon, ctx.temperature = epsilon, temperature
        ctx.teacher_type = type(teacher) if teacher is not None else None
        # a leaf, or a view of one, is the caller's own tensor: never overwritten
        ctx.reuse_logits = reuse_logits and logits.grad_fn is not None and (
            logits._base is None or logits._base.grad_fn is not None
        )
        # saved through autograd, so that the teacher's tensors are freed as soon as the backward
        # pass is done, even while the caller still holds the loss
        teacher_tensors = teacher.tensors() if teacher is not None else ()
        ctx.save_for_backward(logits, target, keep, out.lse, out.lse_t, out.teacher_lse, *teacher_tensors)
        return smoothed_sum, nll_sum, kd_sum, teacher_nll_sum

    @staticmethod
    def backward(ctx, grad_smoothed, grad_nll, grad_kd, _):
        logits, target, keep, lse, lse_t, teacher_lse, *teacher_tensors = ctx.saved_tensors
        epsilon, temperature = ctx.epsilon, ctx.temperature
        teacher = ctx.teacher_type.from_tensors(teacher_tensors) if ctx.teacher_type is not None else None
        n, vocab = logits.shape
        dtype = _compute_dtype(logits)
        eps_i = epsilon / (vocab - 1)
        # gradient = coef_p * p - coef_gold * e_y - coef_const [+ kd_scale * (p_T - q_T)]
        coef_gold = (1.0 - epsilon - eps_i) * grad_smoothed + grad_nll
        coef_p = coef_gold + eps_i * vocab * grad_smoothed
        coef_const = eps_i * grad_smoothed
        kd_scale = grad_kd / temperature
        if teacher is not None and temperature == 1.0:
            coef_p = coef_p + kd_scale
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        converted = logits.dtype != dtype
        scratch = _Scratch(vocab, dtype, logits.device)
        for rows in _chunks(n, vocab, logits.device):
            buf = scratch.chunk(rows, n)
            x = _as_compute(logits[rows], dtype, 1.0, buf, "x")
            if teacher is not None and temperature != 1.0:  # p_T, read from x before g (which may be x) is written
                p_t = torch.div(x, temperature, out=buf["x_t"]).sub_(lse_t[rows].unsqueeze(-1)).exp_()
            g = buf["grad"] if converted else grad[rows]
            torch.sub(x, lse[rows].unsqueeze(-1), out=g).exp_().mul_(coef_p)
            if teacher is not None:
                if temperature != 1.0:
                    g.add_(p_t.mul_(kd_scale))
                q = _teacher_probs(teacher, teacher_lse, rows, temperature, dtype, buf)
                _subtract_teacher(g, q, teacher.ids, rows, kd_scale)
            if epsilon > 0:
                g.sub_(coef_const)
            g.scatter_add_(-1, target[rows].unsqueeze(-1), (-coef_gold).expand(buf.size, 1).to(dtype))
            g.masked_fill_(~keep[rows].unsqueeze(-1), 0.0)  # no host-device sync, unlike indexing
            if converted:
                grad[rows] = g
        return grad, None, None, None, None, None, None, None


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
        teacher: q_T at the same N positions (:class:`OnlineTeacher`, :class:`StoredTeacher`, e.g.
            from :func:`topk_teacher_distribution`), or None for no KD term.
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
    online = isinstance(teacher, OnlineTeacher)
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
