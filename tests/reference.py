"""Float64 references that the loss tests check the plugin against: plain torch written out per
position (explicit exp, sum and log), never calling the code under test."""

from typing import Iterator, Tuple

import torch


def softmax64(row, temperature=1.0):
    """softmax(row / T) of one 1-D vector, in float64, written out: exp(x - max) / sum."""
    x = row.double() / temperature
    e = torch.exp(x - x.max())
    return e / e.sum()


def non_pad_positions(target, pad) -> Iterator[Tuple[int, int, int]]:
    """``(b, t, y)`` for every position of a B x T ``target`` whose token y is not ``pad``."""
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            y = int(target[b, t])
            if y != pad:
                yield b, t, y


def label_smoothed_nll64(log_p, y, eps) -> float:
    """Label smoothing at one position as a cross-entropy against the smoothed one-hot target:
    weight 1 - eps on the gold token y and eps / (V - 1) on each other token."""
    vocab = log_p.numel()
    smoothed = torch.full((vocab,), eps / (vocab - 1), dtype=torch.float64)
    smoothed[y] = 1.0 - eps
    return float(-(smoothed * log_p.double()).sum())


def kd_terms64(q, p) -> Tuple[float, float, float]:
    """(KL(q || p), H(q, p), H(q)) of two distributions over the same tokens, with 0 log 0 = 0."""
    q, p = q.double(), p.double()
    mass = q > 0

    def total(values):
        return float(torch.where(mass, values, torch.zeros_like(q)).sum())

    return total(q * (q.log() - p.log())), total(-q * p.log()), total(-q * q.log())


def label_smoothed_rows64(lprobs, target, eps, pad) -> Tuple[float, float]:
    """(label-smoothed NLL, NLL) summed over the rows of ``lprobs`` (N, V) whose target is not ``pad``."""
    loss = nll = 0.0
    for i in range(target.numel()):
        y = int(target[i])
        if y == pad:
            continue
        loss += label_smoothed_nll64(lprobs[i], y, eps)
        nll += -float(lprobs[i, y])
    return loss, nll


def kd_rows64(student_logits, teacher_lprobs, temperature, pad_mask) -> Tuple[float, float, float]:
    """(KL, CE, teacher entropy) of p_T = softmax(z / T) against q = exp(teacher_lprobs), summed over
    the rows not in ``pad_mask``."""
    kl = ce = entropy = 0.0
    for i in range(student_logits.size(0)):
        if bool(pad_mask[i]):
            continue
        terms = kd_terms64(torch.exp(teacher_lprobs[i].double()), softmax64(student_logits[i], temperature))
        kl, ce, entropy = kl + terms[0], ce + terms[1], entropy + terms[2]
    return kl, ce, entropy


def student_terms64(student, teacher_probs, target, pad_mask, eps, temperature, kind):
    """(smoothed, nll, kd) of ``losses.student_losses`` with explicit log-softmax, sums and masks."""
    z = student.double()
    vocab = z.size(-1)
    log_p = z - torch.logsumexp(z, -1, keepdim=True)
    keep = (~pad_mask).double()
    nll_rows = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth_rows = -log_p.sum(-1)
    eps_i = eps / (vocab - 1)
    smoothed = ((1 - eps - eps_i) * nll_rows + eps_i * smooth_rows) * keep
    log_pt = z / temperature - torch.logsumexp(z / temperature, -1, keepdim=True)
    q = teacher_probs.double()
    log_q = torch.where(q > 0, q.log(), torch.zeros_like(q))
    kd_rows = (q * ((log_q if kind == "kl" else 0.0) - log_pt)).sum(-1)
    return smoothed.sum(), (nll_rows * keep).sum(), (kd_rows * keep).sum()
