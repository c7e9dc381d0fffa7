"""Scene graph of a rendered frame: objects with attributes, 2D/3D positions, relations and free table space.

Objects are the table's placements (ids 0..n-1) followed by the room's furniture (ids n..), each with the
colour word of the material as the scene applied it (a recoloured mug is named by its new colour).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .render import Frame
from .scene import CAMERA_RIGS, FLOOR_FINISHES, TABLE_FINISHES, WALL_FINISHES, Layout, TabletopWorld

GRID = 0.01  # metres per cell of the top-down free-space grid
EDGE_MARGIN = 0.03  # keep region answers this far from the table edge
LEFT_RIGHT_GAP = 0.03  # metres in camera x before "left of" holds
FRONT_BEHIND_GAP = 0.05
NEXT_TO_GAP = 0.08  # footprint gap under which two objects are "next to" each other
TRUNCATED_BELOW = 0.98  # an object with less of its silhouette inside the frame is "truncated"


def colour_name(rgb: np.ndarray) -> str:
    """A basic colour word for an albedo in [0, 1]."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if v < 0.18:
        return "black"
    if s < 0.18:
        return "white" if v > 0.75 else ("grey" if v > 0.35 else "black")
    deg = h * 360
    if (deg < 45 or deg >= 330) and v < 0.6 and s > 0.3:
        return "brown"
    if deg < 15 or deg >= 330:
        return "red"
    if deg < 45:
        return "orange" if v > 0.6 else "brown"
    if deg < 70:
        return "yellow"
    if deg < 170:
        return "green"
    if deg < 255:
        return "blue"
    if deg < 290:
        return "purple"
    return "pink"


