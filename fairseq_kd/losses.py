"""Pure tensor math for knowledge distillation losses.

Nothing here imports fairseq: every function takes plain tensors and returns a summed (not
averaged) loss, so that criterions can normalise it the way fairseq does (sum over tokens,
divided by ``sample_size``). All probabilities are computed in float32, whatever the precision
of the incoming logits.

Notation: ``z`` are logits over a vocabulary of size V, ``T`` is the distillation temperature,
``p_T = softmax(z_student / T)`` the student's and ``q_T`` the teacher's softened distribution.
"""

import math
from typing import Sequence, Tuple

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

    ``log q_T = log( (1/K) * sum_k softmax(z_k / T) )`` for K teachers, computed with logsumexp
    so that no probability underflows. With one teacher it is ``log_softmax(z / T)``.

    Args:
        teacher_logits: K tensors of shape (..., V); any float dtype, computed in float32.
        temperature: T > 0.

    Returns:
        float32 tensor of shape (..., V).
    """
    log_probs = [F.log_softmax(z.float() / temperature, dim=-1) for z in teacher_logits]
    if len(log_probs) == 1:
        return log_probs[0]
    stacked = torch.stack(log_probs, dim=0)
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_lprobs: torch.Tensor,
    temperature: float,
    pad_mask: torch.Tensor,
    kind: str = "kl",
) -> torch.Tensor:
    """Word-level distillation term, summed over non-pad positions (not yet multiplied by T^2).

    Hinton et al. 2015; Kim & Rush 2016 (word-level KD)::

        kl: KL(q_T || p_T) = sum_v q_T(v) * (log q_T(v) - log p_T(v))
        ce: H(q_T, p_T)    = -sum_v q_T(v) * log p_T(v)

    Both have the same gradient in the student; KL is zero when the student matches the teacher,
    CE adds the (constant) teacher entropy. Vocabulary entries where q_T is exactly zero add
    nothing (0 * log 0 = 0).

    Args:
        student_logits: (N, V) raw student logits; the softmax is taken in float32.
        teacher_lprobs: (N, V) log q_T, as returned by :func:`teacher_log_probs`.
        temperature: T > 0, applied to the student logits.
        pad_mask: (N,) bool, True at padding positions.
        kind: ``"kl"`` or ``"ce"``.
    """
    student_lprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_probs = teacher_lprobs.exp()
    if kind == "kl":
        log_ratio = torch.where(teacher_probs > 0, teacher_lprobs - student_lprobs, 0.0)
        per_position = (teacher_probs * log_ratio).sum(dim=-1)
    elif kind == "ce":
        per_position = -(teacher_probs * student_lprobs).sum(dim=-1)
    else:
        raise ValueError(f"unknown distillation loss kind {kind!r}; use 'kl' or 'ce'")
    return per_position.masked_fill(pad_mask, 0.0).sum()
