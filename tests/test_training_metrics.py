"""ConverSeg metrics on hand-computed cases, empty masks included."""

import numpy as np
import pytest

from training.metrics import (
    MetricAccumulator,
    SampleResult,
    positive_outcomes,
    score_sample,
    summarize,
    target_size_group,
)


def m(rows):
    return np.array(rows, dtype=bool)


def test_iou_hand_computed():
    pred = m([[1, 1, 0], [0, 0, 0]])
    target = m([[0, 1, 1], [0, 0, 0]])
    s = score_sample(pred, target, negative=False)
    assert (s.intersection, s.union) == (1, 3)
    assert s.iou == pytest.approx(1 / 3)
    assert s.predicted_present


def test_a_positive_is_pointed_when_the_peak_lies_on_its_target():
    target = m([[0, 1, 1], [0, 0, 0]])
    empty = np.zeros((2, 3), bool)
    on = score_sample(empty, target, negative=False, present=False, peak=(2, 0))
    off = score_sample(empty, target, negative=False, present=False, peak=(0, 1))
    assert (on.pointed, off.pointed) == (True, False)
    assert score_sample(empty, target, negative=False).pointed is None
    assert score_sample(empty, empty, negative=True, peak=(0, 0)).pointed is None
    with pytest.raises(ValueError, match="outside"):
        score_sample(empty, target, negative=False, peak=(3, 0))
    # pointed counts answered and rejected positives alike; positives without a peak are left out of it
    o = positive_outcomes([on, off, on, score_sample(target, target, negative=False)])
    assert o.pointed == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert positive_outcomes([score_sample(target, target, negative=False)]).pointed is None


def test_empty_prediction_on_empty_target_is_iou_one():
    z = np.zeros((4, 4), bool)
    s = score_sample(z, z, negative=True, present=False)
    assert s.iou == 1.0 and not s.predicted_present


def test_absent_prediction_counts_as_empty_mask():
    target = m([[1, 1], [0, 0]])
    s = score_sample(np.ones((2, 2), bool), target, negative=False, present=False)
    assert (s.intersection, s.union, s.iou, s.predicted_present) == (0, 2, 0.0, False)


def test_giou_ciou_nacc_tacc():
    # Positive A: I=1, U=4 (IoU .25); positive B: I=6, U=6 (IoU 1); negative C predicted empty; D predicted 2 px.
    a = score_sample(m([[1, 1, 1, 1]]), m([[1, 0, 0, 0]]), negative=False)
    b = score_sample(np.ones((2, 3), bool), np.ones((2, 3), bool), negative=False)
    c = score_sample(np.zeros((2, 2), bool), np.zeros((2, 2), bool), negative=True)
    d = score_sample(m([[1, 1, 0]]), m([[0, 0, 0]]), negative=True)
    g = summarize([a, b, c, d])
    assert g.giou == pytest.approx(62.5)  # (0.25 + 1) / 2
    assert g.ciou == pytest.approx(70.0)  # (1 + 6) / (4 + 6)
    assert g.giou_all == pytest.approx(100 * (0.25 + 1 + 1 + 0) / 4)
    assert g.ciou_all == pytest.approx(100 * 7 / 12, abs=1e-3)  # D adds 2 false-positive pixels to the union
    assert g.n_acc == pytest.approx(50.0)
    assert g.t_acc == pytest.approx(100.0)
    assert (g.n, g.n_positive, g.n_negative) == (4, 2, 2)


def test_groups_and_missing_kinds():
    acc = MetricAccumulator()
    acc.add(score_sample(m([[1]]), m([[1]]), negative=False), family="color", template="seen")
    acc.add(
        score_sample(m([[0]]), m([[1]]), negative=False, present=False), family="spatial", template="heldout"
    )
    out = acc.to_dict()
    assert out["by_family"]["color"]["giou"] == 100.0
    assert out["by_family"]["spatial"]["t_acc"] == 0.0
    assert out["by_family"]["color"]["n_acc"] is None  # no negatives: not reported as 0 or 100
    assert out["overall"]["giou"] == 50.0


def test_inconsistent_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        score_sample(np.zeros((2, 2), bool), np.zeros((3, 2), bool), negative=False)
    with pytest.raises(ValueError, match="negative"):
        score_sample(np.zeros((2, 2), bool), np.ones((2, 2), bool), negative=True)


