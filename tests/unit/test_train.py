"""The training loop: schedules, optimiser groups, and fit on small synthetic data."""

from __future__ import annotations

import pytest
import torch

from mve.checkpoint import load_checkpoint, load_training_state
from mve.config import OptimConfig, load_train_config
from mve.data import DataBundle, Split
from mve.models import build_model
from mve.train import build_optimizer, fit, lr_factor


def synthetic_bundle(n_train=200, n_val=100, classes=4, size=16, seed=0) -> DataBundle:
    """Images whose class is visible in their mean colour, so a small CNN can learn it."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.arange(n) % classes
        base = (labels.float() / (classes - 1) * 200 + 20).view(n, 1, 1, 1)
        noise = torch.randint(-20, 21, (n, 3, size, size), generator=g).float()
        return Split((base + noise).clamp(0, 255).to(torch.uint8), labels.long())

    names = tuple(f"k{i}" for i in range(classes))
    return DataBundle(train=make(n_train), val=make(n_val), test=None, class_names=names,
                      mean=(0.45, 0.45, 0.45), std=(0.3, 0.3, 0.3), image_size=(size, size),
                      provenance={"source": "synthetic", "split_seed": 0, "val_size": n_val})


SMALL = ["model.input_size=16", "model.num_classes=4", "model.cnn_layers=3",
         "model.starting_channels=8", "model.final_channels=16", "model.fcn_layers=2",
         "batch_size=20", "eval_batch_size=50", "data.val_size=100"]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "linear"])
def test_schedules_warm_up_peak_and_decay(schedule):
    cfg = OptimConfig(schedule=schedule, warmup=0.2, final_lr_fraction=0.05)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert max(f) == pytest.approx(1.0)
    assert f[0] < 0.2 and f[19] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(f[:20], f[1:20], strict=False))  # rising
    assert all(a >= b - 1e-12 for a, b in zip(f[20:], f[21:], strict=False))  # falling
    assert f[-1] == pytest.approx(0.05)


def test_constant_schedule():
    assert {lr_factor(s, 50, OptimConfig(schedule="constant")) for s in range(50)} == {1.0}


def test_weight_decay_skips_norms_and_biases():
    model = build_model("classifier", {"final_channels": 32, "cnn_layers": 3, "fcn_layers": 2})
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1))
    decay, norms, biases = opt.param_groups
    assert decay["weight_decay"] == 0.1 and norms["weight_decay"] == biases["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in norms["params"] + biases["params"])
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in norms["params"]} == {id(p) for m in bn for p in m.parameters()}
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)


def test_fit_learns_reports_and_checkpoints(tmp_path):
    cfg = load_train_config("classifier", preset="baseline", overrides=[*SMALL, "epochs=3", "optim.lr=0.05"])
    data = synthetic_bundle()
    reports = []

    def report(metrics, ckpt):
        reports.append(dict(metrics))
        assert ckpt is not None and (ckpt / "mve.json").exists()
        import shutil
        shutil.copytree(ckpt, tmp_path / f"e{metrics['epoch']}")

    result = fit(cfg, data, report=report, progress=False)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert result.history[-1]["val_accuracy"] > 0.6  # chance is 0.25
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert "val_per_class" not in reports[-1] and "_val_details" in reports[-1]
    ck = load_checkpoint(tmp_path / "e3")
    assert ck.metrics["val_accuracy"] == pytest.approx(result.history[-1]["val_accuracy"])
    assert ck.metrics["val_per_class"]["k0"]["support"] == 25
    assert ck.preprocessing["mean"] == [0.45, 0.45, 0.45]
    assert load_training_state(tmp_path / "e3")["epoch"] == 3


def test_resume_continues_where_it_stopped(tmp_path):
    base = [*SMALL, "optim.lr=0.05"]
    data = synthetic_bundle()
    full = fit(load_train_config("classifier", preset="baseline", overrides=[*base, "epochs=3"]), data,
               progress=False)
    saved = {}

    def keep(metrics, ckpt):
        if metrics["epoch"] == 2:
            import shutil
            shutil.copytree(ckpt, tmp_path / "e2")
            saved["ok"] = True

    fit(load_train_config("classifier", preset="baseline", overrides=[*base, "epochs=3"]), data, progress=False,
        report=keep)
    epochs_seen = []
    resumed = fit(load_train_config("classifier", preset="baseline", overrides=[*base, "epochs=3"]), data,
                  progress=False, resume_from=tmp_path / "e2",
                  report=lambda m, c: epochs_seen.append(m["epoch"]))
    assert saved and epochs_seen == [3]  # only the missing epoch ran
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]  # history is continuous
    assert resumed.history[-1]["val_accuracy"] > 0.6
    assert full.history[-1]["val_accuracy"] > 0.6


def test_vae_fit_reports_generation_metrics():
    cfg = load_train_config("vae", preset="tiny", overrides=[
        "model.input_size=16", "epochs=1", "batch_size=25", "eval_batch_size=50"])
    result = fit(cfg, synthetic_bundle(n_train=100, n_val=50), progress=False)
    last = result.history[-1]
    for key in ("train_loss", "val_loss", "val_elbo_bpd", "val_psnr", "val_ssim", "val_kl",
                "val_mse"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert 0 < last["val_elbo_bpd"] < 100  # an upper bound on NLL; loose after 4 steps


def test_class_count_mismatch_is_a_clear_error():
    cfg = load_train_config("classifier", preset="baseline", overrides=[*SMALL[:1], "model.num_classes=10",
                                                     "model.cnn_layers=3", "epochs=1"])
    with pytest.raises(ValueError, match="num_classes=10 but the data has 4 classes"):
        fit(cfg, synthetic_bundle(), progress=False)


def test_ema_checkpoints_hold_the_average_and_resume_on_the_raw_weights(tmp_path):
    import shutil

    cfg = load_train_config("classifier", preset="baseline", overrides=[
        *SMALL, "epochs=2", "optim.lr=0.05", "averaging=ema", "averaging_decay=0.5",
        "averaging_every=1"])
    data = synthetic_bundle()
    result = fit(cfg, data, progress=False,
                 report=lambda m, c: shutil.copytree(c, tmp_path / f"e{m['epoch']}"))
    saved = load_checkpoint(tmp_path / "e2").model.state_dict()
    state = load_training_state(tmp_path / "e2")
    # the checkpoint and the returned model carry the average; the training state the raw weights
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(saved[k], v)
    assert "averager" in state and any(not torch.equal(v, saved[k])
                                       for k, v in state["raw_model"].items())
    seen = {}

    def capture(net):  # the model as training resumes, before any step
        seen.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    epochs = []
    resumed = fit(cfg, data, progress=False, resume_from=tmp_path / "e1", wrap_model=capture,
                  report=lambda m, c: epochs.append(m["epoch"]))
    assert epochs == [2] and [h["epoch"] for h in resumed.history] == [1, 2]
    for k, v in load_training_state(tmp_path / "e1")["raw_model"].items():
        torch.testing.assert_close(seen[k], v)


def test_whitening_init_images_are_a_seeded_class_stratified_sample() -> None:
    # An image-folder source keeps class order: 10 classes x 600 images, class k all pixels k.
    from mve.train import _init_batch

    labels = torch.arange(10).repeat_interleave(600)
    split = Split(labels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous(),
                  labels)
    prep = {"mean": [0.0] * 3, "std": [1 / 255] * 3}  # normalised value == class index
    batch = _init_batch(split, prep, torch.device("cpu"), num_classes=10, seed=3)
    classes = batch[:, 0, 0, 0].round().long()
    assert len(batch) == 5000
    assert torch.bincount(classes, minlength=10).tolist() == [500] * 10  # not 9 classes
    again = _init_batch(split, prep, torch.device("cpu"), num_classes=10, seed=3)
    assert torch.equal(batch, again)  # every rank fits the same whitening
