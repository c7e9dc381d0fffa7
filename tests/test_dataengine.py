"""Data engine: determinism, masks vs scene graph, families and negatives, readable output, verifier, bad input.

Renders a handful of 256 x 192 scenes with one engine per module (building it takes a few seconds).
Tests that render or read the models are skipped, with the reason, where the Debian package
sweethome3d-furniture is not installed; the verifier, knowledge-base and bad-mesh tests always run.
"""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.dataengine import assets as assets_mod
from training.dataengine.assets import furniture_available

needs_furniture = pytest.mark.skipif(
    not furniture_available(),
    reason="sweethome3d-furniture is not installed (apt-get install sweethome3d-furniture, see scripts/setup.sh)",
)

W, H = 256, 192
SCENES = [0, 1, 2, 3, 4, 5, 6, 7]  # with 221 categories the first region request (free space) is in scene 7


@pytest.fixture(scope="module")
def engine():
    from training.dataengine.pipeline import Engine, EngineConfig

    return Engine(EngineConfig(seed=7, width=W, height=H, shadow_size=512))


@pytest.fixture(scope="module")
def results(engine):
    return [engine.render_scene(i) for i in SCENES]


# ------------------------------------------------------------------------------------------- determinism
@needs_furniture
def test_same_seed_same_scene_other_seed_other_scene(engine, results):
    from training.dataengine.pipeline import Engine

    again = engine.render_scene(SCENES[2])  # after other scenes: no state leaks between scenes
    first = results[2]
    assert np.array_equal(again.rgb, first.rgb)
    assert np.array_equal(again.instance, first.instance)
    assert again.graph == first.graph
    assert [r for r, _ in again.samples] == [r for r, _ in first.samples]
    other = Engine.__new__(Engine)  # same world, another dataset seed
    other.__dict__.update(engine.__dict__)
    from dataclasses import replace

    other.config = replace(engine.config, seed=8)
    diff = other.render_scene(SCENES[2])
    assert [o["model"] for o in diff.graph["objects"]] != [
        o["model"] for o in first.graph["objects"]
    ] or not np.array_equal(diff.rgb, first.rgb)


