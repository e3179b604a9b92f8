"""Checks of the criterions' (and the task's) numeric flags, each refusal naming the flag to change."""

import math


def check_finite(values: dict) -> None:
    """Refuse a NaN or infinite value of any flag in ``values`` ({"--flag": value}): it would end in
    NaN gradients, or silently disable its term (NaN > 0 is False)."""
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
    """Refuse an interpolation weight outside [0, 1] (NaN included)."""
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


def check_label_smoothing(value: float) -> None:
    """Refuse a label smoothing epsilon outside [0, 1)."""
    check_finite({"--label-smoothing": value})
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--label-smoothing must lie in [0, 1) (0 = none, 0.1 is usual), got {value}")
