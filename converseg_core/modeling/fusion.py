"""Text-image fusion: turns a request into SAM prompts.

SAM's mask decoder is steered by sparse prompt tokens (points, boxes) and a dense prompt (a mask). ConverSeg
replaces those with language: learned query tokens read the request (cross-attention to the text tokens),
then look at the picture (cross-attention to the image embedding), and become the sparse prompts. The image
also reads the request, giving a dense per-pixel bias. One extra query token becomes the presence logit: is
anything in the picture what was asked for?

Attention is written out (matmul + softmax with an additive mask) so it exports to ONNX and TensorRT as
plain ops, with a dynamic number of text tokens.

Everything the fusion computes from the image alone (each layer's image keys and values, the dense branch's
per-pixel queries) is split out as `image_context`: the runtime computes it once per frame, and a new request
pays only for `forward_context`. `forward` chains the two, so training and inference run the same math.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


def attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Q x T {0,1} mask -> Q x 1 x 1 x T additive bias (0 where attended, a large negative where padded)."""
    return (1.0 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


def with_sentence_token(text_features: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend each request's mean-pooled token features (padding excluded) as a token that is always attended:
    Q x T x D, Q x T -> Q x (T+1) x D, Q x (T+1)."""
    weights = attention_mask.to(text_features.dtype).unsqueeze(-1)
    pooled = (text_features * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1.0)
    ones = torch.ones_like(attention_mask[:, :1])
    return torch.cat([pooled, text_features], dim=1), torch.cat([ones, attention_mask], dim=1)


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

    def heads(self, x: Tensor) -> Tensor:
        """B x N x C -> B x heads x N x C/heads."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def key_heads(self, k: Tensor) -> Tensor:
        """Projected keys B x M x C -> B x heads x C/heads x M, the layout q @ k takes without a transpose."""
        b, m, c = k.shape
        return k.reshape(b, m, self.num_heads, c // self.num_heads).permute(0, 2, 3, 1)

    def probabilities(self, q: Tensor, k_t: Tensor, bias: Tensor | None = None) -> Tensor:
        """q: B x heads x N x d, k_t: B x heads x d x M (key_heads) -> attention weights B x heads x N x M.
        q and k_t may differ in batch (1 vs Q): matmul broadcasts, the output has the larger batch."""
        logits = (q @ k_t) * (q.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)

    def attend(self, q: Tensor, k_t: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """Attention on projected, head-split q (B x heads x N x d), k_t (key_heads), v (B x heads x M x d);
        returns B x N x C after out_proj."""
        out = self.probabilities(q, k_t, bias) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.attend(
            self.heads(self.q_proj(q)), self.key_heads(self.k_proj(k)), self.heads(self.v_proj(v)), bias
        )


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

    def image_keys_values(self, image: Tensor, image_pe: Tensor) -> tuple[Tensor, Tensor]:
        """The image side of image_attn, which depends on the frame only: image, image_pe: B x HW x C ->
        keys B x heads x d x HW (key_heads layout), values B x heads x HW x d."""
        attn = self.image_attn
        return attn.key_heads(attn.k_proj(image + image_pe)), attn.heads(attn.v_proj(image))

    def forward(
        self, queries: Tensor, text: Tensor, text_bias: Tensor, image_keys: Tensor, image_values: Tensor
    ) -> Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x)
        x = self.norm_text(queries)
        queries = queries + self.text_attn(x, text, text, text_bias)
        x = self.norm_image(queries)
        q = self.image_attn.heads(self.image_attn.q_proj(x))
        queries = queries + self.image_attn.attend(q, image_keys, image_values)
        return queries + self.mlp(self.norm_mlp(queries))


class FusionImageContext(NamedTuple):
    """What the fusion needs from a frame, whatever the request (B = 1 for a frame shared by all queries),
    laid out as the per-request matmuls read it, so no request transposes an image-sized tensor.

    keys: B x depth x heads x d x HW, each layer's image-attention keys k_proj(image + pe);
    values: B x depth x heads x HW x d, v_proj(image); dense_queries: B x heads x HW x d, the dense
    branch's q_proj(dense_norm(image + pe)). d = C / heads.
    """

    keys: Tensor
    values: Tensor
    dense_queries: Tensor


class FusionOutput(NamedTuple):
    """The fusion's answer to Q requests: sparse prompts Q x N x C, dense bias Q x HW x C (as tokens),
    presence logits Q."""

    sparse: Tensor
    dense_bias: Tensor
    presence_logits: Tensor


class TextImageFusion(nn.Module):
    """Request + image -> (sparse prompts Q x N x C, dense bias, presence logits Q)."""

    def __init__(
        self,
        *,
        text_dim: int = 384,
        embed_dim: int = 256,
        num_prompt_tokens: int = 4,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        sentence_token: bool = False,
    ) -> None:
        super().__init__()
        self.num_prompt_tokens = num_prompt_tokens
        self.sentence_token = sentence_token  # see ConverSegConfig.fusion_sentence_token
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

    def image_context(self, image_tokens: Tensor, pe_tokens: Tensor) -> FusionImageContext:
        """image_tokens: B x HW x C (the image embedding as tokens); pe_tokens: 1 x HW x C -> the per-frame
        part of the fusion."""
        keys, values = zip(
            *(layer.image_keys_values(image_tokens, pe_tokens) for layer in self.layers), strict=True
        )
        dense = self.dense_attn
        dense_queries = dense.heads(dense.q_proj(self.dense_norm(image_tokens + pe_tokens)))
        return FusionImageContext(torch.stack(keys, dim=1), torch.stack(values, dim=1), dense_queries)

    def forward_context(
        self, context: FusionImageContext, text_features: Tensor, attention_mask: Tensor
    ) -> FusionOutput:
        """The per-request part. context: from image_context(); text_features: Q x T x text_dim;
        attention_mask: Q x T (1 = token, 0 = padding)."""
        q = text_features.shape[0]
        if self.sentence_token:
            text_features, attention_mask = with_sentence_token(text_features, attention_mask)
        text = self.text_proj(text_features)
        text_bias = attention_bias(attention_mask, text.dtype)

        # Image tensors keep their own batch (1 for a frame shared by every query): the attention matmuls
        # broadcast, so nothing on the image side is repeated per query.
        queries = self.query_tokens.unsqueeze(0).expand(q, -1, -1)
        for i, layer in enumerate(self.layers):
            queries = layer(queries, text, text_bias, context.keys[:, i], context.values[:, i])
        queries = self.norm_out(queries)
        return FusionOutput(
            queries[:, : self.num_prompt_tokens],
            self._dense_bias(context.dense_queries, text, text_bias),
            self.presence_head(queries[:, self.num_prompt_tokens]).squeeze(-1),
        )

    def _dense_bias(self, dense_queries: Tensor, text: Tensor, text_bias: Tensor) -> Tensor:
        """dense_out(dense_attn(pixels -> text)) as Q x HW x C tokens, computed in the text's low rank.

        Each pixel's attention output is a mix of the T text values per head, and out_proj and dense_out are
        linear, so they are applied to the T values (heads x T rows) instead of to all HW pixels: the same
        result, about 5x less work per request at 32 x 32.
        """
        attn = self.dense_attn
        heads, c = attn.num_heads, text.shape[-1]
        probs = attn.probabilities(dense_queries, attn.key_heads(attn.k_proj(text)), text_bias)
        values = attn.heads(attn.v_proj(text))  # Q x heads x T x d
        # out_proj then dense_out as one linear map, split by the head whose channels it reads.
        weight = self.dense_out.weight @ attn.out_proj.weight  # C x C
        bias = self.dense_out.weight @ attn.out_proj.bias + self.dense_out.bias
        mixed = values @ weight.t().reshape(heads, c // heads, c)  # Q x heads x T x C
        q, _, hw, t = probs.shape
        probs = probs.transpose(1, 2).reshape(q, hw, heads * t)
        return probs @ mixed.reshape(q, heads * t, c) + bias

    def forward(
        self, image_embeddings: Tensor, image_pe: Tensor, text_features: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Maps in, maps out (the layout of SAM's prompt encoder):
        image_embeddings: (1 or Q) x C x h x w; image_pe: 1 x C x h x w; text_features: Q x T x text_dim;
        attention_mask: Q x T -> (sparse Q x N x C, dense bias Q x C x h x w, presence logits Q)."""
        h, w = image_embeddings.shape[-2:]
        context = self.image_context(
            image_embeddings.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        )
        sparse, dense, presence = self.forward_context(context, text_features, attention_mask)
        return sparse, dense.transpose(1, 2).reshape(dense.shape[0], -1, h, w), presence
