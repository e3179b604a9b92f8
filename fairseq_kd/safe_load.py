"""Safe loading of fairseq checkpoints under torch >= 2.6.

torch >= 2.6 unpickles with ``weights_only=True`` by default: only tensors, primitive containers
and classes on an allow-list may be rebuilt, so a checkpoint cannot run code while loading.
fairseq checkpoints hold a few more classes (the legacy ``argparse.Namespace`` model config, and,
when rank 0 broadcasts a loaded checkpoint to the other ranks on resume, omegaconf containers and
fairseq's tensor placeholders). This module adds exactly those classes to torch's allow-list; it
never switches ``weights_only`` off, so a pickle that would call any other function (``os.system``,
``eval``, ...) is still refused.
"""

import argparse
import collections
import typing

import torch


def fairseq_checkpoint_globals() -> list:
    """The classes, beyond torch's defaults, that fairseq translation checkpoints contain."""
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [
        argparse.Namespace,
        # rank 0 re-serialises the loaded state for the other ranks on distributed resume
        _TensorPlaceholder,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        dict,
        list,
        int,
        collections.defaultdict,
    ]


def allow_fairseq_checkpoints() -> None:
    """Add fairseq's checkpoint classes to torch's ``weights_only`` allow-list (idempotent)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # torch < 2.4 has no allow-list and no weights_only default
        return
    add_safe_globals(fairseq_checkpoint_globals())
