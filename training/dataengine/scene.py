"""Tabletop world and scene sampler.

One MuJoCo model per process holds the table, a room (floor, three walls, a window), three lights, the
robot camera and a pool of `copies` bodies per asset model. A scene is a *layout* applied to that model at
run time: hidden pool bodies move to a parking lot (no collision, hidden geom group); the table, room
size and surfaces, lights, camera and material colours change through mjModel fields. Compiling and
uploading textures once per process is what makes 1,000 scenes in minutes possible on two CPU cores.

Categories whose knowledge-base entry says `"placement": "room"` (furniture) stand on the floor behind or
beside the table; all others go on the table. Categories with `"recolourable": true` get a random
material colour in some scenes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .assets import AssetModel, _albedo
from .knowledge import Category, KnowledgeBase
from .render import configure_gl
from .sensor import SensorParams, sample_sensor_params

# MuJoCo fixes its GL backend when it is imported: choose EGL or OSMesa first.
configure_gl(strict=False)

import mujoco  # noqa: E402

TABLE_HEIGHT = 0.75  # table top at z = 0, floor at -TABLE_HEIGHT
VISIBLE_GROUP, HULL_GROUP, HIDDEN_GROUP = 0, 3, 4
MAX_PENETRATION = 0.005  # metres; deeper contacts after settling drop an object and settle again
TABLE_FINISHES = (
    "light wood",
    "dark wood",
    "white laminate",
    "grey steel",
    "checked tablecloth",
    "green linoleum",
)
FLOOR_FINISHES = ("oak parquet", "grey tiles", "beige carpet", "dark slate", "terracotta tiles")
WALL_FINISHES = (
    "white paint",
    "warm beige paint",
    "pale blue paint",
    "sage green paint",
    "white brick",
    "wood panels",
)
N_LIGHTS = 3  # built once; a scene switches 1-3 of them on
ROOM_HEIGHT = 2.6  # metres, floor to ceiling
ROOM_GAP = 0.12  # metres kept between room furniture and the table's footprint, and between furniture
RECOLOUR_RATE = 0.6  # share of recolourable objects that get a new colour in a scene
RECOLOUR_MIN_SHARE = 0.3  # parts at least this fraction of a model's largest part take the new colour
# Albedos well inside the bins of scene_graph.colour_name, so the word the graph derives is the one meant.
RECOLOUR_PALETTE = (
    (0.72, 0.08, 0.08),  # red
    (0.92, 0.45, 0.08),  # orange
    (0.90, 0.80, 0.12),  # yellow
    (0.15, 0.55, 0.20),  # green
    (0.12, 0.30, 0.75),  # blue
    (0.45, 0.18, 0.60),  # purple
    (0.90, 0.40, 0.80),  # pink
    (0.88, 0.88, 0.86),  # white
    (0.07, 0.07, 0.08),  # black
    (0.50, 0.50, 0.52),  # grey
    (0.42, 0.24, 0.11),  # brown
)


@dataclass(frozen=True)
class CameraRig:
    """A camera as robots carry it: where it sits relative to the table point it looks at, and its lens.

    Ranges are sampled uniformly. fovy_deg is the vertical field of view of the 512 x 384 (4:3) image;
    native_fov_deg and native_size describe the sensor it stands for: a 16:9 sensor is centre-cropped to
    4:3 (full height kept) and scaled, so the image keeps the native vertical field of view and square
    pixels, and the horizontal one shrinks to 2 atan(4/3 tan(fovy / 2)).
    """

    weight: float  # share of scenes
    fovy_deg: tuple[float, float]
    height_m: tuple[float, float]  # above the table top
    back_m: tuple[float, float]  # horizontal distance from the point looked at
    azimuth_deg: tuple[float, float]  # 0: straight across the table's near edge
    roll_deg: tuple[float, float]
    native_fov_deg: tuple[float, float]  # horizontal, vertical
    native_size: tuple[int, int]  # width, height in pixels


CAMERA_RIGS = {
    # head camera of a mobile manipulator (PrimeSense / Xtion class, 58 x 45 degrees, 4:3)
    "head": CameraRig(
        0.4, (44.0, 46.0), (0.35, 0.8), (0.6, 1.1), (-25, 25), (-3, 3), (58.0, 45.0), (640, 480)
    ),
    # RealSense D435 colour camera on a head or chest mount: 69 x 42 degrees at 16:9
    "realsense": CameraRig(
        0.35, (42.0, 42.0), (0.3, 0.75), (0.55, 1.0), (-25, 25), (-3, 3), (69.0, 42.0), (1280, 720)
    ),
    # wrist camera (RealSense D405 class, 87 x 58 degrees at 16:9) close above the table, rolled with the hand
    "wrist": CameraRig(
        0.25, (58.0, 58.0), (0.25, 0.55), (0.05, 0.35), (-40, 40), (-35, 35), (87.0, 58.0), (1280, 720)
    ),
}


@dataclass
class Light:
    """A spot light: position and the point it aims at (world, m), diffuse intensity (0-1), white of a
    colour temperature (kelvin), and whether it casts shadows."""

    pos: np.ndarray
    target: np.ndarray
    intensity: float
    kelvin: float
    shadow: bool


@dataclass
class Room:
    """The room around the table: surfaces (indices into FLOOR_FINISHES, WALL_FINISHES), the back wall's
    inner face at y = back_y, side walls' inner faces at x = +-half_width (m), and a window on the back
    wall as (centre x, centre height above the floor, width, height) in metres, or None."""

    floor_finish: int
    wall_finish: int
    back_y: float
    half_width: float
    window: tuple[float, float, float, float] | None


@dataclass
class Placement:
    """One object of a layout. x, y (m) and yaw (radians): in the table frame, or in the container's body
    frame for an object inside one. on: index of its support; inside: index of its container."""

    model_index: int
    copy: int
    x: float
    y: float
    yaw: float
    on: int | None = None
    states: dict = field(default_factory=dict)
    inside: int | None = None

    @property
    def parent(self) -> int | None:
        """The placement this one rests on or in (None: the table)."""
        return self.on if self.on is not None else self.inside


@dataclass
class Layout:
    """Everything that makes a scene, sampled from one RNG (table in metres, angles in radians)."""

    table_size: tuple[float, float]  # full width (x), depth (y)
    table_finish: int
    placements: list[Placement]
    camera_kind: str  # a key of CAMERA_RIGS
    cam_pos: np.ndarray  # world, metres
    cam_target: np.ndarray
    fovy: float  # degrees
    lights: list[Light]  # 1-3
    ambient: float  # headlight ambient, 0-1
    room: Room
    composition: str = "spread"  # one of COMPOSITIONS: how the objects were arranged
    cam_roll: float = 0.0  # degrees about the optical axis
    room_objects: list[Placement] = field(default_factory=list)  # furniture on the floor; x, y world
    # new material albedo of (model, copy); pool bodies not listed keep their model's own colours
    tints: dict[tuple[int, int], tuple[float, float, float]] = field(default_factory=dict)
    sensor: SensorParams | None = None  # sensor effects drawn for this scene (applied if the engine asks)

    def without(self, drop: set[int]) -> Layout:
        """The same scene less some placements (and whatever rested on or in them), `on` and `inside`
        indices remapped."""
        drop = set(drop)
        changed = True
        while changed:  # what stood on a dropped support, or lay in a dropped container, goes too
            changed = False
            for k, p in enumerate(self.placements):
                if k not in drop and p.parent is not None and p.parent in drop:
                    drop.add(k)
                    changed = True
        keep = [k for k in range(len(self.placements)) if k not in drop]
        new_index = {old: new for new, old in enumerate(keep)}
        placements = []
        for k in keep:
            p = self.placements[k]
            placements.append(
                Placement(
                    p.model_index,
                    p.copy,
                    p.x,
                    p.y,
                    p.yaw,
                    None if p.on is None else new_index[p.on],
                    dict(p.states),
                    None if p.inside is None else new_index[p.inside],
                )
            )
        return dataclasses.replace(self, placements=placements)


def _area(part) -> float:
    tri = part.verts[part.faces]
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


def _obb_corners(x, y, yaw, w, d):
    c, s = math.cos(yaw), math.sin(yaw)
    hx, hy = w / 2, d / 2
    pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    return pts @ np.array([[c, s], [-s, c]]) + np.array([x, y])


def _obb_overlap(a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Separating-axis test of two rectangles given by their corners, grown by margin. Plain Python on
    the 4 + 4 corners: layout sampling calls it thousands of times per scene, where numpy's per-call
    overhead dominated."""
    pa_, pb_ = a.tolist(), b.tolist()
    for poly in (pa_, pb_):
        for i in range(2):
            ex, ey = poly[i + 1][0] - poly[i][0], poly[i + 1][1] - poly[i][1]
            n = math.hypot(ex, ey) + 1e-12
            ax, ay = -ey / n, ex / n
            da = [x * ax + y * ay for x, y in pa_]
            db = [x * ax + y * ay for x, y in pb_]
            if max(da) + margin < min(db) or max(db) + margin < min(da):
                return False
    return True


