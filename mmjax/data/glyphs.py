"""Procedural handwritten-looking digits: stroke skeletons rendered with jitter (NumPy only).

Each digit is a few polylines in a unit box (x right, y down). A *writer* fixes a slant,
a stroke width and a size; every drawing adds its own affine jitter, per-point wobble and
pixel noise. Rendering is anti-aliased distance-to-segment on a 28x28 grid.
"""
from __future__ import annotations

import numpy as np

SIZE = 28


def _arc(cx, cy, rx, ry, a0, a1, n=14):
  t = np.linspace(np.radians(a0), np.radians(a1), n)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _line(*pts):
  return np.asarray(pts, np.float64)


# Angles in degrees, y down: 0 = right, 90 = down, -90 = up.
SKELETONS = {
    0: [_arc(0.5, 0.5, 0.28, 0.4, 0, 360, 20)],
    1: [_line((0.36, 0.24), (0.54, 0.1), (0.54, 0.9))],
    2: [np.concatenate([_arc(0.5, 0.32, 0.26, 0.22, 200, 380, 10),
                        _line((0.74, 0.42), (0.22, 0.9), (0.8, 0.9))])],
    3: [_arc(0.48, 0.3, 0.25, 0.2, 200, 450, 12), _arc(0.48, 0.68, 0.28, 0.22, -90, 160, 12)],
    4: [_line((0.66, 0.9), (0.66, 0.1), (0.16, 0.64), (0.86, 0.64))],
    5: [np.concatenate([_line((0.78, 0.1), (0.32, 0.1), (0.28, 0.45)),
                        _arc(0.5, 0.65, 0.27, 0.24, -120, 150, 12)])],
    6: [np.concatenate([_line((0.7, 0.1), (0.4, 0.32)), _arc(0.5, 0.66, 0.25, 0.23, 200, 560, 18)])],
    7: [_line((0.2, 0.1), (0.8, 0.1), (0.42, 0.9))],
    8: [_arc(0.5, 0.29, 0.2, 0.19, 0, 360, 16), _arc(0.5, 0.69, 0.25, 0.21, 0, 360, 16)],
    9: [_arc(0.5, 0.32, 0.23, 0.21, 0, 360, 16), _line((0.73, 0.32), (0.62, 0.9))],
}


def writer_style(writer_id: int) -> dict:
  """A writer's fixed habits, derived from their id alone."""
  r = np.random.default_rng(10_000 + writer_id)
  return dict(slant=r.uniform(-0.3, 0.3), width=r.uniform(0.045, 0.09),
              scale=r.uniform(0.8, 1.0), aspect=r.uniform(0.8, 1.15))


def _segment_distance(points, a, b):
  """Distance from each point [P, 2] to each segment a[S, 2]-b[S, 2] -> [P, S]."""
  ab = b - a
  ap = points[:, None, :] - a[None]
  t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
  closest = a[None] + t[..., None] * ab[None]
  return np.linalg.norm(points[:, None, :] - closest, axis=-1)


_GRID = np.stack(np.meshgrid((np.arange(SIZE) + 0.5) / SIZE, (np.arange(SIZE) + 0.5) / SIZE,
                             indexing="xy"), axis=-1).reshape(-1, 2)


def draw_digit(digit: int, writer_id: int, rng: np.random.Generator) -> np.ndarray:
  """One drawing of `digit` by `writer_id`: uint8 [28, 28, 1], ink bright on black."""
  style = writer_style(writer_id)
  angle = rng.uniform(-0.25, 0.25)
  scale = style["scale"] * rng.uniform(0.85, 1.1)
  sx, sy = scale * style["aspect"], scale
  shear = style["slant"] + rng.normal(0, 0.08)
  shift = rng.uniform(-0.08, 0.08, size=2)
  c, s = np.cos(angle), np.sin(angle)
  m = np.array([[c, -s], [s, c]]) @ np.array([[1.0, -shear], [0.0, 1.0]]) @ np.diag([sx, sy])
  seg_a, seg_b = [], []
  for stroke in SKELETONS[digit]:
    pts = stroke + rng.normal(0, 0.012, size=stroke.shape)
    pts = (pts - 0.5) @ m.T + 0.5 + shift
    seg_a.append(pts[:-1])
    seg_b.append(pts[1:])
  dist = _segment_distance(_GRID, np.concatenate(seg_a), np.concatenate(seg_b)).min(axis=1)
  width = style["width"] * rng.uniform(0.8, 1.25)
  ink = np.clip((width - dist) / (1.5 / SIZE) + 0.5, 0.0, 1.0)
  ink = ink * rng.uniform(0.75, 1.0) + rng.normal(0, 0.06, size=ink.shape)
  return (np.clip(ink, 0.0, 1.0) * 255).round().astype(np.uint8).reshape(SIZE, SIZE, 1)
