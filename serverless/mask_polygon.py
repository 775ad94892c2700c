"""Mask → polygon for CVAT's "convert masks to polygons", with numpy alone.

The Nuclio image carries no OpenCV or scikit-image, so this traces the outer boundary of a bitmap's
largest 4-connected component along pixel edges (vertices are pixel corners, CVAT's coordinate
convention: pixel (r, c) covers x in [c, c + 1], y in [r, r + 1]) and simplifies it with
Douglas-Peucker. The unsimplified outline encloses exactly the component and its holes.
"""

from __future__ import annotations

import numpy as np

#: Default simplification tolerance in pixels: removes the pixel staircase of slanted edges.
TOLERANCE = 1.0

# Headings east, south, west, north (clockwise on screen, y pointing down) and, for each, the
# (row, col) offsets from a vertex (x, y) of the pixels ahead-left and ahead-right of it.
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))
_AHEAD = (((-1, 0), (0, 0)), ((0, 0), (0, -1)), ((0, -1), (-1, -1)), ((-1, -1), (-1, 0)))


def mask_to_polygon(mask: np.ndarray, tolerance: float = TOLERANCE) -> list[float]:
    """Flat ``[x0, y0, x1, y1, ...]`` outline of the largest component of a 2-D bool ``mask``, in
    the mask's pixel coordinates; ``[]`` for an empty mask. Always at least three vertices."""
    component = largest_component(mask)
    if component is None:
        return []
    outline = trace_outline(component)
    simplified = simplify_ring(outline, tolerance)
    points = simplified if len(simplified) >= 3 else outline
    return [float(v) for v in points.ravel()]


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of ``mask`` (one of them on a tie) as a bool array, or
    None when the mask is empty. Union-find over horizontal runs: no per-pixel Python loop."""
    rows, starts, ends = _runs(np.asarray(mask, dtype=bool))
    if not len(rows):
        return None
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(rows[-1] + 2)).tolist()  # first run of each row
    lo, hi = starts.tolist(), ends.tolist()
    for r in range(int(rows[0]) + 1, int(rows[-1]) + 1):
        i, j = first[r], first[r - 1]  # sweep this row's and the previous row's runs together
        while i < first[r + 1] and j < first[r]:
            if lo[i] < hi[j] and lo[j] < hi[i]:  # overlapping columns: they share an edge
                parent[find(i)] = find(j)
            if hi[i] < hi[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(len(rows))])
    sizes = np.bincount(roots, weights=ends - starts, minlength=len(rows))
    chosen = roots == int(np.argmax(sizes))
    component = np.zeros(mask.shape, dtype=bool)
    for r, s, e in zip(rows[chosen], starts[chosen], ends[chosen], strict=True):
        component[r, s:e] = True
    return component


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: row, first column, end column (exclusive), in raster order."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends


def trace_outline(component: np.ndarray) -> np.ndarray:
    """(K, 2) pixel-corner vertices (x, y) of the outer boundary of one 4-connected component,
    clockwise on screen, starting at the top-left corner of its first pixel in raster order."""
    h, w = component.shape
    grid = np.zeros((h + 2, w + 2), dtype=bool)
    grid[1:-1, 1:-1] = component
    filled = grid.item  # one element as a Python bool, without building an array scalar
    r0, c0 = (int(v) for v in np.argwhere(component)[0])
    x, y, heading = c0, r0, 3  # as if arriving upwards along the first pixel's left edge
    corners = []
    while True:
        (lr, lc), (rr, rc) = _AHEAD[heading]
        if not filled(y + rr + 1, x + rc + 1):
            turn = (heading + 1) % 4  # nothing ahead on the right: follow it round
        elif filled(y + lr + 1, x + lc + 1):
            turn = (heading + 3) % 4  # blocked ahead on the left: turn left
        else:
            turn = heading
        if turn != heading:
            corners.append((x, y))
        heading = turn
        x, y = x + _STEP[heading][0], y + _STEP[heading][1]
        if (x, y) == (c0, r0) and heading == 3:
            return np.array(corners, dtype=np.float64)


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring of (K, 2) points; keeps the first point and the one
    farthest from it, then every point further than ``tolerance`` from its simplified chord."""
    n = len(ring)
    if n < 4 or tolerance <= 0:
        return ring
    far = int(np.argmax(((ring - ring[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n, dtype=bool)
    keep[[0, far]] = True
    closed = np.vstack([ring, ring[:1]])
    spans = [(0, far), (far, n)]
    while spans:
        start, end = spans.pop()
        if end - start < 2:
            continue
        a, chord = closed[start], closed[end] - closed[start]
        rel = closed[start + 1 : end] - a
        length = float(np.hypot(*chord))
        if length:
            dist = np.abs(chord[0] * rel[:, 1] - chord[1] * rel[:, 0]) / length
        else:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            keep[start + 1 + k] = True
            spans += [(start, start + 1 + k), (start + 1 + k, end)]
    return ring[keep]
