"""End-to-end training, resume, NaN handling, distillation, evaluation and a 2-process DDP run, on the CPU.

Tiny settings: converseg_edge at img_size 64 with narrow fusion/decoder MLPs, a 6-scene toy dataset in the
data engine's format. Training runs use a random-init MiniLM (no 90 MB weight load); the evaluation test goes
through the real MiniLM weights and the runtime Segmenter.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import write_toy_dataset

from converseg_core.checkpoint import load_checkpoint
from training import losses
from training.distill import DistillConfig, distill
from training.evaluate import EvalConfig, evaluate
from training.metrics import presence_auc
from training.schedule import lr_factor
from training.train import train
from training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["img_size=64", "fusion_mlp_dim=64", "decoder_mlp_dim=64", "fusion_depth=1"]


def tiny_train(data, out, **kw):
    base = dict(
        data=str(data),
        out_dir=str(out),
        model="converseg_edge",
        override=TINY,
        steps=2,
        batch_size=2,
        warmup_steps=1,
        val_fraction=0.34,
        val_every=2,
        save_every=1,
        val_samples=4,
        num_panels=2,
        num_workers=0,
        random_text_encoder=True,
        no_progress=True,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_scenes=6, size=(80, 60))


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train(tiny_train(toy, out))


def test_two_step_training_writes_everything(trained):
    out, result = trained
    assert result["step"] == 2 and result["nan_steps"] == 0
    for name in ("last.pt", "model.pt", "train_config.json", "val_metrics.json"):
        assert (out / name).is_file(), name
    assert list((out / "panels").glob("*.png")) and list((out / "tb").iterdir())
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.config.img_size == 64 and ckpt.extra["step"] == 2 and "optimizer" in ckpt.extra
    assert not any(k.startswith("text_encoder.") for k in ckpt.state_dict)
    assert "overall" in result["val"]


def test_resume_continues_from_the_saved_step(trained, toy):
    out, _ = trained
    before = load_checkpoint(out / "last.pt").state_dict
    result = train(tiny_train(toy, out, steps=3, resume=True))
    assert result["step"] == 3
    after = load_checkpoint(out / "last.pt")
    assert after.extra["step"] == 3
    assert any(not torch.equal(before[k], after.state_dict[k]) for k in before if k.startswith("fusion."))
    # Asking for a different architecture on resume is refused, not silently mixed.
    with pytest.raises(SystemExit, match="config"):
        train(tiny_train(toy, out, steps=4, resume=True, override=[*TINY, "fusion_depth=2"]))


def test_lr_schedule():
    cfg = TrainConfig(data="x", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_nan_loss_stops_with_a_clear_error(toy, tmp_path, monkeypatch):
    real = losses.converseg_loss

    def nan_loss(*a, **k):
        out = real(*a, **k)
        out.total = out.total * float("nan")
        return out

    monkeypatch.setattr("training.losses.converseg_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(tiny_train(toy, tmp_path / "nan", steps=5, max_nan_steps=2))


def test_distill_two_steps_and_resume(trained, toy, tmp_path):
    out, _ = trained
    cfg = DistillConfig(
        images=str(toy),
        out_dir=str(tmp_path / "d"),
        student="converseg_edge",
        student_override=TINY,
        teacher_checkpoint=str(out / "model.pt"),
        steps=2,
        batch_size=2,
        warmup_steps=1,
        save_every=1,
        num_workers=0,
        no_progress=True,
        threads=1,
    )
    result = distill(cfg)
    assert result["step"] == 2 and result["loss"] == result["loss"]  # finite
    cfg.steps, cfg.resume = 3, True
    assert distill(cfg)["step"] == 3
    assert load_checkpoint(tmp_path / "d" / "last.pt").extra["step"] == 3
    # zero steps or intervals are refused before any work, not a ZeroDivisionError mid-run
    for flag in ("steps", "log_every", "save_every"):
        bad = dataclasses.replace(cfg, out_dir=str(tmp_path / flag), resume=False, **{flag: 0})
        with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} must be at least 1"):
            distill(bad)
        assert not (tmp_path / flag).exists()


def test_evaluate_end_to_end_with_real_minilm(trained, toy, tmp_path):
    out, _ = trained
    metrics = evaluate(
        EvalConfig(checkpoint=str(out / "model.pt"), data=str(toy), out_dir=str(tmp_path / "e"), num_panels=4)
    )
    assert metrics["overall"]["n"] == 30 and metrics["skipped"] == 0
    assert set(metrics["by_template"]) == {"seen", "heldout"}
    assert set(metrics["by_family"]) == {"attribute", "spatial"}
    cross = metrics["by_family_template"]  # every sample in exactly one (family, split) cell
    assert set(cross) <= {f"{f}: {t}" for f in ("attribute", "spatial") for t in ("seen", "heldout")}
    for fam, m in metrics["by_family"].items():
        assert sum(c["n"] for k, c in cross.items() if k.startswith(fam + ":")) == m["n"]
    # every positive in exactly one target-size group, no negative in any
    assert sum(g["n"] for g in metrics["by_target_size"].values()) == metrics["overall"]["n_positive"]
    assert all(g["n_negative"] == 0 for g in metrics["by_target_size"].values())
    # every negative in one negative-kind group (the toy's are all "absent"), no positive in any
    assert set(metrics["by_negative_kind"]) == {"absent"}
    assert metrics["by_negative_kind"]["absent"]["n"] == metrics["overall"]["n_negative"] > 0
    assert metrics["by_negative_kind"]["absent"]["n_acc"] == metrics["overall"]["n_acc"]
    for k in ("giou", "ciou", "n_acc", "t_acc"):
        assert 0 <= metrics["overall"][k] <= 100
    # where positives lose IoU: the shares cover every positive, and answered IoU x answered share is gIoU
    for key, rows in metrics["outcomes"].items():
        by = {
            "all": {"all": metrics["overall"]},
            "templates": metrics["by_template"],
            "target size": metrics["by_target_size"],
            "family": metrics["by_family"],
        }[key]
        for name, o in rows.items():
            assert o["n_positive"] == by[name]["n_positive"]
            if o["n_positive"]:
                assert o["rejected"] + o["wrong"] + o["partial"] + o["good"] == pytest.approx(100, abs=1e-2)
                answered = (o["answered_iou"] or 0) * (100 - o["rejected"]) / 100
                assert answered == pytest.approx(by[name]["giou"], abs=1e-2)
    md = (tmp_path / "e" / "metrics.md").read_text()
    assert "| attribute |" in md and "N-acc" in md and "Where positives lose IoU" in md
    assert "Negatives by kind" in md
    # presence AUC per template split, recomputed from the per-sample presences samples.jsonl holds
    rows = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    seen = [r for r in rows if r["split"] == "seen"]
    assert set(metrics["presence_auc"]) == {"all", "templates: seen", "templates: heldout"}
    assert metrics["presence_auc"]["templates: seen"] == presence_auc(
        [r["presence"] for r in seen], [r["negative"] for r in seen]
    )
    assert "Presence AUC" in md
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["overall"] == metrics["overall"]
    assert (tmp_path / "e" / "panels_first.png").is_file()

    # The sweep scores other thresholds in the same pass; at the model's own threshold it must agree with the
    # gated run above, so the ungated pass changes nothing about the headline numbers.
    own = metrics["presence_threshold"]
    swept = evaluate(
        EvalConfig(
            checkpoint=str(out / "model.pt"),
            data=str(toy),
            out_dir=str(tmp_path / "s"),
            num_panels=0,
            presence_sweep=[0.0, own, 1.0],
        )
    )
    assert swept["overall"] == metrics["overall"]
    assert swept["presence_sweep"][str(own)] == metrics["overall"]
    assert swept["presence_sweep"]["0.0"]["n_acc"] <= swept["presence_sweep"]["1.0"]["n_acc"]
    assert "Presence threshold sweep" in (tmp_path / "s" / "metrics.md").read_text()
    # masks alone scores every positive's mask whatever presence said: with every pixel in every mask (mask
    # threshold far below any logit) and a rule that rejects everything, gIoU is 0 while every positive
    # keeps an ungated IoU (its target's share of the image)
    assert metrics["outcomes"]["all"]["all"]["masks_alone"] >= metrics["overall"]["giou"]
    refuse_all = evaluate(
        EvalConfig(
            checkpoint=str(out / "model.pt"),
            data=str(toy),
            out_dir=str(tmp_path / "r"),
            num_panels=0,
            presence_threshold=1.01,
            mask_threshold=-1e9,
        )
    )
    assert refuse_all["overall"]["giou"] == 0 and refuse_all["overall"]["n_acc"] == 100
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    ungated = [r["ungated_iou"] for r in samples if not r["negative"]]
    assert all(0 < u < 1 for u in ungated) and not any("ungated_iou" in r for r in samples if r["negative"])
    alone = refuse_all["outcomes"]["all"]["all"]["masks_alone"]
    assert alone == pytest.approx(100 * sum(ungated) / len(ungated), abs=1e-2)

    # samples.jsonl holds what the tables were computed from: training.compare recomputes them exactly, and two
    # evaluations of one model differ by exactly nothing, with a zero-width interval.
    from training.compare import compare, pair, read_samples

    a, b = pair(read_samples(tmp_path / "e"), read_samples(tmp_path / "s"))
    assert len(a.ids) == 30
    rows = {r.metric: r for r in compare(a, b, bootstrap=100, seed=0)}
    for name, key in (("gIoU", "giou"), ("cIoU", "ciou"), ("N-acc", "n_acc"), ("T-acc", "t_acc")):
        want = metrics["overall"][key]
        if want is None:
            assert np.isnan(rows[name].a)
        else:
            assert rows[name].a == pytest.approx(want, abs=1e-3)
        assert rows[name].diff == 0 or np.isnan(rows[name].diff)
    assert rows["gIoU held-out templates"].a == pytest.approx(
        metrics["by_template"]["heldout"]["giou"], abs=1e-3
    )
    # Each line also records the scored mask's size and the decoder's predicted IoU (for analyses of the
    # presence decision); the counts must be those of the mask that was scored.
    for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        assert s["union"] == s["mask_pixels"] + s["target_pixels"] - s["intersection"]
        assert np.isfinite(s["score"])
        if not s["present"]:
            assert s["mask_pixels"] == 0


def test_repeated_request_ids_stay_apart_in_samples_and_compare_refuses_them(tmp_path):
    from training.compare import read_samples
    from training.evaluate import sample_ids
    from training.records import Record

    records = [Record(image=Path("a.png"), prompt="x", mask=None, negative=True, sample_id=s) for s in "aab"]
    with pytest.warns(UserWarning, match="1 request id"):
        ids = sample_ids(records)
    assert len(set(ids)) == 3
    assert sample_ids(records[1:]) == ["a", "b"]  # unique ids are kept as they are
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')
    with pytest.raises(SystemExit, match="appears twice"):
        read_samples(tmp_path)


def test_calibrate_writes_the_chosen_presence_threshold_and_keeps_the_weights(trained, toy, tmp_path):
    from converseg_core.checkpoint import load_checkpoint
    from training.calibrate import (
        CalibrateConfig,
        calibrate,
        choose_threshold,
        criterion_value,
        fit_score_weight,
    )
    from training.metrics import GroupMetrics

    out, _ = trained
    src = out / "model.pt"
    before = src.read_bytes()
    dst = tmp_path / "calibrated.pt"
    record = calibrate(
        CalibrateConfig(
            checkpoint=str(src), data=str(toy), out=str(dst), split="all", thresholds=[0.1, 0.5, 0.9]
        )
    )
    assert record["presence_threshold"] in (0.1, 0.5, 0.9) and record["samples"] == 30
    assert record["criterion_name"] == "targets"

    def targets(v: dict) -> float:  # the default criterion, gIoU + N-acc + T-acc, from a record's numbers
        return (v["giou"] or 0.0) + v["n_acc"] + v["t_acc"]

    sweep = record["sweep"]
    chosen = sweep[str(record["presence_threshold"])]
    assert targets(chosen) == max(targets(v) for v in sweep.values())
    # The fitted predicted-IoU weight replaces the presence head alone only when it is better beyond noise.
    candidates = record["candidates"]
    assert "0.0" in candidates and str(record["presence_score_weight"]) in candidates
    gain = record["fitted_weight_gain"]
    if record["presence_score_weight"] != 0.0:
        assert gain["ci95"][0] > 0 and targets(chosen) == max(targets(c) for c in candidates.values())
    elif gain is not None:
        fitted = candidates[str(record["fitted_score_weight"])]
        assert gain["ci95"][0] <= 0 or targets(fitted) <= targets(chosen)
    a, b = load_checkpoint(src), load_checkpoint(dst)
    assert b.config.presence_threshold == record["presence_threshold"]
    assert b.config.presence_score_weight == record["presence_score_weight"]
    assert (
        b.config.replace(
            presence_threshold=a.config.presence_threshold,
            presence_score_weight=a.config.presence_score_weight,
        )
        == a.config
    )
    # The calibrated checkpoint, evaluated with its own rule, reproduces the validation numbers the record
    # claims for it (the sweep is rescored offline; this pass gates for real).
    again = evaluate(
        EvalConfig(checkpoint=str(dst), data=str(toy), out_dir=str(tmp_path / "again"), num_panels=0)
    )
    for key in ("giou", "n_acc", "t_acc"):
        assert again["overall"][key] == pytest.approx(chosen[key], abs=1e-3)
    kept = calibrate(
        CalibrateConfig(
            checkpoint=str(dst),
            data=str(toy),
            out=str(tmp_path / "kept.pt"),
            split="all",
            thresholds=[0.1, 0.5, 0.9],
            keep_score_weight=True,
        )
    )
    assert (
        kept["presence_score_weight"] == record["presence_score_weight"]
        and kept["fitted_score_weight"] is None
    )
    assert b.meta["presence_calibration"]["presence_threshold"] == record["presence_threshold"]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert src.read_bytes() == before and not b.extra
    with pytest.raises(SystemExit, match="must differ"):
        calibrate(CalibrateConfig(checkpoint=str(src), data=str(toy), out=str(src)))

    def group(n_acc, t_acc, giou=0.0):
        return GroupMetrics(10, 5, 5, giou, 0.0, 0.0, 0.0, n_acc, t_acc)

    # fit_score_weight: the predicted IoU's weight next to the presence logit, from a logistic regression.
    rng = np.random.default_rng(0)
    negative = rng.random(4000) < 0.3
    logit = rng.normal(np.where(negative, -1.0, 1.0), 1.5)
    iou = np.clip(rng.normal(np.where(negative, 0.3, 0.6), 0.2), 0, 1)
    presence = 1 / (1 + np.exp(-logit))
    assert fit_score_weight(presence, iou, negative) > 1.0  # the IoU separates the two kinds as well
    assert abs(fit_score_weight(presence, rng.random(4000), negative)) < 0.5  # an uninformative IoU: ~0
    assert fit_score_weight(presence, 1 - iou, negative) < -1.0  # a reversed one: negative weight
    assert fit_score_weight(presence, iou, np.zeros(4000, bool)) is None  # no negatives: nothing to fit
    assert (
        fit_score_weight(1 - presence, iou, negative) is None
    )  # a head pointing the wrong way is left alone

    # The criterion decides; a tie goes to the threshold nearer 0.5.
    for criterion in ("targets", "balanced"):
        sweep = {0.3: group(60, 90), 0.6: group(80, 80), 0.9: group(100, 40)}
        assert choose_threshold(sweep, criterion) == 0.6
        assert choose_threshold({0.2: group(70, 90), 0.6: group(90, 70)}, criterion) == 0.6
    # Masks count for 'targets' only: 4 N-acc points bought with 2 T-acc and 5 gIoU points are a loss there,
    # a gain in balanced accuracy.
    sweep = {0.7: group(70, 80, giou=40), 0.8: group(74, 78, giou=35)}
    assert choose_threshold(sweep, "targets") == 0.7 and choose_threshold(sweep, "balanced") == 0.8
    assert criterion_value(sweep[0.7], "targets") == 190 and criterion_value(sweep[0.7], "balanced") == 75
    with pytest.raises(ValueError, match="unknown criterion"):
        choose_threshold(sweep, "f1")
    with pytest.raises(ValueError, match="no-target and positive"):
        choose_threshold({0.5: GroupMetrics(5, 5, 0, 0.0, 0.0, 0.0, 0.0, None, 100.0)})


def test_a_fitted_presence_weight_must_gain_beyond_scene_noise():
    from training.calibrate import gain_interval

    rng = np.random.default_rng(1)
    samples = []
    for scene in range(200):
        for k in range(5):
            negative = k == 0
            samples.append({"id": f"{scene}_{k}", "scene": f"s{scene}", "negative": negative,
                            "presence": float(rng.uniform(0.3, 0.7)), "score": 0.1 if negative else 0.9,
                            "intersection": 0 if negative else 60, "union": 0 if negative else 100})  # fmt: skip
    # The presence head alone is a coin toss; the predicted IoU separates the requests completely.
    coin, informed = (0.0, 0.5), (5.0, 1 / (1 + np.exp(-2.5)))
    negative = np.array([s["negative"] for s in samples])
    kept = np.array([s["presence"] for s in samples]) >= 0.5
    n_acc, t_acc = 100 * (~kept[negative]).mean(), 100 * kept[~negative].mean()
    points, low, high = gain_interval(samples, coin, informed, criterion="balanced", resamples=500, seed=0)
    assert points == pytest.approx(100 - (n_acc + t_acc) / 2) and 0 < low < points < high
    # 'targets' also counts the masks: every positive the informed rule keeps adds its IoU (0.6) to gIoU.
    points, low, high = gain_interval(samples, coin, informed, criterion="targets", resamples=500, seed=0)
    assert points == pytest.approx((100 - n_acc) + (100 - t_acc) + 0.6 * (100 - t_acc)) and low > 0
    # A rule that differs on one no-target request: its point gain is real but inside the noise.
    samples[0]["presence"] = 0.5  # a no-target request that the coin keeps (>= 0.5) and the nudged rule drops
    nudged = (0.0, 0.5 + 1e-6)
    for criterion in ("balanced", "targets"):
        points, low, high = gain_interval(samples, coin, nudged, criterion=criterion, resamples=500, seed=0)
        assert points > 0 and low <= 0 <= high
    # Without no-target requests there is no criterion to compare.
    with pytest.raises(ValueError, match="no-target and positive"):
        gain_interval(
            [s for s in samples if not s["negative"]],
            coin,
            informed,
            criterion="targets",
            resamples=100,
            seed=0,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(toy, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "training.train",
        "--data",
        str(toy),
        "--out-dir",
        str(out),
        "--override",
        *TINY,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--val-fraction",
        "0.34",
        "--val-every",
        "2",
        "--val-samples",
        "4",
        "--num-panels",
        "1",
        "--num-workers",
        "0",
        "--random-text-encoder",
        "--no-progress",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["step"] == 2 and result["ranks_in_sync"] is True
    assert (out / "model.pt").is_file()


def test_reproduce_default_plan(tmp_path, capsys):
    from training.reproduce_default import main

    argv = ["--out", str(tmp_path), "--scale", "smoke", "--teacher-steps", "7", "--finetune-img-size", "256"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert stages == [
        "data-train",
        "data-test",
        "teacher",
        "distill",
        "finetune",
        "presence",
        "lite-cache",
        "lite-distill",
        "lite",
        "phrasings-teacher",
        "phrasings-student",
        "phrasings-lite",
        "calibrate-teacher",
        "calibrate-student",
        "calibrate-lite",
        "eval-teacher",
        "eval-student",
        "eval-lite",
    ]
    commands = dict(
        zip(stages, [line for line in out.splitlines() if not line.startswith("# ")], strict=True)
    )
    assert "--model converseg_mobilesam" in out and "--steps 7" in out
    assert ":image_encoder" in out and "--student converseg_edge" in out
    # the student fine-tunes at its own resolution; teacher and distillation keep the preset's
    assert "img_size=256" in commands["finetune"] and "img_size=128" in commands["teacher"]
    # calibration sees only the training run's validation scenes; evaluation the calibrated models
    assert "data/train --split val --val-fraction 0.3" in commands["calibrate-student"]
    # each model's phrasing memory holds its own training side (the same split), beside the model calibrated
    assert "-m training.phrasings build --data " in commands["phrasings-lite"]
    assert (
        f"--out {tmp_path / 'lite' / 'model.phrasings.json.gz'} --val-fraction 0.3"
        in commands["phrasings-lite"]
    )
    assert f"--checkpoint {tmp_path / 'lite' / 'model.pt'}" in commands["calibrate-lite"]
    assert all(
        commands[f"calibrate-{who}"].endswith("--mask-refinement 0 0.5") for who in ("student", "lite")
    )
    for stage in ("teacher", "finetune", "presence"):  # the scenes calibration uses never train
        assert "--val-fraction 0.3" in commands[stage], stage
    assert "presence/calibrated.pt" in commands["eval-student"] and "data/test" in commands["eval-student"]
    assert f"--init {tmp_path / 'student' / 'model.pt'} " in commands["presence"]
    # the lite stage weighs the Dice term up (the end of its command, below); the stages before it keep the default
    assert "--dice-weight" not in commands["finetune"]
    # the pretrained edge model: its trunk cached once, its neck fitted to the last student, then fine-tuned
    # on the cache at the student's resolution, with the student's presence head
    assert (
        f"--out {tmp_path / 'lite_cache'}" in commands["lite-cache"]
        and "--img-size 256" in commands["lite-cache"]
    )
    assert f"--teacher {tmp_path / 'presence' / 'model.pt'}" in commands["lite-distill"]
    lite = commands["lite"]
    assert (
        "--model converseg_edge_lite_concepts" in lite and f"--trunk-cache {tmp_path / 'lite_cache'}" in lite
    )
    assert lite.endswith("--concepts-lr 1e-2 --dice-weight 1.0")
    assert f"--init {tmp_path / 'lite_distilled.pt'}" in lite and "mask_presence=true" in lite
    assert "img_size=256" in lite and "--val-fraction 0.3" in lite
    assert "lite/calibrated.pt" in commands["eval-lite"]


def test_reproduce_default_v3_benchmark_compares_the_shipped_model_with_the_bundled_one(tmp_path, capsys):
    import json

    from converseg_core.weights import DEFAULT_CHECKPOINT as BUNDLED
    from training.dataengine.pinned import V3_TEST_ARGS
    from training.reproduce_default import SCALES, main, summarize

    argv = ["--out", str(tmp_path), "--scale", "smoke", "--dry-run"]
    assert main(argv) == 0
    without = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert main([*argv, "--v3-benchmark"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert stages == [*without, "data-v3-test", "eval-lite-v3", "eval-bundled-v3", "compare-v3"]
    commands = dict(
        zip(stages, [line for line in out.splitlines() if not line.startswith("# ")], strict=True)
    )
    v3 = tmp_path / "data" / "v3_test"
    assert (
        f"-m training.dataengine.pinned --engine v3 --out {v3} {' '.join(V3_TEST_ARGS)}"
        in commands["data-v3-test"]
    )
    assert f"--checkpoint {tmp_path / 'lite' / 'calibrated.pt'} --data {v3}" in commands["eval-lite-v3"]
    assert f"--checkpoint {BUNDLED} --data {v3}" in commands["eval-bundled-v3"] and BUNDLED.is_file()
    assert f"--a {tmp_path / 'eval_bundled_v3'} --b {tmp_path / 'eval_lite_v3'}" in commands["compare-v3"]

    # The summary puts the paired table right after the targets.
    overall = {"giou": 40.0, "ciou": 50.0, "n_acc": 80.0, "t_acc": 85.0}
    for who in ("teacher", "lite"):
        (tmp_path / f"eval_{who}").mkdir()
        (tmp_path / f"eval_{who}" / "metrics.json").write_text(json.dumps({"overall": overall}))
        (tmp_path / f"eval_{who}" / "metrics.md").write_text(f"## {who} metrics\n")
    (tmp_path / "lite").mkdir()
    (tmp_path / "lite" / "calibrated.pt").write_bytes(b"weights")
    (tmp_path / "compare_v3.md").write_text("| metric | bundled | lite |\n")
    summarize(tmp_path, SCALES["smoke"], {})
    text = (tmp_path / "summary.md").read_text()
    assert (
        text.index("| checkpoint <= 40 MB |") < text.index("v3 test set") < text.index("| metric | bundled")
    )
    assert text.index("| metric | bundled") < text.index("## lite metrics")


def test_init_official_loads_sam_named_weights(toy, tmp_path):
    """--init-official takes a plain SAM-style state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    from converseg_core.build import build_model

    sizes = {"img_size": 64, "fusion_mlp_dim": 64, "decoder_mlp_dim": 64, "fusion_depth": 1}  # = TINY
    donor = build_model("converseg_edge", pretrained_text=False, **sizes)
    official = {
        k: v
        for k, v in donor.state_dict().items()
        if k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))
    }
    torch.save({"model": official}, tmp_path / "official.pt")
    result = train(
        tiny_train(
            toy, tmp_path / "o", steps=1, init_official=str(tmp_path / "official.pt"), val_fraction=0.0
        )
    )
    assert result["step"] == 1
    bad = {k: v for k, v in official.items() if not k.startswith("mask_decoder.")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="mask_decoder"):
        train(
            tiny_train(toy, tmp_path / "b", steps=1, init_official=str(tmp_path / "bad.pt"), val_fraction=0.0)
        )


