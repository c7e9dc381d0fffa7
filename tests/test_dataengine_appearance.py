"""Data engine appearance: recolouring, room furniture, lights, camera rigs, sensor effects, determinism.

One small engine per module (256 x 192, a subset of the models). Its knowledge base marks a few
categories recolourable and one as room furniture (its model scaled to furniture size), so these code
paths run whatever the shipped knowledge base says. Rendering tests are skipped, with the reason, where
the Debian package sweethome3d-furniture is not installed; the sensor and palette tests always run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from training.dataengine.assets import furniture_available

needs_furniture = pytest.mark.skipif(
    not furniture_available(),
    reason="sweethome3d-furniture is not installed (apt-get install sweethome3d-furniture, see scripts/setup.sh)",
)

W, H = 256, 192
ROOM_CATEGORY = "toaster"  # stands in for furniture: scaled up and marked "room"
ROOM_SCALE = 4.0
RECOLOURABLE = ("mug", "plate", "bowl", "coffee_cup", "plastic_cup", "toaster")
KEEP = RECOLOURABLE + ("kettle", "wine_bottle", "book", "tray", "apples", "hammer", "candle", "fork")
SCENES = [0, 1, 2, 3, 4, 5]


def _marked(cat, **facts):
    """A copy of a knowledge-base category carrying extra facts (fields the shipped file may lack)."""
    new = dataclasses.replace(cat)
    for k, v in facts.items():
        object.__setattr__(new, k, v)
    return new


@pytest.fixture(scope="module")
def engine():
    return engine_with_facts(W, H)


def engine_with_facts(width: int, height: int):
    """An engine over KEEP's models, RECOLOURABLE recolourable and ROOM_CATEGORY as furniture."""
    from training.dataengine import assets as assets_mod
    from training.dataengine import knowledge
    from training.dataengine.pipeline import Engine, EngineConfig

    real_kb, real_load = knowledge.load_knowledge_base, assets_mod.load_assets

    def kb_with_facts(*a, **k):
        kb = real_kb(*a, **k)
        cats = dict(kb.categories)
        for key in RECOLOURABLE:
            cats[key] = _marked(cats[key], recolourable=True)
        cats[ROOM_CATEGORY] = _marked(cats[ROOM_CATEGORY], recolourable=True, placement="room")
        return dataclasses.replace(kb, categories=cats)

    def some_assets(folder):
        out = []
        for a in real_load(folder):
            if a.category not in KEEP:
                continue
            if a.category == ROOM_CATEGORY:
                parts = [dataclasses.replace(p, verts=p.verts * ROOM_SCALE) for p in a.parts]
                a = dataclasses.replace(a, parts=parts, size_m=a.size_m * ROOM_SCALE)
            out.append(a)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knowledge, "load_knowledge_base", kb_with_facts)
        mp.setattr(assets_mod, "load_assets", some_assets)
        return Engine(EngineConfig(seed=3, width=width, height=height, shadow_size=512))


@pytest.fixture(scope="module")
def results(engine):
    return [engine.render_scene(i) for i in SCENES]


def _without_sensor(engine):
    from training.dataengine.pipeline import Engine

    other = Engine.__new__(Engine)
    other.__dict__.update(engine.__dict__)
    other.config = dataclasses.replace(engine.config, sensor_effects=False)
    return other


# ------------------------------------------------------------------------------------------ recolouring
def test_palette_colours_keep_their_word_across_the_shade_jitter():
    from training.dataengine.scene import RECOLOUR_PALETTE
    from training.dataengine.scene_graph import colour_name

    words = []
    for rgb in RECOLOUR_PALETTE:
        base = np.array(rgb)
        w = {colour_name(np.clip(base * s, 0, 1)) for s in (0.9, 1.0, 1.08)}
        assert len(w) == 1, (rgb, w)
        words.append(w.pop())
    assert len(set(words)) == len(words)  # every palette colour is a different word


@needs_furniture
def test_recolour_changes_the_pixels_and_the_colour_word_follows_them(engine):
    from training.dataengine.scene import sample_layout
    from training.dataengine.scene_graph import build_scene_graph, colour_name

    world, renderer = engine.world, engine.renderer
    for i in range(40):  # a scene with a well visible object of a recolourable category
        layout = sample_layout(np.random.default_rng(i), world)
        layout.tints = {}
        world.apply(layout)
        world.settle(engine.config.settle_steps)
        plain = renderer.render()
        cands = [
            (int((plain.instance == k).sum()), k)
            for k, p in enumerate(layout.placements)
            if world.tint_parts[p.model_index] and world.assets[p.model_index].category in RECOLOURABLE
        ]
        if cands and max(cands)[0] >= 400:
            break
    else:
        pytest.fail("no scene with a visible recolourable object")
    k = max(cands)[1]
    p = layout.placements[k]
    for word, rgb in (("red", (0.72, 0.08, 0.08)), ("blue", (0.12, 0.3, 0.75)), ("green", (0.15, 0.55, 0.2))):
        layout.tints = {(p.model_index, p.copy): rgb}
        world.apply(layout)
        world.settle(engine.config.settle_steps)
        frame = renderer.render()
        graph = build_scene_graph(world, layout, frame, scene_id="t")
        o = graph["objects"][k]
        assert o["colour"] == word and o["recoloured"]
        mask = frame.instance == k
        assert mask.sum() >= 0.8 * (plain.instance == k).sum()  # same object, same place
        seen = frame.rgb[mask].astype(float).mean(0)
        assert np.abs(seen - plain.rgb[mask].astype(float).mean(0)).max() > 20  # the pixels changed
        # the hue in the pixels is the word's (shading scales brightness; normalise it away)
        assert colour_name(seen / seen.max()) == word, (word, seen)


