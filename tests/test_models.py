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
from train.models.common import GaussianBlur, Normalize, cosine_distance

S = 64  # tiny input: the whole file runs in seconds on 2 CPU cores
B = 2


class _Uint8Input(torch.nn.Module):
    """What engines/export ships: uint8 (B,3,H,W) in, cast to float inside the graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x.float())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_contract(kind, tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(kind, image_size=S)
    # args are JSON-serialisable and rebuild the same architecture
    args = json.loads(json.dumps(model.args))
    assert args["image_size"] == S
    rebuilt = build_model(kind, **{**args, "pretrained": False})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()

    # training: scalar loss, gradients reach trainable parameters only
    model.train()
    x = torch.rand(B, 3, S, S) * 255
    loss = model.training_loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # eval: (anomaly_map (B,1,S,S), score (B,)) float32, score = max of the map
    model.eval()
    with torch.no_grad():
        amap, score = model(x)
    assert amap.shape == (B, 1, S, S) and amap.dtype == torch.float32
    assert score.shape == (B,) and score.dtype == torch.float32
    assert torch.isfinite(amap).all() and torch.isfinite(score).all()

    # ONNX opset 17, static shapes, uint8 input as shipped; ONNX Runtime parity
    path = tmp_path / f"{kind}.onnx"
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