# -------------------------------------------------------------------- composition
COMPOSITIONS = ("spread", "clutter")  # spread: objects apart; clutter: close together, touching, piled
CLUTTER_RATE = 0.35  # share of scenes drawn as clutter
CLUTTER_MARGIN = 0.004  # metres between footprints in clutter (spread keeps 0.02)
FILL_RATE = {"spread": 0.6, "clutter": 0.8}  # chance that a container gets something inside it
CONTAINER_SCENE_RATE = 0.4  # share of scenes that surely hold an open container (a bowl, a basket...)
SUPPORT_RATE = {"spread": 0.4, "clutter": 0.7}  # chance that an object tries a support first
MULTI_INSTANCE_RATE = 0.08  # chance that a drawn kind comes as several instances (2-3, "all the mugs")
EDGE_CUT_RATE = 0.15  # share of scenes with an object moved to straddle the frame edge
CAVITY_CELLS = 48  # height-map resolution across a container's larger side
CAVITY_MIN_DEPTH = 0.02  # metres below the rim before a column counts as inside the container
CAVITY_MAX_REST = 0.5  # an object inside rests in the lower half of its container, not on what stands in it


def _may_go_inside(cat: Category, size_m: np.ndarray, container_size_m: np.ndarray) -> bool:
    """Light enough to be put in by hand and no taller than the container."""
    return cat.mass_kg <= 1.0 and float(size_m[2]) <= float(container_size_m[2])


def _surface_points(verts: np.ndarray, faces: np.ndarray, step: float) -> np.ndarray:
    """Points on every triangle no further than `step` apart (so that a height map with cells of 2 x step
    sees every surface, large flat triangles included)."""
    tri = verts[faces]
    span = np.max(np.linalg.norm(tri[:, [1, 2, 0], :2] - tri[:, :, :2], axis=2), axis=1)
    n = np.clip(np.ceil(span / step), 1, 256).astype(np.int64)
    out = [verts]
    for k in np.unique(n):
        t = tri[n == k]
        i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
        keep = i + j <= k
        u, v = (i[keep] / k)[None, :, None], (j[keep] / k)[None, :, None]
        out.append(
            (
                t[:, None, 0] + u * (t[:, None, 1] - t[:, None, 0]) + v * (t[:, None, 2] - t[:, None, 0])
            ).reshape(-1, 3)
        )
    return np.concatenate(out)


