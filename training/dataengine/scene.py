"""Tabletop world and scene sampler.

One MuJoCo model per process holds the table, floor, wall, lights, the robot camera and a pool of
`copies` bodies per asset model. A scene is a *layout* applied to that model at run time: hidden pool
bodies move to a parking lot (no collision, hidden geom group), the table, lights and camera change
through mjModel fields. Compiling and uploading textures once per process is what makes 1,000 scenes
in minutes possible on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .assets import AssetModel
from .knowledge import KnowledgeBase
from .render import configure_gl

# MuJoCo fixes its GL backend when it is imported: choose EGL or OSMesa first.
configure_gl(strict=False)

import mujoco  # noqa: E402

TABLE_HEIGHT = 0.75  # table top at z = 0, floor at -TABLE_HEIGHT
VISIBLE_GROUP, HULL_GROUP, HIDDEN_GROUP = 0, 3, 4
MAX_PENETRATION = 0.005  # metres; deeper contacts after settling drop an object and settle again
SUPPORTS = ("tray", "chopping_board", "plate", "book", "kitchen_scale")
TABLE_FINISHES = (
    "light wood",
    "dark wood",
    "white laminate",
    "grey steel",
    "checked tablecloth",
    "green linoleum",
)


@dataclass
class Placement:
    """One object of a layout. pos: x, y in table frame (m); yaw in radians; on: index of its support."""

    model_index: int
    copy: int
    x: float
    y: float
    yaw: float
    on: int | None = None
    states: dict = field(default_factory=dict)


@dataclass
class Layout:
    """Everything that makes a scene, sampled from one RNG (table in metres, angles in radians)."""

    table_size: tuple[float, float]  # full width (x), depth (y)
    table_finish: int
    placements: list[Placement]
    camera_kind: str  # "head" | "wrist"
    cam_pos: np.ndarray  # world, metres
    cam_target: np.ndarray
    fovy: float  # degrees
    light_pos: np.ndarray
    light_diffuse: float
    ambient: float

    def without(self, drop: set[int]) -> Layout:
        """The same scene less some placements (and whatever rested on them), `on` indices remapped."""
        drop = set(drop)
        changed = True
        while changed:  # what stood on a dropped support goes too
            changed = False
            for k, p in enumerate(self.placements):
                if k not in drop and p.on is not None and p.on in drop:
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
                )
            )
        return dataclasses.replace(self, placements=placements)


def _obb_corners(x, y, yaw, w, d):
    c, s = math.cos(yaw), math.sin(yaw)
    hx, hy = w / 2, d / 2
    pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    return pts @ np.array([[c, s], [-s, c]]) + np.array([x, y])


def _obb_overlap(a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Separating-axis test of two rectangles given by their corners, grown by margin."""
    for poly in (a, b):
        for i in range(2):
            edge = poly[i + 1] - poly[i]
            axis = np.array([-edge[1], edge[0]]) / (np.linalg.norm(edge) + 1e-12)
            pa, pb = a @ axis, b @ axis
            if pa.max() + margin < pb.min() or pb.max() + margin < pa.min():
                return False
    return True


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
        self.by_category: dict[str, list[int]] = {}
        for i, a in enumerate(assets):
            self.by_category.setdefault(a.category, []).append(i)
        self.model = self._build(shadow_size)
        self.data = mujoco.MjData(self.model)
        m = self.model
        self.table_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "table_top")
        self.leg_geoms = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"leg{i}") for i in range(4)]
        self.table_mats = [
            mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_MATERIAL, f"table{i}")
            for i in range(len(TABLE_FINISHES))
        ]
        self.camera = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, "robot")
        # pool bookkeeping: body id, qpos address, visual geoms and hull geom of (model, copy)
        self.pool_body = np.zeros((len(assets), copies), dtype=np.int64)
        self.pool_qadr = np.zeros((len(assets), copies), dtype=np.int64)
        self.pool_geoms: dict[tuple[int, int], list[int]] = {}
        self.pool_hull = np.zeros((len(assets), copies), dtype=np.int64)
        for i, a in enumerate(assets):
            for c in range(copies):
                b = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, f"{a.key}#{c}")
                self.pool_body[i, c] = b
                self.pool_qadr[i, c] = m.jnt_qposadr[m.body_jntadr[b]]
                geoms = [g for g in range(m.body_geomadr[b], m.body_geomadr[b] + m.body_geomnum[b])]
                self.pool_hull[i, c] = next(g for g in geoms if m.geom_group[g] == HULL_GROUP)
                self.pool_geoms[(i, c)] = [g for g in geoms if m.geom_group[g] != HULL_GROUP]
        self.geom_owner = np.full(m.ngeom, -1, dtype=np.int64)  # geom id -> flat pool index i * copies + c
        for (i, c), gs in self.pool_geoms.items():
            self.geom_owner[gs] = i * copies + c
        self.active: list[Placement] = []

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
        spec.add_texture(
            name="floor",
            type=mujoco.mjtTexture.mjTEXTURE_2D,
            builtin=mujoco.mjtBuiltin.mjBUILTIN_CHECKER,
            rgb1=[0.55, 0.5, 0.45],
            rgb2=[0.45, 0.4, 0.36],
            width=128,
            height=128,
        )
        fm = spec.add_material(name="floor", texrepeat=[8, 8])
        fm.textures[rgb_role] = "floor"
        spec.add_material(name="wall", rgba=[0.85, 0.84, 0.8, 1])
        spec.add_material(name="leg", rgba=[0.25, 0.25, 0.27, 1])

        wb = spec.worldbody
        wb.add_geom(
            name="floor",
            type=mujoco.mjtGeom.mjGEOM_PLANE,
            size=[6, 6, 0.1],
            pos=[0, 0, -TABLE_HEIGHT],
            material="floor",
        )
        wb.add_geom(
            name="wall",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            size=[6, 0.05, 2],
            pos=[0, 2.5, 1],
            material="wall",
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
        wb.add_light(
            name="key",
            pos=[0.5, -0.5, 1.5],
            dir=[-0.3, 0.3, -1],
            castshadow=True,
            diffuse=[0.7, 0.7, 0.7],
            specular=[0.2, 0.2, 0.2],
            cutoff=60,
        )
        wb.add_light(
            name="fill", pos=[-1, -1, 2], dir=[0.4, 0.4, -1], castshadow=False, diffuse=[0.2, 0.2, 0.2]
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
                    mat = spec.add_material(name=f"{a.key}_m{j}", rgba=p.rgba.tolist(), specular=0.3)
                    mat.textures[rgb_role] = f"{a.key}_t{j}"
                else:
                    spec.add_material(name=f"{a.key}_m{j}", rgba=p.rgba.tolist(), specular=0.3)
                hull_v.append(p.verts)
                hull_f.append(p.faces + n)
                n += len(p.verts)
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
                q = self.pool_qadr[i, c]
                d.qpos[q : q + 7] = [3 + i * 0.5, 3 + c * 0.5, -5, 1, 0, 0, 0]
                m.geom_group[self.pool_geoms[(i, c)]] = HIDDEN_GROUP
                h = self.pool_hull[i, c]
                m.geom_contype[h] = 0
                m.geom_conaffinity[h] = 0
        w, dpt = layout.table_size
        g = self.table_geom
        m.geom_size[g] = [w / 2, dpt / 2, 0.02]
        m.geom_rbound[g] = float(np.linalg.norm(m.geom_size[g]))
        m.geom_aabb[g] = [0, 0, 0, w / 2, dpt / 2, 0.02]
        m.geom_matid[g] = self.table_mats[layout.table_finish]
        for k, lg in enumerate(self.leg_geoms):
            sx, sy = (-1 if k % 2 else 1), (-1 if k // 2 else 1)
            m.geom_pos[lg][:2] = [sx * (w / 2 - 0.06), sy * (dpt / 2 - 0.06)]
        for p in layout.placements:
            self._place(p, layout)
        # camera: look-at to a quaternion (MuJoCo cameras look along -z with +y up)
        fwd = layout.cam_target - layout.cam_pos
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        rot = np.stack([right, up, -fwd], axis=1)
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, rot.ravel())
        m.cam_pos[self.camera] = layout.cam_pos
        m.cam_quat[self.camera] = quat
        m.cam_fovy[self.camera] = layout.fovy
        m.light_pos[0] = layout.light_pos
        ld = -layout.light_pos / np.linalg.norm(layout.light_pos)
        m.light_dir[0] = ld
        m.light_diffuse[0] = [layout.light_diffuse] * 3
        m.vis.headlight.ambient[:] = [layout.ambient] * 3
        self.active = list(layout.placements)
        mujoco.mj_forward(m, d)

    def _place(self, p: Placement, layout: Layout) -> None:
        m, d = self.model, self.data
        z = 0.003
        if p.on is not None:
            sup = layout.placements[p.on]
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
        mujoco.mj_forward(m, d)
        hull_to_placement = {int(self.pool_hull[p.model_index, p.copy]): k for k, p in enumerate(self.active)}
        worst, bad = 0.0, set()
        for k in range(d.ncon):
            con = d.contact[k]
            a, b = hull_to_placement.get(int(con.geom1)), hull_to_placement.get(int(con.geom2))
            if a is not None and b is not None:
                worst = max(worst, -float(con.dist))
                if -con.dist > MAX_PENETRATION:
                    bad.add(max(a, b))
        for k, p in enumerate(self.active):
            if self.body_pose(p)[0][2] < -0.02:  # fell off (or through) the table
                bad.add(k)
        return worst, bad

    def body_pose(self, p: Placement) -> tuple[np.ndarray, np.ndarray]:
        """World position (3,) and rotation matrix (3, 3) of a placed object's body."""
        b = self.pool_body[p.model_index, p.copy]
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()


# -------------------------------------------------------------------- sampling
def sample_layout(
    rng: np.random.Generator, world: TabletopWorld, *, min_objects: int = 3, max_objects: int = 12
) -> Layout:
    """Draw a table, 3-12 objects placed without footprint overlap (some resting on supports), camera, light."""
    kb = world.kb
    w = float(rng.uniform(0.8, 1.3))
    dpt = float(rng.uniform(0.55, 0.8))
    finish = int(rng.integers(len(TABLE_FINISHES)))
    n_target = int(rng.integers(min_objects, max_objects + 1))
    cats = sorted(c for c in world.by_category if kb.categories[c].placement == "table")  # room: not on it
    order = rng.permutation(len(cats))
    wanted: list[str] = []
    for k in order:
        if len(wanted) >= n_target:
            break
        wanted.append(cats[k])
        if rng.random() < 0.15 and len(wanted) < n_target:  # a second one of the same kind ("the left cup")
            wanted.append(cats[k])
    placements: list[Placement] = []
    footprints: list[np.ndarray] = []
    used: dict[int, int] = {}
    supported: set[int] = set()
    margin = 0.02
    for cat in wanted:
        variants = world.by_category[cat]
        mi = int(variants[rng.integers(len(variants))])
        if used.get(mi, 0) >= world.copies:
            continue
        a = world.assets[mi]
        fw, fd = float(a.size_m[0]), float(a.size_m[1])
        placed = False
        # try resting on a support first (one item per support), then on the free table
        for si, sp in enumerate(placements):
            sup_cat = world.assets[sp.model_index].category
            if sup_cat not in SUPPORTS or si in supported or sp.on is not None or rng.random() > 0.4:
                continue
            if kb.categories[cat].mass_kg > 1.0 or cat in SUPPORTS:
                continue
            sw, sd = (float(s) for s in world.assets[sp.model_index].size_m[:2])
            yaw = sp.yaw + float(rng.choice([0.0, math.pi / 2, math.pi])) + float(rng.uniform(-0.2, 0.2))
            corners = _obb_corners(sp.x, sp.y, yaw, fw, fd)
            local = (corners - [sp.x, sp.y]) @ np.array(
                [[math.cos(sp.yaw), -math.sin(sp.yaw)], [math.sin(sp.yaw), math.cos(sp.yaw)]]
            )
            if (np.abs(local[:, 0]) < sw / 2 - 0.005).all() and (np.abs(local[:, 1]) < sd / 2 - 0.005).all():
                placements.append(Placement(mi, used.get(mi, 0), sp.x, sp.y, yaw, on=si))
                supported.add(si)
                placed = True
                break
        if not placed:
            for _ in range(30):
                yaw = float(rng.uniform(-math.pi, math.pi))
                r = 0.5 * math.hypot(fw, fd)
                if r * 2 > min(w, dpt) - 0.04:
                    break
                x = float(rng.uniform(-w / 2 + r, w / 2 - r))
                y = float(rng.uniform(-dpt / 2 + r, dpt / 2 - r))
                corners = _obb_corners(x, y, yaw, fw, fd)
                if all(not _obb_overlap(corners, f, margin) for f in footprints):
                    placements.append(Placement(mi, used.get(mi, 0), x, y, yaw))
                    footprints.append(corners)
                    placed = True
                    break
        if placed:
            used[mi] = used.get(mi, 0) + 1
            cat_kb = kb.categories[cat]
            st = {}
            if "can_be_hot" in cat_kb.safety:
                st["hot"] = bool(rng.random() < 0.4)
            if cat_kb.physical["holds_liquid"] and "full" in cat_kb.states:
                st["full"] = bool(rng.random() < 0.5)
            if "lit" in cat_kb.states:
                st["lit"] = bool(rng.random() < 0.5)
            placements[-1].states = st
    # camera: a head camera behind the near edge looking down, or a wrist camera close above the table
    kind = "head" if rng.random() < 0.7 else "wrist"
    if kind == "head":
        dist = float(rng.uniform(0.75, 1.15))
        elev = math.radians(float(rng.uniform(35, 60)))
        fovy = float(rng.uniform(50, 62))
    else:
        dist = float(rng.uniform(0.45, 0.7))
        elev = math.radians(float(rng.uniform(55, 80)))
        fovy = float(rng.uniform(62, 75))
    azim = math.radians(float(rng.uniform(-25, 25)))
    target = np.array([float(rng.uniform(-0.1, 0.1) * w), float(rng.uniform(-0.1, 0.1) * dpt), 0.0])
    cam = target + dist * np.array(
        [math.sin(azim) * math.cos(elev), -math.cos(azim) * math.cos(elev), math.sin(elev)]
    )
    light = np.array([float(rng.uniform(-1, 1)), float(rng.uniform(-1, 0.5)), float(rng.uniform(1.2, 2.2))])
    return Layout(
        table_size=(w, dpt),
        table_finish=finish,
        placements=placements,
        camera_kind=kind,
        cam_pos=cam,
        cam_target=target,
        fovy=fovy,
        light_pos=light,
        light_diffuse=float(rng.uniform(0.45, 0.85)),
        ambient=float(rng.uniform(0.2, 0.45)),
    )
