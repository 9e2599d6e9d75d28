"""Knowledge distillation: the loss, the teacher's input mapping, the checks on a teacher, and a
student trained from a teacher checkpoint end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train import synthetic_bundle  # tests/unit/test_train.py
from torch import nn

from mve.checkpoint import save_checkpoint
from mve.config import ConfigError, load_train_config
from mve.distill import DistillConfig, Teacher, distill_loss, load_teacher
from mve.models import build_model, make_config
from mve.train import fit, preprocessing_for

TINY = ["model.input_size=16", "model.num_classes=4", "model.widths=[8,16,16]",
        "batch_size=20", "eval_batch_size=50", "data.val_size=100", "min_steps_per_epoch=0",
        "model.tta=none"]


def test_the_loss_mixes_labels_and_softened_teacher_predictions():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    assert distill_loss(s, t, y, weight=0.0, temperature=4.0) == pytest.approx(ce.item())
    # the soft term is T^2 KL(teacher_T || student_T) and vanishes when they agree
    soft = distill_loss(s, t, y, weight=1.0, temperature=2.0)
    kl = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1).mean()
    assert soft.item() == pytest.approx(4 * kl.item(), rel=1e-5)
    assert distill_loss(t, t, y, weight=1.0, temperature=3.0).item() == pytest.approx(0, abs=1e-6)
    mixed = distill_loss(s, t, y, weight=0.25, temperature=2.0)
    assert mixed.item() == pytest.approx(0.75 * ce.item() + 0.25 * soft.item(), rel=1e-5)


class _Recorder(nn.Module):
    def logits(self, x):
        self.seen = x
        return x.mean((2, 3))


def test_the_teacher_sees_the_batch_in_its_own_normalisation_and_stays_in_eval_mode():
    pixels = torch.rand(2, 3, 4, 4)
    s_prep = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    t_prep = {"mean": [0.45, 0.45, 0.45], "std": [0.3, 0.3, 0.3]}
    teacher = Teacher(_Recorder(), s_prep, t_prep)
    norm = lambda p, prep: (p - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(prep["std"]).view(1, 3, 1, 1)  # noqa: E731
    teacher.train()
    teacher(norm(pixels, s_prep))
    assert torch.allclose(teacher.model.seen, norm(pixels, t_prep), atol=1e-6)
    assert not teacher.training and not teacher.model.training


def _save_classifier(path, classes=4, preset="convgroups"):
    cfg = make_config("classifier", {"input_size": 16, "num_classes": classes,
                                     "widths": [8, 16, 16]}, preset=preset)
    save_checkpoint(path, build_model("classifier", cfg), model_name="classifier",
                    model_config=cfg, preprocessing={"input_size": [16, 16], "mean": [0.45] * 3,
                                                     "std": [0.3] * 3},
                    class_names=[f"k{i}" for i in range(classes)])
    return path


def test_a_teacher_of_other_classes_or_another_family_is_refused(tmp_path):
    teacher = _save_classifier(tmp_path / "t3", classes=3)
    prep = {"mean": [0.45] * 3, "std": [0.3] * 3}
    with pytest.raises(ValueError, match="classes"):
        load_teacher(DistillConfig(teacher=str(teacher)), prep, ["k0", "k1", "k2", "k3"], "cpu")
    vae_cfg = make_config("vae", {}, preset="tiny")
    save_checkpoint(tmp_path / "vae", build_model("vae", vae_cfg), model_name="vae",
                    model_config=vae_cfg, preprocessing={"input_size": [32, 32],
                                                         "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ValueError, match="not a classifier"):
        load_teacher(DistillConfig(teacher=str(tmp_path / "vae")), prep, ["k0"], "cpu")
    for bad in ("distill.weight=1.5", "distill.temperature=0"):
        with pytest.raises(ConfigError):
            load_train_config("classifier", overrides=[bad])


def test_a_student_learns_from_a_trained_teacher(tmp_path):
    data = synthetic_bundle()
    # lr 0.2: the recipe's peak lr is tuned for 50,000 images, and diverges on 200
    t_cfg = load_train_config("classifier", preset="fast",
                              overrides=[*TINY, "epochs=4", "optim.lr=0.2"])
    teacher = fit(t_cfg, data, progress=False)
    save_checkpoint(tmp_path / "teacher", teacher.model, model_name="classifier",
                    model_config=t_cfg.model_config, preprocessing=preprocessing_for(t_cfg, data),
                    class_names=list(data.class_names))
    s_cfg = load_train_config("classifier", preset="fast", overrides=[
        *TINY, "epochs=3", "optim.lr=0.2", f"distill.teacher={tmp_path / 'teacher'}", "distill.weight=0.7"])
    student = fit(s_cfg, data, progress=False)
    history = student.history
    assert history[-1]["train_teacher_accuracy"] > 0.6  # the teacher's targets were its own
    assert history[-1]["val_accuracy"] > 0.45  # chance is 0.25; soft targets learn slower
    assert s_cfg.to_dict()["distill"]["teacher"] == str(tmp_path / "teacher")
