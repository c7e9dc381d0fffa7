"""Every image-encoder family: shape contract, finite outputs, a gradient for every trainable parameter.

Random weights, tiny inputs, CPU. Full-size registry variants are checked on the meta device (shapes only,
no memory, no compute), which also proves the registry's image_encoder_args are valid keywords.
"""

from __future__ import annotations

import inspect
import io
import warnings

import pytest
import torch
from torch import nn

from converseg_core.modeling.efficientnet_lite import LiteImageEncoder
from converseg_core.modeling.image_encoder import ImageEncoderViT
from converseg_core.modeling.student import StudentCNN
from converseg_core.modeling.tiny_vit import TinyViT
from converseg_core.registry import get_config, list_models

ENCODERS: dict[str, type[nn.Module]] = {
    "sam_vit": ImageEncoderViT,
    "tiny_vit": TinyViT,
    "student_cnn": StudentCNN,
    "efficientnet_lite": LiteImageEncoder,
}

# Small but structurally complete members of each family.
SMALL: dict[str, dict] = {
    "sam_vit": dict(embed_dim=64, depth=3, num_heads=4, window_size=4, global_attn_indexes=(1,)),
    "tiny_vit": dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10)),
    "student_cnn": dict(widths=(32, 64, 128, 256), depths=(1, 2, 3, 2)),
}


def _build(family: str, img_size: int, args: dict) -> nn.Module:
    cls = ENCODERS[family]
    kwargs = dict(args, img_size=img_size)
    if "out_chans" in inspect.signature(cls).parameters:
        kwargs["out_chans"] = 256
    return cls(**kwargs)


@pytest.mark.parametrize("name", list_models())
def test_registry_encoders_build_and_keep_the_shape_contract(name: str) -> None:
    cfg = get_config(name)
    if cfg.image_encoder not in ENCODERS:
        pytest.fail(f"{name}: unknown image_encoder family {cfg.image_encoder!r}")
    with torch.device("meta"):
        encoder = _build(cfg.image_encoder, cfg.img_size, cfg.image_encoder_args)
        out = encoder(torch.empty(1, 3, cfg.img_size, cfg.img_size))
    if isinstance(out, tuple):  # (embedding, detail features at stride 4, ImageNet concepts)
        out, hires, concepts = out
        g = cfg.concept_grid
        assert concepts.shape == (1, cfg.text_hidden_dim, g, g)
        assert hires.shape == (1, cfg.prompt_embed_dim // 8, cfg.img_size // 4, cfg.img_size // 4)
    assert out.shape == (1, cfg.prompt_embed_dim, cfg.embed_size, cfg.embed_size)


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("img_size", [64, 128])
def test_encoder_shape_and_finite(family: str, img_size: int) -> None:
    torch.manual_seed(0)
    encoder = _build(family, img_size, SMALL[family]).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 256, img_size // 16, img_size // 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", sorted(SMALL))
def test_encoder_gradients_reach_every_trainable_parameter(family: str) -> None:
    torch.manual_seed(0)
    encoder = _build(family, 64, SMALL[family]).train()
    # Zero-initialised tensors (rel-pos tables, attention biases, residual BN scales, pos_embed) would get
    # a zero gradient for legitimate reasons or hide a disconnected one: give them values first.
    with torch.no_grad():
        for p in encoder.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    out = encoder(torch.randn(2, 3, 64, 64))
    (out * torch.randn_like(out)).sum().backward()
    trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    frozen = sorted(n for n, p in encoder.named_parameters() if not p.requires_grad)
    if family == "tiny_vit":
        # Only the unused ImageNet head that mobile_sam.pt stores is frozen.
        assert frozen == ["head.bias", "head.weight", "norm_head.bias", "norm_head.weight"]
    else:
        assert frozen == []


def test_student_is_small() -> None:
    cfg = get_config("converseg_edge")
    student = _build("student_cnn", cfg.img_size, cfg.image_encoder_args)
    assert sum(p.numel() for p in student.parameters()) < 2_000_000
    # Export-friendly: nothing but convs, BatchNorm, ReLU and the neck's LayerNorm2d.
    allowed = (
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Sequential,
        type(student.neck[1]),
        type(student.stages[0][0]),
    )
    assert all(isinstance(m, allowed) for m in student.modules() if m is not student)


def test_student_exports_to_plain_onnx_ops() -> None:
    """The edge encoder exports with a handful of standard ops and matches PyTorch in ONNX Runtime."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    student = StudentCNN(img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (x,), buf, input_names=["image"], opset_version=17, dynamo=False)
    ops = {node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node}
    assert ops <= {
        "Conv",
        "Relu",
        "Add",
        "Sub",
        "Mul",
        "Transpose",
        "LayerNormalization",  # the neck's LayerNorm2d, between two transposes
        "Constant",
        "Identity",
    }
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert float((torch.from_numpy(out) - student(x)).abs().max()) < 1e-4
