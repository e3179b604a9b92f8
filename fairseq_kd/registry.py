"""Registration that tolerates a second import of the plugin.

fairseq's ``@register_task``/``@register_criterion`` raise on a name that is already registered,
which happens when the plugin module is executed twice (``importlib.reload``, or the package
imported both as an installed package and through ``--user-dir`` under another name). These
wrappers register on first sight and afterwards leave the first registration in place.
"""

from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.tasks import TASK_REGISTRY, register_task


def _keep_first(registry, name):
    return lambda cls: registry[name]


def register_task_once(name, dataclass=None):
    if name in TASK_REGISTRY:
        return _keep_first(TASK_REGISTRY, name)
    return register_task(name, dataclass=dataclass)


def register_criterion_once(name, dataclass=None):
    if name in CRITERION_REGISTRY:
        return _keep_first(CRITERION_REGISTRY, name)
    return register_criterion(name, dataclass=dataclass)