# ----------------------------------------------------------------------------------------- room furniture
@needs_furniture
def test_room_objects_get_masks_stand_on_the_floor_and_never_overlap_the_table(engine, results):
    from training.dataengine.scene import ROOM_GAP, TABLE_HEIGHT, _obb_corners, _obb_overlap

    n_room = n_seen = 0
    for res in results:
        g = res.graph
        tw, td = g["table"]["size_m"]
        table = _obb_corners(0.0, 0.0, 0.0, tw, td)
        room_ids = {o["id"] for o in g["objects"] if o["support"] == "floor"}
        for o in g["objects"]:
            assert o["pixel_area"] == int((res.instance == o["id"]).sum())
            if o["id"] not in room_ids:
                assert o["category"] != ROOM_CATEGORY and o["position_3d"][2] > -0.02
                continue
            n_room += 1
            n_seen += o["pixel_area"] > 0
            assert o["category"] == ROOM_CATEGORY and o["on"] is None
            assert abs(o["position_3d"][2] + TABLE_HEIGHT) < 1e-6
            x, y = o["position_3d"][:2]
            foot = _obb_corners(x, y, math.radians(o["yaw_deg"]), *o["size_m"][:2])
            assert not _obb_overlap(foot, table, ROOM_GAP - 1e-3), o
            assert y < g["room"]["back_wall_y"] and abs(x) < g["room"]["half_width"]
        for a, rel, b in g["relations"]:  # nothing stands on furniture
            assert not (rel == "on" and (a in room_ids or b in room_ids))
        assert all(ids < len(g["objects"]) for ids in np.unique(res.instance))
    assert n_room > 0 and n_seen > 0


def test_an_unknown_placement_is_named():
    from training.dataengine.errors import KnowledgeBaseError
    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.scene import placement_of

    cat = load_knowledge_base().categories["mug"]
    assert placement_of(cat) in ("table", "room")
    with pytest.raises(KnowledgeBaseError, match="'mug'.*'shelf'"):
        placement_of(_marked(cat, placement="shelf"))


@needs_furniture
def test_table_categories_exclude_room_furniture(engine):
    world = engine.world
    assert ROOM_CATEGORY in world.room_by_category and ROOM_CATEGORY not in world.by_category
    assert all(world.is_room[i] for i in world.room_by_category[ROOM_CATEGORY])


# --------------------------------------------------------------------------------------- lights and camera
@needs_furniture
def test_lights_and_cameras_stay_within_their_ranges(engine):
    from training.dataengine.scene import CAMERA_RIGS, N_LIGHTS, sample_layout

    world = engine.world
    n_lights, kinds, shadows = set(), set(), set()
    for i in range(150):
        lay = sample_layout(np.random.default_rng(1000 + i), world)
        assert 1 <= len(lay.lights) <= N_LIGHTS
        n_lights.add(len(lay.lights))
        assert sum(li.intensity for li in lay.lights) <= 1.1 + 1e-9
        for li in lay.lights:
            assert 2700 <= li.kelvin <= 6500 and li.intensity > 0 and li.pos[2] > 0.9
            shadows.add(li.shadow)
        rig = CAMERA_RIGS[lay.camera_kind]
        kinds.add(lay.camera_kind)
        assert rig.fovy_deg[0] <= lay.fovy <= rig.fovy_deg[1]
        assert rig.roll_deg[0] <= lay.cam_roll <= rig.roll_deg[1]
        assert rig.height_m[0] <= lay.cam_pos[2] <= rig.height_m[1] + 1e-9
    assert n_lights == {1, 2, 3} and kinds == set(CAMERA_RIGS) and shadows == {True, False}
    # what the layout says is what the model renders with
    world.apply(lay)
    m = world.model
    assert int(m.light_active[world.lights].sum()) == len(lay.lights)
    for li, lid in zip(lay.lights, world.lights, strict=False):
        assert bool(m.light_castshadow[lid]) == li.shadow
        assert np.allclose(m.light_pos[lid], li.pos)


