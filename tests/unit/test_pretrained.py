"""Default checkpoints (mve.pretrained) and their use by `mve serve` (no Ray is started)."""

from __future__ import annotations

import argparse

from mve.pretrained import default_checkpoint, default_classifier, default_vae, repo_root
from serve_app.cli import apply_default_models, serve_parent
from serve_app.testing import make_classifier, make_vae


def _serve_args(*argv: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[serve_parent()]).parse_args(list(argv))


def test_env_overrides_and_empty_disables(tmp_path, monkeypatch):
    clf = make_classifier(tmp_path / "clf")
    vae = make_vae(tmp_path / "vae")
    monkeypatch.setenv("MVE_DEFAULT_CLASSIFIER", str(clf))
    monkeypatch.setenv("MVE_DEFAULT_VAE", str(vae))
    assert default_classifier() == clf.resolve() and default_vae() == vae.resolve()
    monkeypatch.setenv("MVE_DEFAULT_VAE", "")
    assert default_vae() is None
    monkeypatch.setenv("MVE_DEFAULT_VAE", str(tmp_path / "nowhere"))
    assert default_vae() is None


def test_repo_models_dir_is_found_or_none(tmp_path, monkeypatch):
    monkeypatch.delenv("MVE_DEFAULT_CLASSIFIER", raising=False)
    monkeypatch.delenv("MVE_DEFAULT_VAE", raising=False)
    monkeypatch.chdir(tmp_path)
    for kind in ("classifier", "vae"):
        shipped = repo_root() / "models" / f"cifar10-{kind}"
        found = default_checkpoint(kind)
        if (shipped / "mve.json").is_file():
            assert found == shipped.resolve()
        else:
            assert found is None
    # a models/ folder in the working directory also counts when the checkout has none
    if not (repo_root() / "models" / "cifar10-vae" / "mve.json").is_file():
        make_vae(tmp_path / "models" / "cifar10-vae")
        assert default_vae() == (tmp_path / "models" / "cifar10-vae").resolve()


def test_serve_falls_back_to_the_defaults(tmp_path, monkeypatch):
    vae = make_vae(tmp_path / "vae")
    monkeypatch.setenv("MVE_DEFAULT_CLASSIFIER", "")
    monkeypatch.setenv("MVE_DEFAULT_VAE", str(vae))
    args = apply_default_models(_serve_args())
    assert args.vae == str(vae.resolve()) and args.classifier is None
    given = make_vae(tmp_path / "given")
    args = apply_default_models(_serve_args("--vae", str(given)))
    assert args.vae == str(given)  # an explicit checkpoint wins
    args = apply_default_models(_serve_args("--no-defaults"))
    assert args.vae is None and args.classifier is None
