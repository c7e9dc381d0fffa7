"""SAM's mask decoder, extended to accept one image embedding per prompt set.

Parameter names and math follow segment-anything's `modeling/mask_decoder.py`, so `mask_decoder.*`
weights of official checkpoints load with strict=True. The one difference: SAM always repeats a single
image embedding over the N prompt sets; here `image_embeddings` may be batch 1 (broadcast, as SAM) or
batch N (one image per prompt set, for batched training). Broadcasting uses `expand`, which is the
same values as SAM's repeat_interleave for batch 1 and needs no branch on the batch size, so the module
traces to ONNX with a dynamic prompt batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them (SAM's hypernetwork and IoU head)."""

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim], strict=True)
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x


class DecoderTokens(NamedTuple):
    """The decoder's transformer outputs behind its masks, for heads that read them (modeling/presence.py).
    iou_token: N x C, the IoU token; image_tokens: N x hw x C, the image tokens (row-major h x w)."""

    iou_token: torch.Tensor
    image_tokens: torch.Tensor


class MaskDecoder(nn.Module):
    """Predicts mask logits (4x the embedding resolution) and IoU scores from image and prompt embeddings."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(
                input_dim=transformer_dim,
                hidden_dim=transformer_dim,
                output_dim=transformer_dim // 8,
                num_layers=3,
            )
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        image_embeddings: (1 or N) x C x h x w; image_pe: 1 x C x h x w;
        sparse_prompt_embeddings: N x K x C; dense_prompt_embeddings: (1 or N) x C x h x w.
        Returns masks N x M x 4h x 4w (logits) and iou_pred N x M, with M = num_multimask_outputs when
        multimask_output else 1 (a Python bool, fixed at export time).
        """
        n = sparse_prompt_embeddings.shape[0]
        # expand(n) is a no-op for batch N and a broadcast for batch 1 (SAM's repeat_interleave).
        src = image_embeddings.expand(n, -1, -1, -1) + dense_prompt_embeddings
        masks, iou_pred, _ = self.decode_tokens(
            src.flatten(2).transpose(1, 2),
            image_pe.flatten(2).transpose(1, 2),
            sparse_prompt_embeddings,
            (src.shape[-2], src.shape[-1]),
            multimask_output,
        )
        return masks, iou_pred

    def decode_tokens(
        self,
        src_tokens: torch.Tensor,
        pe_tokens: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        grid: tuple[int, int],
        multimask_output: bool,
        hires_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderTokens]:
        """forward() with the image side as tokens, the layout the fusion produces (no transposes per request),
        plus the transformer outputs the masks were made from. src_tokens: N x hw x C, image embedding + dense
        prompt; pe_tokens: 1 x hw x C; grid: (h, w); hires_tokens: (1 or N) x 16hw x C/8 detail features added
        to the upscaled tokens (in upscale_tokens' pixel order), or None (SAM)."""
        masks, iou_pred, tokens = self.predict_masks_tokens(
            src_tokens, pe_tokens, sparse_prompt_embeddings, grid, hires_tokens
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice], tokens

    def predict_masks_tokens(
        self,
        src_tokens: torch.Tensor,
        pe_tokens: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        grid: tuple[int, int],
        hires_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderTokens]:
        """All num_mask_tokens masks and IoU predictions, and the transformer outputs; see decode_tokens."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        b, (h, w) = n, grid

        hs, src = self.transformer.forward_tokens(src_tokens, pe_tokens, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        # hyper_in: B x M x C/8, upscaled: B x 16hw x C/8 (token-major) -> masks B x M x 4h x 4w
        upscaled = self.upscale_tokens(src)
        if hires_tokens is not None:
            upscaled = upscaled + hires_tokens
        masks = hyper_in @ upscaled.transpose(1, 2)
        masks = masks.reshape(b, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks.reshape(b, -1, 4 * h, 4 * w), iou_pred, DecoderTokens(iou_token_out, src)

    def upscale_tokens(self, src: torch.Tensor) -> torch.Tensor:
        """SAM's output_upscaling (ConvTranspose 2x2/2, LayerNorm2d, act, ConvTranspose 2x2/2, act) on image
        tokens, without going back to an image layout: src B x hw x C -> B x 16hw x C/8, the pixels ordered
        (i, j, dy1, dx1, dy2, dx2), i.e. pixel (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2).

        A 2x2 stride-2 transposed convolution gives each input pixel its own 2x2 output block, so it is a
        matmul per token (weights in x [out, dy, dx]); the layer norm is over channels and the activations
        are pointwise, so pixel order does not matter to them. The same weights and math as the module
        (tests check it against the convolutions), with matmuls in place of ConvTranspose and no transposes
        of image-sized tensors; the pixels are put in image order once, on the final masks.
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        b = src.shape[0]
        x = src @ conv1.weight.permute(0, 2, 3, 1).flatten(1) + conv1.bias.repeat(4)
        x = x.reshape(b, -1, conv1.out_channels)
        x = act1(nn.functional.layer_norm(x, (conv1.out_channels,), norm.weight, norm.bias, norm.eps))
        x = x @ conv2.weight.permute(0, 2, 3, 1).flatten(1) + conv2.bias.repeat(4)
        return act2(x.reshape(b, -1, conv2.out_channels))