@dataclass(frozen=True)
class Cavity:
    """The open inside of a container model in its body frame (z up, base at 0).

    top: rows (y) x cols (x) metres, the highest surface of the model over each cell (-inf: no surface);
    inside: cells whose highest surface lies at least CAVITY_MIN_DEPTH below the rim, connected to the
    model's centre and away from its outline: an object whose footprint covers only these cells rests at
    the highest `top` under it without touching the container (nothing of the model is above `top`).
    """

    origin: np.ndarray  # x0, y0 of cell (0, 0)'s corner
    cell: float  # metres
    top: np.ndarray
    inside: np.ndarray
    bounds: tuple[float, float, float, float]  # x0, y0, x1, y1 (m) around the inside cells

    def cells(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Row and column of body-frame points (N x 2), or None if any falls off the map."""
        ij = np.floor((pts - self.origin) / self.cell).astype(np.int64)
        if (ij < 0).any() or (ij[:, 0] >= self.top.shape[1]).any() or (ij[:, 1] >= self.top.shape[0]).any():
            return None
        return ij[:, 1], ij[:, 0]

    def rest_height(self, x: float, y: float, yaw: float, w: float, d: float) -> float | None:
        """Height (m, body frame) at which a w x d footprint at (x, y, yaw) rests inside, or None if it
        does not fit in the opening."""
        n = max(2, int(math.ceil(max(w, d) / (0.5 * self.cell))) + 1)
        g = np.linspace(-0.5, 0.5, n)
        local = np.stack(np.meshgrid(g * w, g * d), -1).reshape(-1, 2)
        c, s = math.cos(yaw), math.sin(yaw)
        pts = local @ np.array([[c, s], [-s, c]]) + [x, y]
        rc = self.cells(pts)
        if rc is None or not self.inside[rc].all():
            return None
        return float(self.top[rc].max())


def measure_cavity(asset: AssetModel) -> Cavity | None:
    """Height map of a model seen from above and the part of it that is a usable inside; None if the model
    has no opening (a closed box, a knife block's narrow slots still count only if an object fits)."""
    verts = np.concatenate([p.verts for p in asset.parts]).astype(np.float64)
    faces, n = [], 0
    for p in asset.parts:
        faces.append(p.faces.astype(np.int64) + n)
        n += len(p.verts)
    lo, hi = verts[:, :2].min(0), verts[:, :2].max(0)
    cell = float(max(hi - lo)) / CAVITY_CELLS
    pts = _surface_points(verts, np.concatenate(faces), 0.5 * cell)
    shape = (int(math.ceil((hi[1] - lo[1]) / cell)) + 1, int(math.ceil((hi[0] - lo[0]) / cell)) + 1)
    top = np.full(shape, -np.inf)
    ij = np.minimum(np.floor((pts[:, :2] - lo) / cell).astype(np.int64), [shape[1] - 1, shape[0] - 1])
    np.maximum.at(top, (ij[:, 1], ij[:, 0]), pts[:, 2])
    # a cell's surface may rise towards its neighbour before the next sample: judge each by its 3 x 3 block
    top = ndimage.maximum_filter(top, size=3, mode="nearest")
    rim = float(top.max())
    low = np.isfinite(top) & (top < rim - CAVITY_MIN_DEPTH)
    labels, _ = ndimage.label(low)
    centre = labels[shape[0] // 2, shape[1] // 2]
    if centre == 0:
        return None
    comp = labels == centre
    # walls all round: the low part must not run out to the model's outline (a block's sloping top does)
    ring = ndimage.binary_dilation(comp) & ~comp
    if (
        (~np.isfinite(top[ring])).any()
        or comp[0].any()
        or comp[-1].any()
        or comp[:, 0].any()
        or comp[:, -1].any()
    ):
        return None
    inside = ndimage.binary_erosion(comp) & (top <= CAVITY_MAX_REST * rim)
    if not inside.any():
        return None
    ys, xs = np.nonzero(inside)
    x0, y0 = lo + np.array([xs.min(), ys.min()]) * cell
    x1, y1 = lo + np.array([xs.max() + 1, ys.max() + 1]) * cell
    bounds = (float(x0), float(y0), float(x1), float(y1))
    return Cavity(origin=lo, cell=cell, top=top, inside=inside, bounds=bounds)


def _table_texture(kind: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Procedural table finishes (no image files to license): wood, laminate, steel, cloth, linoleum."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.random((size, size)).astype(np.float32)
    if kind in (0, 1):  # wood: planks with grain
        base = np.array([0.72, 0.55, 0.36]) if kind == 0 else np.array([0.36, 0.22, 0.13])
        grain = 0.5 + 0.5 * np.sin(60 * yy + 6 * np.sin(7 * xx) + 3 * noise[:, :1])
        plank = ((yy * 6).astype(int) % 2) * 0.06
        img = base[None, None] * (0.82 + 0.18 * grain[..., None] - plank[..., None] + 0.04 * noise[..., None])
    elif kind == 2:
        img = np.array([0.74, 0.74, 0.72])[None, None] * (0.96 + 0.04 * noise[..., None])
    elif kind == 3:
        streak = np.repeat(rng.random((size, 1)), size, 1).astype(np.float32)
        img = np.array([0.62, 0.64, 0.66])[None, None] * (
            0.85 + 0.1 * streak[..., None] + 0.05 * noise[..., None]
        )
    elif kind == 4:
        check = (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2).astype(np.float32)
        red = np.array([0.75, 0.15, 0.15])
        img = check[..., None] * red + (1 - check[..., None]) * np.array([0.82, 0.82, 0.79])
        img = img * (0.95 + 0.05 * noise[..., None])
    else:
        img = np.array([0.35, 0.55, 0.4])[None, None] * (0.9 + 0.1 * noise[..., None])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _planks(rng: np.random.Generator, size: int, rows: int, base, spread: float) -> np.ndarray:
    """Rows of planks with staggered joints, a tone per plank and a fine grain (rows run along x)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    row = (yy * rows).astype(int)
    shift = rng.random(rows)[row]
    col = ((xx + shift) * 2).astype(int)
    tone = 1 + spread * (rng.random((rows, 4))[row, col] - 0.5)
    grain = 0.94 + 0.06 * np.sin(90 * yy + 8 * np.sin(5 * xx + 3 * shift))
    seam = (((yy * rows) % 1.0) < 0.04) | ((((xx + shift) * 2) % 1.0) < 0.01)
    img = np.asarray(base)[None, None] * (tone * grain)[..., None]
    img[seam] *= 0.6
    return img


def _tiles(
    rng: np.random.Generator, size: int, n: int, base, spread: float, grout, stagger=False
) -> np.ndarray:
    """n x n tiles (or staggered bricks when stagger) with a tone each and grout lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    row = (yy * n).astype(int)
    xs = xx * (n / 2 if stagger else n) + (0.5 * (row % 2) if stagger else 0)
    col = xs.astype(int)
    tone = 1 + spread * (rng.random((n, n + 1))[row, col % (n + 1)] - 0.5)
    img = np.asarray(base)[None, None] * tone[..., None]
    grout_px = ((yy * n) % 1.0 < 0.05) | (xs % 1.0 < (0.025 if stagger else 0.05))
    img[grout_px] = grout
    return img


def _room_texture(name: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Procedural floor and wall surfaces, one texture per metre (no image files to license)."""
    noise = rng.random((size, size)).astype(np.float32)[..., None]
    if name == "oak parquet":
        img = _planks(rng, size, 8, (0.62, 0.45, 0.28), 0.25)
    elif name == "grey tiles":
        img = _tiles(rng, size, 3, (0.62, 0.62, 0.6), 0.08, (0.4, 0.4, 0.4))
    elif name == "beige carpet":
        from scipy import ndimage

        fluff = ndimage.uniform_filter(noise[..., 0], 3)[..., None]
        img = np.array([0.66, 0.58, 0.46])[None, None] * (0.85 + 0.3 * fluff)
    elif name == "dark slate":
        img = _tiles(rng, size, 2, (0.25, 0.26, 0.28), 0.2, (0.15, 0.15, 0.15))
    elif name == "terracotta tiles":
        img = _tiles(rng, size, 4, (0.68, 0.36, 0.22), 0.18, (0.55, 0.5, 0.45))
    elif name == "white brick":
        img = _tiles(rng, size, 12, (0.86, 0.85, 0.82), 0.08, (0.7, 0.7, 0.68), stagger=True)
    elif name == "wood panels":
        img = _planks(rng, size, 6, (0.7, 0.56, 0.4), 0.15).transpose(1, 0, 2)
    else:  # paint
        base = {
            "white paint": (0.86, 0.86, 0.84),
            "warm beige paint": (0.84, 0.76, 0.62),
            "pale blue paint": (0.66, 0.76, 0.84),
            "sage green paint": (0.64, 0.72, 0.6),
        }[name]
        img = np.array(base)[None, None] * (0.97 + 0.03 * noise)
    img = img * (0.97 + 0.06 * noise)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _window_texture(size: int = 256) -> np.ndarray:
    """A bright window pane: sky fading to a pale horizon, divided by a white frame and cross bars."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    sky = np.array([0.55, 0.72, 0.95]) * (1 - yy[..., None]) + np.array([0.93, 0.95, 0.98]) * yy[..., None]
    bars = (np.abs(xx - 0.5) < 0.015) | (np.abs(yy - 0.45) < 0.015)
    frame = (xx < 0.04) | (xx > 0.96) | (yy < 0.04) | (yy > 0.96)
    sky[bars | frame] = (0.97, 0.97, 0.95)
    return (np.clip(sky, 0, 1) * 255).astype(np.uint8)


def kelvin_rgb(kelvin: float) -> np.ndarray:
    """RGB (max 1) of a black body at this temperature (Tanner Helland's fit, 1000-40000 K)."""
    t = kelvin / 100.0
    r = 1.0 if t <= 66 else 1.2929 * (t - 60) ** -0.1332
    g = 0.3901 * math.log(t) - 0.6318 if t <= 66 else 1.1298 * (t - 60) ** -0.0755
    b = 1.0 if t >= 66 else (0.0 if t <= 19 else 0.5432 * math.log(t - 10) - 1.1962)
    rgb = np.clip([r, g, b], 0, 1)
    return rgb / rgb.max()


LIGHT_CAST = 0.45  # fraction of a lamp's colour cast left after the camera's auto white balance


def light_colour(kelvin: float) -> np.ndarray:
    """The colour a lamp of this temperature gives in the image: warm or cool white, but a white mug stays
    white (cameras white-balance most of the cast away)."""
    return 1 - LIGHT_CAST * (1 - kelvin_rgb(kelvin))


PLACEMENTS = ("table", "room")


def placement_of(cat: Category) -> str:
    """'room' (furniture on the floor) or 'table'; knowledge bases without the field mean 'table'."""
    where = getattr(cat, "placement", None) or "table"
    if where not in PLACEMENTS:
        from .errors import KnowledgeBaseError

        raise KnowledgeBaseError(
            f"knowledge base category {cat.key!r} has placement {where!r}; use one of {list(PLACEMENTS)}"
        )
    return where


def recolourable(cat: Category) -> bool:
    """Whether a category may take any material colour (a mug may, a banana may not); default False."""
    return bool(getattr(cat, "recolourable", False))


def look_at_quat(pos: np.ndarray, target: np.ndarray, roll_deg: float = 0.0) -> np.ndarray:
    """MuJoCo camera quaternion (the camera looks along its -z with +y up) looking from pos at target,
    turned by roll_deg about the optical axis."""
    fwd = np.asarray(target, float) - pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    r = math.radians(roll_deg)
    right, up = math.cos(r) * right + math.sin(r) * up, -math.sin(r) * right + math.cos(r) * up
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.stack([right, up, -fwd], axis=1).ravel())
    return quat


class TabletopWorld:
    """The per-process MuJoCo model: build once, apply many layouts, settle, read poses."""

    def __init__(
        self,
        *,
        assets: list[AssetModel],
        kb: KnowledgeBase,
        copies: int = 2,
        width: int = 512,
        height: int = 384,
        shadow_size: int = 1024,
    ):
        self.assets = assets
        self.kb = kb
        self.copies = copies
        self.width, self.height = width, height
        # table categories (sample_layout draws from these) and room furniture, model indices per category
        self.by_category: dict[str, list[int]] = {}
        self.room_by_category: dict[str, list[int]] = {}
        self.is_room = np.zeros(len(assets), dtype=bool)
        for i, a in enumerate(assets):
            room = placement_of(kb.categories[a.category]) == "room"
            self.is_room[i] = room
            (self.room_by_category if room else self.by_category).setdefault(a.category, []).append(i)
        self.model = self._build(shadow_size)
        self.data = mujoco.MjData(self.model)
        m = self.model
        gid = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, name)  # noqa: E731
        mid = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_MATERIAL, name)  # noqa: E731
        self.table_geom = gid("table_top")
        self.leg_geoms = [gid(f"leg{i}") for i in range(4)]
        self.table_mats = [mid(f"table{i}") for i in range(len(TABLE_FINISHES))]
        self.floor_geom = gid("floor")
        self.floor_mats = [mid(f"floor{i}") for i in range(len(FLOOR_FINISHES))]
        self.wall_geoms = [gid("wall_back"), gid("wall_left"), gid("wall_right")]
        self.wall_mats = [mid(f"wall{i}") for i in range(len(WALL_FINISHES))]
        self.window_geom = gid("window")
        self.lights = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_LIGHT, f"light{k}") for k in range(N_LIGHTS)]
        self.camera = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, "robot")
        # pool bookkeeping: body id, qpos address (-1 for room furniture, which has no joint), visual geoms,
        # hull geom (-1 for furniture) and materials of (model, copy)
        self.pool_body = np.zeros((len(assets), copies), dtype=np.int64)
        self.pool_qadr = np.full((len(assets), copies), -1, dtype=np.int64)
        self.pool_geoms: dict[tuple[int, int], list[int]] = {}
        self.pool_hull = np.full((len(assets), copies), -1, dtype=np.int64)
        self.pool_mats: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(assets):
            for c in range(copies):
                b = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, f"{a.key}#{c}")
                self.pool_body[i, c] = b
                geoms = [g for g in range(m.body_geomadr[b], m.body_geomadr[b] + m.body_geomnum[b])]
                if not self.is_room[i]:
                    self.pool_qadr[i, c] = m.jnt_qposadr[m.body_jntadr[b]]
                    self.pool_hull[i, c] = next(g for g in geoms if m.geom_group[g] == HULL_GROUP)
                self.pool_geoms[(i, c)] = [g for g in geoms if m.geom_group[g] != HULL_GROUP]
                self.pool_mats[(i, c)] = [mid(f"{a.key}_m{j}") for j in range(len(a.parts))]
        self.geom_owner = np.full(m.ngeom, -1, dtype=np.int64)  # geom id -> flat pool index i * copies + c
        for (i, c), gs in self.pool_geoms.items():
            self.geom_owner[gs] = i * copies + c
        # the parts that take a new colour: the model's large surfaces, not its small details
        self.tint_parts: list[list[int]] = []
        for a in assets:
            areas = [_area(p) for p in a.parts]
            top = max(areas) if areas else 0.0
            self.tint_parts.append([j for j, ar in enumerate(areas) if ar >= RECOLOUR_MIN_SHARE * top])
        self._mat_rgba0 = m.mat_rgba.copy()
        self._mat_texid0 = m.mat_texid.copy()
        self.active: list[Placement] = []
        self._cavities: dict[int, Cavity | None] = {}  # model index -> its measured inside, on first use
        self.active_room: list[Placement] = []
        self.tints: dict[tuple[int, int], tuple[float, float, float]] = {}

    # ---------------------------------------------------------------- build
    def _build(self, shadow_size: int) -> mujoco.MjModel:
        spec = mujoco.MjSpec()
        spec.modelname = "converseg_tabletop"
        spec.option.timestep = 0.004
        spec.visual.global_.offwidth = max(self.width, 640)
        spec.visual.global_.offheight = max(self.height, 480)
        spec.visual.quality.shadowsize = shadow_size
        spec.visual.quality.offsamples = 0
        spec.visual.headlight.ambient = [0.3, 0.3, 0.3]
        spec.visual.headlight.diffuse = [0.3, 0.3, 0.3]
        spec.visual.map.znear = 0.01
        spec.stat.extent = 2.0
        rgb_role = int(mujoco.mjtTextureRole.mjTEXROLE_RGB)

        def add_texture(name: str, img: np.ndarray) -> None:
            t = spec.add_texture(name=name, type=mujoco.mjtTexture.mjTEXTURE_2D)
            t.width, t.height, t.nchannel = img.shape[1], img.shape[0], 3
            t.data = np.ascontiguousarray(img[::-1]).tobytes()  # OpenGL rows start at the bottom

        rng = np.random.default_rng(1234)  # fixed: textures are part of the world, not of a scene
        for k in range(len(TABLE_FINISHES)):
            add_texture(f"table{k}", _table_texture(k, rng))
            mat = spec.add_material(name=f"table{k}", texrepeat=[2, 2], texuniform=True, specular=0.2)
            mat.textures[rgb_role] = f"table{k}"
        for k, name in enumerate(FLOOR_FINISHES):
            add_texture(f"floor{k}", _room_texture(name, rng))
            mat = spec.add_material(name=f"floor{k}", texrepeat=[1, 1], texuniform=True, specular=0.1)
            mat.textures[rgb_role] = f"floor{k}"
        for k, name in enumerate(WALL_FINISHES):
            add_texture(f"wall{k}", _room_texture(name, rng))
            mat = spec.add_material(name=f"wall{k}", texrepeat=[1, 1], texuniform=True, specular=0.05)
            mat.textures[rgb_role] = f"wall{k}"
        add_texture("window", _window_texture())
        # emission: the pane shows daylight whatever the scene's lamps do
        mat = spec.add_material(name="window", emission=1.0, specular=0.0)
        mat.textures[rgb_role] = "window"
        spec.add_material(name="leg", rgba=[0.25, 0.25, 0.27, 1])

        wb = spec.worldbody
        wb.add_geom(
            name="floor",
            type=mujoco.mjtGeom.mjGEOM_PLANE,
            size=[6, 6, 0.1],
            pos=[0, 0, -TABLE_HEIGHT],
            material="floor0",
        )
        # walls and window: planes facing into the room (MuJoCo maps a 2D texture onto a plane's own xy,
        # not onto a box's upright faces), placed and sized per scene by apply(); they never collide
        s2 = math.sqrt(0.5)
        facing = {
            "wall_back": [s2, s2, 0, 0],  # normal -y
            "wall_left": [s2, 0, s2, 0],  # normal +x
            "wall_right": [s2, 0, -s2, 0],  # normal -x
            "window": [s2, s2, 0, 0],
        }
        for name, quat in facing.items():
            wb.add_geom(
                name=name,
                type=mujoco.mjtGeom.mjGEOM_PLANE,
                size=[1, 1, 0.1],
                quat=quat,
                material="window" if name == "window" else "wall0",
                contype=0,
                conaffinity=0,
            )
        wb.add_geom(
            name="table_top",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            size=[1.0, 0.6, 0.02],
            pos=[0, 0, -0.02],
            material="table0",
        )
        for i in range(4):
            wb.add_geom(
                name=f"leg{i}",
                type=mujoco.mjtGeom.mjGEOM_BOX,
                size=[0.03, 0.03, TABLE_HEIGHT / 2 - 0.02],
                pos=[0, 0, -TABLE_HEIGHT / 2 - 0.02],
                material="leg",
                contype=0,
                conaffinity=0,
            )
        for k in range(N_LIGHTS):
            wb.add_light(
                name=f"light{k}",
                pos=[0, 0, 2],
                dir=[0, 0, -1],
                castshadow=k == 0,
                diffuse=[0.5, 0.5, 0.5],
                specular=[0.15, 0.15, 0.15],
                cutoff=70,
            )
        wb.add_camera(name="robot", pos=[0, -0.8, 0.5], fovy=60)

        for i, a in enumerate(self.assets):
            hull_v, hull_f, n = [], [], 0
            for j, p in enumerate(a.parts):
                mesh = spec.add_mesh(name=f"{a.key}_p{j}")
                mesh.uservert = p.verts.ravel().tolist()
                mesh.userface = p.faces.ravel().tolist()
                mesh.inertia = mujoco.mjtMeshInertia.mjMESH_INERTIA_SHELL
                if p.uv is not None and p.texture is not None:
                    mesh.usertexcoord = p.uv.ravel().tolist()
                    add_texture(f"{a.key}_t{j}", p.texture)
                # one material per part, shared by the model's pool copies: MuJoCo's renderer holds at most
                # 1000 materials, so copies of one model take the same new colour (sample_tints)
                mat = spec.add_material(name=f"{a.key}_m{j}", rgba=p.rgba.tolist(), specular=0.3)
                if p.uv is not None and p.texture is not None:
                    mat.textures[rgb_role] = f"{a.key}_t{j}"
                hull_v.append(p.verts)
                hull_f.append(p.faces + n)
                n += len(p.verts)
            room = bool(self.is_room[i])
            if not room:
                hull = spec.add_mesh(name=f"{a.key}_hull")
                hull.uservert = np.concatenate(hull_v).ravel().tolist()
                hull.userface = np.concatenate(hull_f).ravel().tolist()
                hull.inertia = mujoco.mjtMeshInertia.mjMESH_INERTIA_CONVEX
                hull.maxhullvert = 64
            mass = self.kb.categories[a.category].mass_kg
            w, d, h = (float(s) for s in a.size_m)
            inertia = [mass / 12 * (d * d + h * h), mass / 12 * (w * w + h * h), mass / 12 * (w * w + d * d)]
            for c in range(self.copies):
                body = wb.add_body(name=f"{a.key}#{c}", pos=[3 + i * 0.5, 3 + c * 0.5, -5])
                if not room:  # furniture stands still: no joint, moved through body_pos
                    body.add_freejoint()
                    body.explicitinertial = True
                    body.mass = mass
                    body.ipos = [0, 0, h / 2]
                    body.inertia = [max(x, 1e-7) for x in inertia]
                for j in range(len(a.parts)):
                    body.add_geom(
                        type=mujoco.mjtGeom.mjGEOM_MESH,
                        meshname=f"{a.key}_p{j}",
                        material=f"{a.key}_m{j}",
                        contype=0,
                        conaffinity=0,
                        group=HIDDEN_GROUP,
                        density=0,
                    )
                if room:
                    continue
                # contype 1 at compile time so MuJoCo builds the convex hull; apply() switches parked ones off
                body.add_geom(
                    type=mujoco.mjtGeom.mjGEOM_MESH,
                    meshname=f"{a.key}_hull",
                    group=HULL_GROUP,
                    contype=1,
                    conaffinity=1,
                    density=0,
                    rgba=[0, 0, 0, 0],
                    friction=[0.9, 0.01, 0.001],
                )
        try:
            return spec.compile()
        except Exception as exc:
            from .errors import AssetError

            raise AssetError(f"MuJoCo could not compile the tabletop world: {exc}") from exc

    # ---------------------------------------------------------------- apply + settle
    def apply(self, layout: Layout) -> None:
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        # park every pool body, hide its geoms, switch its collisions off
        for i in range(len(self.assets)):
            for c in range(self.copies):
                park = [3 + i * 0.5, 3 + c * 0.5, -5]
                q = self.pool_qadr[i, c]
                if q >= 0:
                    d.qpos[q : q + 7] = [*park, 1, 0, 0, 0]
                    h = self.pool_hull[i, c]
                    m.geom_contype[h] = 0
                    m.geom_conaffinity[h] = 0
                else:
                    m.body_pos[self.pool_body[i, c]] = park
                m.geom_group[self.pool_geoms[(i, c)]] = HIDDEN_GROUP
        w, dpt = layout.table_size
        g = self.table_geom
        m.geom_size[g] = [w / 2, dpt / 2, 0.02]
        m.geom_rbound[g] = float(np.linalg.norm(m.geom_size[g]))
        m.geom_aabb[g] = [0, 0, 0, w / 2, dpt / 2, 0.02]
        m.geom_matid[g] = self.table_mats[layout.table_finish]
        for k, lg in enumerate(self.leg_geoms):
            sx, sy = (-1 if k % 2 else 1), (-1 if k // 2 else 1)
            m.geom_pos[lg][:2] = [sx * (w / 2 - 0.06), sy * (dpt / 2 - 0.06)]
        self._apply_room(layout.room)
        self._apply_tints(layout.tints)
        for p in layout.placements:
            if p.inside is None:  # contents go in after settling (place_contents)
                self._place(p, layout)
        for p in layout.room_objects:
            b = self.pool_body[p.model_index, p.copy]
            m.body_pos[b] = [p.x, p.y, -TABLE_HEIGHT]
            m.body_quat[b] = [math.cos(p.yaw / 2), 0, 0, math.sin(p.yaw / 2)]
            m.geom_group[self.pool_geoms[(p.model_index, p.copy)]] = VISIBLE_GROUP
        m.cam_pos[self.camera] = layout.cam_pos
        m.cam_quat[self.camera] = look_at_quat(layout.cam_pos, layout.cam_target, layout.cam_roll)
        m.cam_fovy[self.camera] = layout.fovy
        self._apply_lights(layout.lights, layout.ambient)
        self.active = list(layout.placements)
        self.active_room = list(layout.room_objects)
        mujoco.mj_forward(m, d)

    def _apply_room(self, room: Room) -> None:
        m = self.model
        m.geom_matid[self.floor_geom] = self.floor_mats[room.floor_finish]
        back, left, right = self.wall_geoms
        front = -4.0  # side walls run from behind the camera to the back wall
        zc = -TABLE_HEIGHT + ROOM_HEIGHT / 2
        depth = room.back_y - front
        # plane half sizes in the plane's own x, y (see the quaternions in _build)
        planes = {
            back: ([0, room.back_y, zc], [room.half_width, ROOM_HEIGHT / 2]),
            left: ([-room.half_width, (room.back_y + front) / 2, zc], [ROOM_HEIGHT / 2, depth / 2]),
            right: ([room.half_width, (room.back_y + front) / 2, zc], [ROOM_HEIGHT / 2, depth / 2]),
        }
        for geom, (pos, size) in planes.items():
            self._set_plane(geom, pos, size)
            m.geom_matid[geom] = self.wall_mats[room.wall_finish]
        if room.window is None:
            m.geom_group[self.window_geom] = HIDDEN_GROUP
        else:
            x, zc_w, ww, wh = room.window
            self._set_plane(
                self.window_geom, [x, room.back_y - 0.005, -TABLE_HEIGHT + zc_w], [ww / 2, wh / 2]
            )
            m.geom_group[self.window_geom] = VISIBLE_GROUP

    def _set_plane(self, geom: int, pos, half_size) -> None:
        m = self.model
        m.geom_pos[geom] = pos
        m.geom_size[geom] = [*half_size, 0.1]
        m.geom_rbound[geom] = 0.0  # planes: infinite for collision (none here)

    def _apply_tints(self, tints: dict[tuple[int, int], tuple[float, float, float]]) -> None:
        """Material colours back to the models' own, then the scene's new colours (texture off, so the
        colour is the albedo the scene graph names)."""
        m = self.model
        m.mat_rgba[:] = self._mat_rgba0
        m.mat_texid[:] = self._mat_texid0
        for (i, c), rgb in tints.items():
            for j in self.tint_parts[i]:
                mat = self.pool_mats[(i, c)][j]
                m.mat_rgba[mat, :3] = rgb
                m.mat_texid[mat, :] = -1
        self.tints = dict(tints)

    def _apply_lights(self, lights: list[Light], ambient: float) -> None:
        m = self.model
        for k, lid in enumerate(self.lights):
            on = k < len(lights)
            m.light_active[lid] = on
            if not on:
                m.light_castshadow[lid] = False
                continue
            li = lights[k]
            m.light_pos[lid] = li.pos
            direction = li.target - li.pos
            m.light_dir[lid] = direction / np.linalg.norm(direction)
            m.light_diffuse[lid] = li.intensity * light_colour(li.kelvin)
            m.light_castshadow[lid] = li.shadow
        m.vis.headlight.ambient[:] = [ambient] * 3

    def albedo(self, model_index: int, copy: int) -> np.ndarray:
        """Area-weighted mean albedo (0..1) of a pool body as the applied layout colours it."""
        a = self.assets[model_index]
        tint = self.tints.get((model_index, copy))
        if tint is None:
            return a.colour_rgb
        chosen = set(self.tint_parts[model_index])
        parts = [
            dataclasses.replace(p, rgba=np.array([*tint, p.rgba[3]], np.float32), texture=None)
            if j in chosen
            else p
            for j, p in enumerate(a.parts)
        ]
        return _albedo(parts)

    def _place(self, p: Placement, layout: Layout) -> None:
        m, d = self.model, self.data
        z = 0.003
        sup = p
        while sup.on is not None:  # dropped just above the top of its support (of its support's support...)
            sup = layout.placements[sup.on]
            z += float(self.assets[sup.model_index].size_m[2]) + 0.002
        q = self.pool_qadr[p.model_index, p.copy]
        d.qpos[q : q + 7] = [p.x, p.y, z, math.cos(p.yaw / 2), 0, 0, math.sin(p.yaw / 2)]
        m.geom_group[self.pool_geoms[(p.model_index, p.copy)]] = VISIBLE_GROUP
        h = self.pool_hull[p.model_index, p.copy]
        m.geom_contype[h] = 1
        m.geom_conaffinity[h] = 1

    def settle(self, steps: int = 60) -> tuple[float, set[int]]:
        """Let objects come to rest. Returns the deepest object-object penetration in metres (>= 0) and
        the placements to drop: fallen off the table, or the later one of a pair interpenetrating > 5 mm."""
        m, d = self.model, self.data
        for _ in range(steps):
            mujoco.mj_step(m, d)
        d.qvel[:] = 0
        self.place_contents()
        mujoco.mj_forward(m, d)
        hull_to_placement = {int(self.pool_hull[p.model_index, p.copy]): k for k, p in enumerate(self.active)}
        worst, bad = 0.0, set()
        for k in range(d.ncon):
            con = d.contact[k]
            a, b = hull_to_placement.get(int(con.geom1)), hull_to_placement.get(int(con.geom2))
            if a is not None and b is not None and self._touch_expected(a, b):
                continue
            if a is not None and b is not None:
                worst = max(worst, -float(con.dist))
                if -con.dist > MAX_PENETRATION:
                    bad.add(max(a, b))
        for k, p in enumerate(self.active):
            if self.body_pose(p)[0][2] < -0.02:  # fell off (or through) the table
                bad.add(k)
        return worst, bad

    def cavity(self, model_index: int) -> Cavity | None:
        """The measured inside of a container model (None: not a container, or no opening that any model
        of the library could go into)."""
        if model_index not in self._cavities:
            a = self.assets[model_index]
            cav = measure_cavity(a) if self.kb.categories[a.category].is_container else None
            if cav is not None:
                ys, xs = np.nonzero(cav.inside)
                cx, cy = cav.origin + (np.array([xs.mean(), ys.mean()]) + 0.5) * cav.cell
                fits = [
                    b
                    for b in self.assets
                    if _may_go_inside(self.kb.categories[b.category], b.size_m, a.size_m)
                    and cav.rest_height(float(cx), float(cy), 0.0, *(float(v) for v in b.size_m[:2]))
                    is not None
                ]
                cav = cav if fits else None
            self._cavities[model_index] = cav
        return self._cavities[model_index]

    def place_contents(self) -> None:
        """Put every object that goes inside a container into it, posed rigidly in the settled container's
        body frame at the height its cavity gives (resting on the inner surface, touching nothing else of
        the container: the convex collision hull of a bowl is solid, so contents are placed, not dropped)."""
        m, d = self.model, self.data
        mujoco.mj_kinematics(m, d)
        for p in self.active:
            if p.inside is None:
                continue
            c = self.active[p.inside]
            cav = self.cavity(c.model_index)
            fw, fd = (float(v) for v in self.assets[p.model_index].size_m[:2])
            z = cav.rest_height(p.x, p.y, p.yaw, fw, fd) if cav is not None else None
            if z is None:
                raise ValueError(f"placement inside model {c.model_index} does not fit its cavity")
            pos, rot = self.body_pose(c)
            local = np.array(
                [[math.cos(p.yaw), -math.sin(p.yaw), 0], [math.sin(p.yaw), math.cos(p.yaw), 0], [0, 0, 1]]
            )
            quat = np.zeros(4)
            mujoco.mju_mat2Quat(quat, (rot @ local).ravel())
            q = self.pool_qadr[p.model_index, p.copy]
            d.qpos[q : q + 7] = [*(pos + rot @ np.array([p.x, p.y, z + 0.001])), *quat]
            m.geom_group[self.pool_geoms[(p.model_index, p.copy)]] = VISIBLE_GROUP
            h = self.pool_hull[p.model_index, p.copy]
            m.geom_contype[h] = 1
            m.geom_conaffinity[h] = 1

    def _touch_expected(self, a: int, b: int) -> bool:
        """A content and its container: their convex hulls overlap by design (see place_contents)."""
        pa, pb = self.active[a], self.active[b]
        return pa.inside == b or pb.inside == a

    def body_pose(self, p: Placement) -> tuple[np.ndarray, np.ndarray]:
        """World position (3,) and rotation matrix (3, 3) of a placed object's body."""
        b = self.pool_body[p.model_index, p.copy]
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()


# -------------------------------------------------------------------- sampling
def sample_layout(
    rng: np.random.Generator, world: TabletopWorld, *, min_objects: int = 3, max_objects: int = 12
) -> Layout:
    """Draw a table, objects (spread apart, or cluttered: close, touching, piled; some on supports, some
    inside containers), camera, light; a share of scenes has an object cut by the frame edge."""
    w = float(rng.uniform(0.8, 1.3))
    dpt = float(rng.uniform(0.55, 0.8))
    finish = int(rng.integers(len(TABLE_FINISHES)))
    composition = "clutter" if rng.random() < CLUTTER_RATE else "spread"
    placements = _sample_placements(rng, world, (w, dpt), composition, min_objects, max_objects)
    layout = sample_surroundings(rng, world, (w, dpt), finish, placements, composition)
    return _cut_by_frame_edge(rng, world, layout)


def sample_surroundings(
    rng: np.random.Generator,
    world: TabletopWorld,
    table_size: tuple[float, float],
    table_finish: int,
    placements: list[Placement],
    composition: str = "spread",
) -> Layout:
    """Complete a table's placements into a scene: camera, lights, room and its furniture, material
    colours and sensor effects, in this order from the same RNG."""
    kind, cam_pos, target, fovy, roll = sample_camera(rng, table_size)
    lights, ambient = sample_lights(rng, table_size)
    room = sample_room(rng, table_size)
    layout = Layout(
        table_size=table_size,
        table_finish=table_finish,
        placements=placements,
        camera_kind=kind,
        cam_pos=cam_pos,
        cam_target=target,
        fovy=fovy,
        lights=lights,
        ambient=ambient,
        room=room,
        composition=composition,
        cam_roll=roll,
    )
    layout.room_objects = sample_room_objects(rng, world, layout)
    layout.tints = sample_tints(rng, world, layout.placements + layout.room_objects)
    layout.sensor = sample_sensor_params(rng)
    return layout


def _sample_placements(
    rng: np.random.Generator,
    world: TabletopWorld,
    table: tuple[float, float],
    composition: str,
    min_objects: int,
    max_objects: int,
) -> list[Placement]:
    """The objects of a scene: kinds drawn without repeats except deliberate multiples (2-3 of a kind),
    each tried inside a container, then on a support, then on the free table."""
    kb = world.kb
    clutter = composition == "clutter"
    # clutter draws from the upper half of the allowed count: many things in a small patch
    lo = max(min_objects, (min_objects + max_objects + 1) // 2) if clutter else min_objects
    n_target = int(rng.integers(lo, max_objects + 1))
    cats = sorted(world.by_category)
    wanted: list[str] = []
    open_kinds = [c for c in cats if any(world.cavity(mi) is not None for mi in world.by_category[c])]
    if open_kinds and rng.random() < CONTAINER_SCENE_RATE:
        wanted.append(open_kinds[int(rng.integers(len(open_kinds)))])
    for k in rng.permutation(len(cats)):
        if len(wanted) >= n_target:
            break
        if cats[k] in wanted:
            continue
        wanted.append(cats[k])
        if rng.random() < MULTI_INSTANCE_RATE:  # several of a kind: "all the mugs", "the left mug"
            wanted += [cats[k]] * int(rng.integers(1, 3))
    wanted = wanted[:n_target]
    # holders first, so that what comes later can go on or in them
    hosts = {c for c in wanted if kb.categories[c].is_support or kb.categories[c].is_container}
    wanted = [c for c in wanted if c in hosts] + [c for c in wanted if c not in hosts]
    w, dpt = table
    if clutter:  # a patch of the table where everything gathers
        hx, hy = float(rng.uniform(0.15, 0.3)) * w, float(rng.uniform(0.2, 0.38)) * dpt
        cx = float(rng.uniform(-w / 2 + hx, w / 2 - hx))
        cy = float(rng.uniform(-dpt / 2 + hy, dpt / 2 - hy))
        region = (cx - hx, cx + hx, cy - hy, cy + hy)
    else:
        region = (-w / 2, w / 2, -dpt / 2, dpt / 2)
    s = _Sampler(rng, world, table, region, clutter)
    for cat in wanted:
        free = [mi for mi in world.by_category[cat] if s.used.get(mi, 0) < world.copies]
        if not free:
            continue
        mi = int(free[int(rng.integers(len(free)))])
        p = s.inside(mi) or s.on_support(mi) or s.on_table(mi)
        if p is None:
            continue
        s.used[mi] = s.used.get(mi, 0) + 1
        cat_kb = kb.categories[cat]
        st = {}
        if "can_be_hot" in cat_kb.safety:
            st["hot"] = bool(rng.random() < 0.4)
        if cat_kb.physical["holds_liquid"] and "full" in cat_kb.states:
            st["full"] = bool(rng.random() < 0.5) and p.inside is None and not s.holds(len(s.placements) - 1)
        if "lit" in cat_kb.states:
            st["lit"] = bool(rng.random() < 0.5)
        p.states = st
    return s.placements


class _Sampler:
    """Placement state of one layout being drawn: what is placed, where footprints lie, what holds what."""

    def __init__(self, rng, world, table, region, clutter):
        self.rng, self.world, self.kb = rng, world, world.kb
        self.table, self.region, self.clutter = table, region, clutter
        self.margin = CLUTTER_MARGIN if clutter else 0.02
        self.mode = "clutter" if clutter else "spread"
        self.placements: list[Placement] = []
        self.floor: list[tuple[int, np.ndarray]] = []  # (placement, corners) of what stands on the table
        self.used: dict[int, int] = {}

    def _size(self, mi: int) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.world.assets[mi].size_m)

    def _cat(self, mi: int) -> Category:
        return self.kb.categories[self.world.assets[mi].category]

    def holds(self, k: int) -> bool:
        return any(p.parent == k for p in self.placements)

    def _add(self, p: Placement) -> Placement:
        self.placements.append(p)
        return p

    def _clear_of(self, corners: np.ndarray, neighbours: list[Placement], margin: float) -> bool:
        """A footprint (in the neighbours' frame) keeps `margin` metres from every neighbour's footprint."""
        return not any(
            _obb_overlap(corners, _obb_corners(q.x, q.y, q.yaw, *self._size(q.model_index)[:2]), margin)
            for q in neighbours
        )

    def _children(self, k: int) -> list[Placement]:
        return [p for p in self.placements if p.parent == k]

    def _depth(self, k: int) -> int:
        n = 0
        while self.placements[k].on is not None:
            k, n = self.placements[k].on, n + 1
        return n

    def inside(self, mi: int) -> Placement | None:
        """Into an open container already on the table: the footprint inside its opening, at most 3 things."""
        fw, fd, _ = self._size(mi)
        size = self.world.assets[mi].size_m
        for ci, cp in enumerate(self.placements):
            if cp.inside is not None or not self._cat(cp.model_index).is_container:
                continue
            cav = self.world.cavity(cp.model_index)
            inner = self._children(ci)
            if (
                cav is None
                or len(inner) >= 3
                or not _may_go_inside(self._cat(mi), size, self.world.assets[cp.model_index].size_m)
                or self.rng.random() > FILL_RATE[self.mode]
            ):
                continue
            x0, y0, x1, y1 = cav.bounds
            for _ in range(8):
                x, y = float(self.rng.uniform(x0, x1)), float(self.rng.uniform(y0, y1))
                yaw = float(self.rng.uniform(-math.pi, math.pi))
                if cav.rest_height(x, y, yaw, fw, fd) is None:
                    continue
                if not self._clear_of(_obb_corners(x, y, yaw, fw, fd), inner, 0.003):
                    continue
                return self._add(Placement(mi, self.used.get(mi, 0), x, y, yaw, inside=ci))
        return None

    def on_support(self, mi: int) -> Placement | None:
        """On top of a support (a tray, a board, a book; one thing each, two in clutter, piles two high)."""
        fw, fd, _ = self._size(mi)
        if self._cat(mi).mass_kg > 1.0:
            return None
        for si, sp in enumerate(self.placements):
            sc = self._cat(sp.model_index)
            if not sc.is_support or sp.inside is not None or self._depth(si) >= 1 + int(self.clutter):
                continue
            others = self._children(si)
            if len(others) >= 1 + int(self.clutter) or self.rng.random() > SUPPORT_RATE[self.mode]:
                continue
            if self._cat(mi).is_support and not (self.clutter and self._cat(mi).physical["stackable"]):
                continue  # supports pile only in clutter, and only the stackable ones (books, plates, boards)
            sw, sd, _ = self._size(sp.model_index)
            cs, sn = math.cos(sp.yaw), math.sin(sp.yaw)
            for _ in range(4 if others or self.clutter else 1):
                yaw = (
                    sp.yaw
                    + float(self.rng.choice([0.0, math.pi / 2, math.pi]))
                    + float(self.rng.uniform(-0.2, 0.2))
                )
                ox, oy = (
                    (0.0, 0.0)
                    if not (others or self.clutter)
                    else (float(self.rng.uniform(-0.3, 0.3)) * sw, float(self.rng.uniform(-0.3, 0.3)) * sd)
                )
                x, y = sp.x + cs * ox - sn * oy, sp.y + sn * ox + cs * oy
                corners = _obb_corners(x, y, yaw, fw, fd)
                local = (corners - [sp.x, sp.y]) @ np.array([[cs, -sn], [sn, cs]])
                if not (
                    (np.abs(local[:, 0]) < sw / 2 - 0.005).all()
                    and (np.abs(local[:, 1]) < sd / 2 - 0.005).all()
                ):
                    continue
                if not self._clear_of(corners, others, 0.005):
                    continue
                return self._add(Placement(mi, self.used.get(mi, 0), x, y, yaw, on=si))
        return None

    def on_table(self, mi: int) -> Placement | None:
        """On the free table: anywhere (spread), or in the clutter patch, pushed against a neighbour."""
        fw, fd, _ = self._size(mi)
        w, dpt = self.table
        r = 0.5 * math.hypot(fw, fd)
        if r * 2 > min(w, dpt) - 0.04:
            return None
        x0, x1, y0, y1 = self.region
        x0, x1 = max(x0, -w / 2 + r), min(x1, w / 2 - r)
        y0, y1 = max(y0, -dpt / 2 + r), min(y1, dpt / 2 - r)
        if x0 > x1 or y0 > y1:
            x0, x1, y0, y1 = -w / 2 + r, w / 2 - r, -dpt / 2 + r, dpt / 2 - r
        for _ in range(30):
            yaw = float(self.rng.uniform(-math.pi, math.pi))
            if self.clutter and self.floor and self.rng.random() < 0.7:
                x, y = self._against(mi, yaw)
                if abs(x) > w / 2 - r or abs(y) > dpt / 2 - r:
                    continue
            else:
                x, y = float(self.rng.uniform(x0, x1)), float(self.rng.uniform(y0, y1))
            corners = _obb_corners(x, y, yaw, fw, fd)
            if all(not _obb_overlap(corners, f, self.margin) for _, f in self.floor):
                self.floor.append((len(self.placements), corners))
                return self._add(Placement(mi, self.used.get(mi, 0), x, y, yaw))
        return None

    def _against(self, mi: int, yaw: float) -> tuple[float, float]:
        """A position next to a random table-standing object, as close as its footprint allows."""
        k, fa = self.floor[int(self.rng.integers(len(self.floor)))]
        ax, ay = fa.mean(0)
        fw, fd, _ = self._size(mi)
        theta = float(self.rng.uniform(-math.pi, math.pi))
        u = np.array([math.cos(theta), math.sin(theta)])
        inner, outer = (
            0.0,
            float(np.linalg.norm(fa - [ax, ay], axis=1).max()) + 0.5 * math.hypot(fw, fd) + self.margin,
        )
        for _ in range(8):  # bisect to the nearest distance where the two footprints just clear
            mid = 0.5 * (inner + outer)
            if _obb_overlap(_obb_corners(ax + u[0] * mid, ay + u[1] * mid, yaw, fw, fd), fa, self.margin):
                inner = mid
            else:
                outer = mid
        return float(ax + u[0] * outer), float(ay + u[1] * outer)


def _cut_by_frame_edge(rng: np.random.Generator, world: TabletopWorld, layout: Layout) -> Layout:
    """In EDGE_CUT_RATE of scenes, move one free-standing object (nothing on or in it) so that the left,
    right or bottom edge of the frame runs through its middle, where the table and its neighbours allow."""
    if rng.random() >= EDGE_CUT_RATE:
        return layout
    pl = layout.placements
    loose = [k for k, p in enumerate(pl) if p.parent is None and not any(q.parent == k for q in pl)]
    if not loose:
        return layout
    k = loose[int(rng.integers(len(loose)))]
    p = pl[k]
    fw, fd, fh = (float(v) for v in world.assets[p.model_index].size_m)
    fwd = layout.cam_target - layout.cam_pos
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    ty = math.tan(math.radians(layout.fovy) / 2)
    tx = ty * world.width / world.height
    side = int(rng.integers(3))  # 0 left, 1 right, 2 bottom
    s = float(rng.uniform(-0.6, 0.6))
    ray = (
        fwd + {0: -tx * right + s * ty * up, 1: tx * right + s * ty * up, 2: -ty * up + s * tx * right}[side]
    )
    if ray[2] >= -1e-6:
        return layout
    t = (0.5 * fh - layout.cam_pos[2]) / ray[2]  # where the edge ray meets the object's mid-height
    x, y = (float(c) for c in (layout.cam_pos + t * ray)[:2])
    w, dpt = layout.table_size
    corners = _obb_corners(x, y, p.yaw, fw, fd)
    if (np.abs(corners[:, 0]) > w / 2 - 0.01).any() or (np.abs(corners[:, 1]) > dpt / 2 - 0.01).any():
        return layout
    for j, q in enumerate(pl):
        if j != k and q.parent is None:
            qw, qd = (float(v) for v in world.assets[q.model_index].size_m[:2])
            if _obb_overlap(corners, _obb_corners(q.x, q.y, q.yaw, qw, qd), 0.01):
                return layout
    moved = list(pl)
    moved[k] = dataclasses.replace(p, x=x, y=y, states=dict(p.states))
    return dataclasses.replace(layout, placements=moved)



def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def sample_camera(
    rng: np.random.Generator, table_size: tuple[float, float]
) -> tuple[str, np.ndarray, np.ndarray, float, float]:
    """A rig of CAMERA_RIGS (by weight) and its pose: (kind, position, target, fovy deg, roll deg)."""
    w, dpt = table_size
    kinds = sorted(CAMERA_RIGS)
    weights = np.array([CAMERA_RIGS[k].weight for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    rig = CAMERA_RIGS[kind]
    target = np.array([_u(rng, (-0.15, 0.15)) * w, _u(rng, (-0.15, 0.1)) * dpt, 0.0])
    height, back = _u(rng, rig.height_m), _u(rng, rig.back_m)
    azim = math.radians(_u(rng, rig.azimuth_deg))
    pos = target + np.array([back * math.sin(azim), -back * math.cos(azim), height])
    return kind, pos, target, _u(rng, rig.fovy_deg), _u(rng, rig.roll_deg)


def sample_lights(rng: np.random.Generator, table_size: tuple[float, float]) -> tuple[list[Light], float]:
    """1-3 ceiling lamps aimed near the table, warm to cool white, each casting shadows or not, and the
    ambient level. The first lamp is the key light; the total stays below clipping."""
    w, dpt = table_size
    n = int(rng.integers(1, N_LIGHTS + 1))
    lights = []
    for k in range(n):
        pos = np.array([_u(rng, (-1.3, 1.3)), _u(rng, (-1.3, 1.2)), _u(rng, (1.0, 1.8))])
        target = np.array([_u(rng, (-0.3, 0.3)) * w, _u(rng, (-0.3, 0.3)) * dpt, 0.0])
        intensity = _u(rng, (0.45, 0.85) if k == 0 else (0.15, 0.45))
        kelvin = _u(rng, (2700.0, 6500.0))
        shadow = bool(rng.random() < (0.85 if k == 0 else 0.35))
        lights.append(Light(pos, target, intensity, kelvin, shadow))
    total = sum(li.intensity for li in lights)
    if total > 1.1:
        for li in lights:
            li.intensity *= 1.1 / total
    return lights, _u(rng, (0.15, 0.4))


def sample_room(rng: np.random.Generator, table_size: tuple[float, float]) -> Room:
    """Surfaces, size and window of the room around the table."""
    w, dpt = table_size
    back_y = dpt / 2 + _u(rng, (0.7, 2.2))
    half_width = max(w / 2 + 0.8, _u(rng, (1.5, 3.0)))
    window = None
    if rng.random() < 0.75:
        ww, wh = _u(rng, (0.7, 1.6)), _u(rng, (0.8, 1.3))
        x = _u(rng, (-half_width + ww / 2 + 0.2, half_width - ww / 2 - 0.2))
        window = (x, _u(rng, (1.3, 1.7)), ww, wh)
    return Room(
        floor_finish=int(rng.integers(len(FLOOR_FINISHES))),
        wall_finish=int(rng.integers(len(WALL_FINISHES))),
        back_y=back_y,
        half_width=half_width,
        window=window,
    )


def project_points(layout: Layout, points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel coordinates (N x 2) of world points in the layout's camera, NaN behind it."""
    rot = np.zeros(9)
    mujoco.mju_quat2Mat(rot, look_at_quat(layout.cam_pos, layout.cam_target, layout.cam_roll))
    cv = rot.reshape(3, 3) @ np.diag([1.0, -1.0, -1.0])  # world-from-camera, OpenCV axes
    pc = (points - layout.cam_pos) @ cv
    f = 0.5 * height / math.tan(math.radians(layout.fovy) / 2)
    uv = pc[:, :2] / np.where(pc[:, 2:3] > 1e-3, pc[:, 2:3], np.nan) * f + [width / 2, height / 2]
    return uv


def _in_view(layout: Layout, x: float, y: float, yaw: float, size: np.ndarray, world: TabletopWorld) -> bool:
    """At least half of the furniture's projected box lies in the image, and the camera is outside it."""
    fw, fd, h = (float(v) for v in size)
    c = _obb_corners(x, y, yaw, fw, fd)
    box = np.concatenate([np.c_[c, np.full(4, -TABLE_HEIGHT)], np.c_[c, np.full(4, h - TABLE_HEIGHT)]])
    uv = project_points(layout, box, world.width, world.height)
    if np.isnan(uv).any():
        return False
    lo, hi = uv.min(0), uv.max(0)
    inter = np.clip(np.minimum(hi, [world.width, world.height]) - np.maximum(lo, 0), 0, None)
    area = float(np.prod(hi - lo))
    return area > 0 and float(np.prod(inter)) >= 0.5 * area


def sample_room_objects(rng: np.random.Generator, world: TabletopWorld, layout: Layout) -> list[Placement]:
    """0-4 pieces of furniture on the floor behind or beside the table, inside the room and the camera's
    view, their footprints clear of the table's (by ROOM_GAP) and of each other. Nothing stands on them."""
    if not world.room_by_category:
        return []
    w, dpt = layout.table_size
    room = layout.room
    table = _obb_corners(0.0, 0.0, 0.0, w, dpt)
    cats = sorted(world.room_by_category)
    n_target = int(rng.integers(0, 5))
    placed: list[Placement] = []
    footprints: list[np.ndarray] = []
    used: dict[int, int] = {}
    for _ in range(n_target):
        cat = cats[int(rng.integers(len(cats)))]
        variants = world.room_by_category[cat]
        mi = int(variants[rng.integers(len(variants))])
        if used.get(mi, 0) >= world.copies:
            continue
        size = world.assets[mi].size_m
        fw, fd = float(size[0]), float(size[1])
        r = 0.5 * math.hypot(fw, fd)
        for _ in range(20):
            if rng.random() < 0.6:  # behind the table
                y = _u(rng, (dpt / 2 + ROOM_GAP, room.back_y - 0.02))
                x = _u(rng, (-room.half_width + 0.02, room.half_width - 0.02))
            else:  # beside it, no nearer the camera than the table's front edge
                y = _u(rng, (-dpt / 2, room.back_y - 0.02))
                side = 1 if rng.random() < 0.5 else -1
                x = side * _u(rng, (w / 2 + ROOM_GAP, room.half_width - 0.02))
            # face the camera, more or less (models face -y at yaw 0)
            yaw = math.atan2(layout.cam_pos[0] - x, -(layout.cam_pos[1] - y)) + _u(rng, (-0.4, 0.4))
            corners = _obb_corners(x, y, yaw, fw, fd)
            inside = (np.abs(corners[:, 0]) < room.half_width - 0.01).all() and (
                corners[:, 1] < room.back_y - 0.01
            ).all()
            if not inside or r > room.half_width:
                continue
            if _obb_overlap(corners, table, ROOM_GAP) or any(
                _obb_overlap(corners, f, ROOM_GAP) for f in footprints
            ):
                continue
            if not _in_view(layout, x, y, yaw, size, world):
                continue
            placed.append(Placement(mi, used.get(mi, 0), x, y, yaw))
            footprints.append(corners)
            used[mi] = used.get(mi, 0) + 1
            break
    return placed


def sample_tints(
    rng: np.random.Generator, world: TabletopWorld, placements: list[Placement]
) -> dict[tuple[int, int], tuple[float, float, float]]:
    """New material colours for some objects of recolourable categories: a palette colour, slightly
    varied in shade. Copies of one model share their materials, so they share the colour drawn for the
    model. Keyed by (model, copy) so dropping placements keeps the rest."""
    by_model: dict[int, tuple[float, float, float] | None] = {}
    tints = {}
    for p in placements:
        if p.model_index not in by_model:
            cat = world.kb.categories[world.assets[p.model_index].category]
            tint = None
            if recolourable(cat) and world.tint_parts[p.model_index] and rng.random() < RECOLOUR_RATE:
                base = np.array(RECOLOUR_PALETTE[int(rng.integers(len(RECOLOUR_PALETTE)))])
                shade = float(rng.uniform(0.9, 1.08))
                tint = tuple(float(v) for v in np.clip(base * shade, 0, 1))
            by_model[p.model_index] = tint
        if by_model[p.model_index] is not None:
            tints[(p.model_index, p.copy)] = by_model[p.model_index]
    return tints