def test_presence_sweep_gates_ungated_scores_by_threshold():
    """Hand-computed: one positive (IoU 3/5 ungated, target 4 px) and one negative (2 false-positive px)."""
    from training.evaluate import presence_sweep

    pos = score_sample(np.array([1, 1, 1, 1, 0, 0], bool), np.array([0, 1, 1, 1, 1, 0], bool), negative=False)
    neg = score_sample(np.array([1, 1, 0, 0, 0, 0], bool), np.zeros(6, bool), negative=True)
    assert (pos.intersection, pos.union) == (3, 5)
    sweep = presence_sweep([(0.6, pos, 4), (0.3, neg, 0)], [0.2, 0.5, 0.7])
    low, mid, high = sweep[0.2], sweep[0.5], sweep[0.7]
    # 0.2: both predicted -> positive IoU 0.6, the negative is wrong
    assert low.giou == pytest.approx(60.0) and low.n_acc == 0.0 and low.t_acc == 100.0
    # 0.5: the negative is gated (right), the positive kept
    assert mid.giou == pytest.approx(60.0) and mid.n_acc == 100.0 and mid.t_acc == 100.0
    # 0.7: both gated -> the positive scores 0 with its whole target as union
    assert high.giou == 0.0 and high.ciou == 0.0 and high.n_acc == 100.0 and high.t_acc == 0.0
    assert high.giou_all == pytest.approx(50.0)  # the negative's empty answer is IoU 1


def test_presence_auc_ranks_present_above_absent_with_ties_counting_half():
    from training.metrics import presence_auc

    negative = [False, False, True, True]
    assert presence_auc([0.9, 0.8, 0.2, 0.1], negative) == 100.0
    assert presence_auc([0.1, 0.2, 0.8, 0.9], negative) == 0.0
    # pairs (positive, negative): 0.9 > 0.5 and 0.9 > 0.3; 0.5 = 0.5 (half); 0.5 > 0.3 -> 3.5 of 4
    assert presence_auc([0.9, 0.5, 0.5, 0.3], negative) == 87.5
    assert presence_auc([0.7, 0.7, 0.7, 0.7], negative) == 50.0
    assert presence_auc([0.9, 0.1], [False, False]) is None
    assert presence_auc([], []) is None


def test_target_size_groups_cover_every_positive_once_in_size_order():
    # 100 x 100 image: 99 px is 0.99 % (smallest group), 100 px is exactly 1 % (next group: edges are lower-inclusive)
    names = [target_size_group(px, 100 * 100) for px in (1, 99, 100, 249, 250, 499, 500, 10_000)]
    assert names == ["0-1 %", "0-1 %", "1-2.5 %", "1-2.5 %", "2.5-5 %", "2.5-5 %", ">= 5 %", ">= 5 %"]
    assert sorted(set(names)) == list(dict.fromkeys(names))  # tables list them small to large
    assert target_size_group(0, 100) is None  # no-target queries belong to no size group
    with pytest.raises(ValueError, match="image_pixels"):
        target_size_group(5, 0)


def test_positive_outcomes_split_positives_by_what_went_wrong():
    """Five positives: one rejected, IoU 0.05 (wrong), 0.1 (partial: edges are lower-inclusive), 0.3, 0.5 (good).
    The negative counts in no share."""
    results = [
        SampleResult(0, 10, negative=False, predicted_present=False),
        SampleResult(1, 20, negative=False, predicted_present=True),
        SampleResult(1, 10, negative=False, predicted_present=True),
        SampleResult(3, 10, negative=False, predicted_present=True),
        SampleResult(5, 10, negative=False, predicted_present=True),
        SampleResult(0, 4, negative=True, predicted_present=True),
    ]
    o = positive_outcomes(results)
    assert o.n_positive == 5
    assert (o.rejected, o.wrong, o.partial, o.good) == (20.0, 20.0, 40.0, 20.0)
    assert o.answered_iou == pytest.approx(100 * (0.05 + 0.1 + 0.3 + 0.5) / 4)
    # the identity the table states: gIoU = answered IoU x answered share
    assert summarize(results).giou == pytest.approx(o.answered_iou * (100 - o.rejected) / 100)
    none = positive_outcomes([SampleResult(0, 0, negative=True, predicted_present=False)])
    assert none.n_positive == 0 and none.rejected is None and none.answered_iou is None
    everything_rejected = positive_outcomes([SampleResult(0, 3, negative=False, predicted_present=False)])
    assert everything_rejected.rejected == 100.0 and everything_rejected.answered_iou is None


