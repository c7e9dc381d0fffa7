"""Our SAM / MobileSAM blocks against the official implementations, with random weights.

Official segment-anything modules come from the `segment-anything==1.0` wheel (a dev dependency). Its
package `__init__` imports torchvision, which this project cannot install, so the `modeling` subpackage is
imported under a bare stand-in parent package; nothing of ours is patched.

Official MobileSAM's TinyViT (`mobile_sam/modeling/tiny_vit_sam.py`, Apache-2.0) is not on PyPI as a
usable dependency (it needs timm); `scripts/fetch_reference_code.sh` takes that one file from the
`mobilesam-mirror==1.0.0` wheel into `.cache/reference/` (checked by sha256). It is loaded with minimal
stand-ins for the three timm helpers it imports. The TinyViT tests skip, saying so, when the cache is absent.

Every test: build official, randomise every parameter and buffer, load its state_dict into ours with
strict=True, and compare outputs (max abs diff < 1e-5). Full-size key sets and shapes are compared on the
meta device, so they cost nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from converseg_core.modeling.image_encoder import ImageEncoderViT
from converseg_core.modeling.mask_decoder import MaskDecoder
from converseg_core.modeling.prompt_encoder import PromptEncoder
from converseg_core.modeling.tiny_vit import TinyViT
from converseg_core.modeling.transformer import TwoWayTransformer
from converseg_core.registry import get_config

REPO = Path(__file__).resolve().parents[1]
TINY_VIT_REF = REPO / ".cache" / "reference" / "mobile_sam" / "tiny_vit_sam.py"
TINY_VIT_REF_SHA256 = "e6432ce8eee4727e921ab5b0530631fd71453f760247734f8fe63604cff4d303"
TOL = 1e-5


@contextmanager
def _stand_in_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """Put modules into sys.modules for the duration of an import, then restore what was there."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture(scope="module")
def sam() -> types.ModuleType:
    """segment_anything.modeling without the torchvision-dependent package __init__."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything==1.0 is not installed (pip install -e '.[dev]')")
    parent = types.ModuleType("segment_anything")
    parent.__path__ = list(spec.submodule_search_locations)
    names = [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]
    saved = {n: sys.modules.pop(n) for n in names}
    try:
        with _stand_in_modules({"segment_anything": parent}):
            modeling = importlib.import_module("segment_anything.modeling")
    finally:
        for n in [n for n in sys.modules if n.startswith("segment_anything.")]:
            sys.modules.pop(n)
        sys.modules.update(saved)
    return modeling


@pytest.fixture(scope="module")
def official_tiny_vit() -> types.ModuleType:
    """Official MobileSAM tiny_vit_sam.py, loaded with stand-ins for timm's DropPath/to_2tuple/trunc_normal_."""
    if not TINY_VIT_REF.is_file():
        pytest.skip(f"{TINY_VIT_REF.relative_to(REPO)} missing: run scripts/fetch_reference_code.sh")
    digest = hashlib.sha256(TINY_VIT_REF.read_bytes()).hexdigest()
    assert digest == TINY_VIT_REF_SHA256, f"unexpected reference file {TINY_VIT_REF} (sha256 {digest})"

    class DropPath(nn.Module):  # only built when drop_path_rate > 0, never in these tests
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, tuple | list) else (x, x)
    layers.trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    stand_ins = {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }
    spec = importlib.util.spec_from_file_location("_official_tiny_vit_sam", TINY_VIT_REF)
    module = importlib.util.module_from_spec(spec)
    with _stand_in_modules(stand_ins):
        spec.loader.exec_module(module)
    return module


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every float parameter and buffer with noise, so a swapped or unused tensor shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif t.dim() == 1 and name.endswith("weight"):  # norm scales: stay near 1
                t.copy_(1.0 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    return module


def _load_strict(ours: nn.Module, official: nn.Module) -> None:
    result = ours.load_state_dict(official.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, relative to the reference's scale where that exceeds 1: float32 rounding, not a
    different computation, must be all that separates the two (LayerNorm2d, for one, runs as F.layer_norm
    here and as written-out reductions in the official code)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------- prompt encoder, decoder


def _prompt_encoder_kwargs(embed: int) -> dict:
    return dict(embed_dim=256, image_embedding_size=(embed, embed), input_image_size=(16 * embed, 16 * embed))


def test_prompt_encoder_matches_official(sam: types.ModuleType) -> None:
    torch.manual_seed(0)
    official = _randomize(sam.PromptEncoder(mask_in_chans=16, **_prompt_encoder_kwargs(16))).eval()
    ours = PromptEncoder(mask_in_chans=16, **_prompt_encoder_kwargs(16)).eval()
    _load_strict(ours, official)

    with torch.no_grad():
        assert _max_diff(ours.get_dense_pe(), official.get_dense_pe()) < TOL
        points = torch.rand(3, 2, 2) * 256
        labels = torch.tensor([[1, 0], [0, -1], [1, 1]])
        boxes = torch.rand(3, 4) * 256
        masks = torch.randn(3, 1, 64, 64)
        for args in [((points, labels), None, None), ((points, labels), boxes, masks), (None, boxes, None)]:
            for a, b in zip(ours(*args), official(*args), strict=True):
                assert _max_diff(a, b) < TOL
        sparse, dense = ours(None, None, None)
        assert sparse.shape == (1, 0, 256) and dense.shape == (1, 256, 16, 16)


def _official_decoder(sam: types.ModuleType) -> nn.Module:
    transformer = sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    decoder = sam.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return _randomize(decoder).eval()


def _our_decoder() -> MaskDecoder:
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    ).eval()


@pytest.mark.parametrize("multimask_output", [True, False])
def test_mask_decoder_batch1_broadcast_matches_official(
    sam: types.ModuleType, multimask_output: bool
) -> None:
    torch.manual_seed(0)
    official = _official_decoder(sam)
    ours = _our_decoder()
    _load_strict(ours, official)
    n, h = 3, 8
    image = torch.randn(1, 256, h, h)
    pe = torch.randn(1, 256, h, h)
    sparse = torch.randn(n, 5, 256)
    dense = torch.randn(n, 256, h, h)
    with torch.no_grad():
        masks, iou = ours(image, pe, sparse, dense, multimask_output)
        ref_masks, ref_iou = official(image, pe, sparse, dense, multimask_output)
    outputs = 3 if multimask_output else 1
    assert masks.shape == (n, outputs, 4 * h, 4 * h) and iou.shape == (n, outputs)
    assert _max_diff(masks, ref_masks) < TOL
    assert _max_diff(iou, ref_iou) < TOL


def test_mask_decoder_batch_n_matches_official_loop(sam: types.ModuleType) -> None:
    # float64: a batched GEMM and N single ones round differently in float32 (~1e-5 relative), which
    # would hide nothing but makes an absolute 1e-5 bound flaky; in float64 any real difference stands out.
    torch.manual_seed(1)
    official = _official_decoder(sam).double()
    ours = _our_decoder()
    _load_strict(ours, official)
    ours = ours.double()
    n, h = 3, 8
    images = torch.randn(n, 256, h, h, dtype=torch.float64)
    pe = torch.randn(1, 256, h, h, dtype=torch.float64)
    sparse = torch.randn(n, 4, 256, dtype=torch.float64)
    dense = torch.randn(n, 256, h, h, dtype=torch.float64)
    with torch.no_grad():
        masks, iou = ours(images, pe, sparse, dense, True)
        for i in range(n):
            ref_masks, ref_iou = official(images[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], True)
            assert _max_diff(masks[i : i + 1], ref_masks) < TOL
            assert _max_diff(iou[i : i + 1], ref_iou) < TOL
        # The images really differ per prompt set: a batch-1 call must give other masks.
        first_only, _ = ours(images[:1], pe, sparse, dense, True)
        assert _max_diff(first_only[1:], masks[1:]) > 1e-3


# ----------------------------------------------------------------------------- SAM ViT image encoder


@pytest.mark.parametrize("name", ["converseg_vit_b", "converseg_vit_l", "converseg_vit_h"])
def test_sam_vit_full_size_keys_and_shapes_match_official(sam: types.ModuleType, name: str) -> None:
    """The registry's arguments build exactly the official sam_vit_{b,l,h} encoder state_dict (meta device)."""
    cfg = get_config(name)
    args = cfg.image_encoder_args
    with torch.device("meta"):
        official = sam.ImageEncoderViT(
            depth=args["depth"],
            embed_dim=args["embed_dim"],
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=args["num_heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=args["global_attn_indexes"],
            window_size=14,
            out_chans=256,
        )
        ours = ImageEncoderViT(img_size=cfg.img_size, out_chans=cfg.prompt_embed_dim, **args)
    assert _shapes(ours) == _shapes(official)
    ln = ours.blocks[0].norm1
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-6


def test_sam_vit_matches_official_small(sam: types.ModuleType) -> None:
    """A depth-reduced ViT at 256 px: window 7 on a 16 x 16 grid exercises padding, two global blocks."""
    kwargs = dict(
        img_size=256,
        patch_size=16,
        embed_dim=96,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=7,
        global_attn_indexes=(1, 3),
    )
    torch.manual_seed(0)
    official = _randomize(sam.ImageEncoderViT(**kwargs)).eval()
    ours = ImageEncoderViT(**kwargs).eval()
    _load_strict(ours, official)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (1, 256, 16, 16)
        assert _max_diff(out, official(x)) < TOL


# ----------------------------------------------------------------------------- MobileSAM TinyViT

MOBILE_SAM_ARGS = dict(
    in_chans=3,
    num_classes=1000,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def test_tiny_vit_full_size_keys_and_shapes_match_official(official_tiny_vit: types.ModuleType) -> None:
    """mobile_sam.pt's image_encoder keys and shapes, built as MobileSAM's builder and our registry do."""
    official = official_tiny_vit.TinyViT(img_size=1024, **MOBILE_SAM_ARGS)
    cfg = get_config("converseg_mobilesam")
    with torch.device("meta"):
        ours = TinyViT(img_size=cfg.img_size, **cfg.image_encoder_args)
    assert _shapes(ours) == _shapes(official)
    assert {"head.weight", "norm_head.weight", "neck.3.bias"} <= set(_shapes(ours))


def _official_tiny_vit_features(official: nn.Module, x: torch.Tensor, embed: int) -> torch.Tensor:
    """Official forward_features, with its hard-coded 64 x 64 output grid replaced by `embed`."""
    x = official.patch_embed(x)
    for layer in official.layers:
        x = layer(x)
    b, _, c = x.shape
    return official.neck(x.view(b, embed, embed, c).permute(0, 3, 1, 2))


def test_tiny_vit_matches_official_small(official_tiny_vit: types.ModuleType) -> None:
    torch.manual_seed(0)
    official = _randomize(official_tiny_vit.TinyViT(img_size=256, **MOBILE_SAM_ARGS)).eval()
    ours = TinyViT(img_size=256, **MOBILE_SAM_ARGS).eval()
    _load_strict(ours, official)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (1, 256, 16, 16)
        assert _max_diff(out, _official_tiny_vit_features(official, x, 16)) < TOL


@pytest.mark.slow
def test_tiny_vit_matches_official_forward_at_1024(official_tiny_vit: types.ModuleType) -> None:
    """The official forward itself (only 1024 works there): a few seconds on two cores."""
    torch.manual_seed(0)
    official = _randomize(official_tiny_vit.TinyViT(img_size=1024, **MOBILE_SAM_ARGS)).eval()
    ours = TinyViT(img_size=1024, **MOBILE_SAM_ARGS).eval()
    _load_strict(ours, official)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        assert _max_diff(ours(x), official(x)) < TOL