def test_mostly_bad_data_stops_training(tmp_path):
    """Corrupt images are skipped with a count; when most of the data is bad the run stops, naming why."""
    from training.records import DatasetError

    root = write_toy_dataset(tmp_path / "bad", num_scenes=6, size=(80, 60))
    for png in sorted((root / "shard-00000" / "images").glob("*.png"))[1:]:
        png.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="unreadable"):
        train(tiny_train(root, tmp_path / "o", steps=40, val_fraction=0.0, queries_per_image=0, batch_size=4))


def test_reproduce_default_plan_with_a_refine_stage(tmp_path, capsys):
    """--refine-steps adds a warm restart from the fine-tuned student; without a presence stage it is what gets
    calibrated and shipped."""
    from training.reproduce_default import main

    argv = [
        "--out",
        str(tmp_path),
        "--scale",
        "smoke",
        "--refine-steps",
        "9",
        "--refine-lr",
        "5e-5",
        "--refine-token-dropout",
        "0.15",
        "--refine-text-layers",
        "1",
        "--presence-steps",
        "0",
        "--samples-per-family",
        "2",
    ]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    commands = dict(
        zip(stages, [line for line in out.splitlines() if not line.startswith("# ")], strict=True)
    )
    assert stages.index("refine") == stages.index("finetune") + 1
    refine = commands["refine"]
    assert (
        f"--init {tmp_path / 'student' / 'model.pt'} " in refine
        and "--out-dir " + str(tmp_path / "refined") in refine
    )
    assert "--steps 9" in refine and "--lr 5e-05" in refine and "--train-image-encoder" in refine
    assert "--token-dropout 0.15" in refine
    # MiniLM's last layer trains in the refine stage only
    assert "text_trainable_layers=1" in refine and "--text-encoder-lr 5e-05" in refine
    assert "text_trainable_layers" not in commands["finetune"]
    # more requests per training scene; the test set keeps one per family, so test sets stay comparable
    data_train = commands["data-train"].split()
    assert data_train[data_train.index("--samples-per-family") + 1] == "2"
    assert "--samples-per-family" not in commands["data-test"]
    assert f"--checkpoint {tmp_path / 'refined' / 'model.pt'}" in commands["calibrate-student"]
    assert f"{tmp_path / 'refined' / 'calibrated.pt'}" in commands["eval-student"]
    assert f"{tmp_path / 'teacher' / 'calibrated.pt'}" in commands["eval-teacher"]


