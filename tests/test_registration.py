"""Importing the plugin registers everything, and registering twice does not crash."""

import shutil
import subprocess
import sys

from conftest import REPO, USER_DIR

SCRIPT = """
import argparse, importlib, sys
from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.tasks import TASK_REGISTRY
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1]))
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1]))  # fairseq does this in every main()
import fairseq_kd
first = {name: CRITERION_REGISTRY[name] for name in ("word_kd", "seq_kd_interp", "hybrid_kd", "triple_loss")}
for module in [m for name, m in sys.modules.items() if name.startswith("fairseq_kd.")]:
    importlib.reload(module)  # executes every @register_* again
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[2]))  # the same plugin under another name
assert TASK_REGISTRY["translation_distill"].__module__ == "fairseq_kd.tasks.translation_distill"
assert {name: CRITERION_REGISTRY[name] for name in first} == first, "the first registration was replaced"
print("registered", sorted(first), "and translation_distill")
"""


def test_registering_twice_keeps_the_first_registration(tmp_path):
    copy = tmp_path / "fairseq_kd_copy"
    shutil.copytree(USER_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    # the copy's absolute imports still name fairseq_kd: it re-executes the registrations of its own modules
    proc = subprocess.run([sys.executable, "-c", SCRIPT, USER_DIR, str(copy)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "registered ['hybrid_kd', 'seq_kd_interp', 'triple_loss', 'word_kd'] and translation_distill" in proc.stdout
