"""Data engine composition: containers, supports, clutter, occlusion and frame cuts, several of a kind.

The geometry tests (cavity of a constructed mesh, visibility of a constructed silhouette, prompts over a
constructed scene graph) always run; the ones that render need the Debian package sweethome3d-furniture
and build one 256 x 192 engine per module.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from training.dataengine.assets import AssetModel, MeshPart, furniture_available

needs_furniture = pytest.mark.skipif(
    not furniture_available(),
    reason="sweethome3d-furniture is not installed (apt-get install sweethome3d-furniture, see scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def engine():
    from training.dataengine.pipeline import Engine, EngineConfig

    return Engine(EngineConfig(seed=11, width=256, height=192, shadow_size=512))


# ------------------------------------------------------------------------------------------ constructed cases
def _box_mesh(w: float, d: float, h: float, *, lid: bool, wall: float = 0.01) -> AssetModel:
    """An open (or closed) box with walls `wall` thick, base at z = 0, centred in x and y."""
    boxes = [(-w / 2, w / 2, -d / 2, d / 2, 0.0, wall)]  # bottom slab
    boxes += [
        (-w / 2, -w / 2 + wall, -d / 2, d / 2, 0.0, h),
        (w / 2 - wall, w / 2, -d / 2, d / 2, 0.0, h),
        (-w / 2, w / 2, -d / 2, -d / 2 + wall, 0.0, h),
        (-w / 2, w / 2, d / 2 - wall, d / 2, 0.0, h),
    ]
    if lid:
        boxes.append((-w / 2, w / 2, -d / 2, d / 2, h - wall, h))
    verts, faces = [], []
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    for x0, x1, y0, y1, z0, z1 in boxes:
        n = len(verts)
        verts += [(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)]
        for a, b, c, e in quads:
            faces += [(n + a, n + b, n + c), (n + a, n + c, n + e)]
    part = MeshPart(
        verts=np.array(verts, np.float32),
        faces=np.array(faces, np.int32),
        uv=None,
        rgba=np.ones(4, np.float32),
        texture=None,
    )
    return AssetModel(
        key="box__0",
        category="bowl",
        name="box",
        source="test",
        licence="CC0-1.0",
        author="test",
        size_m=np.array([w, d, h]),
        parts=[part],
    )


def test_cavity_of_an_open_box_holds_a_small_thing_on_its_bottom_and_a_lidded_box_has_none():
    from training.dataengine.scene import measure_cavity

    cav = measure_cavity(_box_mesh(0.3, 0.2, 0.1, lid=False))
    assert cav is not None
    z = cav.rest_height(0.0, 0.0, 0.4, 0.08, 0.05)
    assert z == pytest.approx(0.01, abs=1e-6)  # on the bottom slab, not on a wall
    assert cav.rest_height(0.0, 0.0, 0.0, 0.29, 0.1) is None  # wider than the inside: would touch the walls
    assert cav.rest_height(0.12, 0.0, 0.0, 0.08, 0.05) is None  # reaches into the wall
    assert measure_cavity(_box_mesh(0.3, 0.2, 0.1, lid=True)) is None


def test_visible_and_in_frame_fractions_of_a_silhouette_half_outside_the_frame():
    from training.dataengine.scene_graph import TRUNCATED_BELOW, clip_to_frame, polygon_area, visibility

    square = np.array([[-10.0, 0.0], [10.0, 0.0], [10.0, 20.0], [-10.0, 20.0]])  # 400 px^2, half left of x=0
    assert polygon_area(square) == pytest.approx(400.0)
    assert polygon_area(clip_to_frame(square, 100, 100)) == pytest.approx(200.0)
    visible, in_frame = visibility(square, 100, 100, 100)  # 100 px shown: the rest hidden or cut off
    assert in_frame == pytest.approx(0.5) and in_frame < TRUNCATED_BELOW
    assert visible == pytest.approx(0.25)
    assert visibility(square + [50, 50], 400, 100, 100) == pytest.approx((1.0, 1.0))  # wholly inside
    assert len(clip_to_frame(square - [100, 0], 100, 100)) == 0  # wholly outside
    assert visibility(square - [100, 0], 0, 100, 100) == (0.0, 0.0)
    assert visibility(None, 0, 100, 100) == (0.0, 0.0)


def _graph(objects: list[tuple[str, str]], relations: list[list]) -> dict:
    objs = []
    for k, (cat, name) in enumerate(objects):
        objs.append(
            {
                "id": k,
                "category": cat,
                "name": name,
                "pixel_area": 900,
                "visible_fraction": 1.0,
                "colour": "white",
                "material": "ceramic",
                "support": "table",
                "size": "small",
                "size_m": [0.1, 0.1, 0.1],
                "camera_xyz": [0.1 * k, 0.0, 1.0],
                "position_3d": [0.1 * k, 0.0, 0.0],
                "distance_to_camera": 1.0 + 0.1 * k,
                "states": {},
                "mass_kg": 0.3,
            }
        )
    return {"objects": objs, "relations": relations, "nearest_to_camera": 0}


def test_in_requests_are_honest_about_what_the_graph_puts_inside():
    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.prompts import PromptGenerator

    gen = PromptGenerator(kb=load_knowledge_base())
    beside = _graph([("bowl", "bowl"), ("mug", "mug"), ("fork", "fork")], [])
    inside = _graph([("bowl", "bowl"), ("mug", "mug"), ("fork", "fork")], [[1, "in", 0]])
    for g in (beside, inside):
        g["objects"][0]["size_m"] = [0.4, 0.4, 0.2]
    hard = 0
    for k in range(300):
        r = gen._in_negative(beside, np.random.default_rng(k), "teapot")
        if r is not None and r.negative_kind == "relation":
            hard += 1
            assert "bowl" in r.prompt and r.targets == [] and r.negative
        r = gen._in_negative(inside, np.random.default_rng(k), "teapot")
        assert r is None or not re.search(r"mug.* the bowl", r.prompt.lower()), r.prompt  # it IS in the bowl
        if r is not None and r.negative_kind == "relation":
            assert re.search(r"fork.* the bowl", r.prompt.lower()), r.prompt  # only the fork is not
    assert hard > 0
    # positives: the mug in the bowl, or everything in it, never the fork beside it
    seen = set()
    for k in range(100):
        r = gen._spatial_kind("in", inside, np.random.default_rng(k), inside["objects"], {})
        assert r is not None and r.targets == [1] and not r.negative and not r.ambiguous
        seen.add(r.template_id.split(".")[1])
    assert seen == {"in", "in_any"}


def test_all_of_a_kind_asks_for_every_instance():
    from training.dataengine.knowledge import load_knowledge_base
    from training.dataengine.prompts import PromptGenerator

    gen = PromptGenerator(kb=load_knowledge_base())
    g = _graph([("mug", "mug"), ("fork", "fork"), ("mug", "mug"), ("mug", "mug")], [])
    for k in range(60):
        r = gen._entities(g, np.random.default_rng(k), False)
        if r.concept == "mug":
            assert r.targets == [0, 2, 3] and r.template_id.startswith("entities.all"), r.prompt


def test_layout_without_drops_the_contents_of_a_dropped_container():
    from training.dataengine.scene import Layout, Light, Placement, Room

    lay = Layout(
        table_size=(1.0, 0.6),
        table_finish=0,
        placements=[
            Placement(0, 0, 0, 0, 0),
            Placement(1, 0, 0.01, 0.0, 0.0, inside=0),
            Placement(2, 0, 0.3, 0, 0),
            Placement(3, 0, 0.0, 0.0, 0.0, inside=2),
        ],
        camera_kind="head",
        cam_pos=np.zeros(3),
        cam_target=np.ones(3),
        fovy=60.0,
        lights=[Light(np.ones(3), np.zeros(3), 0.5, 4000.0, True)],
        ambient=0.3,
        room=Room(floor_finish=0, wall_finish=0, back_y=1.5, half_width=2.0, window=None),
    )
    out = lay.without({0})
    assert [p.model_index for p in out.placements] == [2, 3]
    assert out.placements[1].inside == 0 and out.placements[0].parent is None


def test_scene_disagreements_names_a_graph_that_contradicts_its_masks():
    from training.dataengine.verifier import scene_disagreements

    inst = np.full((20, 20), -1, np.int32)
    inst[2:6, 3:9] = 0
    g = _graph([("bowl", "bowl"), ("mug", "mug")], [[1, "in", 0]])
    g["objects"][0].update(pixel_area=24, bbox_2d=[3, 2, 9, 6], in_frame_fraction=1.0, inside=None, on=None)
    g["objects"][1].update(pixel_area=0, bbox_2d=None, in_frame_fraction=1.0, visible_fraction=0.0, inside=0)
    assert scene_disagreements(g, inst) == []
    g["objects"][0]["pixel_area"] = 25
    g["objects"][1]["inside"] = None
    g["objects"][1]["visible_fraction"] = 0.9
    g["objects"][1]["in_frame_fraction"] = 0.5
    found = " | ".join(scene_disagreements(g, inst))
    assert "pixel_area 25" in found and "is inside None" in found and "disagree" in found


# ------------------------------------------------------------------------------------------ rendered
def _fits(world, container: int) -> int:
    from training.dataengine.scene import _may_go_inside

    cav = world.cavity(container)
    ys, xs = np.nonzero(cav.inside)
    cx, cy = cav.origin + (np.array([xs.mean(), ys.mean()]) + 0.5) * cav.cell
    for i, a in enumerate(world.assets):
        big = world.assets[container].size_m
        if _may_go_inside(world.kb.categories[a.category], a.size_m, big) and a.category != "bowl":
            if cav.rest_height(float(cx), float(cy), 0.5, float(a.size_m[0]), float(a.size_m[1])) is not None:
                return i
    raise AssertionError("nothing fits in the bowl")


@needs_furniture
def test_an_object_put_in_a_bowl_lies_within_it_above_its_bottom_in_the_rendered_scene(engine):
    from training.dataengine.scene import MAX_PENETRATION, Placement, sample_layout
    from training.dataengine.scene_graph import build_scene_graph
    from training.dataengine.verifier import scene_disagreements

    world = engine.world
    bowl = world.by_category["bowl"][0]
    thing = _fits(world, bowl)
    cav = world.cavity(bowl)
    ys, xs = np.nonzero(cav.inside)
    cx, cy = (float(v) for v in cav.origin + (np.array([xs.mean(), ys.mean()]) + 0.5) * cav.cell)
    base = sample_layout(np.random.default_rng(0), world)
    layout = dataclasses.replace(
        base,
        placements=[Placement(bowl, 0, 0.05, 0.02, 0.3), Placement(thing, 0, cx, cy, 0.5, inside=0)],
        cam_pos=np.array([0.0, -0.45, 0.9]),
        cam_target=np.zeros(3),
        fovy=55.0,
    )
    world.apply(layout)
    penetration, bad = world.settle(engine.config.settle_steps)
    assert not bad and penetration <= MAX_PENETRATION
    frame = engine.renderer.render()
    graph = build_scene_graph(world, layout, frame, scene_id="t")
    assert [1, "in", 0] in graph["relations"]
    assert scene_disagreements(graph, frame.instance) == []
    assert graph["objects"][1]["pixel_area"] > 0  # seen from above, in the bowl
    # the thing's footprint lies within the bowl's, and its base above the bowl's inner bottom
    bpos, brot = world.body_pose(layout.placements[0])
    tpos, trot = world.body_pose(layout.placements[1])
    w, d, _ = (float(v) for v in world.assets[thing].size_m)
    corners = np.array([[sx * w / 2, sy * d / 2, 0.0] for sx in (-1, 1) for sy in (-1, 1)]) @ trot.T + tpos
    local = (corners - bpos) @ brot  # bowl body frame
    bw, bd, bh = (float(v) for v in world.assets[bowl].size_m)
    assert (np.abs(local[:, 0]) < bw / 2).all() and (np.abs(local[:, 1]) < bd / 2).all()
    floor = float(cav.top[cav.inside].min())
    assert (local[:, 2] >= floor - 1e-3).all() and (local[:, 2] < bh).all()
    # the same layout again gives the same pixels (contents are placed, not simulated)
    world.apply(layout)
    world.settle(engine.config.settle_steps)
    assert np.array_equal(engine.renderer.render().instance, frame.instance)


@needs_furniture
def test_layouts_are_determined_by_seed_and_index_and_show_the_new_range(engine):
    from training.dataengine.scene import sample_layout

    world = engine.world

    def draw(i, seed=11):
        return sample_layout(np.random.default_rng(np.random.SeedSequence([seed, i])), world)

    a, b = draw(3), draw(3)
    assert a.composition == b.composition and len(a.placements) == len(b.placements)
    for p, q in zip(a.placements, b.placements, strict=True):
        assert (p.model_index, p.copy, p.x, p.y, p.yaw, p.on, p.inside) == (
            q.model_index,
            q.copy,
            q.x,
            q.y,
            q.yaw,
            q.on,
            q.inside,
        )
    layouts = [draw(i) for i in range(150)]
    comps = {lay.composition for lay in layouts}
    assert comps == {"spread", "clutter"}
    several = inside = 0
    for lay in layouts:
        pool = [(p.model_index, p.copy) for p in lay.placements]
        assert len(set(pool)) == len(pool)  # one pool body never stands for two objects
        cats = [world.assets[p.model_index].category for p in lay.placements]
        several += max(cats.count(c) for c in cats) >= 2
        for p in lay.placements:
            if p.inside is not None:
                inside += 1
                container = world.assets[lay.placements[p.inside].model_index]
                assert world.kb.categories[container.category].is_container
                assert world.cavity(lay.placements[p.inside].model_index) is not None
            if p.on is not None:
                assert world.kb.categories[world.assets[lay.placements[p.on].model_index].category].is_support
    assert several >= 15 and inside >= 5, (several, inside)  # 221 kinds: few are open containers
    clutter = [len(lay.placements) for lay in layouts if lay.composition == "clutter"]
    spread = [len(lay.placements) for lay in layouts if lay.composition == "spread"]
    assert np.mean(clutter) > np.mean(spread) + 2


@needs_furniture
def test_rendered_scenes_agree_with_their_graphs_and_record_visibility(engine):
    from training.dataengine.verifier import VerifierConfig, scene_disagreements

    min_visible = VerifierConfig().min_visible_fraction
    partly = truncated = 0
    for i in range(8):
        res = engine.render_scene(i)
        g = res.graph
        assert scene_disagreements(g, res.instance) == [], i
        for o in g["objects"]:
            partly += 0 < o["visible_fraction"] < 0.9
            truncated += o["truncated"]
        for rec, _ in res.samples:  # nothing mostly hidden is ever an object answer
            if rec["answer_kind"] == "object" and not rec["negative"]:
                for t in rec["targets"]:
                    assert g["objects"][t]["visible_fraction"] >= min_visible, rec["prompt"]
    assert partly > 0 and truncated > 0