def size_word(size_m: np.ndarray) -> str:
    m = float(np.max(size_m))
    return "small" if m < 0.1 else ("medium" if m < 0.25 else "large")


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon (N x 2 vertices in order), shoelace formula."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def clip_to_frame(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    """A convex polygon (N x 2, pixels) clipped to the image rectangle [0, width] x [0, height]
    (Sutherland-Hodgman); empty (0 x 2) when it lies outside."""
    out = np.asarray(poly, dtype=np.float64)
    if len(out) and (out >= 0).all() and (out[:, 0] <= width).all() and (out[:, 1] <= height).all():
        return out  # the common case: nothing to clip
    for axis, bound, keep_below in (
        (0, 0.0, False),
        (0, float(width), True),
        (1, 0.0, False),
        (1, float(height), True),
    ):
        if len(out) == 0:
            break
        pts, res = out, []
        for i in range(len(pts)):
            a, b = pts[i - 1], pts[i]
            ina = a[axis] <= bound if keep_below else a[axis] >= bound
            inb = b[axis] <= bound if keep_below else b[axis] >= bound
            if ina != inb:
                t = (bound - a[axis]) / (b[axis] - a[axis])
                res.append(a + t * (b - a))
            if inb:
                res.append(b)
        out = np.array(res).reshape(-1, 2)
    return out


def visibility(
    hull_uv: np.ndarray | None, visible_pixels: int, width: int, height: int
) -> tuple[float, float]:
    """(visible_fraction, in_frame_fraction) of an object from its unoccluded, unclipped image silhouette
    (convex polygon, pixels) and the pixels of it the renderer shows. visible_fraction: shown / whole
    silhouette (hidden behind others and cut by the frame both lower it); in_frame_fraction: share of the
    silhouette inside the image."""
    full = polygon_area(hull_uv) if hull_uv is not None else 0.0
    if full <= 0:
        return 0.0, 0.0
    inside = polygon_area(clip_to_frame(hull_uv, width, height))
    return min(1.0, visible_pixels / full), min(1.0, inside / full)


_HULLS: dict[tuple[str, int], np.ndarray] = {}


def _hull_vertices(asset) -> np.ndarray:
    """Vertices of a model's 3D convex hull (cached per model): they project to the same 2D hull as the
    whole mesh, at a fraction of the points."""
    key = (asset.key, id(asset))
    if key not in _HULLS:
        from scipy.spatial import ConvexHull, QhullError

        verts = np.concatenate([p.verts for p in asset.parts]).astype(np.float64)
        try:
            _HULLS[key] = verts[ConvexHull(verts).vertices]
        except QhullError:  # flat or degenerate: every vertex
            _HULLS[key] = verts
    return _HULLS[key]


def _silhouette(world: TabletopWorld, placement, frame: Frame) -> np.ndarray | None:
    """Unoccluded, unclipped silhouette estimate: the 2D convex hull (vertices in order, pixels) of the
    projected model vertices."""
    a = world.assets[placement.model_index]
    pos, rot = world.body_pose(placement)
    pw = _hull_vertices(a) @ rot.T + pos
    pc = (pw - frame.cam_pos) @ frame.cam_rot  # camera frame: x right, y down, z forward
    pc = pc[pc[:, 2] > 1e-3]
    if len(pc) < 3:
        return None
    uv = (pc[:, :2] / pc[:, 2:3]) * [frame.K[0, 0], frame.K[1, 1]] + [frame.K[0, 2], frame.K[1, 2]]
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(uv)
    except QhullError:
        return None
    return uv[hull.vertices]


def build_scene_graph(world: TabletopWorld, layout: Layout, frame: Frame, *, scene_id: str) -> dict:
    """Everything prompts and the verifier need, JSON-serialisable (metres, pixels, degrees)."""
    kb = world.kb
    objects = []
    everything = [(p, "table") for p in layout.placements] + [(p, "floor") for p in layout.room_objects]
    for k, (p, support) in enumerate(everything):
        a = world.assets[p.model_index]
        cat = kb.categories[a.category]
        pos, rot = world.body_pose(p)
        mask = frame.instance == k
        area = int(mask.sum())
        visible_fraction, in_frame = visibility(
            _silhouette(world, p, frame), area, frame.instance.shape[1], frame.instance.shape[0]
        )
        if area:
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            centroid = [float(xs.mean()), float(ys.mean())]
        else:
            bbox, centroid = None, None
        centre = pos + rot @ np.array([0, 0, float(a.size_m[2]) / 2])
        cam_xyz = (centre - frame.cam_pos) @ frame.cam_rot
        yaw = math.atan2(rot[1, 0], rot[0, 0])
        upright = float(rot[2, 2]) > 0.9
        albedo = world.albedo(p.model_index, p.copy)
        states = dict(p.states)
        states.update({"sharp": "sharp" in cat.safety, "fragile": "fragile" in cat.safety})
        objects.append(
            {
                "id": k,
                "category": a.category,
                "name": cat.name,
                "model": a.key,
                "source": a.source,
                "colour": colour_name(albedo),
                "colour_rgb": [round(float(c), 3) for c in albedo],
                "recoloured": (p.model_index, p.copy) in layout.tints,
                "support": support,
                "material": cat.material,
                "size": size_word(a.size_m),
                "size_m": [round(float(s), 4) for s in a.size_m],
                "mass_kg": cat.mass_kg,
                "states": states,
                "position_3d": [round(float(c), 4) for c in pos],
                "centre_3d": [round(float(c), 4) for c in centre],
                "camera_xyz": [round(float(c), 4) for c in cam_xyz],
                "distance_to_camera": round(float(np.linalg.norm(cam_xyz)), 4),
                "yaw_deg": round(math.degrees(yaw), 2),
                "upright": upright,
                "bbox_2d": bbox,
                "centroid_2d": centroid,
                "pixel_area": area,
                "visible_fraction": round(visible_fraction, 3),
                "in_frame_fraction": round(in_frame, 3),
                "truncated": in_frame < TRUNCATED_BELOW,
                "on": p.on,
                "inside": p.inside,
            }
        )
    relations = _relations(objects, layout, world)
    visible = [o for o in objects if o["pixel_area"] > 0]
    nearest = min(visible, key=lambda o: o["distance_to_camera"])["id"] if visible else None
    grid, origin = free_space_grid(world, layout)
    return {
        "scene_id": scene_id,
        "image_size": [frame.instance.shape[1], frame.instance.shape[0]],
        "camera": camera_record(layout, frame),
        "table": {
            "size_m": [round(s, 4) for s in layout.table_size],
            "finish": layout.table_finish,
            "finish_name": TABLE_FINISHES[layout.table_finish],
            "top_z": 0.0,
            "free_fraction": round(float(grid.mean()), 4),
            "largest_free_radius_m": round(float(ndimage.distance_transform_edt(grid).max() * GRID), 4),
            "free_regions": free_regions(grid, origin),
        },
        "lights": [
            {
                "position": li.pos.round(4).tolist(),
                "target": li.target.round(4).tolist(),
                "intensity": round(li.intensity, 3),
                "kelvin": round(li.kelvin, 1),
                "shadow": li.shadow,
            }
            for li in layout.lights
        ],
        "ambient": round(layout.ambient, 3),
        "room": {
            "floor": FLOOR_FINISHES[layout.room.floor_finish],
            "wall": WALL_FINISHES[layout.room.wall_finish],
            "back_wall_y": round(layout.room.back_y, 4),
            "half_width": round(layout.room.half_width, 4),
            "window": None if layout.room.window is None else [round(v, 4) for v in layout.room.window],
        },
        "sensor": frame.sensor,
        "objects": objects,
        "relations": relations,
        "nearest_to_camera": nearest,
        "composition": layout.composition,
    }


def camera_record(layout: Layout, frame: Frame) -> dict:
    """Pose and intrinsics of the scene's camera, and the sensor its rig stands for (CAMERA_RIGS)."""
    rig = CAMERA_RIGS[layout.camera_kind]
    h, w = frame.instance.shape
    return {
        "kind": layout.camera_kind,
        "K": frame.K.round(4).tolist(),
        "position": frame.cam_pos.round(4).tolist(),
        "rotation_world_from_cv": frame.cam_rot.round(5).tolist(),
        "fovy_deg": round(layout.fovy, 3),
        "fovx_deg": round(math.degrees(2 * math.atan(w / 2 / frame.K[0, 0])), 3),
        "roll_deg": round(layout.cam_roll, 3),
        "native_fov_deg": list(rig.native_fov_deg),
        "native_size": list(rig.native_size),
    }


