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
import os
import pickle
import re
import typing
import zipfile

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


class CheckpointError(ValueError):
    """A checkpoint file the plugin will not read; the message names the file, the problem and the fix."""


#: Bounds on a checkpoint's config (``cfg`` and the legacy ``args``), counted as the tree fairseq's
#: loader builds from it. fairseq turns the config into an omegaconf object, node by node and
#: following every shared reference: a 2 KB pickle of lists that share their children expands into
#: 2^n nodes and loads forever, a 1 MB flat list of 100,000 lists takes 14 s. A real fairseq config
#: has about a thousand nodes and a depth under 10.
CONFIG_MAX_NODES = 50_000
CONFIG_MAX_DEPTH = 100


def check_config_size(state: dict, describe: str) -> None:
    """Refuse a checkpoint whose ``cfg``/``args`` exceed :data:`CONFIG_MAX_NODES` nodes (shared
    references counted each time they are reached) or :data:`CONFIG_MAX_DEPTH` levels. Stops at the
    bound, so it takes at most a few milliseconds whatever the file holds."""
    for key in ("cfg", "args"):
        stack, nodes = [(state.get(key), 1)], 0
        while stack:
            node, depth = stack.pop()
            nodes += 1
            if nodes > CONFIG_MAX_NODES or depth > CONFIG_MAX_DEPTH:
                raise CheckpointError(
                    f"{describe}: its {key!r} entry (the training config) holds more than "
                    f"{CONFIG_MAX_NODES:,} values or is nested deeper than {CONFIG_MAX_DEPTH} levels; a "
                    "fairseq config holds about a thousand, and expanding this one would take hours. "
                    "It was not written by fairseq-train: use the checkpoint the teacher's training wrote"
                )
            if isinstance(node, argparse.Namespace):
                node = vars(node)
            if isinstance(node, dict):
                stack.extend((child, depth + 1) for child in node.values())
            elif isinstance(node, (list, tuple)):
                stack.extend((child, depth + 1) for child in node)


def _first_sentence(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]


def _refused_global(message: str) -> str:
    match = re.search(r"GLOBAL (\S+)", message)
    return f"it names {match.group(1)}, " if match else ""


def check_checkpoint(path: str, what: str = "checkpoint") -> None:
    """Check that ``path`` is a complete fairseq checkpoint that torch's ``weights_only`` loader
    accepts and whose config is of bounded size (:func:`check_config_size`); every problem is a
    :class:`CheckpointError` naming ``what`` and ``path``. The file is read memory-mapped (its
    tensors are not read), so this costs the unpickling of the metadata only."""
    describe = f"{what} {path!r}"
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{describe} is empty (0 bytes): the copy or the save that wrote it failed; "
                              "copy it again or use an earlier checkpoint")
    try:
        # torch.load's mmap needs the zip format of torch >= 1.6; older files are read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{describe} was refused by torch's safe loader (weights_only): {_refused_global(str(err))}"
            "which is not a class fairseq checkpoints hold, and nothing in the file was run. Use a "
            "checkpoint written by fairseq-train, or re-save this one where it was made with only "
            "tensors, containers and its config"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{describe} ({os.path.getsize(path):,} bytes) is not a complete checkpoint, truncated or not "
            f"written by torch.save ({type(err).__name__}: {_first_sentence(err)}); copy it "
            "again or use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{describe} is not a fairseq checkpoint: it has no 'model' entry (it holds {keys})")
    check_config_size(state, describe)


def load_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """fairseq's ``load_checkpoint_to_cpu(path)``, after :func:`check_checkpoint`."""
    from fairseq import checkpoint_utils

    check_checkpoint(path, what)
    return checkpoint_utils.load_checkpoint_to_cpu(path)
