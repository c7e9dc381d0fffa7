"""Asset library: Sweet Home 3D furniture models converted to upright, real-scale MuJoCo-ready meshes.

The Debian package `sweethome3d-furniture` ships zip libraries (`*.sh3f`) of textured OBJ models plus a
`PluginFurnitureCatalog.properties` that gives each model's name, author and real width/depth/height in
cm. Models are Y-up. `build_asset_cache` converts the models named in `asset_catalog.json` once into a
cache folder (one `.npz` per model and a `manifest.json` with licence and author of every model); the
scene builder only ever reads that cache. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AssetError

FURNITURE_DIR_ENV = "CONVERSEG_FURNITURE_DIR"
DEFAULT_FURNITURE_DIR = Path("/usr/share/sweethome3d/furniture")
CACHE_DIR_ENV = "CONVERSEG_ASSET_CACHE"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "assets"
ASSET_CATALOG = Path(__file__).with_name("asset_catalog.json")
# Bump when the conversion changes so that old caches are rebuilt, never silently reused.
CONVERTER_VERSION = 4
MAX_TEXTURE_SIDE = 256  # objects cover < 200 px of a 512 x 384 frame; bigger textures only cost memory
MAX_PARTS = 12  # one MuJoCo geom per material; tiny extra materials merge into the largest part
# MuJoCo's renderer holds at most 1000 materials in one model, and the world holds every model. A model's
# untextured opaque parts therefore become one part whose colours sit in a palette texture: one cell of
# PALETTE_CELL x PALETTE_CELL texels per colour, every vertex of a part at its cell's centre.
PALETTE_CELL = 8
# The world compiles every model once per process: 362 models at full detail (4 million faces) take 40 s
# and 5.5 GB to compile. Above this many faces a model is simplified by vertex clustering; at < 200 px on
# screen the difference does not show.
MAX_FACES = 8000

# Sweet Home 3D libraries and their licence as the Debian copyright file states it.
LIBRARY_LICENCES = {
    "BlendSwap-CC-0": "CC0-1.0",
    "BlendSwap-CC-BY": "CC-BY-3.0",
    "KatorLegaz": "CC-BY-3.0-US",
    "Scopia": "CC-BY-3.0",
    "Reallusion": "CC-BY-3.0-US",
}


@dataclass
class MeshPart:
    """One material of a model. verts: V x 3 float32 metres (z up, base at z=0); faces: F x 3 int32;
    uv: V x 2 float32 or None; rgba: 4 float32 in [0, 1]; texture: H x W x 3 uint8 or None."""

    verts: np.ndarray
    faces: np.ndarray
    uv: np.ndarray | None
    rgba: np.ndarray
    texture: np.ndarray | None


@dataclass
class AssetModel:
    """A converted model: its parts and the facts the scene graph and the manifest need."""

    key: str  # "<category>__<index>"
    category: str
    name: str  # name in the furniture catalog
    source: str  # "<library>:<obj path>"
    licence: str
    author: str
    size_m: np.ndarray  # width (x), depth (y), height (z) in metres
    parts: list[MeshPart] = field(default_factory=list)
    colour_rgb: np.ndarray | None = None  # area-weighted mean albedo, 0..1


def furniture_dir() -> Path:
    return Path(os.environ.get(FURNITURE_DIR_ENV, DEFAULT_FURNITURE_DIR))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR))


def furniture_available() -> bool:
    d = furniture_dir()
    return d.is_dir() and any(d.glob("*.sh3f"))


@dataclass
class SkippedModel:
    """A catalog model (or one of its textures) left out of the cache, and why."""

    category: str
    source: str  # "<library file>:<obj path>"
    reason: str


def load_asset_catalog(path: Path = ASSET_CATALOG) -> dict[str, list[dict]]:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def parse_furniture_catalog(text: str) -> dict[str, dict[str, str]]:
    """Parse a PluginFurnitureCatalog.properties into {model obj path: fields}."""
    items: dict[int, dict[str, str]] = {}
    header: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)#(\d+)=(.*)$", line)
        if m:
            items.setdefault(int(m.group(2)), {})[m.group(1)] = _unescape(m.group(3).strip())
            continue
        m = re.match(r"^(\w+)=(.*)$", line)
        if m:
            header[m.group(1)] = _unescape(m.group(2).strip())
    out = {}
    for it in items.values():
        if "model" in it:
            it["_library_license"] = header.get("license", "")
            out[it["model"]] = it
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), s)


def _catalog_hash(catalog: dict) -> str:
    blob = json.dumps({"catalog": catalog, "version": CONVERTER_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def check_sources(catalog: dict[str, list[dict]], known_categories: set[str] | None = None) -> dict[str, str]:
    """Fail at start-up, naming the culprit, if a library, a model or a knowledge-base entry is missing.

    A library file that exists but cannot be read (a broken zip) is no typo in the catalog: it is returned
    as {library: reason} so that its models are skipped with a warning instead.
    """
    from .errors import KnowledgeBaseError

    if known_categories is not None:
        unknown = sorted(set(catalog) - known_categories)
        if unknown:
            raise KnowledgeBaseError(
                f"asset_catalog.json names categories missing from the knowledge base: {unknown}"
            )
        no_asset = sorted(known_categories - set(catalog))
        if no_asset:
            raise KnowledgeBaseError(
                f"knowledge-base categories with no asset in asset_catalog.json: {no_asset}"
            )
    fdir = furniture_dir()
    if not furniture_available():
        raise AssetError(
            f"no Sweet Home 3D furniture libraries in {fdir}: run scripts/setup.sh "
            f"(apt-get install sweethome3d-furniture) or set {FURNITURE_DIR_ENV}"
        )
    by_lib: dict[str, list[tuple[str, str]]] = {}
    for cat, entries in catalog.items():
        if not entries:
            raise AssetError(f"category {cat!r} lists no model in asset_catalog.json")
        for e in entries:
            by_lib.setdefault(e["lib"], []).append((cat, e["model"]))
    unreadable: dict[str, str] = {}
    for lib, models in by_lib.items():
        path = fdir / f"{lib}.sh3f"
        if not path.is_file():
            raise AssetError(f"furniture library {path} (needed by {models[0][0]!r}) does not exist")
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                fcat = parse_furniture_catalog(z.read("PluginFurnitureCatalog.properties").decode("latin-1"))
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            unreadable[lib] = f"library {path} cannot be read: {exc}"
            continue
        for cat, model in models:
            if model.lstrip("/") not in names:
                raise AssetError(f"model {model} for category {cat!r} is not in {path}")
            if model not in fcat:
                raise AssetError(f"model {model} for category {cat!r} has no entry in {path}'s catalog")
    return unreadable


def convert_model(
    z: zipfile.ZipFile,
    entry: dict[str, str],
    label: str,
    *,
    size_cm: list[float] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[MeshPart], np.ndarray]:
    """Convert one OBJ in an open .sh3f to parts in metres, Z up, base at z=0, centred in x and y.

    Sweet Home 3D scales a model's bounding box to the catalog's width/depth/height; so do we, unless
    `size_cm` (width, depth, height) overrides a catalog size that is not the real object's (pliers listed
    60 cm long). A texture the material names but the library lacks is reported through `warn` and the
    part keeps its material colour. Returns the parts and the size (width, depth, height) in metres.
    """
    import trimesh

    model = entry["model"].lstrip("/")
    folder = os.path.dirname(model)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            members = [n for n in z.namelist() if n.startswith(folder + "/") and not n.endswith("/")]
            for n in members:
                z.extract(n, tmp)
            for tex in missing_textures(Path(tmp), folder, members):
                if warn is not None:
                    warn(f"missing texture {tex} of {label} ({entry['model']}): material colour used instead")
            scene = trimesh.load(os.path.join(tmp, model), force="scene", process=False)
            meshes = [g for g in scene.dump(concatenate=False) if len(g.faces) > 0]
    except Exception as exc:  # trimesh raises many types; the message must name the model
        raise AssetError(f"cannot load mesh {label} ({entry['model']}): {exc}") from exc
    if not meshes:
        raise AssetError(f"mesh {label} ({entry['model']}) has no faces")

    # Y-up to Z-up: (x, y, z) -> (x, -z, y); the model's front (+z in Sweet Home 3D) faces -y.
    rot = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)
    all_v = np.concatenate([np.asarray(m.vertices) @ rot.T for m in meshes])
    if not np.isfinite(all_v).all():
        raise AssetError(f"mesh {label} ({entry['model']}) has non-finite vertices")
    lo, hi = all_v.min(0), all_v.max(0)
    extent = hi - lo
    dims = size_cm if size_cm is not None else [entry["width"], entry["depth"], entry["height"]]
    target = np.array([float(v) for v in dims]) / 100.0
    if (extent <= 0).any():
        raise AssetError(f"mesh {label} ({entry['model']}) is degenerate (extent {extent})")
    scale = target / extent
    offset = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])

    groups: dict[str, list] = {}
    for m in meshes:
        key, rgba, tex = _material_of(m)
        groups.setdefault(key, []).append((m, rgba, tex))
    parts = []
    for items in groups.values():
        vs, fs, uvs, n = [], [], [], 0
        rgba, tex = items[0][1], items[0][2]
        for m, _, _ in items:
            v = ((np.asarray(m.vertices) @ rot.T) - offset) * scale
            vs.append(v)
            fs.append(np.asarray(m.faces) + n)
            uv = getattr(m.visual, "uv", None) if tex is not None else None
            uvs.append(np.asarray(uv) if uv is not None and len(uv) == len(v) else None)
            n += len(v)
        have_uv = tex is not None and all(u is not None for u in uvs)
        parts.append(
            MeshPart(
                verts=np.concatenate(vs).astype(np.float32),
                faces=np.concatenate(fs).astype(np.int32),
                uv=np.concatenate(uvs).astype(np.float32) if have_uv else None,
                rgba=rgba,
                texture=tex if have_uv else None,
            )
        )
    parts.sort(key=lambda p: -len(p.faces))
    parts = _merge_plain_parts(parts)
    if len(parts) > MAX_PARTS:  # merge the tail into one untextured part with its own colour
        tail = parts[MAX_PARTS - 1 :]
        offs = np.cumsum([0] + [len(p.verts) for p in tail[:-1]])
        merged = MeshPart(
            verts=np.concatenate([p.verts for p in tail]),
            faces=np.concatenate([p.faces + o for p, o in zip(tail, offs, strict=True)]),
            uv=None,
            rgba=np.mean([p.rgba for p in tail], axis=0).astype(np.float32),
            texture=None,
        )
        parts = parts[: MAX_PARTS - 1] + [merged]
    return _simplify(parts, MAX_FACES), target.astype(np.float32)


def missing_textures(root: Path, folder: str, members: list[str]) -> list[str]:
    """Colour textures (map_Kd) named by the model's .mtl files that the library does not hold."""
    present = {m.lower() for m in members}
    missing = []
    for mtl in (m for m in members if m.lower().endswith(".mtl")):
        text = (root / mtl).read_text(encoding="latin-1", errors="replace")
        for line in text.splitlines():
            parts = line.strip().split()
            if (
                len(parts) >= 2 and parts[0].lower() == "map_kd"
            ):  # colour; bump and reflection maps do not matter
                name = parts[-1].replace("\\", "/")
                path = os.path.normpath(os.path.join(os.path.dirname(mtl), name)).replace(os.sep, "/")
                if path.lower() not in present and name not in missing:
                    missing.append(name)
    return missing