def _relations(objects: list[dict], layout: Layout, world: TabletopWorld) -> list[list]:
    rel = []
    for a in objects:
        for b in objects:
            if a["id"] == b["id"]:
                continue
            ax, bx = a["camera_xyz"][0], b["camera_xyz"][0]
            if ax < bx - LEFT_RIGHT_GAP:
                rel.append([a["id"], "left_of", b["id"]])
            if a["distance_to_camera"] < b["distance_to_camera"] - FRONT_BEHIND_GAP:
                rel.append([a["id"], "in_front_of", b["id"]])
            pa, pb = np.array(a["position_3d"][:2]), np.array(b["position_3d"][:2])
            ra = 0.5 * min(a["size_m"][0], a["size_m"][1])
            rb = 0.5 * min(b["size_m"][0], b["size_m"][1])
            if (
                a["on"] is None
                and b["on"] is None
                and a["inside"] is None
                and b["inside"] is None
                and a["support"] == b["support"]
                and np.linalg.norm(pa - pb) - ra - rb < NEXT_TO_GAP
                and a["id"] < b["id"]
            ):
                rel.append([a["id"], "next_to", b["id"]])
                rel.append([b["id"], "next_to", a["id"]])
        if a["on"] is not None:
            sup = objects[a["on"]]
            # verified after settling: still above the support's footprint and resting on its top
            dz = a["position_3d"][2] - sup["position_3d"][2]
            if 0 < dz < sup["size_m"][2] + 0.03:
                rel.append([a["id"], "on", sup["id"]])
        if a["inside"] is not None and is_inside(a, objects[a["inside"]]):
            rel.append([a["id"], "in", a["inside"]])
    return rel


