#!/usr/bin/env python
"""Draws the built-in shapes dataset's six classes at several sizes (long side in pixels), three
random poses each, as the generator rasterizes them: the picture behind the generator's smallest
object size (solov2_d2/data/shapes.py, TINY_OBJECT_EXTENT).

python tools/draw_shape_sizes.py --output docs/shapes_by_size.png
"""

import argparse
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from solov2_d2.data import shapes  # noqa: E402


def shape_sizes_sheet(sizes, poses=3, seed=3, tile=28, zoom=4) -> np.ndarray:
    """Rows: classes; columns: ``poses`` tiles per size. Grey uint8 image, enlarged ``zoom`` x."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_name in shapes.SHAPES_CLASSES:
        tiles = []
        for extent in sizes:
            for _ in range(poses):
                vertices = shapes._pose_shape(
                    shapes._unit_shape(class_name, rng), extent, rng, tile, tile
                )
                vertices = vertices - vertices.mean(axis=0) + tile / 2.0
                mask = shapes._rasterize_shape(vertices, tile, tile)
                drawn = np.where(mask > 0, 40, 255).astype(np.uint8)
                tiles.append(np.pad(drawn, 1, constant_values=180))
        rows.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(rows, axis=0)
    return cv2.resize(sheet, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="shapes_by_size.png")
    parser.add_argument("--sizes", type=float, nargs="+", default=[6, 9, 12, 16, 20, 24])
    args = parser.parse_args()
    sheet = shape_sizes_sheet(args.sizes)
    if not cv2.imwrite(args.output, sheet):
        raise SystemExit("could not write {}".format(args.output))
    print(
        "wrote {}: rows {}, columns: 3 poses each at {} px".format(
            args.output, ", ".join(shapes.SHAPES_CLASSES), ", ".join("%g" % s for s in args.sizes)
        )
    )


if __name__ == "__main__":
    main()