# ------------------------------------------------------------------------------------- scene graph vs masks
@needs_furniture
def test_masks_agree_with_scene_graph(results):
    for res in results:
        g = res.graph
        assert g["image_size"] == [W, H]
        assert 3 <= sum(o["support"] == "table" for o in g["objects"]) <= 12  # room furniture comes on top
        assert res.instance.max() < len(g["objects"])
        for o in g["objects"]:
            m = res.instance == o["id"]
            assert o["pixel_area"] == int(m.sum())
            if o["pixel_area"]:
                ys, xs = np.nonzero(m)
                assert o["bbox_2d"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            if o["pixel_area"] and not o["truncated"]:
                # the projected body centre lies near the pixels of an object the frame does not cut
                # (the camera model is consistent)
                p = np.asarray(o["centre_3d"]) - np.asarray(g["camera"]["position"])
                c = p @ np.asarray(g["camera"]["rotation_world_from_cv"])
                K = np.asarray(g["camera"]["K"])
                u, v = c[:2] / c[2] * K[0, 0] + K[:2, 2]
                x0, y0, x1, y1 = o["bbox_2d"]
                assert x0 - 25 <= u <= x1 + 25 and y0 - 25 <= v <= y1 + 25, o["name"]
            assert 0.0 <= o["visible_fraction"] <= 1.0
            assert o["size"] in ("small", "medium", "large")
        for rec, mask in res.samples:
            assert mask.shape == (H, W)
            if rec["negative"]:
                assert not mask.any() and rec["targets"] == []
            elif rec["answer_kind"] == "object":
                assert np.array_equal(mask, np.isin(res.instance, rec["targets"]))
                assert rec["target_categories"] == [g["objects"][t]["category"] for t in rec["targets"]]
            else:  # a region of free table: on the table, never on an object
                assert mask.any() and not (mask & (res.instance >= 0)).any()
        tw, td = g["table"]["size_m"]
        for reg in g["table"]["free_regions"]:  # empty discs lie on the table
            x, y = reg["centre_xy"]
            assert abs(x) + reg["radius_m"] <= tw / 2 + 1e-6 and abs(y) + reg["radius_m"] <= td / 2 + 1e-6
        near = g["nearest_to_camera"]
        vis = [o for o in g["objects"] if o["pixel_area"]]
        assert near == min(vis, key=lambda o: o["distance_to_camera"])["id"]
        for a, rel, b in g["relations"]:
            if rel == "left_of":
                assert g["objects"][a]["camera_xyz"][0] < g["objects"][b]["camera_xyz"][0]


@needs_furniture
def test_settled_objects_rest_on_the_table_without_interpenetration(results):
    for res in results:
        assert res.graph["max_penetration_m"] < 0.005
        for o in res.graph["objects"]:
            if o["support"] == "table":  # nothing fell off or through the table
                assert o["position_3d"][2] > -0.02, o["name"]


# --------------------------------------------------------------------------------------- families and kinds
@needs_furniture
def test_every_family_negatives_regions_and_multi_targets_appear(results):
    from training.dataengine.prompts import FAMILIES

    recs = [r for res in results for r, _ in res.samples]
    assert {r["family"] for r in recs} == set(FAMILIES)
    assert any(r["negative"] for r in recs)
    assert any(r["answer_kind"] == "region" for r in recs)
    assert any(len(r["targets"]) > 1 for r in recs)
    # an absent-object negative never names something the scene holds under another name ("the glass"
    # next to a wine glass, "the cup" next to a mug)
    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.prompts import _head

    kb = load_knowledge_base()
    for res in results:
        heads = set()
        for o in res.graph["objects"]:
            c = kb.categories[o["category"]]
            heads |= {_head(w) for w in (c.name, c.plural, *c.synonyms)}
        for r, _ in res.samples:
            if r["negative"] and r["negative_kind"] == "absent" and r["family"] == "entities":
                words = {_head(w.strip("?.,!")) for w in r["prompt"].lower().split()}
                assert not (words & heads) - {"thing", "table", "robot", "me"}, r["prompt"]
    # every phrase key the generator emits is one phrase_groups knows, so the split checks below cover it
    from training.dataengine.prompts import phrase_groups

    known = {k for keys in phrase_groups(kb).values() for k in keys}
    for r in recs:
        assert r["template_split"] in ("train", "heldout")
        assert r["template_id"].startswith(r["family"] + ".")
        assert r["template_id"].rsplit(".", 1)[0] in known, r["template_id"]
        assert r["prompt"] and r["prompt"][0].isupper()


@needs_furniture
def test_negatives_are_phrased_like_positives_and_attribute_negatives_name_a_missing_colour(results):
    """No phrasing may give the answer away: every template that names an object (entity phrasings, spatial
    relations, "the hot X") is sometimes asked about something that is not there. Until 2026-12-03 only
    "the {name}" / "the {syn}" and the spatial "rel" phrasings were ever negative; a model trained on that
    rejected two thirds of the plain "the mug" positives. Drawn straight from the generator over the rendered
    scene graphs (no rendering), many draws per scene."""
    import collections
    import re

    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.prompts import COLOURS, NEAR_COLOURS, TEMPLATES, PromptGenerator

    kb = load_knowledge_base()
    gen = PromptGenerator(kb=kb)
    counts = collections.defaultdict(lambda: [0, 0])  # template key -> [positives, negatives]
    attribute = 0
    for n, res in enumerate(results):
        for k in range(400):  # ~30 entity phrasings, each a negative in a few of ~2,000 entity negatives
            for r in gen.generate(res.graph, np.random.default_rng([n, k]), per_family=2):
                key = r.template_id.rsplit(".", 1)[0]
                counts[key][int(r.negative)] += 1
                if r.negative_kind != "attribute":
                    continue
                attribute += 1
                c = kb.categories[r.concept]
                named = [o for o in res.graph["objects"] if c.name in gen._present_words({"objects": [o]})]
                assert named, r.prompt  # a hard negative: the category is on the table...
                said = {w for w in re.findall(r"[a-z]+", r.prompt.lower()) if w in COLOURS}
                assert len(said) == 1, r.prompt
                for o in named:  # ...but in no colour near the one asked for
                    assert not said & {o["colour"], *NEAR_COLOURS[o["colour"]]}, (r.prompt, o["colour"])
    assert attribute > 0
    for prefix in ("entities.single", "entities.all", "spatial.rel", "spatial.side", "spatial.near_cam"):
        keys = [f"{prefix}.t{i}" for i in range(len(TEMPLATES[prefix]))]
        for key in keys:
            assert counts[key][1] > 0, f"{key} is never a negative: its phrasing alone says 'present'"
        pos, neg = (sum(counts[k][j] for k in keys) for j in (0, 1))
        assert 0.05 < neg / (pos + neg) < 0.5, (prefix, pos, neg)
    for prefix in ("spatial.on", "spatial.left_of", "spatial.right_of", "safety.hot_state"):
        assert sum(counts[f"{prefix}.t{i}"][1] for i in range(len(TEMPLATES[prefix]))) > 0, prefix


def test_template_split_is_deterministic_and_holds_out_some_phrases_of_every_family():
    from training.dataengine import prompts as P
    from training.dataengine.knowledge import load_knowledge_base

    by_family: dict[str, list[str]] = {}
    for group, keys in P.phrase_groups(load_knowledge_base()).items():
        by_family.setdefault(group.split(".")[0], []).extend(keys)
    assert set(by_family) == set(P.FAMILIES)
    for fam, ks in by_family.items():
        splits = [P.template_split(k) for k in ks]
        assert splits == [P.template_split(k) for k in ks]
        assert "heldout" in splits and "train" in splits, fam


def test_every_concept_and_template_list_keeps_two_training_phrasings():
    """A held-out phrasing must be a new way of saying something the model was trained on: a concept whose
    every phrase is held out would test an unseen concept instead (the knowledge base once had nine)."""
    from training.dataengine import prompts as P
    from training.dataengine.knowledge import load_knowledge_base

    groups = P.phrase_groups(load_knowledge_base())
    thin = {g: [P.template_split(k) for k in ks] for g, ks in groups.items()}
    thin = {g: s for g, s in thin.items() if s.count("train") < 2}
    assert not thin, f"add phrasings to these (knowledge_base.json vocab or prompts.py): {thin}"
    assert P.template_split("functions.writing.p0") == "heldout"  # the rule itself: crc32 % 5 == 0


def test_no_phrase_is_said_twice_in_a_vocab_section():
    """A phrase under two concepts of one section would be trained toward two different answers, and a
    phrase listed twice in a concept weights it twice and may sit in both splits (keys are indices)."""
    from training.dataengine.knowledge import load_knowledge_base

    for section, concepts in load_knowledge_base().vocab.items():
        seen: dict[str, str] = {}
        for concept, phrases in concepts.items():
            for p in phrases:
                key = p.lower().strip()
                assert key not in seen, f"vocab.{section}: {p!r} is in {seen[key]!r} and {concept!r}"
                seen[key] = concept


# ------------------------------------------------------------------------------------ output and the reader
def read_dataset(root: Path) -> list[dict]:
    """A tiny reader of the output contract (docs/ARCHITECTURE.md): jsonl + PNGs."""
    index = json.loads((root / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        sd = root / shard
        assert (sd / "DONE").is_file()
        for line in (sd / "samples.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec["rgb"] = np.asarray(Image.open(sd / rec["image"]))
            rec["mask"] = np.asarray(Image.open(sd / rec["mask_merged"]))
            rec["graph"] = json.loads((sd / rec["scene_graph"]).read_text())
            out.append(rec)
    return out


def _args(out: Path, scenes: int):
    from training.dataengine.__main__ import build_parser

    return build_parser().parse_args(
        [
            "--out",
            str(out),
            "--scenes",
            str(scenes),
            "--seed",
            "7",
            "--workers",
            "0",
            "--shard-size",
            "1",
            "--width",
            str(W),
            "--height",
            str(H),
            "--shadow-size",
            "512",
            "--quiet",
        ]
    )


@needs_furniture
def test_cli_output_is_readable_resumable_and_in_converseg_format(engine, tmp_path):
    from training.dataengine.__main__ import run

    out = tmp_path / "de"
    index = run(_args(out, 2), engine=engine)
    assert index["scenes"] == 2 and index["shards"] == ["shard-00000", "shard-00001"]
    recs = read_dataset(out)
    assert len(recs) == index["samples"] > 0
    assert sum(index["counts_per_family"].values()) == len(recs)
    for r in recs:
        for key in (
            "image",
            "mask_merged",
            "prompt",
            "family",
            "template_id",
            "targets",
            "negative",
            "answer_kind",
            "scene_id",
            "sample_id",
            "template_split",
        ):
            assert key in r, key
        assert r["rgb"].shape == (H, W, 3) and r["rgb"].dtype == np.uint8
        assert r["mask"].shape == (H, W) and set(np.unique(r["mask"])) <= {0, 255}
        assert r["graph"]["scene_id"] == r["scene_id"]
        assert bool(r["mask"].any()) == (not r["negative"])
    items = json.loads((out / "items.json").read_text())
    assert items["count"] == len(items["items"]) == len(recs)
    it = items["items"][0]
    assert (
        {"id", "image", "mask", "prompt"} <= set(it)
        and (out / it["image"]).is_file()
        and (out / it["mask"]).is_file()
    )
    lines = (out / "dataset.jsonl").read_text().splitlines()
    assert len(lines) == len(recs) and (out / json.loads(lines[0])["mask_merged"]).is_file()

    # same run again: every shard is DONE and skipped, outputs identical
    before = (out / "dataset.jsonl").read_bytes()
    shard_mtime = (out / "shard-00000" / "samples.jsonl").stat().st_mtime_ns
    run(_args(out, 2), engine=engine)
    assert (out / "dataset.jsonl").read_bytes() == before
    assert (out / "shard-00000" / "samples.jsonl").stat().st_mtime_ns == shard_mtime

    # a crashed shard (no DONE) and a stale temp folder are redone, not trusted
    (out / "shard-00001" / "DONE").unlink()
    (out / ".shard-00001.tmp-999").mkdir()
    run(_args(out, 2), engine=engine)
    assert (out / "shard-00001" / "DONE").is_file() and not (out / ".shard-00001.tmp-999").exists()
    assert (out / "dataset.jsonl").read_bytes() == before

    # another configuration in the same folder is refused, naming the file
    from training.dataengine.errors import DataEngineError

    other = _args(out, 2)
    other.negative_rate = 0.5
    with pytest.raises(DataEngineError, match="config.json"):
        run(other, engine=engine)


@needs_furniture
def test_gallery_writes_a_contact_sheet(engine, tmp_path):
    from training.dataengine.__main__ import run
    from training.dataengine.gallery import main as gallery_main

    out = tmp_path / "de"
    run(_args(out, 1), engine=engine)
    assert (
        gallery_main(["--data", str(out), "--out", str(tmp_path / "sheet.jpg"), "--n", "4", "--cols", "2"])
        == 0
    )
    sheet = Image.open(tmp_path / "sheet.jpg")
    assert sheet.size[0] > 2 * 200 and sheet.size[1] > 2 * 150


# ------------------------------------------------------------------------------------------------ verifier
class _Req:
    def __init__(self, targets, negative=False, answer_kind="object", ambiguous=False):
        self.targets, self.negative, self.answer_kind, self.ambiguous = (
            targets,
            negative,
            answer_kind,
            ambiguous,
        )


def _graph(area=500, visible=0.9):
    return {
        "objects": [
            {"id": 0, "pixel_area": area, "visible_fraction": visible},
            {"id": 1, "pixel_area": 800, "visible_fraction": 1.0},
        ]
    }


def test_verifier_rejects_what_it_should():
    from training.dataengine.verifier import Verifier

    inst = -np.ones((20, 30), dtype=np.int32)
    inst[2:10, 2:10] = 0
    inst[12:18, 12:28] = 1
    m0 = inst == 0
    empty = np.zeros_like(m0)
    v = Verifier()
    assert v.check(_Req([0]), m0, _graph(), inst) is None
    assert v.check(_Req([0]), m0, _graph(area=40), inst) == "target_too_small"
    assert v.check(_Req([0]), m0, _graph(visible=0.1), inst) == "target_occluded"
    assert v.check(_Req([0], ambiguous=True), m0, _graph(), inst) == "ambiguous"
    assert v.check(_Req([0]), empty, _graph(), inst) == "empty_mask"
    assert v.check(_Req([], negative=True), m0, _graph(), inst) == "negative_not_empty"
    assert v.check(_Req([], negative=True), empty, _graph(), inst) is None
    assert v.check(_Req([0]), inst >= 0, _graph(), inst) == "mask_mismatch"
    small_region = np.zeros_like(m0)
    small_region[0, :5] = True
    assert v.check(_Req([], answer_kind="region"), small_region, _graph(), inst) == "region_too_small"
    assert v.counts["kept"] == 2 and sum(v.counts.values()) == 9


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_category_is_named_at_start_up():
    from training.dataengine.errors import KnowledgeBaseError
    from training.dataengine.knowledge import load_knowledge_base

    kb = set(load_knowledge_base().categories)
    catalog = assets_mod.load_asset_catalog()
    catalog["flux_capacitor"] = catalog["mug"]
    with pytest.raises(KnowledgeBaseError, match="flux_capacitor"):
        assets_mod.check_sources(catalog, kb)
    with pytest.raises(KnowledgeBaseError, match="mug"):
        assets_mod.check_sources({k: v for k, v in catalog.items() if k not in ("mug", "flux_capacitor")}, kb)


def test_knowledge_base_entry_missing_a_field_is_named(tmp_path):
    from training.dataengine.errors import KnowledgeBaseError
    from training.dataengine.knowledge import KNOWLEDGE_BASE, load_knowledge_base

    raw = json.loads(KNOWLEDGE_BASE.read_text())
    del raw["categories"]["teapot"]["safety"]
    bad = tmp_path / "kb.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(KnowledgeBaseError, match="teapot.*safety"):
        load_knowledge_base(bad)


@needs_furniture
def test_missing_model_is_named_at_start_up():
    from training.dataengine.errors import AssetError

    catalog = {"mug": [{"lib": "KatorLegaz", "model": "/katorlegaz/no-such-mug/no-such-mug.obj"}]}
    with pytest.raises(AssetError, match="no-such-mug"):
        assets_mod.check_sources(catalog)
    with pytest.raises(AssetError, match="NoSuchLibrary"):
        assets_mod.check_sources({"mug": [{"lib": "NoSuchLibrary", "model": "/x/x.obj"}]})


def test_broken_mesh_is_named(tmp_path):
    from training.dataengine.errors import AssetError

    lib = tmp_path / "Broken.sh3f"
    with zipfile.ZipFile(lib, "w") as z:
        z.writestr(
            "PluginFurnitureCatalog.properties",
            "id#1=x\nname#1=Bad mug\nmodel#1=/broken/mug/mug.obj\nwidth#1=8\ndepth#1=8\nheight#1=10\n",
        )
        z.writestr("broken/mug/mug.obj", "v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n")
    with zipfile.ZipFile(lib) as z:
        entry = assets_mod.parse_furniture_catalog(z.read("PluginFurnitureCatalog.properties").decode())
        with pytest.raises(AssetError, match="mug__0"):
            assets_mod.convert_model(z, entry["/broken/mug/mug.obj"], "mug__0")


def test_layout_without_drops_dependents_and_remaps_supports():
    from training.dataengine.scene import Layout, Placement

    z = np.zeros(3)
    lay = Layout(
        (1.0, 0.7),
        0,
        [
            Placement(0, 0, 0, 0, 0),
            Placement(1, 0, 0, 0, 0, on=0),
            Placement(2, 0, 0.3, 0, 0),
            Placement(3, 0, 0.3, 0, 0, on=2),
        ],
        "head",
        z,
        z,
        60.0,
        [],
        0.3,
        None,
    )
    out = lay.without({0})  # the support goes, and what stood on it
    assert [p.model_index for p in out.placements] == [2, 3]
    assert out.placements[1].on == 0 and out.placements[0].on is None
    assert len(lay.placements) == 4  # the original is untouched


def test_phrase_similarity_flags_a_new_phrase_that_repeats_a_held_out_one_and_refuses_edits():
    import copy

    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.phrase_similarity import heldout_neighbours
    from training.dataengine.prompts import template_split

    base = load_knowledge_base().vocab
    # one fixed word list for every text (the base vocab's words; the appended phrase adds none)
    allw = sorted({w for s in base.values() for ps in s.values() for p in ps for w in p.lower().split()})

    def embed(texts):
        v = np.array([[t.lower().split().count(w) for w in allw] + [1e-3] for t in texts], float)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    concept, phrases = next(  # a concept with one held-out phrase whose next key trains
        (c, ps)
        for c, ps in base["functions"].items()
        if [template_split(f"functions.{c}.p{j}") for j in range(len(ps))].count("heldout") == 1
        and template_split(f"functions.{c}.p{len(ps)}") == "train"
    )
    j = next(j for j in range(len(phrases)) if template_split(f"functions.{concept}.p{j}") == "heldout")
    held = phrases[j]
    new = copy.deepcopy(base)
    new["functions"][concept].append(held.upper())  # the same words: cosine 1 in this embedding
    rows = {r.key: r for r in heldout_neighbours(new, embed, ["functions"], baseline_vocab=base)}
    row = rows[f"functions.{concept}.p{j}"]
    assert row.baseline < 0.999 and row.current > 0.999 and row.nearest == held.upper()
    others = [r for k, r in rows.items() if k != f"functions.{concept}.p{j}"]
    assert others and all(abs(r.current - r.baseline) < 1e-9 for r in others)

    edited = copy.deepcopy(base)
    edited["functions"][concept].insert(0, "a phrase put first")  # shifts every key of that concept
    with pytest.raises(SystemExit, match="appended"):
        heldout_neighbours(edited, embed, ["functions"], baseline_vocab=base)


@needs_furniture
def test_resume_with_another_shard_size_or_scene_count_is_refused(engine, tmp_path):
    """10 then 20 scenes a shard used to index 400 scenes with 280 present; 20 then 10 repeated 363 sample ids."""
    from training.dataengine.__main__ import run
    from training.dataengine.errors import DataEngineError

    out = tmp_path / "de"
    run(_args(out, 3), engine=engine)  # one scene a shard
    before = (out / "dataset.jsonl").read_bytes()
    wider = _args(out, 3)
    wider.shard_size = 2
    with pytest.raises(DataEngineError, match="started with --shard-size 1"):
        run(wider, engine=engine)
    # a folder written before config.json recorded the shard size: its finished shards are checked instead
    config = json.loads((out / "config.json").read_text())
    del config["shard_size"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataEngineError, match="shard-00000 holds scenes 0-0 .* puts scenes 0-1 there"):
        run(wider, engine=engine)
    assert "shard_size" not in json.loads((out / "config.json").read_text())  # still resumable as it was
    run(_args(out, 3), engine=engine)
    assert (out / "dataset.jsonl").read_bytes() == before
    assert json.loads((out / "config.json").read_text())["shard_size"] == 1

    # more scenes than a run whose last shard is partial: that shard would silently lack the new scenes
    grown = tmp_path / "grown"
    args = _args(grown, 3)
    args.shard_size = 2
    run(args, engine=engine)
    args.scenes = 4
    with pytest.raises(
        DataEngineError, match="shard-00001 holds scenes 2-2 .* puts scenes 2-3 there. Remove"
    ):
        run(args, engine=engine)
    shutil.rmtree(grown / "shard-00001")
    index = run(args, engine=engine)
    scenes = {r["scene_id"] for r in read_dataset(grown)}
    ids = [r["sample_id"] for r in read_dataset(grown)]
    assert len(scenes) == index["scenes"] == 4 and len(ids) == len(set(ids)) == index["samples"]


@needs_furniture
@pytest.mark.parametrize(
    "fault, code, message",
    [
        (KeyboardInterrupt(), 130, "interrupted; finished shards are kept"),
        (OSError(errno.ENOSPC, "No space left on device", "masks/x.png"), 1, "No space left on device"),
    ],
)
def test_ctrl_c_and_a_full_disk_end_with_a_message_and_keep_finished_shards(
    engine, tmp_path, monkeypatch, capsys, fault, code, message
):
    import training.dataengine.__main__ as cli
    import training.dataengine.pipeline as pipeline

    real = pipeline.write_scene

    def fails_on_the_second_scene(res, shard_dir, save_depth):
        if res.scene_id.endswith("0000001"):
            raise fault
        return real(res, shard_dir, save_depth)

    monkeypatch.setattr(cli, "Engine", lambda cfg, asset_cache=None: engine)  # the module's, already built
    monkeypatch.setattr(pipeline, "write_scene", fails_on_the_second_scene)
    out = tmp_path / "de"
    argv = ["--out", str(out), "--scenes", "2", "--seed", "7", "--workers", "0", "--shard-size", "1"]
    argv += ["--width", str(W), "--height", str(H), "--shadow-size", "512", "--quiet"]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "run the same command again to resume" in err and "Traceback" not in err
    assert (out / "shard-00000" / "DONE").is_file() and not (out / "index.json").exists()
    assert not list(out.glob(".shard-*")), "the unfinished shard's temporary folder was left behind"
    monkeypatch.setattr(pipeline, "write_scene", real)
    assert cli.main(argv) == 0
    assert json.loads((out / "index.json").read_text())["shards"] == ["shard-00000", "shard-00001"]


@needs_furniture
def test_reprompt_draws_new_requests_over_old_pictures_and_mix_joins_sets(engine, tmp_path):
    from training.dataengine.__main__ import run
    from training.dataengine.errors import DataEngineError
    from training.dataengine.mix import main as mix_main
    from training.dataengine.mix import mix
    from training.dataengine.reprompt import main as reprompt_main
    from training.records import read_records

    src = tmp_path / "src"
    run(_args(src, len(SCENES)), engine=engine)  # scene 7 holds a free-space request
    old = read_dataset(src)
    args = ["--data", str(src), "--seed", "11", "--quiet"]
    assert reprompt_main([*args, "--out", str(tmp_path / "new")]) == 0
    new = read_dataset(tmp_path / "new")
    assert {r["scene_id"] for r in new} == {r["scene_id"] for r in old}
    assert {r["prompt"] for r in new} != {r["prompt"] for r in old}  # another seed, other requests
    ids = [r["sample_id"] for r in new]
    assert len(ids) == len(set(ids))
    for r in new:
        assert np.array_equal(r["rgb"], next(o["rgb"] for o in old if o["scene_id"] == r["scene_id"]))
        assert r["template_split"] in ("train", "heldout") and bool(r["mask"].any()) == (not r["negative"])
        if r["answer_kind"] == "object":  # the answer is exactly the targets' pixels of the old frame
            instance = np.asarray(Image.open(next(src.glob(f"shard-*/instances/{r['scene_id']}.png"))))
            assert np.array_equal(r["mask"] > 0, np.isin(instance.astype(int) - 1, r["targets"]))
    old_regions = sorted((r["prompt"], r["mask"].tobytes()) for r in old if r["answer_kind"] == "region")
    new_regions = sorted((r["prompt"], r["mask"].tobytes()) for r in new if r["answer_kind"] == "region")
    assert old_regions and new_regions == old_regions  # carried over as they were, never redrawn

    # the same seed again (another folder) gives the same requests; a rerun into the folder changes nothing
    assert reprompt_main([*args, "--out", str(tmp_path / "again")]) == 0
    shard = "shard-00003/samples.jsonl"
    assert (tmp_path / "again" / shard).read_bytes() == (tmp_path / "new" / shard).read_bytes()
    mtime = (tmp_path / "new" / shard).stat().st_mtime_ns
    (tmp_path / "new" / "shard-00001" / "DONE").unlink()  # an interrupted shard and its debris are redone
    (tmp_path / "new" / ".shard-00001.tmp-999" / "masks").mkdir(parents=True)
    assert reprompt_main([*args, "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / shard).stat().st_mtime_ns == mtime
    assert (tmp_path / "new" / "shard-00001" / "DONE").is_file()
    assert not list((tmp_path / "new").glob(".shard-*"))
    assert reprompt_main(["--data", str(src), "--seed", "12", "--quiet", "--out", str(tmp_path / "new")]) == 2
    assert reprompt_main(["--data", str(tmp_path / "nowhere"), "--seed", "1", "--out", str(tmp_path / "x")]) == 2

    # a mix reads as both sets, in order, and is made once
    index = mix(tmp_path / "mix", [src, tmp_path / "new"])
    assert len(index["shards"]) == 2 * len(SCENES) and index["samples"] == len(old) + len(new)
    mixed = read_records(tmp_path / "mix")
    assert [r.prompt for r in mixed] == [r["prompt"] for r in old + new]
    assert all(r.image.is_file() for r in mixed)
    assert mix(tmp_path / "mix", [src, tmp_path / "new"]) == index
    with pytest.raises(DataEngineError, match="other sources"):
        mix(tmp_path / "mix", [tmp_path / "new", src])
    with pytest.raises(DataEngineError, match="given twice"):
        mix(tmp_path / "mix2", [src, src])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert mix_main(["--out", str(tmp_path / "full"), str(src), str(tmp_path / "new")]) == 2
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