@needs_furniture
def test_intrinsics_in_the_scene_graph_match_the_rig(results):
    from training.dataengine.scene import CAMERA_RIGS

    for res in results:
        cam = res.graph["camera"]
        K = np.array(cam["K"])
        fy = (H / 2) / math.tan(math.radians(cam["fovy_deg"]) / 2)
        assert K[0, 0] == pytest.approx(fy, rel=1e-3) and K[1, 1] == pytest.approx(fy, rel=1e-3)
        assert K[0, 2] == W / 2 and K[1, 2] == H / 2
        fovx = 2 * math.degrees(math.atan(math.tan(math.radians(cam["fovy_deg"]) / 2) * W / H))
        assert cam["fovx_deg"] == pytest.approx(fovx, abs=0.01)
        assert cam["native_fov_deg"] == list(CAMERA_RIGS[cam["kind"]].native_fov_deg)
    # the RealSense rig keeps the D435's 42 degrees vertically; a 4:3 crop leaves about 54 across
    rs = CAMERA_RIGS["realsense"]
    assert rs.fovy_deg == (42.0, 42.0) and rs.native_fov_deg == (69.0, 42.0)


# ------------------------------------------------------------------------------------------ sensor effects
def _params(seed):
    from training.dataengine.sensor import sample_sensor_params

    return sample_sensor_params(np.random.default_rng(seed))


def test_sensor_effects_are_deterministic_per_seed_and_keep_shape_and_dtype():
    from training.dataengine.sensor import apply_sensor

    rng = np.random.default_rng(0)
    img = (rng.random((48, 64, 3)) * 200 + 20).astype(np.uint8)
    a, b = apply_sensor(img, _params(1)), apply_sensor(img, _params(1))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, img)
    assert not np.array_equal(a, apply_sensor(img, _params(2)))
    with pytest.raises(ValueError, match="uint8"):
        apply_sensor(img.astype(np.float32), _params(1))


def test_each_sensor_effect_does_what_it_says():
    from training.dataengine.sensor import apply_sensor

    flat = np.full((64, 96, 3), 128, np.uint8)
    none = dict(
        exposure=1.0,
        wb_gains=(1.0, 1.0, 1.0),
        vignette=0.0,
        defocus_sigma=0.0,
        motion_px=0.0,
        motion_angle_deg=0.0,
        shot_noise=0.0,
        read_noise=0.0,
        jpeg_quality=None,
    )
    base = dataclasses.replace(_params(0), **none)
    assert np.abs(apply_sensor(flat, base).astype(int) - 128).max() <= 1  # all off: the image back
    dark = apply_sensor(flat, dataclasses.replace(base, exposure=0.5))
    assert dark.mean() < 110
    vig = apply_sensor(flat, dataclasses.replace(base, vignette=0.4)).astype(int)
    assert vig[32, 48].mean() > vig[0, 0].mean() + 10
    warm = apply_sensor(flat, dataclasses.replace(base, wb_gains=(1.1, 1.0, 0.9))).astype(int)
    assert warm[..., 0].mean() > warm[..., 2].mean() + 10
    noisy = apply_sensor(flat, dataclasses.replace(base, read_noise=0.02, shot_noise=0.002))
    assert noisy.std() > 2
    edge = np.zeros((64, 96, 3), np.uint8)
    edge[:, 48:] = 255
    for blur in ({"defocus_sigma": 1.5}, {"motion_px": 6.0, "motion_angle_deg": 0.0}):
        out = apply_sensor(edge, dataclasses.replace(base, **blur))
        assert 0 < out[32, 47, 0] < 255 or 0 < out[32, 48, 0] < 255  # the step is smeared
    texture = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    jpg = apply_sensor(texture, dataclasses.replace(base, jpeg_quality=60)).astype(int)
    assert np.abs(jpg - texture).mean() > 5  # JPEG loses fine detail


@needs_furniture
def test_sensor_effects_change_only_the_rgb(engine, results):
    clean = _without_sensor(engine).render_scene(SCENES[1])
    noisy = results[1]
    assert np.array_equal(clean.instance, noisy.instance) and np.array_equal(clean.depth, noisy.depth)
    assert clean.rgb.shape == noisy.rgb.shape and clean.rgb.dtype == noisy.rgb.dtype
    assert not np.array_equal(clean.rgb, noisy.rgb)
    assert clean.graph["sensor"] is None and noisy.graph["sensor"]["seed"] >= 0
    strip = dict(noisy.graph, sensor=None)
    assert strip == clean.graph  # objects, relations, masks: the same scene
    assert [r for r, _ in clean.samples] == [r for r, _ in noisy.samples]


# ------------------------------------------------------------------------------------------- determinism
@needs_furniture
def test_same_seed_and_index_give_identical_output(engine, results):
    again = engine.render_scene(SCENES[3])  # after other scenes: no tint, room or light state leaks
    first = results[3]
    assert np.array_equal(again.rgb, first.rgb)
    assert np.array_equal(again.instance, first.instance)
    assert again.graph == first.graph
    assert [r for r, _ in again.samples] == [r for r, _ in first.samples]
