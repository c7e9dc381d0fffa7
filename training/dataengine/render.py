"""Headless rendering of the robot camera: RGB, per-object instance ids and metric depth."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

_PROBE = "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); mujoco.Renderer(m, 8, 8).render()"


def configure_gl(*, strict: bool = True) -> str | None:
    """Choose the headless OpenGL backend once: MUJOCO_GL if set, else EGL if a context really opens
    (probed in a subprocess: a failed EGL start cannot be undone in this process), else OSMesa.

    The choice goes into os.environ so that worker processes inherit it without probing again. With
    strict=False a machine without headless GL returns None instead of raising (importing is not rendering).
    """
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    import subprocess
    import sys

    errors = []
    for backend in ("egl", "osmesa"):
        env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
        try:
            r = subprocess.run(
                [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            errors.append(f"{backend}: probe timed out")
            continue
        if r.returncode == 0:
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
        errors.append(f"{backend}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    if not strict:
        return None
    from .errors import DataEngineError

    raise DataEngineError(
        "no headless OpenGL for MuJoCo (apt-get install libegl1 libgl1-mesa-dri, or libosmesa6): "
        + "; ".join(errors)
    )


def _gl_context_class():
    """The GLContext of the configured backend, even if mujoco was imported before MUJOCO_GL was set."""
    backend = configure_gl()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        from mujoco.gl_context import GLContext
    return GLContext


@dataclass
class Frame:
    """One rendered view.

    rgb: H x W x 3 uint8; instance: H x W int32 (-1 background/table/room, else an object id: index k
    into the layout's placements, or len(placements) + j for its room object j); table: H x W bool (table
    top visible); depth: H x W float32 metres along the optical axis; K: 3 x 3 intrinsics (pixels);
    cam_pos: 3 (world, m); cam_rot: 3 x 3 world-from-camera with columns right, down, forward (OpenCV
    convention); sensor: the sensor effects applied to rgb (sensor.SensorParams as a dict), None for the
    clean render.
    """

    rgb: np.ndarray
    instance: np.ndarray
    table: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    cam_pos: np.ndarray
    cam_rot: np.ndarray
    sensor: dict | None = None


class SceneRenderer:
    """Two passes per frame on one offscreen GL context made once per process (textures uploaded once):
    a lit RGB pass, then an id-colour pass whose depth buffer also gives metric depth (mujoco.Renderer
    would need a third pass for depth)."""

    def __init__(self, world, *, shadows: bool = True):
        import mujoco

        self._mj = mujoco
        self.world = world
        m = world.model
        self.shadows = shadows
        self.gl = _gl_context_class()(world.width, world.height)
        self.gl.make_current()
        self.ctx = mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.ctx)
        self.ctx.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self.scene = mujoco.MjvScene(m, maxgeom=4000)
        self.rect = mujoco.MjrRect(0, 0, world.width, world.height)
        self.opt = mujoco.MjvOption()
        self.opt.geomgroup[:] = [1, 1, 1, 0, 0, 0]  # hull (3) and parked (4) geoms are never drawn
        self.cam = mujoco.MjvCamera()
        self.cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self.cam.fixedcamid = world.camera
        h, w = world.height, world.width
        self._rgb = np.empty((h, w, 3), np.uint8)
        self._ids = np.empty((h, w, 3), np.uint8)
        self._zbuf = np.empty((h, w), np.float32)

    def render(self) -> Frame:
        mj, w = self._mj, self.world
        m, d, sc = w.model, w.data, self.scene
        self.gl.make_current()
        mj.mjv_updateScene(m, d, self.opt, None, self.cam, mj.mjtCatBit.mjCAT_ALL, sc)
        flags = sc.flags.copy()
        sc.flags[mj.mjtRndFlag.mjRND_SHADOW] = self.shadows
        mj.mjr_render(self.rect, sc, self.ctx)
        mj.mjr_readPixels(self._rgb, None, self.rect, self.ctx)
        sc.flags[mj.mjtRndFlag.mjRND_SHADOW] = False
        sc.flags[mj.mjtRndFlag.mjRND_SEGMENT] = True
        sc.flags[mj.mjtRndFlag.mjRND_IDCOLOR] = True
        mj.mjr_render(self.rect, sc, self.ctx)
        mj.mjr_readPixels(self._ids, self._zbuf, self.rect, self.ctx)
        np.copyto(sc.flags, flags)
        rgb = np.flipud(self._rgb).copy()  # GL rows start at the bottom
        ids = np.flipud(self._ids).astype(np.int64)
        segid = ids[..., 0] + (ids[..., 1] << 8) + (ids[..., 2] << 16)  # 0 = background
        depth = self._linear_depth(np.flipud(self._zbuf))
        # segid -> geom id -> placement index
        lut_geom = np.full(sc.ngeom + 2, -1, dtype=np.int64)
        for i in range(sc.ngeom):
            g = sc.geoms[i]
            if g.segid != -1 and g.objtype == int(mj.mjtObj.mjOBJ_GEOM):
                lut_geom[g.segid + 1] = g.objid
        geom = lut_geom[np.clip(segid, 0, sc.ngeom + 1)]
        owner = np.where(geom >= 0, w.geom_owner[np.maximum(geom, 0)], -1)
        pool_to_placement = np.full(len(w.assets) * w.copies, -1, dtype=np.int32)
        for k, p in enumerate(w.active + w.active_room):
            pool_to_placement[p.model_index * w.copies + p.copy] = k
        instance = np.where(owner >= 0, pool_to_placement[np.maximum(owner, 0)], -1).astype(np.int32)
        table = geom == w.table_geom
        fovy = np.radians(m.cam_fovy[w.camera])
        f = 0.5 * w.height / np.tan(fovy / 2)
        K = np.array([[f, 0, w.width / 2], [0, f, w.height / 2], [0, 0, 1]])
        xmat = d.cam_xmat[w.camera].reshape(3, 3)
        cam_rot = xmat @ np.diag([1.0, -1.0, -1.0])  # MuJoCo camera (x right, y up, -z fwd) -> OpenCV
        return Frame(rgb, instance, table, depth, K, d.cam_xpos[w.camera].copy(), cam_rot)

    def _linear_depth(self, z: np.ndarray) -> np.ndarray:
        """Reverse-Z depth buffer to metres along the optical axis (as mujoco.Renderer does it)."""
        m = self.world.model
        near = np.float32(m.vis.map.znear * m.stat.extent)
        far = np.float32(m.vis.map.zfar * m.stat.extent)
        c = -(far + near) / (far - near)
        dd = -(np.float32(2) * far * near) / (far - near)
        c = np.float32(-0.5) * c - np.float32(0.5)
        dd = np.float32(-0.5) * dd
        return (dd / (z.astype(np.float64) + c)).astype(np.float32)

    def close(self) -> None:
        self.gl.make_current()
        self.ctx.free()
        self.gl.free()
