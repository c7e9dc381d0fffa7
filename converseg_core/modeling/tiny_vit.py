"""MobileSAM's TinyViT image encoder (TinyViT-5M with a SAM neck).

Parameter names and math follow MobileSAM's `mobile_sam/modeling/tiny_vit_sam.py` (itself from Microsoft's
TinyViT, both Apache-2.0), so the `image_encoder.*` weights of mobile_sam.pt load with strict=True.
Differences from that file, none of which changes a key or, at img_size=1024, a value:
- every resolution derives from img_size (official hard-codes the 64 x 64 output grid), so 256 or 512
  inputs work;
- the last patch merging keeps the resolution because it is the last (official tests out_dim against
  320/448/576, which is the same layer for every published TinyViT);
- attention biases are always gathered from the table (official caches them in eval mode), so loading
  weights after .eval() cannot leave a stale cache;
- the unused ImageNet head (`norm_head`, `head`) is kept only because mobile_sam.pt stores it; it is
  frozen (requires_grad=False) and never called;
- no timm: DropPath is defined here, initialisation uses torch.nn.init.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Conv2d_BN(nn.Sequential):  # noqa: N801 (official name; its children are the checkpoint keys c, bn)
    """Conv without bias followed by BatchNorm (fused into one conv at ONNX/TensorRT export)."""

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 conv-BN layers: B x 3 x S x S -> B x embed_dim x S/4 x S/4."""

    def __init__(self, *, in_chans: int, embed_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1),
            activation(),
            Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (1x1 expand, 3x3 depthwise, 1x1 project) on B x C x H x W."""

    def __init__(
        self,
        *,
        in_chans: int,
        out_chans: int,
        expand_ratio: float,
        activation: type[nn.Module],
        drop_path: float,
    ) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = activation()
        # Zero-initialised last BN: each block starts as the identity.
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y = self.drop_path(self.conv3(y))
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """Conv downsampling between stages; returns tokens B x (H' * W') x out_dim."""

    def __init__(
        self,
        *,
        input_resolution: tuple[int, int],
        dim: int,
        out_dim: int,
        activation: type[nn.Module],
        stride: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # tokens from a transformer stage
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """First stage: MBConv blocks on B x C x H x W, then an optional PatchMerging."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        activation: type[nn.Module],
        drop_path: Sequence[float],
        downsample: nn.Module | None,
        use_checkpoint: bool = False,
        conv_expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            MBConv(
                in_chans=dim,
                out_chans=dim,
                expand_ratio=conv_expand_ratio,
                activation=activation,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm MLP on tokens."""

    def __init__(
        self, *, in_features: int, hidden_features: int, act_layer: type[nn.Module], drop: float
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Pre-norm window self-attention with a learned bias per head and per |dy|, |dx| offset (LeViT)."""

    def __init__(
        self, *, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int]
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)

        # Bias table indexed by the absolute offset between two positions of a window, enumerated in
        # the order the official code meets them (so the table's columns match the checkpoint).
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x N x C
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local conv, MLP; on tokens B x (H * W) x C."""

    def __init__(
        self,
        *,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if window_size <= 0:
            raise ValueError("window_size must be positive")
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.drop_path = _drop_path(drop_path)
        self.attn = Attention(
            dim=dim,
            key_dim=dim // num_heads,
            num_heads=num_heads,
            attn_ratio=1,
            resolution=(window_size, window_size),
        )
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=activation, drop=drop)
        self.local_conv = Conv2d_BN(
            dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        shortcut = x
        # Window partition (with zero padding to whole windows); one window is the same code path.
        y = x.view(b, h, w, c)
        pad_b = (ws - h % ws) % ws
        pad_r = (ws - w % ws) % ws
        if pad_b > 0 or pad_r > 0:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        y = self.attn(y)
        y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b > 0 or pad_r > 0:
            y = y[:, :h, :w].contiguous()
        x = shortcut + self.drop_path(y.view(b, n, c))

        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.view(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """One transformer stage: TinyViT blocks, then an optional PatchMerging."""

    def __init__(
        self,
        *,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: Sequence[float],
        downsample: nn.Module | None,
        use_checkpoint: bool,
        local_conv_size: int,
        activation: type[nn.Module],
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim=dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                drop=drop,
                drop_path=drop_path[i],
                local_conv_size=local_conv_size,
                activation=activation,
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """Normalized B x 3 x S x S image -> B x 256 x S/16 x S/16 embedding (S a multiple of 64 for the
    default four stages: S/4 conv stage, S/8 and S/16 attention stages, a last S/16 stage)."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 0.8,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if img_size % (4 * 2 ** (num_stages - 2)) != 0:
            raise ValueError(f"img_size={img_size} must be a multiple of {4 * 2 ** (num_stages - 2)}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.depths = tuple(depths)
        self.layer_lr_decay = layer_lr_decay
        activation = nn.GELU

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0], activation=activation)
        # Stage i runs at S / 4 / 2**i, except the last, which keeps the previous stage's resolution so
        # the output is S/16 (MobileSAM's change to TinyViT).
        resolutions = [img_size // 4 // 2 ** min(i, num_stages - 2) for i in range(num_stages)]
        self.embed_size = resolutions[-1]
        # Stochastic depth grows linearly over blocks (torch.linspace, in plain Python so the module
        # also builds on the meta device).
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]

        self.layers = nn.ModuleList()
        for i in range(num_stages):
            res = (resolutions[i], resolutions[i])
            downsample = None
            if i < num_stages - 1:
                downsample = PatchMerging(
                    input_resolution=res,
                    dim=embed_dims[i],
                    out_dim=embed_dims[i + 1],
                    activation=activation,
                    stride=resolutions[i] // resolutions[i + 1],
                )
            stage_dpr = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            if i == 0:
                layer: nn.Module = ConvLayer(
                    dim=embed_dims[0],
                    depth=depths[0],
                    activation=activation,
                    drop_path=stage_dpr,
                    downsample=downsample,
                    use_checkpoint=use_checkpoint,
                    conv_expand_ratio=mbconv_expand_ratio,
                )
            else:
                layer = BasicLayer(
                    dim=embed_dims[i],
                    input_resolution=res,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    drop_path=stage_dpr,
                    downsample=downsample,
                    use_checkpoint=use_checkpoint,
                    local_conv_size=local_conv_size,
                    activation=activation,
                )
            self.layers.append(layer)

        # ImageNet classifier head: unused by MobileSAM but stored in mobile_sam.pt, so kept for strict
        # loading and frozen so optimisers and gradient checks leave it alone.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for p in itertools.chain(self.norm_head.parameters(), self.head.parameters()):
            p.requires_grad_(False)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def layer_lr_scales(self) -> dict[str, float]:
        """Per-parameter learning-rate scale for layer-wise decay (official sets `p.lr_scale` attributes;
        a mapping by name is what an optimiser's param groups need)."""
        depth = sum(self.depths)
        scales = [self.layer_lr_decay ** (depth - i - 1) for i in range(depth)]
        out = {f"patch_embed.{k}": scales[0] for k, _ in self.patch_embed.named_parameters()}
        i = 0
        for li, layer in enumerate(self.layers):
            for bi, block in enumerate(layer.blocks):
                out.update({f"layers.{li}.blocks.{bi}.{k}": scales[i] for k, _ in block.named_parameters()})
                i += 1
            if layer.downsample is not None:
                out.update(
                    {
                        f"layers.{li}.downsample.{k}": scales[i - 1]
                        for k, _ in layer.downsample.named_parameters()
                    }
                )
        for name, _ in self.named_parameters():
            out.setdefault(name, 1.0 if name.startswith("neck.") else scales[-1])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.embed_size, self.embed_size, c).permute(0, 3, 1, 2)
        return self.neck(x)
