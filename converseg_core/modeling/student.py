"""StudentCNN: the small convolutional image encoder distilled from SAM / MobileSAM for the edge.

Only Conv2d, BatchNorm2d, ReLU, additions and the LayerNorm2d of a SAM-style neck: every op exports to ONNX
opset 17 (LayerNorm2d as LayerNormalization between transposes) and builds in TensorRT 8.6+ without plugins,
and BatchNorm folds into the convs.

Layout (S = img_size):
    stem       3x3 s2 conv-BN-ReLU, then a depthwise-separable s2 block        S/4,  widths[0]
    stage 0..3 inverted residuals; stages 1 and 2 start with stride 2           S/4, S/8, S/16, S/16
               stage 3 uses dilation 2 in its depthwise convs: a wider receptive field at S/16, where
               the teacher's global attention sees the whole image
    neck       1x1 conv, LayerNorm2d, depthwise-separable 3x3, LayerNorm2d     S/16, out_chans
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import LayerNorm2d


def _conv_bn(
    in_ch: int, out_ch: int, *, kernel: int = 1, stride: int = 1, groups: int = 1, dilation: int = 1
):
    padding = dilation * (kernel - 1) // 2
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (optionally strided or dilated), 1x1 project; residual when shapes match."""

    def __init__(
        self, *, in_chans: int, out_chans: int, stride: int = 1, expand_ratio: float = 2.0, dilation: int = 1
    ) -> None:
        super().__init__()
        hidden = int(round(in_chans * expand_ratio))
        self.use_residual = stride == 1 and in_chans == out_chans
        self.block = nn.Sequential(
            *_conv_bn(in_chans, hidden),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, kernel=3, stride=stride, groups=hidden, dilation=dilation),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, out_chans),
        )
        if self.use_residual:
            # Zero-initialised last BN: every residual block starts as the identity (stable early training).
            nn.init.zeros_(self.block[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class StudentCNN(nn.Module):
    """Normalized B x 3 x S x S image -> B x out_chans x S/16 x S/16 embedding (S a multiple of 16)."""

    def __init__(
        self,
        *,
        img_size: int,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 2, 3, 2),
        out_chans: int = 256,
        in_chans: int = 3,
        expand_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("StudentCNN takes exactly four stage widths and depths")
        if img_size % 16 != 0:
            raise ValueError(f"img_size={img_size} must be a multiple of 16")
        self.img_size = img_size
        self.out_chans = out_chans
        stem_width = max(widths[0] // 2, 8)
        self.stem = nn.Sequential(
            *_conv_bn(in_chans, stem_width, kernel=3, stride=2),
            nn.ReLU(inplace=True),
            *_conv_bn(stem_width, stem_width, kernel=3, stride=2, groups=stem_width),
            nn.ReLU(inplace=True),
            *_conv_bn(stem_width, widths[0]),
            nn.ReLU(inplace=True),
        )
        strides = (1, 2, 2, 1)
        dilations = (1, 1, 1, 2)
        stages = []
        in_ch = widths[0]
        for width, depth, stride, dilation in zip(widths, depths, strides, dilations, strict=True):
            blocks = [
                InvertedResidual(
                    in_chans=in_ch if i == 0 else width,
                    out_chans=width,
                    stride=stride if i == 0 else 1,
                    expand_ratio=expand_ratio,
                    dilation=dilation,
                )
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.neck = nn.Sequential(
            nn.Conv2d(widths[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, groups=out_chans, bias=False),
            nn.Conv2d(out_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.stages(self.stem(x)))
