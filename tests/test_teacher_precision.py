"""--teacher-precision: what auto resolves to, that bf16 really runs under autocast on CPU, and
that the distillation math stays in fp32 whatever the teacher's precision."""

import os
import subprocess
import sys

import pytest
import torch

from fairseq_kd import losses, teacher as teacher_module
from fairseq_kd.teacher import Teacher, resolve_precision
from test_word_kd import data_dir, make_sample, parse  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_resolution(monkeypatch):
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(teacher_module, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(teacher_module, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("int8", torch.device("cpu"))


@pytest.fixture(scope="module")
def model_and_sample(data_dir):  # noqa: F811
    from fairseq import tasks

    cfg = parse(data_dir, "--dropout", "0.0")
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task.build_model(cfg.model), make_sample(task)


def forward(teacher, sample):
    ni = sample["net_input"]
    return teacher.logits(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])[0]


def test_bf16_runs_under_autocast_with_fp32_weights(model_and_sample):
    model, sample = model_and_sample
    teacher = Teacher([model], precision="bf16").to(torch.device("cpu"))
    logits = forward(teacher, sample)
    assert logits.dtype == torch.bfloat16  # the matrix products ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights untouched on CPU
    fp32 = forward(Teacher([model], precision="fp32").to(torch.device("cpu")), sample)
    assert fp32.dtype == torch.float32
    assert (logits.float() - fp32).abs().max() < 0.1  # same model, rounded
    # the teacher distribution built from bf16 logits is fp32
    assert losses.teacher_log_probs([logits], 2.0).dtype == torch.float32


def test_fp32_teacher_ignores_the_callers_autocast(model_and_sample):
    """fairseq's --amp runs the criterion under autocast; the teacher keeps its own precision."""
    model, sample = model_and_sample
    teacher = Teacher([model], precision="fp32").to(torch.device("cpu"))
    plain = forward(teacher, sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = forward(teacher, sample)
        encoder_states = teacher.encoder_states(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
    assert under_autocast.dtype == torch.float32 and encoder_states[0].dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_moving_again_to_the_same_device_is_a_no_op(model_and_sample):
    model, _ = model_and_sample
    teacher = Teacher([model], precision="fp32")
    assert teacher.to(torch.device("cpu")) is teacher
    assert teacher.device == torch.device("cpu") and teacher.resolved_precision == "fp32"


def test_bf16_teacher_on_cpu_caps_onednn_cache_unless_user_chose(model_and_sample, monkeypatch):
    model, _ = model_and_sample
    variable = teacher_module.ONEDNN_CACHE_VARIABLE
    monkeypatch.delenv(variable, raising=False)
    Teacher([model], precision="fp32").to(torch.device("cpu"))
    assert variable not in os.environ  # fp32 products do not run through oneDNN's cache
    Teacher([model], precision="bf16").to(torch.device("cpu"))
    assert os.environ[variable] == str(teacher_module.ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv(variable, "3")
    Teacher([model], precision="bf16").to(torch.device("cpu"))
    assert os.environ[variable] == "3"


# bf16 products on CPU over 40 operand shapes, twice, in a fresh process, with or without the
# plugin's cap (set, as in training, after torch is imported); oneDNN's verbose log says whether each
# product found its primitive in the cache
_SHAPES_SCRIPT = """
import sys, torch, torch.nn.functional as F
from fairseq_kd.teacher import bound_onednn_cache
if sys.argv[1] == "capped":
    bound_onednn_cache()
weight = torch.randn(64, 32)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for _ in range(2):
        for rows in range(1, 41):
            F.linear(torch.randn(rows, 32), weight)
"""


@pytest.mark.skipif(not teacher_module.cpu_supports_bf16(), reason="needs a CPU with native bf16")
def test_onednn_cache_cap_is_applied_after_torch_is_imported():
    env = {k: v for k, v in os.environ.items() if k != teacher_module.ONEDNN_CACHE_VARIABLE}
    env["ONEDNN_VERBOSE"] = "all"
    hits = {}
    for mode in ("default", "capped"):
        log = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT, mode], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert "create:cache_miss" in log  # the products ran through oneDNN
        hits[mode] = log.count("create:cache_hit")
    assert hits["default"] >= 30, hits  # the second pass finds the first pass's 40 primitives
    assert hits["capped"] == 0, hits  # 16 entries cannot hold 40 shapes visited in turn
