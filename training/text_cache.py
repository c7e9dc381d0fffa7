"""MiniLM token features cached per prompt text, so a training step does a lookup instead of running the
frozen text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from converseg_core.checkpoint import safe_torch_load
from converseg_core.files import atomic_write

from .augment import swap_left_right
from .records import Record


class TextFeatureCache:
    """Frozen MiniLM token features, computed once per unique prompt (the text side dominates nothing at
    train time then: a lookup and a pad). Stored as float16 trimmed to each prompt's real tokens."""

    def __init__(self, features: dict[str, torch.Tensor] | None = None, *, max_tokens: int = 32) -> None:
        self.features: dict[str, torch.Tensor] = dict(features or {})
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def add(
        self,
        prompts: Sequence[str],
        text_encoder: torch.nn.Module,
        tokenizer,
        *,
        batch_size: int = 64,
        stop_layer: int | None = None,
    ) -> int:
        """Encode the prompts not cached yet; returns how many were new. `stop_layer`: cache the features
        after that many MiniLM layers (the input of the layers a run trains) instead of the last ones."""
        new = sorted({p for p in prompts if p not in self.features})
        if not new:
            return 0
        device = next(text_encoder.parameters()).device
        for i in range(0, len(new), batch_size):
            chunk = new[i : i + batch_size]
            tok = tokenizer.encode(chunk, self.max_tokens)
            ids = torch.from_numpy(tok.input_ids).to(device)
            am = torch.from_numpy(tok.attention_mask).to(device)
            if stop_layer is None:
                feats = text_encoder(ids, am).float().cpu()
            else:
                feats = text_encoder.hidden_states(ids, am, stop=stop_layer).float().cpu()
            for j, p in enumerate(chunk):
                n = int(tok.attention_mask[j].sum())
                self.features[p] = feats[j, :n].to(torch.float16).clone()
        return len(new)

    def lookup(
        self, prompts: Sequence[str], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (Q x T x D float32 features, Q x T int64 attention mask), right-padded to the longest."""
        try:
            feats = [self.features[p] for p in prompts]
        except KeyError as exc:
            raise KeyError(f"prompt {exc} not in the text feature cache; call add() first") from exc
        t = max(f.shape[0] for f in feats)
        out = torch.zeros(len(feats), t, feats[0].shape[1])
        am = torch.zeros(len(feats), t, dtype=torch.int64)
        for i, f in enumerate(feats):
            out[i, : f.shape[0]] = f.float()
            am[i, : f.shape[0]] = 1
        return out.to(device), am.to(device)

    def save(self, path: str | Path) -> None:
        with atomic_write(path) as f:
            torch.save({"max_tokens": self.max_tokens, "features": self.features}, f)

    @classmethod
    def load(cls, path: str | Path) -> TextFeatureCache:
        data = safe_torch_load(path, what="text feature cache")
        return cls(data["features"], max_tokens=data["max_tokens"])


def all_prompt_variants(records: Sequence[Record], with_flips: bool) -> list[str]:
    """Every prompt text a dataset can produce (including left/right-swapped ones when flipping)."""
    out = {r.prompt for r in records}
    if with_flips:
        out |= {swap_left_right(p) for p in out}
    return sorted(out)