def test_reproduce_default_plan_with_a_presence_stage(tmp_path, capsys):
    """--presence-steps adds the mask-evidence presence head to the fine-tuned student and trains it alone; a
    refine stage then trains every part, the head included (the bundled default model's stages)."""
    from training.reproduce_default import main

    argv = ["--out", str(tmp_path), "--scale", "smoke", "--refine-steps", "5", "--presence-steps", "6"]
    assert main([*argv, "--presence-lr", "2e-3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    commands = dict(
        zip(stages, [line for line in out.splitlines() if not line.startswith("# ")], strict=True)
    )
    assert stages.index("presence") == stages.index("finetune") + 1
    assert stages.index("refine") == stages.index("presence") + 1
    presence = commands["presence"]
    assert f"--init {tmp_path / 'student' / 'model.pt'} " in presence
    assert "mask_presence=true" in presence and "--train-parts mask_presence" in presence
    assert "--steps 6" in presence and "--lr 0.002" in presence
    assert "--train-image-encoder" not in presence and "--image-encoder-lr" not in presence
    refine = commands["refine"]
    assert f"--init {tmp_path / 'presence' / 'model.pt'} " in refine
    assert "mask_presence=true" in refine and "--train-image-encoder" in refine
    assert "--train-parts" not in refine
    assert f"--checkpoint {tmp_path / 'refined' / 'model.pt'}" in commands["calibrate-student"]
    assert f"{tmp_path / 'refined' / 'calibrated.pt'}" in commands["eval-student"]
    assert "mask_presence" not in commands["finetune"]


def test_token_dropout_hides_only_words_and_keeps_one():
    from training.step import drop_tokens

    # two requests: 6 real tokens ([CLS] w w w w [SEP]) and 3 ([CLS] w [SEP]) + padding
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert torch.equal(drop_tokens(am, 0.0, torch.Generator().manual_seed(0)), am)
    seen_hidden = torch.zeros(6, dtype=torch.bool)
    for seed in range(50):
        out = drop_tokens(am, 0.5, torch.Generator().manual_seed(seed))
        assert out[:, 0].eq(1).all() and out[0, 5] == 1 and out[1, 2] == 1  # [CLS] and [SEP] stay
        assert torch.equal(out[1], am[1])  # its only word is never hidden
        assert out[0, 1:5].sum() >= 1  # at least one word stays
        assert (out <= am).all()  # padding never turns into a token
        seen_hidden |= (am[0] == 1) & (out[0] == 0)
    assert seen_hidden.tolist() == [False, True, True, True, True, False]
    again = drop_tokens(am, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again, drop_tokens(am, 0.5, torch.Generator().manual_seed(3)))


def test_token_dropout_trains_and_is_validated(toy, tmp_path):
    train(tiny_train(toy, tmp_path / "td", token_dropout=0.3))
    assert load_checkpoint(tmp_path / "td" / "model.pt").meta["step"] == 2
    with pytest.raises(SystemExit, match="token-dropout"):
        train(tiny_train(toy, tmp_path / "bad", token_dropout=1.0))


def test_images_per_second_counts_the_steps_since_the_last_log(toy, tmp_path):
    # The last step of a run that is not a multiple of --log-every (and the first log after a resume) counts
    # the images of its own interval, not --log-every steps' (a 2-step interval must not read as 10).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "rate"
    train(tiny_train(toy, out, steps=3, log_every=2))  # validation and saving make the interval long
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    rate = {e.step: e for e in events.Scalars("train/samples_per_s")}
    assert sorted(rate) == [2, 3]
    # images in the interval (2 to 3: one step of batch_size 2) = rate x the interval's length
    images = rate[3].value * (rate[3].wall_time - rate[2].wall_time)
    assert images == pytest.approx(2, rel=0.25)


@pytest.mark.parametrize("flag", ["steps", "log_every", "val_every", "save_every"])
def test_non_positive_intervals_are_refused_before_any_work(toy, tmp_path, flag):
    # --val-every 0 must exit naming the flag, not raise ZeroDivisionError after the model is built.
    with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} must be at least 1"):
        train(tiny_train(toy, tmp_path / "bad", **{flag: 0}))
    assert not (tmp_path / "bad").exists()