# ------------------------------------------------------------------------------ paired comparison (compare)
def _write_samples(folder, rows):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _sample(i, scene, *, inter, union, split="seen", negative=False, present=True, family="f"):
    return {
        "id": f"r{i}",
        "scene": f"s{scene}",
        "family": family,
        "split": split,
        "negative": negative,
        "intersection": inter,
        "union": union,
        "present": present,
        "presence": 0.9 if present else 0.1,
        "target_pixels": 0 if negative else 10,
    }


def test_compare_hand_computed_values_and_a_held_out_only_gain(tmp_path):
    from training.compare import compare, pair, read_samples

    # 40 scenes, each: a seen positive (IoU 0.5), a held-out positive, a negative. A answers the held-out one
    # with IoU 0.2, B with 0.6; everything else equal.
    a_rows, b_rows = [], []
    for s in range(40):
        base = [
            _sample(3 * s, s, inter=5, union=10),
            _sample(3 * s + 2, s, inter=0, union=0, negative=True, present=(s % 4 == 0)),
        ]
        a_rows += base + [_sample(3 * s + 1, s, inter=2, union=10, split="heldout")]
        b_rows += base + [_sample(3 * s + 1, s, inter=6, union=10, split="heldout")]
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", a_rows)),
        read_samples(_write_samples(tmp_path / "b", b_rows)),
    )
    rows = {r.metric: r for r in compare(a, b, bootstrap=200, seed=1)}
    assert rows["gIoU"].a == pytest.approx(35.0) and rows["gIoU"].b == pytest.approx(55.0)
    assert rows["cIoU"].a == pytest.approx(100 * 7 / 20) and rows["cIoU"].b == pytest.approx(100 * 11 / 20)
    assert rows["N-acc"].a == pytest.approx(75.0) and rows["N-acc"].diff == 0
    assert rows["T-acc"].a == pytest.approx(100.0)
    assert rows["gIoU + N-acc + T-acc"].a == pytest.approx(35 + 75 + 100)
    assert rows["gIoU + N-acc + T-acc"].diff == pytest.approx(20.0)
    assert rows["(N-acc + T-acc) / 2"].a == pytest.approx(87.5) and rows["(N-acc + T-acc) / 2"].diff == 0
    gap = rows["held-out gap (seen - held-out)"]
    assert gap.a == pytest.approx(30.0) and gap.b == pytest.approx(-10.0)
    assert gap.high < 0  # every scene gains the same: the interval is the difference itself
    seen = rows["gIoU seen templates"]
    assert seen.diff == 0 and seen.low == 0 and seen.high == 0


