"""Knowledge distillation (Hinton et al. 2015): a classifier learns from a teacher's softened
predictions as well as from the labels.

Why: at under 1M parameters a student taught by a larger net gains about 0.5-1.3 points
(ResNet-110 -> ResNet-20: +1.3, ``../shared/reference/recipes-2.md``); only the student is
shipped, so the teacher may be any size. The teacher is a finished mve classifier checkpoint
(``distill.teacher``), e.g. trained by the same job just before (``bench/device/issue14.py``).

Loss per batch: ``(1 - weight) * CE(student, labels) + weight * T^2 * KL(teacher_T || student_T)``
where ``_T`` is a softmax at temperature ``T``; the ``T^2`` keeps the soft term's gradient on
the same scale as the hard one's whatever ``T`` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mve.checkpoint import load_checkpoint

__all__ = ["DistillConfig", "Teacher", "load_teacher", "distill_loss", "distill_step"]


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a teacher checkpoint; ``teacher: null`` (the default) turns it off."""

    teacher: str | None = None  # a classifier checkpoint directory with the run's classes
    weight: float = 0.5  # share of the soft (teacher) term in the loss
    temperature: float = 4.0  # softmax temperature of both sides of the soft term

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f"distill.weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")


class Teacher(nn.Module):
    """A frozen classifier in eval mode that takes the student's normalised batch.

    The teacher may have been trained on another split (other channel statistics), so the
    batch is mapped from the student's normalisation to the teacher's before its forward.
    One view, no test-time augmentation: the targets follow the student's augmented view.
    """

    def __init__(self, model: nn.Module, student_prep: Mapping[str, Any],
                 teacher_prep: Mapping[str, Any]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        s_mean, s_std = _stats(student_prep)
        t_mean, t_std = _stats(teacher_prep)
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std = x_s * scale + shift
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> Teacher:
        super().train(False)  # BatchNorm keeps its running statistics whatever the student does
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x * self.scale + self.shift)


def _stats(prep: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(prep["mean"], dtype=torch.float32),
            torch.tensor(prep["std"], dtype=torch.float32))


def load_teacher(cfg: DistillConfig, student_prep: Mapping[str, Any], class_names: list[str],
                 device: torch.device) -> Teacher:
    """The teacher of ``cfg`` on ``device``; a teacher of other classes is a ValueError."""
    ckpt = load_checkpoint(cfg.teacher, device=device)
    if ckpt.model_name != "classifier":
        raise ValueError(f"distill.teacher {cfg.teacher} is a {ckpt.model_name}, not a classifier")
    if ckpt.class_names is not None and list(ckpt.class_names) != list(class_names):
        raise ValueError(f"distill.teacher {cfg.teacher} has classes {ckpt.class_names}, the "
                         f"data has {list(class_names)}")
    return Teacher(ckpt.model, student_prep, ckpt.preprocessing).to(device)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor, *, weight: float, temperature: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """The mixed hard/soft loss of the module docstring (a mean over the batch)."""
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    return (1 - weight) * hard + weight * soft


def distill_step(teacher: Teacher, cfg: DistillConfig, label_smoothing: float):
    """A ``mve.loop.Stepper`` that trains a classifier with :func:`distill_loss`; its metrics
    add the teacher's accuracy on the training batches (is the teacher any good?)."""

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = distill_loss(logits, t_logits, y, weight=cfg.weight, temperature=cfg.temperature,
                            label_smoothing=label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        t_acc = (t_logits.argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": acc, "teacher_accuracy": t_acc}

    return step