def is_inside(obj: dict, container: dict) -> bool:
    """Checked on the settled poses: the object's centre lies within the container's footprint and its
    base above the container's base, below its rim."""
    c = np.asarray(container["position_3d"])
    yaw = math.radians(container["yaw_deg"])
    d = np.asarray(obj["position_3d"]) - c
    lx = math.cos(yaw) * d[0] + math.sin(yaw) * d[1]
    ly = -math.sin(yaw) * d[0] + math.cos(yaw) * d[1]
    w, dp, h = container["size_m"]
    return abs(lx) < w / 2 and abs(ly) < dp / 2 and 0 < d[2] < h


def free_space_grid(world: TabletopWorld, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Top-down boolean grid (rows = y, cols = x) of free table cells, and its world origin (x0, y0)."""
    w, d = layout.table_size
    nx, ny = int(round(w / GRID)), int(round(d / GRID))
    origin = np.array([-w / 2, -d / 2])
    occ = Image.new("L", (nx, ny), 0)
    draw = ImageDraw.Draw(occ)
    for p in layout.placements:
        a = world.assets[p.model_index]
        pos, rot = world.body_pose(p)
        if pos[2] < -0.05:
            continue  # fell off the table
        hw, hd = float(a.size_m[0]) / 2, float(a.size_m[1]) / 2
        corners = np.array([[-hw, -hd, 0], [hw, -hd, 0], [hw, hd, 0], [-hw, hd, 0]]) @ rot.T + pos
        cells = (corners[:, :2] - origin) / GRID
        draw.polygon([tuple(c) for c in cells], fill=1)
    free = ~np.asarray(occ, dtype=bool)
    m = int(round(EDGE_MARGIN / GRID))
    free[:m, :] = free[-m:, :] = False
    free[:, :m] = free[:, -m:] = False
    return free, origin


def free_regions(free: np.ndarray, origin: np.ndarray, k: int = 3, min_radius_m: float = 0.03) -> list[dict]:
    """Up to k largest empty discs on the table, greedily (each one blocks its own area): centre in world
    metres, radius in metres."""
    dist = ndimage.distance_transform_edt(free)
    out = []
    yy, xx = np.mgrid[0 : free.shape[0], 0 : free.shape[1]]
    for _ in range(k):
        iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
        r = float(dist[iy, ix])
        if r * GRID < min_radius_m:
            break
        centre = origin + (np.array([ix, iy]) + 0.5) * GRID
        out.append({"centre_xy": [round(float(c), 4) for c in centre], "radius_m": round(r * GRID, 4)})
        dist[(yy - iy) ** 2 + (xx - ix) ** 2 <= (2 * r) ** 2] = 0
    return out


def region_grid(free: np.ndarray, radius_m: float) -> np.ndarray:
    """Cells covered by some disc of radius_m that lies entirely in free space (morphological opening)."""
    r = radius_m / GRID
    centres = ndimage.distance_transform_edt(free) >= r
    if not centres.any():
        return np.zeros_like(free)
    return ndimage.distance_transform_edt(~centres) <= r


def grid_to_image(grid: np.ndarray, origin: np.ndarray, frame: Frame) -> np.ndarray:
    """Project a top-down table grid into the image through the visible table pixels (depth back-projection)."""
    vs, us = np.nonzero(frame.table)
    if len(us) == 0:
        return np.zeros(frame.table.shape, dtype=bool)
    z = frame.depth[vs, us]
    x = (us + 0.5 - frame.K[0, 2]) / frame.K[0, 0] * z
    y = (vs + 0.5 - frame.K[1, 2]) / frame.K[1, 1] * z
    world = np.stack([x, y, z], 1) @ frame.cam_rot.T + frame.cam_pos
    cells = np.floor((world[:, :2] - origin) / GRID).astype(np.int64)
    ok = (
        (cells[:, 0] >= 0)
        & (cells[:, 0] < grid.shape[1])
        & (cells[:, 1] >= 0)
        & (cells[:, 1] < grid.shape[0])
    )
    hit = np.zeros(len(us), dtype=bool)
    hit[ok] = grid[cells[ok, 1], cells[ok, 0]]
    out = np.zeros(frame.table.shape, dtype=bool)
    out[vs[hit], us[hit]] = True
    return out