def test_compare_concept_matched_gap_separates_phrasing_from_which_requests_are_held_out(tmp_path):
    from training.compare import compare, pair, read_samples

    # Per scene: concept "f.easy" has two seen positives (IoU 1.0) and one held-out (0.8); concept "f.hard"
    # one seen (0.2) and three held-out (0.2). A negative and a held-out-only concept ("f.new") are ignored.
    # Raw gap: seen (1 + 1 + 0.2) / 3 - held (0.8 + 0.6 + 0.5) / 5 = 73.3 - 38.0. Matched: easy 20 points
    # (1 held-out), hard 0 (3): (20 * 1 + 0 * 3) / 4 = 5.0.
    rows = []
    for sc in range(30):
        spec = [("f.easy.t0.n1", "seen", 10), ("f.easy.t1.n2", "seen", 10), ("f.easy.t2.n0", "heldout", 8)]
        spec += [("f.hard.p0.q1", "seen", 2)] + [(f"f.hard.p{k}.d0", "heldout", 2) for k in (1, 2, 3)]
        spec += [("f.new.t0.n0", "heldout", 5)]
        for k, (template, split, inter) in enumerate(spec):
            rows.append(
                {**_sample(10 * sc + k, sc, inter=inter, union=10, split=split), "template": template}
            )
        rows.append({**_sample(10 * sc + 9, sc, inter=0, union=0, negative=True), "template": "f.easy.t0.n0"})
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", rows)), read_samples(_write_samples(tmp_path / "b", rows))
    )
    got = {r.metric: r for r in compare(a, b, bootstrap=200, seed=0)}
    assert got["held-out gap (seen - held-out)"].a == pytest.approx(100 * 2.2 / 3 - 100 * 1.9 / 5)
    matched = got["held-out gap, concept-matched"]
    assert matched.a == pytest.approx(5.0) and matched.diff == 0
    assert got["f: held-out gap, concept-matched"].a == pytest.approx(5.0)

    # Without template ids (evaluations written before evaluate stored them) the row is left out, not faked.
    plain = [{k: v for k, v in r.items() if k != "template"} for r in rows]
    a, b = pair(
        read_samples(_write_samples(tmp_path / "c", plain)),
        read_samples(_write_samples(tmp_path / "d", plain)),
    )
    assert "held-out gap, concept-matched" not in {r.metric for r in compare(a, b, bootstrap=200, seed=0)}


def test_compare_presence_auc_matches_the_evaluation_and_bootstraps_over_scenes(tmp_path):
    from training.compare import compare, pair, read_samples
    from training.metrics import presence_auc

    # 30 scenes of two positives and a negative. A's presence orders them right in the seen-template
    # requests and at random in the held-out ones; B orders every held-out pair right.
    rng = np.random.default_rng(3)
    a_rows, b_rows = [], []
    for sc in range(30):
        split = "heldout" if sc % 2 else "seen"
        scores = rng.random(3).round(2) if split == "heldout" else np.array([0.9, 0.8, 0.2])
        for k, negative in enumerate((False, False, True)):
            row = _sample(
                3 * sc + k, sc, inter=0 if negative else 5, union=0 if negative else 10, split=split
            )
            row["negative"] = negative
            a_rows.append({**row, "presence": float(scores[k])})
            b_rows.append({**row, "presence": 0.1 if negative else 0.95})
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", a_rows)),
        read_samples(_write_samples(tmp_path / "b", b_rows)),
    )
    rows = {r.metric: r for r in compare(a, b, bootstrap=300, seed=0)}
    held = [r for r in a_rows if r["split"] == "heldout"]
    expected = presence_auc([r["presence"] for r in held], [r["negative"] for r in held])
    assert rows["presence AUC, held-out templates"].a == pytest.approx(expected, abs=1e-3)
    assert rows["presence AUC, seen templates"].a == pytest.approx(100.0)
    assert rows["presence AUC"].b == pytest.approx(100.0)
    gain = rows["presence AUC, held-out templates"]
    assert gain.diff == pytest.approx(100.0 - expected, abs=1e-3) and gain.low > 0
    seen = rows["presence AUC, seen templates"]
    assert seen.diff == 0 and seen.low == seen.high == 0

    # Evaluations without presence scores leave the rows out.
    plain = [{k: v for k, v in r.items() if k != "presence"} for r in a_rows]
    a, b = pair(
        read_samples(_write_samples(tmp_path / "c", plain)),
        read_samples(_write_samples(tmp_path / "d", plain)),
    )
    assert not any("presence AUC" in r.metric for r in compare(a, b, bootstrap=100, seed=0))


def test_compare_interval_covers_zero_for_noise_and_refuses_other_requests(tmp_path):
    from training.compare import compare, pair, read_samples

    rng = np.random.default_rng(0)
    a_rows, b_rows = [], []
    for i in range(0, 200, 2):  # B = A plus noise that sums to zero: +d on one request, -d on the next
        inter, d = rng.integers(3, 8, size=2), int(rng.integers(0, 4))
        for k, sign in ((0, 1), (1, -1)):
            a_rows.append(_sample(i + k, (i + k) % 37, inter=int(inter[k]), union=10))
            b_rows.append(_sample(i + k, (i + k) % 37, inter=int(inter[k]) + sign * d, union=10))
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", a_rows)),
        read_samples(_write_samples(tmp_path / "b", b_rows)),
    )
    g = next(r for r in compare(a, b, bootstrap=500, seed=0) if r.metric == "gIoU")
    assert g.diff == pytest.approx(0) and g.low < 0 < g.high

    with pytest.raises(SystemExit, match="different requests"):
        pair(read_samples(tmp_path / "a"), read_samples(_write_samples(tmp_path / "c", b_rows[:-1])))
    with pytest.raises(SystemExit, match="not found"):
        read_samples(tmp_path / "missing")
    with pytest.raises(SystemExit, match="at least 100"):
        compare(a, b, bootstrap=10, seed=0)


