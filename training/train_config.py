"""The options of a training run (`python -m training.train`): one dataclass, one flag per field.

The config is stored in every checkpoint a run writes (meta["train_config"]), so a model file says how it
was trained. This module needs no torch: reproduce_default and --help read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from converseg_core.registry import list_models

from .cli import arg, require_at_least_one, require_finite

# The model's top-level blocks that --init loads and --train-parts names (mask_presence only exists in models
# built with config.mask_presence).
MODEL_PARTS = ("image_encoder", "text_encoder", "fusion", "prompt_encoder", "mask_decoder", "mask_presence")


@dataclass
class TrainConfig:
    """Every option of a training run; each field's help is its --help text."""

    data: str = arg(help="dataset: data engine folder, ConverSeg .jsonl, items.json or COCO .json")
    out_dir: str = arg(
        "runs/train", help="run folder: last.pt (resumable), model.pt, TensorBoard logs, panels"
    )
    model: str = arg("converseg_edge", help="registered variant to build", choices=list_models())
    override: list[str] = arg(
        [], help="config overrides KEY=VALUE for a fresh model (e.g. img_size=256)", nargs="*"
    )
    init: list[str] = arg(
        [],
        help="PATH[:part,part] load parts (image_encoder,fusion,prompt_encoder,mask_decoder; default all) "
        "of a ConverSeg checkpoint before training; repeatable",
        nargs="*",
    )
    init_official: str | None = arg(
        None, help="official SAM (sam_vit_*.pth) or MobileSAM (mobile_sam.pt) weights"
    )
    val_data: str | None = arg(None, help="validation dataset; default: a scene-level split of --data")
    val_fraction: float = arg(
        0.05, help="fraction of scenes held out for validation when --val-data is not given"
    )
    heldout_templates: list[str] = arg(
        [], help="template ids never trained on (samples marked heldout never are)", nargs="*"
    )
    train_image_encoder: bool = arg(False, help="train the image encoder too (from scratch or fine-tuning)")
    train_parts: list[str] = arg(
        [],
        help="train only these parts; every other part is frozen and kept in eval mode (e.g. mask_presence: "
        "the mask-evidence presence head on top of a trained model, with --override mask_presence=true). "
        "Default: every part but the image encoder, which --train-image-encoder adds (text_encoder: the top "
        "MiniLM layers a model built with --override text_trainable_layers=N trains; the rest stay frozen)",
        nargs="*",
        choices=list(MODEL_PARTS),
    )
    freeze_text_proj: bool = arg(
        False,
        help="freeze the language projection (fusion.text_proj); it trains by default as it starts random",
    )
    steps: int = arg(2000, help="optimizer steps")
    batch_size: int = arg(8, help="images per micro-batch per process")
    queries_per_image: int = arg(
        4,
        help="requests per image in a batch (the image encoder runs once for all of them); 0: one sample per item",
    )
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    lr: float = arg(3e-4, help="peak learning rate (fusion, decoder)")
    image_encoder_lr: float | None = arg(None, help="peak learning rate of the image encoder (default: --lr)")
    text_encoder_lr: float | None = arg(
        None,
        help="peak learning rate of the trained MiniLM layers (text_trainable_layers > 0; default: --lr)",
    )
    concepts_lr: float | None = arg(
        None,
        help="peak learning rate of the ImageNet concept projection, which starts at zero, and of the concept "
        "prior's scale (converseg_edge_lite_concepts; default: --image-encoder-lr, else --lr)",
    )
    weight_decay: float = arg(0.01, help="AdamW weight decay")
    warmup_steps: int = arg(100, help="linear warm-up steps")
    min_lr_ratio: float = arg(0.05, help="cosine decay floor as a fraction of the peak")
    grad_clip: float = arg(1.0, help="gradient norm clip (0 disables)")
    dice_weight: float = arg(0.25, help="weight of the Dice term")
    presence_weight: float = arg(1.0, help="weight of the presence BCE")
    iou_weight: float = arg(1.0, help="weight of the IoU-head MSE (makes the Segmenter's score meaningful)")
    dense_weight: float = arg(
        0.0,
        help="weight of the dense language-grounding loss (training.losses.dense_grounding_loss, after LSeg): "
        "each embedding pixel is pulled towards the MiniLM sentence embedding of the requests it answers; "
        "0 disables",
    )
    token_dropout: float = arg(
        0.0,
        help="probability of hiding each word token of a request from the fusion during training (attention "
        "mask 0; [CLS], [SEP] and at least one word stay), against over-reliance on exact phrasings",
    )
    feature_jitter: float = arg(
        0.0,
        help="with --trunk-cache: redraw each cached feature map's per-channel mean and spread at this scale "
        "(training.augment.jitter_feature_statistics; the stride 4, 8 and 16 maps the neck and detail path "
        "read, not the classifier's stride-32 input), for features that photographs move; 0 disables",
    )
    no_augment: bool = arg(False, help="disable crop / flip / colour augmentation")
    trunk_cache: str | None = arg(
        None,
        help="folder of cached frozen-trunk features (python -m training.trunk_cache build): the trunk does "
        "not run per step; augmentation becomes a horizontal mirror only",
    )
    amp: str = arg(
        "auto",
        help="autocast dtype on a GPU (auto: bf16 if supported)",
        choices=["auto", "bf16", "fp16", "none"],
    )
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    num_workers: int = arg(2, help="DataLoader worker processes per training process")
    seed: int = arg(0, help="seed of the data order, augmentation and initialisation")
    log_every: int = arg(10, help="steps between TensorBoard scalars")
    val_every: int = arg(500, help="steps between validations (and at the end)")
    val_samples: int = arg(256, help="validation samples per validation (0: all)")
    save_every: int = arg(250, help="steps between resumable checkpoints")
    num_panels: int = arg(8, help="validation overlay panels written per validation")
    resume: bool = arg(False, help="continue from out_dir/last.pt when it exists")
    on_bad: str = arg(
        "skip", help="bad sample: skip with a counted warning, or stop", choices=["skip", "error"]
    )
    allow_partial: bool = arg(False, help="read data engine output without index.json (complete shards only)")
    max_skip_fraction: float = arg(
        0.5, help="stop when more than this fraction of the samples read so far were bad (after 64 samples)"
    )
    max_nan_steps: int = arg(10, help="stop after this many consecutive steps with a non-finite loss")
    random_text_encoder: bool = arg(False, help="random-init MiniLM (tests only: skips loading its weights)")
    no_progress: bool = arg(False, help="no tqdm progress bar")
    threads: int = arg(0, help="torch CPU threads per process (0: cores / processes)")


def check_train_config(cfg: TrainConfig) -> None:
    """Exit with the flag's name before any work when a value cannot give a sound run."""
    if not 0.0 <= cfg.token_dropout < 1.0:
        raise SystemExit(f"--token-dropout must be in [0, 1), got {cfg.token_dropout}")
    if not 0.0 <= cfg.feature_jitter <= 1.0:
        raise SystemExit(f"--feature-jitter must be in [0, 1], got {cfg.feature_jitter}")
    if cfg.feature_jitter > 0 and not cfg.trunk_cache:
        raise SystemExit("--feature-jitter works on cached trunk features: give --trunk-cache too")
    require_at_least_one(cfg, "steps", "log_every", "val_every", "save_every")
    require_finite(
        cfg,
        positive=("lr", "image_encoder_lr", "text_encoder_lr", "concepts_lr"),
        non_negative=(
            "weight_decay",
            "grad_clip",
            "dice_weight",
            "presence_weight",
            "iou_weight",
            "min_lr_ratio",
            "dense_weight",
        ),
    )
