"""Text-image fusion: turns a request into SAM prompts.

SAM's mask decoder is steered by sparse prompt tokens (points, boxes) and a dense prompt (a mask). ConverSeg
replaces those with language: learned query tokens read the request (cross-attention to the text tokens),
then look at the picture (cross-attention to the image embedding), and become the sparse prompts. The image
also reads the request, giving a dense per-pixel bias. One extra query token becomes the presence logit: is
anything in the picture what was asked for?

Attention is written out (matmul + softmax with an additive mask) so it exports to ONNX and TensorRT as
plain ops, with a dynamic number of text tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Q x T {0,1} mask -> Q x 1 x 1 x T additive bias (0 where attended, a large negative where padded)."""
    return (1.0 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


class MultiHeadAttention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias
        # q, k, v may differ in batch (1 vs Q): matmul broadcasts, the output has the larger batch.
        out = logits.softmax(dim=-1) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class FusionLayer(nn.Module):
    """Pre-norm block: queries self-attend, read the text, read the image, then an MLP."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim=dim, num_heads=num_heads)
        self.norm_text = nn.LayerNorm(dim)
        self.text_attn = MultiHeadAttention(dim=dim, num_heads=num_heads)
        self.norm_image = nn.LayerNorm(dim)
        self.image_attn = MultiHeadAttention(dim=dim, num_heads=num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(
        self, queries: Tensor, text: Tensor, text_bias: Tensor, image: Tensor, image_pe: Tensor
    ) -> Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x)
        x = self.norm_text(queries)
        queries = queries + self.text_attn(x, text, text, text_bias)
        x = self.norm_image(queries)
        queries = queries + self.image_attn(x, image + image_pe, image)
        return queries + self.mlp(self.norm_mlp(queries))


class TextImageFusion(nn.Module):
    """Request + image embedding -> (sparse prompts Q x N x C, dense bias Q x C x h x w, presence logits Q)."""

    def __init__(
        self,
        *,
        text_dim: int = 384,
        embed_dim: int = 256,
        num_prompt_tokens: int = 4,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.num_prompt_tokens = num_prompt_tokens
        self.text_proj = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.LayerNorm(embed_dim))
        # The last query token is the presence token; the others become SAM sparse prompts.
        self.query_tokens = nn.Parameter(torch.randn(num_prompt_tokens + 1, embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            FusionLayer(dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(embed_dim)
        self.dense_norm = nn.LayerNorm(embed_dim)
        self.dense_attn = MultiHeadAttention(dim=embed_dim, num_heads=num_heads)
        # Zero-initialised, so an untrained fusion leaves SAM's "no mask" dense prompt unchanged.
        self.dense_out = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.dense_out.weight)
        nn.init.zeros_(self.dense_out.bias)
        self.presence_head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1)
        )

    def forward(
        self, image_embeddings: Tensor, image_pe: Tensor, text_features: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        image_embeddings: (1 or Q) x C x h x w; image_pe: 1 x C x h x w;
        text_features: Q x T x text_dim; attention_mask: Q x T (1 = token, 0 = padding).
        """
        q = text_features.shape[0]
        _, c, h, w = image_embeddings.shape
        # Image tokens keep their own batch (1 for a frame shared by every query): the attention matmuls
        # broadcast, so the image-side projections run once per frame, not once per query.
        image = image_embeddings.flatten(2).transpose(1, 2)
        pe = image_pe.flatten(2).transpose(1, 2)
        text = self.text_proj(text_features)
        text_bias = attention_bias(attention_mask, text.dtype)

        queries = self.query_tokens.unsqueeze(0).expand(q, -1, -1)
        for layer in self.layers:
            queries = layer(queries, text, text_bias, image, pe)
        queries = self.norm_out(queries)
        sparse = queries[:, : self.num_prompt_tokens]
        presence_logits = self.presence_head(queries[:, self.num_prompt_tokens]).squeeze(-1)

        dense = self.dense_attn(self.dense_norm(image + pe), text, text, text_bias)
        dense = self.dense_out(dense).transpose(1, 2).reshape(q, c, h, w)
        return sparse, dense, presence_logits