def test_compare_of_held_out_only_requests_prints_dashes_not_nan(tmp_path):
    from training.compare import compare, markdown, pair, read_samples

    # what `evaluate --split unused` writes: every request held out, so seen-template rows have no requests
    a_rows = [_sample(i, i % 20, inter=4, union=10, split="heldout") for i in range(60)]
    b_rows = [_sample(i, i % 20, inter=6, union=10, split="heldout") for i in range(60)]
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", a_rows)),
        read_samples(_write_samples(tmp_path / "b", b_rows)),
    )
    rows = compare(a, b, bootstrap=200, seed=0)
    held = next(r for r in rows if r.metric == "gIoU held-out templates")
    assert held.diff == pytest.approx(20.0) and held.low > 0
    text = markdown(rows, ["A", "B"], 60, 20, 200)
    assert "nan" not in text
    assert "| gIoU seen templates | - | - | - | [-, -] |" in text


def test_masks_alone_scores_rejected_positives_masks_as_perfect_presence_would():
    """A rejected positive keeps IoU 0 in gIoU but its own mask's IoU in masks_alone; an accepted one counts
    the same in both; negatives have no ungated IoU; a group lacking it for some positive reports none."""
    target = m([[1, 1, 0, 0], [1, 1, 0, 0]])
    half = m([[1, 1, 0, 0], [0, 0, 0, 0]])  # IoU 0.5
    rejected = score_sample(target, target, negative=False, present=False)
    accepted = score_sample(half, target, negative=False, present=True)
    assert (rejected.iou, rejected.ungated_iou) == (0.0, 1.0)
    assert accepted.iou == accepted.ungated_iou == pytest.approx(0.5)
    assert score_sample(half, np.zeros_like(target), negative=True, present=False).ungated_iou is None
    results = [rejected, accepted]
    o = positive_outcomes(results)
    assert summarize(results).giou == pytest.approx(25.0)
    assert o.masks_alone == pytest.approx(75.0)
    assert positive_outcomes([accepted, SampleResult(1, 2, negative=False, predicted_present=True)]).masks_alone is None


def test_compare_masks_alone_tells_a_better_segmenter_from_a_stricter_presence_rule(tmp_path):
    from training.compare import compare, pair, read_samples

    # 30 scenes, one positive each with the same mask (ungated IoU 0.6). A accepts it; B rejects every third:
    # B's gIoU drops, its masks alone do not.
    a_rows, b_rows = [], []
    for s in range(30):
        a_rows.append({**_sample(s, s, inter=6, union=10), "ungated_iou": 0.6})
        rejected = s % 3 == 0
        b = _sample(s, s, inter=0 if rejected else 6, union=10, present=not rejected)
        b_rows.append({**b, "ungated_iou": 0.6})
    a, b = pair(
        read_samples(_write_samples(tmp_path / "a", a_rows)),
        read_samples(_write_samples(tmp_path / "b", b_rows)),
    )
    rows = {r.metric: r for r in compare(a, b, bootstrap=200, seed=1)}
    assert rows["gIoU"].a == pytest.approx(60.0) and rows["gIoU"].b == pytest.approx(40.0)
    alone = rows["gIoU, masks alone"]
    assert alone.a == alone.b == pytest.approx(60.0) and alone.low == alone.high == 0
    # evaluations written before samples.jsonl carried ungated_iou compare without the row
    old = read_samples(_write_samples(tmp_path / "old", [_sample(s, s, inter=6, union=10) for s in range(30)]))
    a, b = pair(old, read_samples(tmp_path / "b"))
    assert "gIoU, masks alone" not in {r.metric for r in compare(a, b, bootstrap=100, seed=0)}
