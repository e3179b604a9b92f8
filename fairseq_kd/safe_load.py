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
    """The classes, beyond torch's defaults, that fairseq translation checkpoints contain.

    Measured with ``torch.serialization.get_unsafe_globals_in_checkpoint`` and by running each
    command with one class left out (each omission made the command fail):

    - ``argparse.Namespace``: every checkpoint file stores the model config (``cfg.model``) as
      one. Needed by everything that reads a checkpoint file: ``fairseq-train`` resume, loading
      the teacher (``--teacher-path``), ``fairseq-generate``, ``fairseq-interactive`` and
      ``fairseq-validate``. It is the only class these need.
    - all the others: only distributed ``fairseq-train`` resume. Rank 0 reads the file, turns its
      ``cfg`` into an omegaconf ``DictConfig``, replaces the tensors by ``_TensorPlaceholder``
      objects and sends the rest through ``torch.save`` to the other ranks, which
      ``torch.load`` it. The config pickles as ``DictConfig``/``ListConfig`` containers with
      ``AnyNode`` leaves, whose ``ContainerMetadata``/``Metadata`` name ``typing.Any``,
      ``dict``, ``list`` and ``int`` (the object, key and element types) and hold a
      ``collections.defaultdict`` (the resolver cache).
    """
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