def test_train_parts_mask_presence_trains_only_the_new_head(trained, toy, tmp_path):
    """A trained model gains the mask-evidence presence head (--init keeps what the checkpoint holds, the new
    head starts at zero) and --train-parts mask_presence changes that head and nothing else."""
    out, _ = trained
    base = load_checkpoint(out / "model.pt").state_dict
    cfg = tiny_train(
        toy,
        tmp_path / "mp",
        override=[*TINY, "mask_presence=true"],
        init=[str(out / "model.pt")],
        train_parts=["mask_presence"],
        lr=1e-2,
    )
    train(cfg)
    after = load_checkpoint(tmp_path / "mp" / "model.pt")
    assert after.config.mask_presence
    head = [k for k in after.state_dict if k.startswith("mask_presence.")]
    assert head and all(k not in base for k in head)
    assert any(after.state_dict[k].abs().sum() > 0 for k in head if k.startswith("mask_presence.mlp.4."))
    for k, v in base.items():  # every other weight, BatchNorm statistics included, exactly as loaded
        assert torch.equal(after.state_dict[k], v), k


def test_train_parts_refuses_a_part_the_model_lacks_and_a_conflicting_flag(toy, tmp_path):
    with pytest.raises(SystemExit, match="mask_presence=true"):
        train(tiny_train(toy, tmp_path / "a", train_parts=["mask_presence"]))
    with pytest.raises(SystemExit, match="conflicts"):
        train(tiny_train(toy, tmp_path / "b", train_parts=["fusion"], train_image_encoder=True))


