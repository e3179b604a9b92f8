"""--teacher-precision: what auto resolves to, that bf16 really runs under autocast on CPU, and
that the distillation math stays in fp32 whatever the teacher's precision."""

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


def test_moving_again_to_the_same_device_is_a_no_op(model_and_sample):
    model, _ = model_and_sample
    teacher = Teacher([model], precision="fp32")
    assert teacher.to(torch.device("cpu")) is teacher
    assert teacher.device == torch.device("cpu") and teacher.resolved_precision == "fp32"
