"""PatchCore reference model: coreset, nearest-neighbour map, fit -> checkpoint -> export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.models import build_model
from train.models.patchcore.anomaly_map import nearest_distance
from train.models.patchcore.coreset import greedy_coreset

S = 64


def test_greedy_coreset_covers_every_cluster():
    # Four tight clusters of very different sizes: four greedy picks land one in each (a
    # random sample of four would usually miss the small clusters).
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    sizes = [1000, 10, 10, 10]
    x = torch.cat(
        [c + 0.1 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes, strict=True)]
    )
    idx = greedy_coreset(x, 4, seed=0)
    assert sorted(torch.cdist(x[idx], centres).argmin(1).tolist()) == [0, 1, 2, 3]
    assert len(set(idx.tolist())) == 4
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(x, 0)


def test_nearest_distance_matches_brute_force():
    torch.manual_seed(0)
    emb = torch.randn(2, 5, 3, 4)
    bank = torch.randn(7, 5)
    d = nearest_distance(emb, bank.t(), (bank * bank).sum(1))
    x = emb.permute(0, 2, 3, 1).reshape(-1, 5)
    ref = torch.cdist(x, bank).min(1).values.view(2, 3, 4)
    assert d.shape == (2, 1, 3, 4)
    torch.testing.assert_close(d[:, 0], ref, atol=1e-4, rtol=1e-4)


def test_a_patch_in_the_bank_gets_the_distance_floor_whatever_the_summation_order():
    # |x|^2 - 2 x.m + |m|^2 cancels to float32 noise for a patch that is in the bank, and the
    # square root magnified that noise past the export's parity limit; the floor makes every
    # summation order (every runtime) give the same distance.
    torch.manual_seed(0)
    bank = torch.randn(64, 32) * 30 + 5
    emb = bank[:12].t().reshape(1, 32, 3, 4)
    floor = (1e-5 * (bank * bank).sum(1).mean()).sqrt()
    for perm in (torch.arange(32), torch.randperm(32)):
        d = nearest_distance(emb[:, perm], bank[:, perm].t(), (bank * bank).sum(1))
        torch.testing.assert_close(d.flatten(), floor.expand(12), rtol=1e-3, atol=0)


def test_bank_of_a_training_image_scores_it_near_zero_and_an_unseen_one_higher():
    torch.manual_seed(0)
    model = build_model("patchcore", image_size=S, coreset_ratio=1.0)
    good = torch.rand(1, 3, S, S) * 255
    model.fit_memory([good])
    other = torch.rand(1, 3, S, S) * 255
    with torch.no_grad():
        s_good = model(good)[1].item()
        s_other = model(other)[1].item()
    # not exactly 0: |x|^2 - 2x.m + |m|^2 cancels in float32 (|x|^2 ~ 1e3 here)
    assert s_good < 0.05 * s_other


def test_fit_checkpoint_export_roundtrip(tmp_path):
    import cv2

    from engines.export import export
    from train.checkpoint import load_checkpoint
    from train.fit import fit, load_config

    rng = np.random.default_rng(0)
    data = tmp_path / "good"
    data.mkdir()
    for i in range(6):
        cv2.imwrite(str(data / f"{i}.png"), rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
    cfg = load_config(None, {"model": "patchcore", "data": str(data), "out": str(tmp_path / "run")})
    cfg.image_size = S
    ckpt = fit(cfg, progress=False)
    model, meta = load_checkpoint(ckpt)
    n = meta["provenance"]["memory_bank"]
    assert model.memory.shape[0] == n >= 1
    assert not (tmp_path / "run" / "loss.png").exists()  # nothing was trained
    bundle = tmp_path / "bundle"
    export(tmp_path / "run", bundle)  # raises if ONNX Runtime disagrees with torch
    assert (bundle / "model.onnx").stat().st_size > n * 4 * model.memory.shape[1]