def test_trained_minilm_layer_learns_is_stored_and_the_frozen_ones_stay(trained, toy, tmp_path):
    """--override text_trainable_layers=1: only MiniLM's last layer trains (on cached layer-5 inputs), the
    checkpoint stores it, and --init of that file into a model that would not store the layer is refused
    rather than the trained layer silently dropped."""
    from converseg_core.build import build_model
    from training.cli import parse_overrides
    from training.parts import configure_trainable

    out, _ = trained
    override = [*TINY, "text_trainable_layers=1"]
    cfg = tiny_train(
        toy, tmp_path / "t1", override=override, init=[str(out / "model.pt")], text_encoder_lr=1e-2, lr=1e-2
    )
    torch.manual_seed(cfg.seed)  # the random MiniLM the run starts from (train() seeds and builds the same)
    start = build_model("converseg_edge", pretrained_text=False, **parse_overrides(override))
    configure_trainable(start, cfg)
    trainable = {n for n, p in start.text_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.5.") for n in trainable)
    assert len(trainable) == len(list(start.text_encoder.encoder.layer[5].parameters()))

    train(cfg)
    assert (tmp_path / "t1" / "text_features_random_layer5.pt").is_file()
    after = load_checkpoint(tmp_path / "t1" / "model.pt").state_dict
    text_keys = [k for k in after if k.startswith("text_encoder.")]
    assert sorted(text_keys) == sorted("text_encoder." + n for n in trainable)
    assert any(not torch.equal(after[k], start.state_dict()[k]) for k in text_keys)

    with pytest.raises(SystemExit, match="unexpected/mismatched .*text_encoder.encoder.layer.5"):
        train(tiny_train(toy, tmp_path / "t0", init=[str(tmp_path / "t1" / "model.pt")]))
    with pytest.raises(SystemExit, match="text_trainable_layers=N"):
        train(tiny_train(toy, tmp_path / "t2", train_parts=["text_encoder"]))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", 0.0),
        ("image_encoder_lr", float("nan")),
        ("weight_decay", -1.0),
    ],
)
def test_non_finite_rates_are_refused_before_any_work(toy, tmp_path, flag, value):
    """--lr nan would train to NaN weights and exit 0, its validation reporting N-acc 100: refused up front."""
    with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} must be a finite number"):
        train(tiny_train(toy, tmp_path / "o", **{flag: value}))
    assert not (tmp_path / "o").exists()


