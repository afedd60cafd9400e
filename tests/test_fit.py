"""Data loading, fitting (determinism, resume), checkpoints and the `python -m train` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edge.errors import ConfigError, DataError
from train.checkpoint import CheckpointError, load_checkpoint
from train.data import fingerprint, load_good_images, split
from train.fit import TrainConfig, fit

S = 32  # model input; the smallest multiple of the coarsest stride (16) that is still useful
ROOT = Path(__file__).resolve().parents[1]


def _make_images(folder: Path, n: int = 6, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
        p = folder / f"{i:03d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cat")
    _make_images(root / "train" / "good")  # MVTec layout
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        image_size=S,
        epochs=2,
        batch_size=2,
        threads=1,
        val_fraction=0.34,
        early_stop_patience=0,
        # "stop after epoch 1, resume to 2" below stands for an interrupted run; a cosine
        # schedule's length depends on the epochs asked for, so those tests use a constant lr
        # (test_cosine_schedule_resumes_mid_run covers the schedule's own state).
        lr_schedule="constant",
    )
    return TrainConfig(**{**base, **kw})


def test_data_split_fingerprint_and_errors(tmp_path, good_dir):
    train, val, info = load_good_images(good_dir, S, val_fraction=0.34)
    assert (len(train), len(val)) == (4, 2) and info["images"] == 6
    assert info["data_dir"].endswith("train/good")
    x = train[0]
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 255
    files = sorted((good_dir / "train" / "good").iterdir())
    assert split(files, 0.34) == split(list(reversed(files)), 0.34)  # order-independent
    assert split(files, 0.0) == (files, [])
    # the fingerprint covers bytes, not just names
    copy = tmp_path / "copy"
    _make_images(copy)
    assert fingerprint(sorted(copy.iterdir())) == info["data_fingerprint"]
    cv2.imwrite(str(copy / "000.png"), np.zeros((40, 40, 3), np.uint8))
    assert fingerprint(sorted(copy.iterdir())) != info["data_fingerprint"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        load_good_images(empty, S)
    with pytest.raises(DataError, match="missing"):
        load_good_images(tmp_path / "missing", S)
    (copy / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_good_images(copy, S)


def test_fit_deterministic_and_checkpoint_roundtrip(tmp_path, good_dir):
    a = fit(_cfg(good_dir, tmp_path / "a"), progress=False)
    b = fit(_cfg(good_dir, tmp_path / "b"), progress=False)
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert len(ha) == 2 and ha == hb  # same seed -> identical losses on CPU
    for name in ("checkpoint.pt", "last.pt", "config.yaml", "history.json", "loss.png"):
        assert (tmp_path / "a" / name).is_file(), name

    model, meta = load_checkpoint(a)
    assert not model.training and meta["kind"] == "stpm" and meta["args"]["image_size"] == S
    prov = meta["provenance"]
    assert prov["images"] == 6 and prov["val_images"] == 2 and prov["epochs_run"] == 2
    assert prov["seed"] == 0 and len(prov["data_fingerprint"]) == 64
    assert prov["best_val_loss"] == min(h["val_loss"] for h in ha)
    assert meta["config"]["image_size"] == S and meta["history"] == ha
    ckpt = torch.load(a, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    x = torch.rand(1, 3, S, S) * 255
    model2, _ = load_checkpoint(b)
    with torch.no_grad():
        assert torch.equal(model(x)[1], model2(x)[1])


def test_resume_continues_identically(tmp_path, good_dir):
    fit(_cfg(good_dir, tmp_path / "full"), progress=False)
    fit(_cfg(good_dir, tmp_path / "part", epochs=1), progress=False)
    fit(_cfg(good_dir, tmp_path / "part", epochs=2), resume=True, progress=False)
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert part == full


def test_max_steps_caps_training_and_resumes(tmp_path, good_dir):
    # 4 training images, batch 2: 2 steps per epoch; the cap stops inside epoch 2
    a = fit(_cfg(good_dir, tmp_path / "a", epochs=5, max_steps=3), progress=False)
    hist = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 3]
    prov = load_checkpoint(a)[1]["provenance"]
    assert prov["steps"] == 3 and prov["reached_max_steps"] is True and prov["epochs_run"] == 2
    fit(_cfg(good_dir, tmp_path / "b", epochs=1, max_steps=3), progress=False)
    fit(_cfg(good_dir, tmp_path / "b", epochs=5, max_steps=3), resume=True, progress=False)
    assert json.loads((tmp_path / "b" / "history.json").read_text()) == hist
    uncapped = fit(_cfg(good_dir, tmp_path / "c", epochs=2, max_steps=0), progress=False)
    assert load_checkpoint(uncapped)[1]["provenance"]["reached_max_steps"] is False


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_cli_help():
    r = subprocess.run(
        [sys.executable, "-m", "train", "fit", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "--resume" in r.stdout and "--config" in r.stdout


def test_cli_bad_config_key(tmp_path, capsys, good_dir):
    from train.__main__ import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: stpm\nepochz: 3\n")
    rc = main(["fit", "--config", str(cfg), "--data", str(good_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "epochz" in err and str(cfg) in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, key",
    [
        ('  embedding: "false"', "model_args.embedding: expected true/false"),
        ("  embeding: true", "unknown key model_args.embeding"),
        ("  stages: [1, two]", "model_args.stages[1]: expected an integer"),
        ("  sigma: wide", "model_args.sigma: expected a number"),
    ],
)
def test_cli_refuses_a_wrong_model_argument(tmp_path, capsys, good_dir, line, key):
    # model_args are typed by the model's constructor (train.models.args_class): a string
    # "false" used to become True through bool().
    from train.__main__ import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: dskd\nmodel_args:\n{line}\n")
    rc = main(["fit", "--config", str(cfg), "--data", str(good_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and str(cfg) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_example_config_loads_and_cli_overrides():
    from train.fit import load_config

    cfg = load_config(ROOT / "configs" / "train_stpm.yaml", {"epochs": 3, "data": "x"})
    assert cfg.model == "stpm" and cfg.epochs == 3 and cfg.data == "x"
    assert cfg.model_args == {"stages": [1, 2, 4], "combine_scales": "product", "sigma": 4.0}
    defaults = TrainConfig()
    assert (cfg.image_size, cfg.batch_size, cfg.lr) == (
        defaults.image_size,
        defaults.batch_size,
        defaults.lr,
    )


@pytest.mark.parametrize("kind", ["dskd", "mtkd"])
def test_fit_resume_and_checkpoint_new_models(kind, tmp_path, good_dir):
    """DSKD (two students + embedding) and MTKD (two teachers, importance logits in their own
    optimiser group) train, resume identically and reload with their learned state."""
    fit(_cfg(good_dir, tmp_path / "full", model=kind), progress=False)
    fit(_cfg(good_dir, tmp_path / "part", model=kind, epochs=1), progress=False)
    fit(_cfg(good_dir, tmp_path / "part", model=kind, epochs=2), resume=True, progress=False)
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert part == full and len(full) == 2

    model, meta = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert meta["kind"] == kind and not model.training
    assert bool(model.scale.fitted)  # the map's quantile normalisation was fitted and saved
    if kind == "mtkd":
        # learned importance weights moved off uniform and came back from the checkpoint
        w = model.importance()
        assert not torch.allclose(w, torch.full_like(w, 0.5))
    x = torch.rand(1, 3, S, S) * 255
    with torch.no_grad():
        amap, score = model(x)
    assert amap.shape == (1, 1, S, S) and torch.isfinite(score).all()


def test_cosine_schedule_resumes_after_an_interruption(tmp_path, good_dir, monkeypatch):
    import train.fit as fit_mod
    from train.fit import lr_factor

    # warm-up to the base lr, then down to 0 at the last step
    f = [lr_factor("cosine", i, 40) for i in range(40)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert lr_factor("constant", 7, 40) == 1.0

    cos = dict(lr_schedule="cosine", epochs=3)
    fit(_cfg(good_dir, tmp_path / "full", **cos), progress=False)
    full = json.loads((tmp_path / "full" / "history.json").read_text())

    real_tqdm = fit_mod.tqdm

    def dies_in_epoch_2(it, desc="", **kw):  # the process is killed during epoch 2
        if desc.startswith("epoch 2/"):
            raise KeyboardInterrupt
        return real_tqdm(it, desc=desc, **kw)

    monkeypatch.setattr(fit_mod, "tqdm", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(good_dir, tmp_path / "part", **cos), progress=False)
    monkeypatch.setattr(fit_mod, "tqdm", real_tqdm)
    fit(_cfg(good_dir, tmp_path / "part", **cos), resume=True, progress=False)
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert part == full and len(full) == 3
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert last["scheduler"]["last_epoch"] == last["step"] == full[-1]["step"]


@pytest.mark.parametrize("kind", ["stpm", "dskd", "mtkd", "patchcore"])
def test_model_configs_load_and_build(kind):
    from train.fit import load_config
    from train.models import build_model

    cfg = load_config(ROOT / "configs" / f"train_{kind}.yaml", {"data": "x"})
    assert cfg.model == kind
    # every model_args key of the example config is a real switch of the model
    model = build_model(kind, **cfg.model_args, image_size=64, pretrained=False)
    for key, value in cfg.model_args.items():
        assert model.args[key] == value, key


def test_crop_and_rot90_give_training_windows(good_dir):
    """crop: random windows of the model input; rot90: quarter turns; val stays whole."""
    torch.manual_seed(0)
    train, val, _ = load_good_images(good_dir, 64, val_fraction=0.34, augment=["rot90"], crop=32)
    full = torch.from_numpy(train.load(0)).float()
    windows = [train[0] for _ in range(12)]
    assert all(w.shape == (3, 32, 32) for w in windows) and val[0].shape == (3, 64, 64)
    assert len(train) == 4 * len(train.files)  # an epoch: (64 // 32)^2 windows per image
    # every window is some quarter turn of a 32x32 block of the whole input
    for w in windows:
        assert any(
            (torch.rot90(w, -k, (-2, -1)) == full[:, y : y + 32, x : x + 32]).all()
            for k in range(4)
            for y in range(33)
            for x in range(33)
        )
    assert len({tuple(w.flatten()[:64].tolist()) for w in windows}) > 1  # they differ
    with pytest.raises(ValueError, match="crop"):
        load_good_images(good_dir, 64, crop=96)


def test_fit_on_crops(tmp_path, good_dir):
    """DSKD trains on crops and its checkpoint maps whole images; bad crop values and a model
    that needs whole images (MTKD's paper variant) are config errors naming the key."""
    a = fit(_cfg(good_dir, tmp_path / "a", model="dskd", image_size=64, crop=32), progress=False)
    model, meta = load_checkpoint(a)
    with torch.no_grad():
        amap, score = model(torch.rand(1, 3, 64, 64) * 255)
    assert amap.shape == (1, 1, 64, 64) and torch.isfinite(score).all()
    for bad in (48, 96):
        with pytest.raises(ConfigError, match="crop"):
            fit(_cfg(good_dir, tmp_path / "b", image_size=64, crop=bad), progress=False)
    with pytest.raises(ConfigError, match="crop: model 'mtkd' needs whole images"):
        cfg = _cfg(good_dir, tmp_path / "c", model="mtkd", image_size=64, crop=32)
        cfg.model_args = {"variant": "paper"}
        fit(cfg, progress=False)
