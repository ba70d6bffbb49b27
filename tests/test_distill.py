"""Distillation (task distill): the loss against an independent computation, and a short run
whose student reads the teacher's tokenizer and trains on its distributions."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from onnxformer.modeling.objectives import IGNORE_INDEX, distillation_loss, token_cross_entropy  # noqa: E402
from onnxformer.runtime.errors import ConfigError  # noqa: E402


def _reference(student, teacher, labels, temperature, weight):
    """KL(teacher_T || student_T) by its definition, sum p log(p/q), mean over labelled positions."""
    keep = labels != IGNORE_INDEX
    p = torch.softmax(teacher[keep].double() / temperature, -1)
    q = torch.softmax(student[keep].double() / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student[keep].double(), labels[keep])
    return weight * temperature ** 2 * kl + (1 - weight) * ce, ce


@pytest.mark.parametrize("temperature, weight", [(1.0, 0.5), (2.0, 0.9), (4.0, 0.0), (0.5, 1.0)])
def test_distillation_loss_matches_its_definition(temperature, weight):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g)
    teacher = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    wider = torch.nn.functional.pad(teacher, (0, 2), value=5.0)  # a teacher V of 13: cut to the student's 11
    loss, hard = distillation_loss(student, wider, labels, temperature=temperature, kl_weight=weight)
    expected, ce = _reference(student, teacher, labels, temperature, weight)
    assert torch.allclose(loss.double(), expected, atol=1e-5) and torch.allclose(hard.double(), ce, atol=1e-6)
    assert torch.allclose(hard, token_cross_entropy(student, labels))


def test_a_student_equal_to_its_teacher_has_zero_kl():
    logits = torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    loss, hard = distillation_loss(logits, logits, labels, temperature=2.0, kl_weight=1.0)
    assert abs(float(loss)) < 1e-6


def test_distill_needs_a_teacher_and_only_distill_takes_one():
    from onnxformer.modeling.train import TrainConfig
    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(arch="decoder", task="distill", data="builtin:numbers", out_dir="x")
    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(arch="decoder", task="causal-lm", data="builtin:numbers", out_dir="x", teacher="t")
    with pytest.raises(ConfigError, match="distill_kl_weight"):
        TrainConfig(arch="decoder", task="distill", data="builtin:numbers", out_dir="x", teacher="t",
                    distill_kl_weight=1.5)


@pytest.mark.slow
def test_a_short_distillation_run(tmp_path):
    from onnxformer.modeling import checkpoint as ckpt
    from onnxformer.modeling.train import TrainConfig, train
    common = dict(arch="decoder", data="builtin:numbers", eval_every=4, eval_examples=16, progress=False,
                  batch_size=8)
    teacher = train(TrainConfig(task="sft", out_dir=str(tmp_path / "teacher"), steps=8, **common))
    student = train(TrainConfig(task="distill", out_dir=str(tmp_path / "student"), steps=4, teacher=str(teacher.run_dir),
                                distill_temperature=2.0, distill_kl_weight=0.7, **common))
    assert student.last_loss < student.first_loss
    same = (teacher.checkpoint / ckpt.TOKENIZER_FILE).read_text() == (student.checkpoint / ckpt.TOKENIZER_FILE).read_text()
    assert same  # the teacher's tokenizer
    assert ckpt.read_model_config(student.checkpoint).prompt_format == ckpt.read_model_config(teacher.checkpoint).prompt_format