def test_a_run_that_diverges_at_the_end_writes_no_model(toy, tmp_path):
    """--lr 1e30: one update to weights near 1e30, then every step's loss is non-finite and skipped, fewer than
    --max-nan-steps in a row; the run must not end with exit 0 and write those weights as model.pt."""
    out = tmp_path / "o"
    with pytest.raises(FloatingPointError, match="model.pt was not written"):
        train(tiny_train(toy, out, steps=6, lr=1e30, max_nan_steps=10))
    assert not (out / "model.pt").exists()


def test_a_short_run_on_unreadable_data_writes_no_model(tmp_path):
    """Fewer than 64 samples read, all of them bad: the mid-run check never fired and the run wrote model.pt."""
    from training.records import DatasetError

    root = write_toy_dataset(tmp_path / "bad", num_scenes=6, size=(80, 60))
    for png in (root / "shard-00000" / "images").glob("*.png"):
        png.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="8 of the 8 samples read in all were unreadable"):
        train(tiny_train(root, tmp_path / "o", steps=4, val_fraction=0.0, queries_per_image=0, batch_size=2))
    assert not (tmp_path / "o" / "model.pt").exists()


def test_distill_refuses_a_non_finite_learning_rate(toy, tmp_path):
    with pytest.raises(SystemExit, match="--lr must be a finite number above 0, got nan"):
        distill(DistillConfig(images=str(toy), out_dir=str(tmp_path / "d"), lr=float("nan")))


