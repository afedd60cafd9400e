"""Backbone registry: shapes, strides, frozen teachers, weight loading."""

from __future__ import annotations

import pytest
import torch

from train.backbones import BACKBONES, BackboneError, build_backbone

S = 64  # tiny input: fast on 2 CPU cores
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", LITE)
def test_lite_shapes_strides_channels(name):
    fe = build_backbone(name, S, stages=[0, 1, 2, 3, 4, 5, 6]).freeze()
    assert fe.strides == [2, 4, 8, 16, 16, 32, 32]
    wide = name == "efficientnet_lite2"  # 1.1x width multiplier
    assert fe.channels == (
        [16, 24, 48, 88, 120, 208, 352] if wide else [16, 24, 40, 80, 112, 192, 320]
    )
    with torch.no_grad():
        feats = fe(torch.randn(2, 3, S, S))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, S // s, S // s) for c, s in zip(fe.channels, fe.strides, strict=True)
    ]


def test_default_stages_and_truncation():
    fe = build_backbone("efficientnet_lite0", S)
    assert fe.out_indices == list(BACKBONES["efficientnet_lite0"].default_stages) == [1, 2, 4]
    assert fe.channels == [24, 40, 112] and fe.strides == [4, 8, 16]
    assert len(fe.stages) == 5  # nothing after the last requested stage is kept or run
    assert fe.mean == (127.0, 127.0, 127.0) and fe.std == (128.0, 128.0, 128.0)


def test_frozen_teacher_stays_in_eval():
    teacher = build_backbone("efficientnet_lite0", S, stages=[1]).freeze()
    parent = torch.nn.ModuleDict(
        {
            "teacher": teacher,
            "student": build_backbone("efficientnet_lite0", S, stages=[1], pretrained=False),
        }
    )
    parent.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert parent["student"].training
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher(torch.rand(2, 3, S, S))  # a forward in "train" must not touch BN statistics
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_pretrained_differs_from_random():
    a = build_backbone("efficientnet_lite0", S, stages=[1])
    b = build_backbone("efficientnet_lite0", S, stages=[1], pretrained=False)
    w = "stem.0.weight"
    assert not torch.equal(a.state_dict()[w], b.state_dict()[w])


def test_weights_from_local_file(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(123)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=S)
    state = net.state_dict()
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    fe = build_backbone("efficientnet_lite0", S, stages=[1, 2], weights=path)
    got = fe.state_dict()
    assert torch.equal(got["stem.0.weight"], state["_conv_stem.weight"])
    assert torch.equal(got["stem.1.running_var"], state["_bn0.running_var"])
    # stage 1 = blocks 1..2 of lite0; stage 2 = blocks 3..4
    assert torch.equal(
        got["stages.2.1._project_conv.weight"], state["_blocks.4._project_conv.weight"]
    )
    # the classifier head is optional, anything else missing is an error
    torch.save({k: v for k, v in state.items() if not k.startswith("_fc.")}, path)
    build_backbone("efficientnet_lite0", S, stages=[1], weights=path)
    torch.save({k: v for k, v in state.items() if k != "_bn0.weight"}, path)
    with pytest.raises(BackboneError, match="_bn0.weight"):
        build_backbone("efficientnet_lite0", S, stages=[1], weights=path)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone("vgg16", S)
    with pytest.raises(BackboneError, match="stages"):
        build_backbone("efficientnet_lite0", S, stages=[2, 1])
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("efficientnet_lite0", S, weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_backbone("efficientnet_lite0", S, weights=tmp_path / "junk.pth")


@pytest.mark.skipif(_has_torchvision(), reason="checks the error raised without torchvision")
def test_resnet18_without_torchvision_names_it():
    with pytest.raises(BackboneError, match="torchvision"):
        build_backbone("resnet18", S)


@pytest.mark.skipif(not _has_torchvision(), reason="torchvision is not installed")
def test_resnet18_shapes_and_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    fe = build_backbone("resnet18", S, weights=path).freeze()
    assert fe.channels == [64, 128, 256] and fe.strides == [4, 8, 16]
    assert torch.equal(fe.state_dict()["stem.0.weight"], state["conv1.weight"])
    with torch.no_grad():
        feats = fe(torch.randn(1, 3, S, S))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
