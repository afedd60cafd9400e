"""Every model in train.models.MODELS: training step, eval outputs, ONNX export + ORT parity.

The shared test is parametrised over MODELS, so models registered later are covered with no
change here (they must build with defaults plus image_size).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from train.models import MODELS, build_model
from train.models.common import (
    GaussianBlur,
    MapNorm,
    Normalize,
    combine,
    cosine_distance,
    l2_normalize,
)

S = 64  # tiny input: the whole file runs in seconds on 2 CPU cores
B = 2


class _Uint8Input(torch.nn.Module):
    """What engines/export ships: uint8 (B,3,H,W) in, cast to float inside the graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x.float())


def export_and_check(model: torch.nn.Module, path) -> None:
    """ONNX opset 17, static shapes, uint8 input as shipped; ONNX Runtime parity."""
    import onnx
    import onnxruntime as ort

    model.eval()
    x8 = (torch.rand(B, 3, S, S) * 255).to(torch.uint8)
    # eval() on the wrapper too: the exporter restores the wrapper's mode after export, and a
    # wrapper left in train mode would switch the model back to train mode with it.
    wrapped = _Uint8Input(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapped,
            (x8,),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["image"],
            output_names=["anomaly_map", "score"],
        )
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 17
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert dims == {"anomaly_map": [B, 1, S, S], "score": [B]}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    o_map, o_score = sess.run(None, {"image": x8.numpy()})
    assert not model.training
    with torch.no_grad():
        t_map, t_score = model(x8.float())
    np.testing.assert_allclose(o_map, t_map.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(o_score, t_score.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_contract(kind, tmp_path):
    torch.manual_seed(0)
    model = build_model(kind, image_size=S)
    # args are JSON-serialisable and rebuild the same architecture
    args = json.loads(json.dumps(model.args))
    assert args["image_size"] == S
    rebuilt = build_model(kind, **{**args, "pretrained": False})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()

    x = torch.rand(B, 3, S, S) * 255
    if hasattr(model, "fit_memory"):
        # a memory model: no parameter to train, the bank is filled from good images
        assert not any(p.requires_grad for p in model.parameters())
        n = model.fit_memory([x, torch.rand(B, 3, S, S) * 255])
        assert model.memory.shape[0] == n >= 1
    else:
        # training: scalar loss, gradients reach trainable parameters only
        model.train()
        loss = model.training_loss(x)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        if hasattr(model, "fit_map_normalization"):
            model.eval()
            model.fit_map_normalization([x])

    # eval: (anomaly_map (B,1,S,S), score (B,)) float32, score = max of the map
    model.eval()
    with torch.no_grad():
        amap, score = model(x)
    assert amap.shape == (B, 1, S, S) and amap.dtype == torch.float32
    assert score.shape == (B,) and score.dtype == torch.float32
    assert torch.isfinite(amap).all() and torch.isfinite(score).all()
    assert torch.allclose(score, amap.amax(dim=(1, 2, 3)))

    # ONNX opset 17, static shapes, uint8 input as shipped; ONNX Runtime parity
    export_and_check(model, tmp_path / f"{kind}.onnx")


def test_build_model_errors():
    with pytest.raises(ValueError, match="stpm"):
        build_model("nope")
    with pytest.raises(ValueError, match="bogus"):
        build_model("stpm", image_size=S, bogus=1)


def test_stpm_student_equal_to_teacher_gives_zero():
    model = build_model("stpm", image_size=S)
    model.student.load_state_dict(model.teacher.state_dict())
    model.eval()
    x = torch.rand(1, 3, S, S) * 255
    with torch.no_grad():
        assert model.training_loss(x).item() < 1e-5
        amap, score = model(x)
    assert amap.abs().max().item() < 1e-5 and score.item() < 1e-5


def test_stpm_teacher_frozen_in_train_mode():
    model = build_model("stpm", image_size=S).train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_common_blocks():
    n = Normalize((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
    assert torch.allclose(n(torch.full((1, 3, 2, 2), 255.0)), torch.ones(1, 3, 2, 2))
    a = torch.randn(2, 8, 5, 5)
    assert cosine_distance(a, a).abs().max() < 1e-4
    assert torch.allclose(cosine_distance(a, -a), torch.full((2, 1, 5, 5), 2.0), atol=1e-4)
    blur = GaussianBlur(4.0, (S, S))
    # border-corrected: a constant map stays constant up to the edges, mass is kept inside
    assert torch.allclose(blur(torch.full((1, 1, S, S), 3.0)), torch.full((1, 1, S, S), 3.0))
    impulse = torch.zeros(1, 1, S, S)
    impulse[0, 0, S // 2, S // 2] = 1.0
    out = blur(impulse)
    assert abs(out.sum().item() - 1.0) < 1e-4 and out.argmax().item() == S // 2 * S + S // 2


def test_combine_and_running_scale():
    a, b = torch.full((1, 1, 2, 2), 0.04), torch.full((1, 1, 2, 2), 0.01)
    assert torch.allclose(combine([a, b], "mean"), torch.full_like(a, 0.025))
    assert torch.equal(combine([a, b], "max"), a)
    # product = geometric mean: same pixel order as the plain product, range of one map
    assert torch.allclose(combine([a, b], "product"), torch.full_like(a, 0.02))
    assert torch.equal(combine([b - 1e-7, b], "product"), combine([b - 1e-7, b], "product"))
    assert combine([torch.full_like(a, -1e-7), b], "product").min() >= 0  # no NaN from rounding
    with pytest.raises(ValueError, match="median"):
        combine([a, b], "median")
    v = torch.randn(2, 5, 3, 3)
    assert torch.allclose(l2_normalize(v).norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)

    rs = MapNorm([(2, 2), (2, 2)], momentum=0.5)
    rs.update([torch.full((1, 1, 2, 2), 4.0), torch.full((1, 1, 2, 2), 2.0)])
    assert rs.mean.tolist() == [4.0, 2.0]  # first batch replaces the init
    rs.update([torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 2.0)])
    assert rs.mean.tolist() == [3.0, 2.0]
    out = rs([torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 1.0)])
    assert out[0].unique().item() == 1.0 and out[1].unique().item() == 0.5


def test_map_norm_quantiles_per_border_ring():
    # Good maps whose border ring runs 10x hotter than the interior: after the fit, a good
    # map's border and interior land in the same range, and a hot interior pixel stands out.
    torch.manual_seed(0)
    good = torch.rand(50, 1, 8, 8)
    good[..., 0, :] *= 10
    good[..., -1, :] *= 10
    good[..., :, 0] *= 10
    good[..., :, -1] *= 10
    norm = MapNorm([(8, 8)], rings=1)
    norm.fit([[good]])
    out = norm([good])[0]
    ring = out[..., 0, :].flatten()
    inner = out[..., 2:-2, 2:-2].flatten()
    assert abs(ring.quantile(0.995) - 1) < 0.05 and abs(inner.quantile(0.995) - 1) < 0.05
    hot = good[:1].clone()
    hot[..., 4, 4] = 3.0  # 3x the interior's good maximum, a third of the border's
    assert norm([hot])[0][..., 4, 4].item() > norm([good])[0][..., 0, :].max().item()


# ---------------------------------------------------------------------------- DSKD


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_dskd_students_and_interaction():
    torch.manual_seed(0)
    x = torch.rand(B, 3, S, S) * 255
    both = build_model("dskd", image_size=S)
    assert both.active == ["se", "sd"] and both.sd is not None
    # pyramid matching: both students against the teacher at every scale, fine -> coarse
    d = both.distances(x)
    assert (
        [t.shape[-1] for t in d["se"]]
        == [S // 4, S // 8, S // 16]
        == [t.shape[-1] for t in d["sd"]]
    )
    se_only = build_model("dskd", image_size=S, students="se")
    assert se_only.sd is None and se_only.embed is None and list(se_only.distances(x)) == ["se"]

    # Sd fed by Se (the paper): with interaction Sd's loss trains Se; without, Se gets nothing.
    # Sd fed by the frozen teacher (the default): Se gets nothing from Sd either.
    for sd_input, interaction, se_trained in (
        ("se", True, True),
        ("se", False, False),
        ("teacher", True, False),
    ):
        m = build_model(
            "dskd", image_size=S, students="sd", interaction=interaction, sd_input=sd_input
        ).train()
        m.training_loss(x).backward()
        assert (_grads(m.se) > 0) == se_trained
        assert _grads(m.sd) > 0 and _grads(m.embed) > 0


def test_dskd_se_equal_to_teacher_gives_zero():
    model = build_model("dskd", image_size=S, students="se", map_norm="none")
    model.se.load_state_dict(model.teacher.state_dict())
    model.eval()
    x = torch.rand(1, 3, S, S) * 255
    with torch.no_grad():
        assert model.training_loss(x).item() < 1e-5
        amap, score = model(x)
    assert amap.abs().max().item() < 1e-5 and score.item() < 1e-5


def test_dskd_match_scales_and_embedding_switch():
    x = torch.rand(1, 3, S, S) * 255
    m = build_model("dskd", image_size=S, match_scales=[2])
    assert m.match_strides == [16] and [t.shape[-1] for t in m.distances(x)["sd"]] == [S // 16]
    fused = build_model("dskd", image_size=S)
    plain = build_model("dskd", image_size=S, embedding=False)
    assert len(fused.embed.branches) == 3 and not hasattr(plain.embed, "branches")
    assert sum(p.numel() for p in plain.embed.parameters()) < sum(
        p.numel() for p in fused.embed.parameters()
    )


def test_dskd_map_fused_its_own_way_keeps_the_score():
    # The map may take its own scale fusion and smoothing (localisation) while the score stays
    # the max of the default fusion (the image decision): same weights, same score.
    torch.manual_seed(0)
    x = torch.rand(2, 3, S, S) * 255
    base = build_model("dskd", image_size=S, map_norm="none").eval()
    args = {k: v for k, v in base.args.items() if k != "teacher_weights"}
    split = build_model("dskd", **{**args, "map_combine_scales": "max", "map_sigma": 2.0})
    whole = build_model("dskd", **{**args, "combine_scales": "max", "sigma": 2.0})
    for m in (split, whole):
        m.load_state_dict(base.state_dict())
        m.eval()
    with torch.no_grad():
        (m0, s0), (m1, s1), (m2, _) = base(x), split(x), whole(x)
    assert torch.equal(s0, s1) and torch.allclose(m1, m2) and not torch.allclose(m0, m1)


@pytest.mark.parametrize(
    "bad",
    [
        {"map_combine_scales": "median"},
        {"students": "three"},
        {"combine_scales": "median"},
        {"combine_students": "sum"},
        {"match_scales": [2, 0]},
        {"match_scales": [3]},
        {"match_scales": []},
    ],
)
def test_dskd_rejects_bad_switches(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_model("dskd", image_size=S, **bad)


@pytest.mark.parametrize(
    "kind,args",
    [
        ("dskd", {"combine_scales": "product", "combine_students": "max"}),
        ("dskd", {"students": "sd", "embedding": False, "match_scales": [0, 2]}),
        ("dskd", {"map_combine_scales": "max", "map_sigma": 8.0}),
        ("mtkd", {"weights": "uniform", "reconstruction": False}),
    ],
)
def test_ablation_variants_export(kind, args, tmp_path):
    """The ablation switches change the graph (Pow, Max, fewer branches): each still exports
    with ONNX Runtime parity."""
    torch.manual_seed(0)
    model = build_model(kind, image_size=S, **args).train()
    model.training_loss(torch.rand(B, 3, S, S) * 255)  # non-trivial running scales
    export_and_check(model, tmp_path / "variant.onnx")


# ---------------------------------------------------------------------------- MTKD


def test_mtkd_teachers_and_param_groups():
    m = build_model("mtkd", image_size=S)
    assert m.args["teachers"] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert all(not t.training for t in m.teachers.train()) and m.student.training
    assert torch.allclose(m.importance(), torch.full((2,), 0.5))
    groups = m.param_groups(1e-3)
    assert groups[1]["params"] == [m.logits] and groups[1]["weight_decay"] == 0.0
    assert groups[1]["lr"] == m.weight_lr and all(p is not m.logits for p in groups[0]["params"])
    uniform = build_model("mtkd", image_size=S, weights="uniform")
    assert not uniform.logits.requires_grad and len(uniform.param_groups(1e-3)) == 1
    for bad in (["efficientnet_lite0"], ["efficientnet_lite0", "efficientnet_lite0"]):
        with pytest.raises(ValueError, match="two or more"):
            build_model("mtkd", image_size=S, teachers=bad)
    with pytest.raises(ValueError, match="weights"):
        build_model("mtkd", image_size=S, weights="best")


def test_mtkd_weight_step_converges_to_boltzmann_weights():
    """Minimising the weight objective over the logits alone reaches w ~ exp(-(e/mean e)/T):
    the better-reconstructed teacher gets more weight, the entropy keeps the other in play."""
    from train.models.mtkd.loss import weight_objective

    errors, temp = torch.tensor([0.1, 0.3]), 0.5
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(500):
        opt.zero_grad()
        obj = weight_objective(errors, logits, temp)
        assert obj.item() == 0.0  # gradient only, no value in the reported loss
        obj.backward()
        opt.step()
    target = torch.softmax(-(errors / errors.mean()) / temp, 0)
    assert torch.allclose(torch.softmax(logits, 0), target, atol=1e-3)
    assert target[0] > 0.7


def test_mtkd_learned_weights_move_and_reconstruction_term():
    torch.manual_seed(0)
    m = build_model("mtkd", image_size=S).train()
    opt = torch.optim.AdamW(m.param_groups(1e-3))
    x = torch.rand(B, 3, S, S) * 255
    for _ in range(3):
        opt.zero_grad()
        m.training_loss(x).backward()
        opt.step()
    assert not torch.allclose(m.importance(), torch.full((2,), 0.5))
    m.eval()
    with torch.no_grad():
        with_rec = m(x)[0]
        m.reconstruction = False  # the score term only; the weights stay learned
        without = m(x)[0]
        assert not torch.allclose(with_rec, without)
        for p in m.ae.parameters():  # without the term, the autoencoder does not touch the map
            p.add_(1.0)
        assert torch.equal(m(x)[0], without)