def test_calibrate_chooses_the_mask_refinement_scale_on_validation(trained, toy, tmp_path):
    from training.calibrate import CalibrateConfig, calibrate

    out, _ = trained
    dst = tmp_path / "refined.pt"
    record = calibrate(
        CalibrateConfig(
            checkpoint=str(out / "model.pt"),
            data=str(toy),
            out=str(dst),
            split="all",
            thresholds=[0.1, 0.5, 0.9],
            keep_score_weight=True,
            mask_refinement=[0.0, 2.0],
        )
    )
    tried = record["mask_refinement_tried"]
    assert set(tried) == {"0", "2"} and tried["0"] != tried["2"]  # the scale changes the masks

    def targets(v: dict) -> float:
        return (v["giou"] or 0.0) + v["n_acc"] + v["t_acc"]

    best = max(tried, key=lambda s: (targets(tried[s]), -float(s)))
    assert record["mask_refinement"] == float(best) and record["previous_mask_refinement"] == 0.0
    assert load_checkpoint(dst).config.mask_refinement == float(best)
    # The file answers with the chosen scale: its own evaluation reproduces the numbers the record claims.
    again = evaluate(
        EvalConfig(checkpoint=str(dst), data=str(toy), out_dir=str(tmp_path / "e"), num_panels=0)
    )
    for key in ("giou", "n_acc", "t_acc"):
        assert again["overall"][key] == pytest.approx(tried[best][key], abs=1e-3)
    assert not list((tmp_path / "refined_calibration").rglob("*.pt"))  # no temporary model left behind
