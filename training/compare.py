"""Compare two evaluations of the same requests, with confidence intervals: is model B really better than A?

    python -m training.compare --a runs/eval_a --b runs/eval_b --names baseline candidate

Reads the samples.jsonl that `training.evaluate` writes into each --out-dir. Both must have scored the same
requests (same test set, same --limit); the comparison is paired, request by request. For every metric it
prints A, B, B - A and a 95 % interval of B - A from a bootstrap over scenes: scenes are drawn with
replacement, because the requests of one scene share an image and are not independent. An interval that
excludes 0 is a difference this test set can tell apart from noise; one that includes it is not.

Metrics (see training/metrics.py): gIoU and cIoU on positives, N-acc, T-acc, gIoU on seen and held-out
templates and their gap (seen - held-out), presence AUC (threshold-free; overall, seen and held-out templates),
gIoU of the masks alone (every positive's mask whatever presence said: the gIoU a perfect presence decision
would give, which tells a better segmenter from a shifted presence rule) and per concept family gIoU and gap.

The held-out phrasings are not spread evenly over kinds of request (a family's held-out phrasings may all be
hard relations while its seen ones include easy free-space requests), so the raw gap mixes phrasing with
content. "held-out gap, concept-matched" compares each held-out positive with the seen phrasings of its own
concept (the template id's first two parts, e.g. `intent.lighting`, `spatial.left_of`): per concept, seen
gIoU - held-out gIoU, averaged with the concepts' held-out positive counts as weights, over the concepts that
have both, overall and per family. What remains is the cost of unseen words. (Only when samples.jsonl
carries template ids.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import arg, config_parser
from .metrics import criterion_score


@dataclass
class CompareConfig:
    a: str = arg(help="evaluation folder of model A (holds samples.jsonl)")
    b: str = arg(help="evaluation folder of model B, same requests")
    names: list[str] = arg(["A", "B"], help="labels of A and B in the table", nargs=2)
    bootstrap: int = arg(2000, help="bootstrap resamples of the scenes (at least 100)")
    seed: int = arg(0, help="bootstrap random seed")
    out: str | None = arg(None, help="also write the markdown table here")


@dataclass
class Samples:
    """Per-request arrays of one evaluation, in a fixed request order."""

    ids: list[str]
    scene: np.ndarray  # int index of the request's scene
    family: np.ndarray  # str
    heldout: np.ndarray  # bool: template split is held out
    negative: np.ndarray  # bool
    inter: np.ndarray  # float pixel counts
    union: np.ndarray
    present: np.ndarray  # bool: predicted something
    concept: np.ndarray | None = None  # str: template id's first two parts; None without template ids
    presence: np.ndarray | None = None  # float: the presence score; None where samples.jsonl lacks it
    # float: a positive's IoU whatever presence said (0 for negatives); None where samples.jsonl lacks it
    ungated: np.ndarray | None = None

    @property
    def iou(self) -> np.ndarray:
        return np.where(self.union == 0, 1.0, self.inter / np.maximum(self.union, 1))


def read_samples(folder: str | Path) -> dict[str, dict]:
    path = Path(folder) / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(
            f"{path}: not found; evaluate with `python -m training.evaluate ... --out-dir {folder}` first "
            "(evaluation folders written before evaluate wrote samples.jsonl lack it)"
        )
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            key = str(row["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}:{n}: not a samples.jsonl line ({exc})") from exc
        if key in rows:
            raise SystemExit(
                f"{path}:{n}: request id {key!r} appears twice; evaluate again with this version of "
                "training.evaluate (it makes repeated ids unique)"
            )
        rows[key] = row
    if not rows:
        raise SystemExit(f"{path}: empty")
    return rows


def pair(a: dict[str, dict], b: dict[str, dict]) -> tuple[Samples, Samples]:
    """Both evaluations as arrays over the same requests; refuses evaluations of different requests."""
    if a.keys() != b.keys():
        only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        raise SystemExit(
            f"the evaluations scored different requests ({only_a} only in A, {only_b} only in B): "
            "compare evaluations of one test set with the same --limit and no skipped samples"
        )
    ids = sorted(a)
    for i in ids:
        if a[i]["negative"] != b[i]["negative"] or a[i]["split"] != b[i]["split"]:
            raise SystemExit(f"request {i}: A and B disagree on its labels; not the same test set")
    scenes = {s: k for k, s in enumerate(sorted({a[i]["scene"] for i in ids}))}
    templates = [a[i].get("template") for i in ids]
    concept = None if None in templates else np.array([".".join(str(t).split(".")[:2]) for t in templates])
    with_presence = all("presence" in a[i] and "presence" in b[i] for i in ids)
    with_ungated = all(a[i]["negative"] or ("ungated_iou" in a[i] and "ungated_iou" in b[i]) for i in ids)

    def arrays(rows: dict[str, dict]) -> Samples:
        return Samples(
            ids=ids,
            scene=np.array([scenes[rows[i]["scene"]] for i in ids]),
            family=np.array([rows[i]["family"] for i in ids]),
            heldout=np.array([rows[i]["split"] == "heldout" for i in ids]),
            negative=np.array([bool(rows[i]["negative"]) for i in ids]),
            inter=np.array([rows[i]["intersection"] for i in ids], float),
            union=np.array([rows[i]["union"] for i in ids], float),
            present=np.array([bool(rows[i]["present"]) for i in ids]),
            concept=concept,
            presence=np.array([rows[i]["presence"] for i in ids], float) if with_presence else None,
            ungated=np.array([rows[i].get("ungated_iou", 0.0) for i in ids], float) if with_ungated else None,
        )

    return arrays(a), arrays(b)


# A metric maps (samples, C) to one value per row of C: C is R x S scene counts (how often each scene was
# drawn; a row of ones is the test set itself). Every metric is a ratio of sums over requests, so requests are
# summed per scene once and the bootstrap only reweights scenes. NaN where the group is empty.
Metric = Callable[[Samples, np.ndarray], np.ndarray]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 100.0 * num / np.where(den > 0, den, 1), np.nan)


def ratio(parts: Callable[[Samples], tuple[np.ndarray, np.ndarray]]) -> Metric:
    """100 * sum(numerator) / sum(denominator), from per-request parts (the definitions of metrics.py)."""

    def f(s: Samples, counts: np.ndarray) -> np.ndarray:
        num, den = parts(s)
        per_scene = [
            np.bincount(s.scene, weights=x.astype(float), minlength=counts.shape[1]) for x in (num, den)
        ]
        return _ratio(counts @ per_scene[0], counts @ per_scene[1])

    return f


def giou(select: Callable[[Samples], np.ndarray] | None = None) -> Metric:
    def parts(s: Samples) -> tuple[np.ndarray, np.ndarray]:
        m = ~s.negative & (select(s) if select else True)
        return s.iou * m, m

    return ratio(parts)


ciou = ratio(lambda s: (s.inter * ~s.negative, s.union * ~s.negative))
n_acc = ratio(lambda s: (s.negative & ~s.present, s.negative))
t_acc = ratio(lambda s: (~s.negative & s.present, ~s.negative))


def gap(select: Callable[[Samples], np.ndarray] | None = None) -> Metric:
    seen = giou(lambda s: ~s.heldout & (select(s) if select else True))
    held = giou(lambda s: s.heldout & (select(s) if select else True))
    return lambda s, c: seen(s, c) - held(s, c)


def matched_gap(select: Callable[[Samples], np.ndarray] | None = None) -> Metric:
    """Seen - held-out gIoU within each concept, weighted by the concept's held-out positives (module doc)."""

    def f(s: Samples, counts: np.ndarray) -> np.ndarray:
        if s.concept is None:
            raise ValueError("a concept-matched gap needs the template ids of the requests")
        names, code = np.unique(s.concept, return_inverse=True)
        n_scenes = counts.shape[1]
        cell = code * n_scenes + s.scene

        def per_concept(x: np.ndarray) -> np.ndarray:  # R x K sums over the resampled scenes
            grid = np.bincount(cell, weights=x.astype(float), minlength=len(names) * n_scenes)
            return counts @ grid.reshape(len(names), n_scenes).T

        positive = ~s.negative & (select(s) if select else True)
        seen, held = positive & ~s.heldout, positive & s.heldout
        seen_den, held_den = per_concept(seen), per_concept(held)
        both = (seen_den > 0) & (held_den > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            gaps = per_concept(s.iou * seen) / seen_den - per_concept(s.iou * held) / held_den
        weight = np.where(both, held_den, 0.0)
        return _ratio((np.where(both, gaps, 0.0) * weight).sum(1), weight.sum(1))

    return f


def presence_auc(select: Callable[[Samples], np.ndarray] | None = None) -> Metric:
    """training.metrics.presence_auc with each request weighted by how often its scene was drawn: the weighted
    share of (positive, negative) pairs that the presence score orders right, ties counting half."""

    def f(s: Samples, counts: np.ndarray) -> np.ndarray:
        m = select(s) if select else np.ones(len(s.ids), bool)
        if not (m & s.negative).any() or not (m & ~s.negative).any():
            return np.full(len(counts), np.nan)
        order = np.argsort(s.presence[m], kind="mergesort")
        _, first = np.unique(s.presence[m][order], return_index=True)
        scene, negative = s.scene[m][order], s.negative[m][order]
        out = []
        for chunk in np.array_split(counts, max(1, len(counts) // 200)):
            w = chunk[:, scene]  # R x n request weights, in presence order
            neg = np.add.reduceat(w * negative, first, axis=1)  # R x K weight of the negatives per score
            pos = np.add.reduceat(w * ~negative, first, axis=1)
            below = np.cumsum(neg, axis=1) - neg
            out.append(_ratio((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1)))
        return np.concatenate(out)

    return f


def metrics(
    families: Sequence[str],
    concept_matched: bool = False,
    with_presence: bool = False,
    with_ungated: bool = False,
) -> dict[str, Metric]:
    g = giou()
    out: dict[str, Metric] = {
        "gIoU": g,
        "cIoU": ciou,
        "N-acc": n_acc,
        "T-acc": t_acc,
        # the calibration criteria (training.calibrate --criterion): the targets' sum and balanced accuracy
        "gIoU + N-acc + T-acc": lambda s, c: criterion_score("targets", g(s, c), n_acc(s, c), t_acc(s, c)),
        "(N-acc + T-acc) / 2": lambda s, c: criterion_score("balanced", g(s, c), n_acc(s, c), t_acc(s, c)),
        "gIoU seen templates": giou(lambda s: ~s.heldout),
        "gIoU held-out templates": giou(lambda s: s.heldout),
        "held-out gap (seen - held-out)": gap(),
    }
    if concept_matched:
        out["held-out gap, concept-matched"] = matched_gap()
    if with_presence:
        out["presence AUC"] = presence_auc()
        out["presence AUC, seen templates"] = presence_auc(lambda s: ~s.heldout)
        out["presence AUC, held-out templates"] = presence_auc(lambda s: s.heldout)
    if with_ungated:
        out["gIoU, masks alone"] = ratio(lambda s: (s.ungated * ~s.negative, ~s.negative))
    for fam in families:
        out[f"{fam}: gIoU"] = giou(lambda s, fam=fam: s.family == fam)
        out[f"{fam}: held-out gap"] = gap(lambda s, fam=fam: s.family == fam)
        if concept_matched:
            out[f"{fam}: held-out gap, concept-matched"] = matched_gap(lambda s, fam=fam: s.family == fam)
    return out


@dataclass
class Row:
    metric: str
    a: float
    b: float
    diff: float
    low: float
    high: float


def scene_resamples(n_scenes: int, bootstrap: int, seed: int) -> np.ndarray:
    """bootstrap x n_scenes: how often each scene is drawn in each resample (scenes drawn with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_scenes, np.full(n_scenes, 1 / n_scenes), size=bootstrap).astype(float)


def compare(a: Samples, b: Samples, *, bootstrap: int, seed: int) -> list[Row]:
    """Paired differences B - A with 95 % scene-bootstrap intervals (percentile method)."""
    if bootstrap < 100:
        raise SystemExit(f"--bootstrap must be at least 100 for a 95 % interval, got {bootstrap}")
    n_scenes = int(a.scene.max()) + 1
    rows = []
    ones = np.ones((1, n_scenes))
    counts = scene_resamples(n_scenes, bootstrap, seed)
    chosen = metrics(
        sorted(set(a.family)),
        concept_matched=a.concept is not None,
        with_presence=a.presence is not None,
        with_ungated=a.ungated is not None,
    )
    for name, f in chosen.items():
        va, vb = float(f(a, ones)[0]), float(f(b, ones)[0])
        d = f(b, counts) - f(a, counts)
        d = d[~np.isnan(d)]
        low, high = np.percentile(d, [2.5, 97.5]) if d.size else (np.nan, np.nan)
        rows.append(Row(name, va, vb, vb - va, float(low), float(high)))
    return rows


def markdown(rows: list[Row], names: Sequence[str], n_requests: int, n_scenes: int, bootstrap: int) -> str:
    def f(v: float) -> str:
        return "-" if np.isnan(v) else f"{v:.1f}"

    out = [
        f"{n_requests} requests in {n_scenes} scenes; 95 % intervals from {bootstrap} scene bootstraps. "
        "* marks an interval that excludes 0.",
        "",
        f"| metric | {names[0]} | {names[1]} | {names[1]} - {names[0]} | 95 % interval |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        sig = " *" if not np.isnan(r.low) and (r.low > 0 or r.high < 0) else ""
        diff = "-" if np.isnan(r.diff) else f"{r.diff:+.1f}"  # a group one side lacks
        out.append(f"| {r.metric} | {f(r.a)} | {f(r.b)} | {diff}{sig} | [{f(r.low)}, {f(r.high)}] |")
    return "\n".join(out) + "\n"


def run(cfg: CompareConfig) -> list[Row]:
    a, b = pair(read_samples(cfg.a), read_samples(cfg.b))
    rows = compare(a, b, bootstrap=cfg.bootstrap, seed=cfg.seed)
    md = markdown(rows, cfg.names, len(a.ids), int(a.scene.max()) + 1, cfg.bootstrap)
    print(md)
    if cfg.out:
        Path(cfg.out).write_text(md)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(CompareConfig, __doc__)
    run(CompareConfig(**vars(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