def _simplify(parts: list[MeshPart], max_faces: int) -> list[MeshPart]:
    """Keep a model under `max_faces` by vertex clustering, each part within its share of the budget.

    Vertices merge when they fall in one cell of a grid over the model and (for a textured part) in one
    cell of a 1/32 uv grid, so texture seams stay apart. The finest grid that meets the budget is kept; a
    part that meets it only when seams merge too (foliage) gives them up, one that never does stays whole."""
    total = sum(len(p.faces) for p in parts)
    if total <= max_faces:
        return parts
    all_v = np.concatenate([p.verts for p in parts])
    lo, span = all_v.min(0), float((all_v.max(0) - all_v.min(0)).max())
    out = []
    for p in parts:
        budget = max(int(max_faces * len(p.faces) / total), 32)
        if len(p.faces) <= budget:
            out.append(p)
            continue
        best = None
        for keep_seams in (True, False):  # foliage has too many uv islands: then seams give way
            for res in (256, 128, 64, 32, 16, 8):
                cand = _cluster(p, lo, span / res, keep_seams)
                if 0 < len(cand.faces) <= budget:
                    best = cand
                    break
            if best is not None:
                break
        out.append(best if best is not None else p)
    return out


def _cluster(p: MeshPart, lo: np.ndarray, cell: float, keep_seams: bool) -> MeshPart:
    key = np.floor((p.verts - lo) / max(cell, 1e-9)).astype(np.int64)
    if p.uv is not None and keep_seams:
        key = np.concatenate([key, np.floor(p.uv * 32).astype(np.int64)], axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    n = len(counts)

    def mean(a: np.ndarray) -> np.ndarray:
        acc = np.zeros((n, a.shape[1]), dtype=np.float64)
        np.add.at(acc, inv, a)
        return (acc / counts[:, None]).astype(np.float32)

    f = inv[p.faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    f = np.unique(f, axis=0) if len(f) else f
    return MeshPart(
        verts=mean(p.verts),
        faces=f.astype(np.int32),
        uv=mean(p.uv) if p.uv is not None else None,
        rgba=p.rgba,
        texture=p.texture,
    )


def _merge_plain_parts(parts: list[MeshPart]) -> list[MeshPart]:
    """Untextured opaque parts (two or more) -> one part textured by a palette of their colours.

    Every face keeps its colour exactly: its three vertices share one uv at a cell centre, so the
    texture lookup is constant over the face (no mipmap blending across cells)."""
    plain = [p for p in parts if p.texture is None and p.rgba[3] >= 0.999]
    if len(plain) < 2:
        return parts
    n = len(plain)
    palette = np.zeros((PALETTE_CELL, n * PALETTE_CELL, 3), dtype=np.uint8)
    verts, faces, uvs, off = [], [], [], 0
    for k, p in enumerate(plain):
        palette[:, k * PALETTE_CELL : (k + 1) * PALETTE_CELL] = np.round(p.rgba[:3] * 255).astype(np.uint8)
        verts.append(p.verts)
        faces.append(p.faces + off)
        uvs.append(np.tile(np.array([(k + 0.5) / n, 0.5], dtype=np.float32), (len(p.verts), 1)))
        off += len(p.verts)
    merged = MeshPart(
        verts=np.concatenate(verts).astype(np.float32),
        faces=np.concatenate(faces).astype(np.int32),
        uv=np.concatenate(uvs),
        rgba=np.ones(4, dtype=np.float32),
        texture=palette,
    )
    rest = [p for p in parts if not (p.texture is None and p.rgba[3] >= 0.999)]
    return sorted([merged, *rest], key=lambda p: -len(p.faces))


def _material_of(mesh) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(grouping key, rgba 0..1, texture H x W x 3 uint8 or None) of a trimesh mesh."""
    from PIL import Image

    vis = mesh.visual
    mat = getattr(vis, "material", None)
    img = None
    if mat is not None:
        img = getattr(mat, "image", None) or getattr(mat, "baseColorTexture", None)
        color = np.asarray(mat.main_color, dtype=np.float32) / 255.0
        name = getattr(mat, "name", None) or str(id(mat))
    else:
        color = np.asarray(getattr(vis, "main_color", (180, 180, 180, 255)), dtype=np.float32) / 255.0
        name = "color-" + ",".join(str(int(c * 255)) for c in color)
    tex = None
    if img is not None and getattr(vis, "uv", None) is not None:
        im = img.convert("RGB")
        if max(im.size) > MAX_TEXTURE_SIDE:
            im.thumbnail((MAX_TEXTURE_SIDE, MAX_TEXTURE_SIDE), Image.Resampling.BILINEAR)
        tex = np.asarray(im, dtype=np.uint8)
        color = np.array([1.0, 1.0, 1.0, color[3]], dtype=np.float32)
    color[3] = max(color[3], 0.35)  # glass must stay visible in RGB
    return name, color, tex


def _albedo(parts: list[MeshPart]) -> np.ndarray:
    total, acc = 0.0, np.zeros(3)
    for p in parts:
        tri = p.verts[p.faces]
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        if p.texture is None:
            acc += area.sum() * p.rgba[:3]
        elif p.uv is not None and np.allclose(np.ptp(p.uv[p.faces], axis=1), 0):
            # one colour per face (a palette): sample each face's texel, weighted by its area
            h, w = p.texture.shape[:2]
            uv = p.uv[p.faces[:, 0]] % 1.0
            texel = p.texture[
                (uv[:, 1] * h).astype(int).clip(0, h - 1), (uv[:, 0] * w).astype(int).clip(0, w - 1)
            ]
            acc += (area[:, None] * texel / 255.0).sum(0)
        else:
            acc += area.sum() * p.texture.reshape(-1, 3).mean(0) / 255.0
        total += area.sum()
    return (acc / max(total, 1e-12)).astype(np.float32)


def build_asset_cache(
    out_dir: Path | None = None,
    *,
    force: bool = False,
    known_categories: set[str] | None = None,
    catalog: dict[str, list[dict]] | None = None,
    log=print,
) -> Path:
    """Convert every model in asset_catalog.json (or `catalog`) into `out_dir/<hash>/`; reuse a complete cache.

    A model that cannot be converted (unreadable library or file, no usable mesh) is skipped with a
    warning naming it, a missing texture falls back to the material colour; both are counted in the
    manifest. A category left with no model is listed there as dropped (`dropped_categories`) and the
    engine leaves it out of its knowledge base for the run. Returns the cache folder. Written to a
    temporary folder and renamed, so a crash never leaves a half-built cache that looks complete.
    """
    catalog = load_asset_catalog() if catalog is None else catalog
    unreadable = check_sources(catalog, known_categories)
    root = Path(out_dir) if out_dir is not None else cache_dir()
    final = root / _catalog_hash(catalog)
    if (final / "manifest.json").is_file() and not force:
        log_conversion_summary(json.loads((final / "manifest.json").read_text(encoding="utf-8")), log)
        return final
    root.mkdir(parents=True, exist_ok=True)
    gitignore = root.parent / ".gitignore" if root.parent.name == ".cache" else root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# converted assets are a cache, never committed\n*\n")
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
    manifest = []
    skipped: list[SkippedModel] = []
    texture_warnings: list[str] = []
    zips: dict[str, zipfile.ZipFile] = {}
    fcats: dict[str, dict] = {}
    try:
        for cat, entries in sorted(catalog.items()):
            for i, e in enumerate(entries):
                lib = e["lib"]
                source = f"{lib}.sh3f:{e['model']}"
                key = f"{cat}__{i}"
                if lib in unreadable:
                    skipped.append(SkippedModel(cat, source, unreadable[lib]))
                    log(f"[assets] warning: skipped {source}: {unreadable[lib]}")
                    continue
                if lib not in zips:
                    zips[lib] = zipfile.ZipFile(furniture_dir() / f"{lib}.sh3f")
                    fcats[lib] = parse_furniture_catalog(
                        zips[lib].read("PluginFurnitureCatalog.properties").decode("latin-1")
                    )
                entry = fcats[lib][e["model"]]

                def warn(msg: str) -> None:
                    texture_warnings.append(msg)
                    log(f"[assets] warning: {msg}")

                try:
                    parts, size = convert_model(zips[lib], entry, key, size_cm=e.get("size_cm"), warn=warn)
                except AssetError as exc:
                    skipped.append(SkippedModel(cat, source, str(exc)))
                    log(f"[assets] warning: skipped {source}: {exc}")
                    continue
                arrays = {"size_m": size, "n_parts": np.array(len(parts))}
                for j, p in enumerate(parts):
                    arrays[f"p{j}_verts"] = p.verts
                    arrays[f"p{j}_faces"] = p.faces
                    arrays[f"p{j}_rgba"] = p.rgba
                    if p.uv is not None:
                        arrays[f"p{j}_uv"] = p.uv
                        arrays[f"p{j}_tex"] = p.texture
                np.savez_compressed(tmp / f"{key}.npz", **arrays)
                manifest.append(
                    {
                        "key": key,
                        "category": cat,
                        "name": entry.get("name", ""),
                        "library": lib,
                        "model": e["model"],
                        "licence": LIBRARY_LICENCES.get(lib, entry["_library_license"]),
                        "library_licence_text": entry["_library_license"],
                        "author": entry.get("creator", ""),
                        "size_cm": [round(float(s) * 100, 2) for s in size],
                        "faces": int(sum(len(p.faces) for p in parts)),
                        "albedo": [round(float(c), 4) for c in _albedo(parts)],
                    }
                )
                log(
                    f"[assets] {key:28s} {len(parts):2d} parts {manifest[-1]['faces']:6d} faces  {e['model']}"
                )
    finally:
        for z in zips.values():
            z.close()
    converted = {m["category"] for m in manifest}
    record = {
        "converter_version": CONVERTER_VERSION,
        "models": manifest,
        "skipped": [{"category": s.category, "source": s.source, "reason": s.reason} for s in skipped],
        "texture_warnings": texture_warnings,
        "dropped_categories": sorted(set(catalog) - converted),
    }
    if not manifest:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise AssetError(f"no model of asset_catalog.json could be converted ({len(skipped)} skipped)")
    with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    log_conversion_summary(record, log)
    return final


def log_conversion_summary(record: dict, log=print) -> None:
    """One line per problem of a cache's conversion, and the categories it leaves out; silent when clean."""
    skipped, tex, dropped = (record.get(k, []) for k in ("skipped", "texture_warnings", "dropped_categories"))
    if not (skipped or tex or dropped):
        return
    log(
        f"[assets] {len(record['models'])} models converted, {len(skipped)} skipped, "
        f"{len(tex)} missing textures"
    )
    for s in skipped:
        log(f"[assets]   skipped {s['source']} ({s['category']}): {s['reason']}")
    for t in tex:
        log(f"[assets]   {t}")
    if dropped:
        log(f"[assets] categories with no usable model, left out of this run: {', '.join(dropped)}")


def usable_categories(folder: Path) -> set[str]:
    """Categories with at least one converted model in a cache."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    return {m["category"] for m in manifest["models"]}


def load_assets(folder: Path) -> list[AssetModel]:
    """Read a cache written by build_asset_cache."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise AssetError(
            f"asset cache {folder} has no manifest.json: run `python -m training.dataengine.assets`"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    models = []
    for rec in manifest["models"]:
        path = folder / f"{rec['key']}.npz"
        if not path.is_file():
            raise AssetError(f"asset cache is missing {path}: rebuild it with --rebuild-assets")
        with np.load(path) as d:
            parts = []
            for j in range(int(d["n_parts"])):
                parts.append(
                    MeshPart(
                        verts=d[f"p{j}_verts"],
                        faces=d[f"p{j}_faces"],
                        uv=d[f"p{j}_uv"] if f"p{j}_uv" in d else None,
                        rgba=d[f"p{j}_rgba"],
                        texture=d[f"p{j}_tex"] if f"p{j}_tex" in d else None,
                    )
                )
            size = d["size_m"].copy()
        models.append(
            AssetModel(
                key=rec["key"],
                category=rec["category"],
                name=rec["name"],
                source=f"{rec['library']}:{rec['model']}",
                licence=rec["licence"],
                author=rec["author"],
                size_m=size,
                parts=parts,
                colour_rgb=np.array(rec["albedo"], dtype=np.float32),
            )
        )
    return models


def manifest_markdown(folder: Path) -> str:
    """The licence table for docs: one row per model."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    rows = ["| category | model | library | licence | author |", "|---|---|---|---|---|"]
    for r in manifest["models"]:
        rows.append(
            f"| {r['category']} | {r['name']} (`{r['model']}`) | {r['library']} | {r['licence']} | {r['author']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="Convert the Sweet Home 3D models named in asset_catalog.json into the asset cache."
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"cache folder (default ${CACHE_DIR_ENV} or {DEFAULT_CACHE_DIR})",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    p.add_argument("--manifest-md", action="store_true", help="print the licence table as Markdown")
    args = p.parse_args(argv)
    try:
        from .knowledge import load_knowledge_base

        kb = load_knowledge_base()
        folder = build_asset_cache(args.cache, force=args.force, known_categories=set(kb.categories))
    except AssetError as exc:
        print(f"error: {exc}")
        return 2
    print(f"[assets] cache: {folder}")
    if args.manifest_md:
        print(manifest_markdown(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
