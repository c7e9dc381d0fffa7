"""The data engine's asset library and knowledge base: breadth of the shipped catalog, the facts every
category carries, and bad input (broken libraries, models without a mesh, missing textures) that is
skipped with a warning naming the file instead of stopping the run."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from training.dataengine import assets as assets_mod
from training.dataengine.errors import KnowledgeBaseError
from training.dataengine.knowledge import KNOWLEDGE_BASE, PLACEMENTS, load_knowledge_base

# a unit cube: 8 corners, 6 sides as quads, each side two triangles (uv corners 1-4)
_QUADS = ((1, 4, 3, 2), (5, 6, 7, 8), (1, 2, 6, 5), (2, 3, 7, 6), (3, 4, 8, 7), (4, 1, 5, 8))
CUBE_OBJ = (
    "mtllib cube.mtl\n"
    + "".join(f"v {x} {y} {z}\n" for z in (0, 1) for x, y in ((0, 0), (1, 0), (1, 1), (0, 1)))
    + "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nusemtl red\n"
    + "".join(f"f {a}/1 {b}/2 {c}/3\nf {a}/1 {c}/3 {d}/4\n" for a, b, c, d in _QUADS)
)


def _library(path: Path, models: dict[str, dict[str, str]]) -> None:
    """Write a tiny Sweet Home 3D library: {folder: {file name: text}}, one catalog entry per folder."""
    props = ["license=CC0"]
    with zipfile.ZipFile(path, "w") as z:
        for n, (folder, files) in enumerate(models.items(), start=1):
            props += [
                f"id#{n}={folder}",
                f"name#{n}={folder}",
                f"model#{n}=/{folder}/{folder}.obj",
                f"creator#{n}=tester",
                f"width#{n}=10",
                f"depth#{n}=8",
                f"height#{n}=6",
            ]
            for name, text in files.items():
                z.writestr(f"{folder}/{name}", text)
        z.writestr("PluginFurnitureCatalog.properties", "\n".join(props) + "\n")


@pytest.fixture()
def bad_furniture(tmp_path, monkeypatch):
    """A furniture folder holding one good model, one whose texture is missing, one that is not an OBJ,
    one without a usable mesh, and a library that is not a zip at all."""
    fdir = tmp_path / "furniture"
    fdir.mkdir()
    _library(
        fdir / "Fixture.sh3f",
        {
            "goodcube": {
                "goodcube.obj": CUBE_OBJ.replace("cube.mtl", "goodcube.mtl"),
                "goodcube.mtl": "newmtl red\nKd 0.8 0.1 0.1\n",
            },
            "notex": {
                "notex.obj": CUBE_OBJ.replace("cube.mtl", "notex.mtl"),
                "notex.mtl": "newmtl red\nKd 0.2 0.6 0.2\nmap_Kd lost_wood.jpg\n",
            },
            "garbage": {"garbage.obj": "\x00\x01 this is not a mesh \xff\n"},
            "flat": {"flat.obj": "v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n"},
        },
    )
    (fdir / "Corrupt.sh3f").write_bytes(b"PK\x03\x04 truncated, not a zip")
    monkeypatch.setenv(assets_mod.FURNITURE_DIR_ENV, str(fdir))
    catalog = {
        "cube": [
            {"lib": "Fixture", "model": "/goodcube/goodcube.obj"},
            {"lib": "Fixture", "model": "/garbage/garbage.obj"},
        ],
        "green_cube": [{"lib": "Fixture", "model": "/notex/notex.obj"}],
        "broken": [
            {"lib": "Fixture", "model": "/garbage/garbage.obj"},
            {"lib": "Fixture", "model": "/flat/flat.obj"},
        ],
        "corrupt": [{"lib": "Corrupt", "model": "/x/x.obj"}],
    }
    return tmp_path, catalog


def test_bad_models_are_skipped_with_counted_warnings_and_empty_categories_dropped(bad_furniture):
    tmp_path, catalog = bad_furniture
    lines: list[str] = []
    folder = assets_mod.build_asset_cache(tmp_path / "cache", catalog=catalog, log=lines.append)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(m["key"] for m in manifest["models"]) == ["cube__0", "green_cube__0"]
    skipped = {s["source"] for s in manifest["skipped"]}
    assert skipped == {
        "Fixture.sh3f:/garbage/garbage.obj",
        "Fixture.sh3f:/flat/flat.obj",
        "Corrupt.sh3f:/x/x.obj",
    }
    assert len(manifest["skipped"]) == 4  # the garbage file is listed by two categories
    assert manifest["dropped_categories"] == ["broken", "corrupt"]
    assert len(manifest["texture_warnings"]) == 1 and "lost_wood.jpg" in manifest["texture_warnings"][0]
    log = "\n".join(lines)
    for name in ("garbage.obj", "flat.obj", "Corrupt.sh3f", "lost_wood.jpg"):
        assert name in log
    assert "4 skipped" in log and "left out of this run: broken, corrupt" in log
    # the model whose texture is missing keeps its material colour; the good cube is real size
    models = {m.key: m for m in assets_mod.load_assets(folder)}
    assert models["green_cube__0"].parts[0].texture is None
    assert models["green_cube__0"].colour_rgb[1] > models["green_cube__0"].colour_rgb[0]
    assert models["cube__0"].size_m.tolist() == pytest.approx([0.10, 0.08, 0.06])
    # a reused cache says the same again
    again: list[str] = []
    assert assets_mod.build_asset_cache(tmp_path / "cache", catalog=catalog, log=again.append) == folder
    assert "left out of this run: broken, corrupt" in "\n".join(again)
    assert assets_mod.usable_categories(folder) == {"cube", "green_cube"}


def test_a_catalog_with_no_usable_model_is_a_clear_error(bad_furniture):
    tmp_path, catalog = bad_furniture
    with pytest.raises(assets_mod.AssetError, match="no model .* could be converted"):
        assets_mod.build_asset_cache(tmp_path / "cache", catalog={"broken": catalog["broken"]}, log=print)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_size_override_replaces_the_catalog_size(bad_furniture):
    tmp_path, catalog = bad_furniture
    cat = {"cube": [{"lib": "Fixture", "model": "/goodcube/goodcube.obj", "size_cm": [20, 5.8, 1]}]}
    folder = assets_mod.build_asset_cache(tmp_path / "cache", catalog=cat, log=lambda *_: None)
    (model,) = assets_mod.load_assets(folder)
    assert model.size_m.tolist() == pytest.approx([0.20, 0.058, 0.01])
    span = model.parts[0].verts.max(0) - model.parts[0].verts.min(0)
    assert span.tolist() == pytest.approx([0.20, 0.058, 0.01], abs=1e-6)


def test_knowledge_base_drops_categories_for_a_run_but_never_all():
    kb = load_knowledge_base()
    small = kb.restricted_to({"mug", "plate"})
    assert set(small.categories) == {"mug", "plate"} and small.vocab is kb.vocab
    assert kb.restricted_to(set(kb.categories)) is kb
    with pytest.raises(KnowledgeBaseError, match="no knowledge-base category"):
        kb.restricted_to(set())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("placement", "ceiling", "placement 'ceiling'"),
        ("recolourable", "yes", "recolourable"),
        ("synonyms", [], "synonym"),
    ],
)
def test_bad_new_fields_are_named(tmp_path, field, value, message):
    raw = json.loads(KNOWLEDGE_BASE.read_text())
    raw["categories"]["drill"][field] = value
    bad = tmp_path / "kb.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(KnowledgeBaseError, match=f"drill.*{message}"):
        load_knowledge_base(bad)


# ------------------------------------------------------------------------------ the shipped catalog
def test_shipped_catalog_is_broad_and_matches_the_knowledge_base():
    catalog = assets_mod.load_asset_catalog()
    kb = load_knowledge_base()
    assert set(catalog) == set(kb.categories)
    models = [(e["lib"], e["model"]) for entries in catalog.values() for e in entries]
    assert len(models) >= 300 and len(catalog) >= 150, (len(models), len(catalog))
    assert len(set(models)) == len(models), "a model stands for two categories"
    assert set(e["lib"] for _, e in [(0, e) for v in catalog.values() for e in v]) <= set(
        assets_mod.LIBRARY_LICENCES
    )
    for entries in catalog.values():
        for e in entries:
            if "size_cm" in e:
                assert len(e["size_cm"]) == 3 and all(0 < v < 400 for v in e["size_cm"]), e
    placements = {c.placement for c in kb.categories.values()}
    assert placements == set(PLACEMENTS)
    # several kinds of one thing: the seating and lighting a room holds come in several models
    for key in ("chair", "armchair", "table_lamp", "dining_table", "kitchen_cabinet"):
        assert len(catalog[key]) >= 3, key


def test_every_category_carries_the_facts_each_family_needs():
    kb = load_knowledge_base()
    names: dict[str, str] = {}
    for key, c in kb.categories.items():
        assert c.name and c.plural and c.plural != c.name, key
        assert len(c.synonyms) >= 2, f"{key}: give it at least two synonyms"
        assert c.name.lower() not in names, f"{key} and {names.get(c.name.lower())} share the name {c.name!r}"
        names[c.name.lower()] = key
        assert c.functions, f"{key} is for nothing (functions)"
        assert c.affordances or c.placement == "room", f"{key} affords nothing"
        assert c.mass_kg > 0 and c.material and c.group, key
        assert isinstance(c.recolourable, bool) and c.placement in PLACEMENTS, key
    # what the brief settles: food and plants keep their colours, cups and furniture may change
    for key, want in (
        ("mug", True),
        ("chair", True),
        ("bin", True),
        ("apples", False),
        ("wine_bottle", False),
        ("houseplant", False),
        ("firewood", False),
    ):
        assert kb.categories[key].recolourable is want, key
    for key in ("fridge", "sofa", "bookcase", "kitchen_sink", "chair", "bin"):
        assert kb.categories[key].placement == "room", key
    for key in ("mug", "hammer", "drill", "saw", "laptop"):
        assert kb.categories[key].placement == "table", key


def test_new_vocab_concepts_have_enough_seed_phrases_and_a_carrier():
    kb = load_knowledge_base()
    for section, concepts in kb.vocab.items():
        for concept, phrases in concepts.items():
            assert len(phrases) >= 4, f"vocab.{section}.{concept} has {len(phrases)} phrases"
            if section != "physical":
                assert any(c.has(concept) for c in kb.categories.values()), f"{section}.{concept}"
    for concept in ("sit_on", "play_with", "wear", "hit_with", "write_with", "store_in"):
        assert concept in kb.vocab["affordances"], concept
    for concept in ("pointed", "chemical", "flammable", "choking_hazard", "tip_over", "power_tool"):
        assert concept in kb.vocab["safety"], concept


def test_missing_texture_is_found_from_the_material_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.mtl").write_text(
        "newmtl x\nmap_Kd wood.jpg\nmap_Bump gone.png\nnewmtl y\nmap_Kd sub\\paint.png\n"
    )
    (tmp_path / "m" / "wood.jpg").write_bytes(b"")
    assert assets_mod.missing_textures(tmp_path, "m", ["m/a.mtl", "m/wood.jpg"]) == ["sub/paint.png"]


def test_untextured_parts_share_one_palette_and_keep_their_colours(tmp_path):
    """Two plain materials become one part (the renderer holds at most 1000 materials for all models),
    each face still in its own colour, and the albedo stays area-weighted: the cube is scaled to
    10 x 8 x 6 cm, blue is its 8 x 6 side, 48 of 376 cm2."""
    obj = CUBE_OBJ.replace("f 4/1 1/2 5/3\n", "usemtl blue\nf 4/1 1/2 5/3\n")
    mtl = "newmtl red\nKd 1 0 0\nnewmtl blue\nKd 0 0 1\n"
    lib = tmp_path / "Two.sh3f"
    _library(lib, {"two": {"two.obj": obj.replace("cube.mtl", "two.mtl"), "two.mtl": mtl}})
    with zipfile.ZipFile(lib) as z:
        entry = assets_mod.parse_furniture_catalog(z.read("PluginFurnitureCatalog.properties").decode())
        parts, _ = assets_mod.convert_model(z, entry["/two/two.obj"], "two__0")
    (part,) = parts
    assert part.texture is not None and part.texture.shape[0] == assets_mod.PALETTE_CELL
    h, w = part.texture.shape[:2]
    colours = {tuple(part.texture[int(v * h), int(u * w)]) for u, v in part.uv[part.faces[:, 0]]}
    assert colours == {(255, 0, 0), (0, 0, 255)}
    albedo = assets_mod._albedo(parts)
    assert albedo[0] == pytest.approx(328 / 376, abs=0.005) and albedo[2] == pytest.approx(
        48 / 376, abs=0.005
    )


def test_dense_models_are_simplified_within_budget_and_keep_their_size():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces
    v = (sphere.vertices - sphere.vertices.min(0)).astype("float32")
    part = assets_mod.MeshPart(
        v, sphere.faces.astype("int32"), None, __import__("numpy").ones(4, "float32"), None
    )
    (out,) = assets_mod._simplify([part], 2000)
    assert 100 < len(out.faces) <= 2000
    span = out.verts.max(0) - out.verts.min(0)
    assert span.tolist() == pytest.approx([2.0, 2.0, 2.0], rel=0.05)
    assert assets_mod._simplify([part], 30000)[0] is part
