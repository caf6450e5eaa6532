"""SOLOv2 target assignment: hand-computed grids, positive cells and mask targets.

Conventions in the comments: a square mask ``mask[a:b, a:b]`` has tight box (a, a, b, b), scale
sqrt(w * h) = b - a and center of mass (a + b - 1) / 2. With the 64x64 padded images used here the
grid spans 64 input pixels per axis: a cell of S = 4 is 16 px wide, of S = 3 is 21.33 px, so
cell(v) = int((v / 64) // (1 / S)).
"""

import cv2
import numpy as np
import pytest
import torch

from solov2_d2.modeling.target_assigner import (
    SOLOv2Targets,
    assign_targets_single_image,
    resize_masks_like_cv2,
)

NUM_CLASSES = 7
BACKGROUND = NUM_CLASSES


def square_instances(image_size, squares):
    """(masks, boxes) for squares/rectangles given as (top, left, bottom, right), end exclusive."""
    height, width = image_size
    masks = torch.zeros((len(squares), height, width), dtype=torch.bool)
    boxes = torch.zeros((len(squares), 4), dtype=torch.float32)
    for k, (top, left, bottom, right) in enumerate(squares):
        masks[k, top:bottom, left:right] = True
        boxes[k] = torch.tensor([left, top, right, bottom], dtype=torch.float32)
    return masks, boxes


def assign(
    masks, boxes, classes, padded_size=(64, 64), num_grids=(4,), scale_ranges=((1, 64),), sigma=0.2
):
    return assign_targets_single_image(
        masks,
        boxes,
        torch.as_tensor(classes, dtype=torch.int64),
        padded_size,
        list(num_grids),
        list(scale_ranges),
        sigma,
        NUM_CLASSES,
    )


def _cv2_resize(mask, out_h, out_w):
    return cv2.resize(mask.numpy().astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def category_grid(cells_to_class, num_grid):
    grid = torch.full((num_grid * num_grid,), BACKGROUND, dtype=torch.int64)
    for cell, cls in cells_to_class.items():
        grid[cell] = cls
    return grid


def assert_level(targets, level, cells, instances, categories):
    assert targets.positive_cells[level].tolist() == cells
    assert targets.positive_instances[level].tolist() == instances
    assert torch.equal(targets.category_targets[level], categories)


def test_single_square_and_exact_mask_target():
    # mask[8:16, 8:16] on 64x64: scale 8 -> level 0 only (ranges (1, 32) and (16, 64)).
    # center 11.5, S = 4: 11.5 / 64 = 0.1797 -> cell 0. half = 0.5 * 8 * 0.2 = 0.8:
    # cell(10.7) = cell(12.3) = 0 -> the single cell (0, 0) = 0.
    masks, boxes = square_instances((64, 64), [(8, 8, 16, 16)])
    targets = assign(masks, boxes, [3], num_grids=(4, 3), scale_ranges=((1, 32), (16, 64)))
    assert isinstance(targets, SOLOv2Targets)
    assert_level(targets, 0, [0], [0], category_grid({0: 3}, 4))
    assert_level(targets, 1, [], [], category_grid({}, 3))
    # 64 -> 16 is an exact factor 4: output pixel r samples rows 4r + 1 and 4r + 2 at weight 0.5
    # each. Rows 8..15 cover {9, 10} (r = 2) and {13, 14} (r = 3) fully, nothing else.
    expected = torch.zeros((1, 16, 16), dtype=torch.uint8)
    expected[0, 2:4, 2:4] = 1
    assert targets.mask_targets.dtype == torch.uint8
    assert torch.equal(targets.mask_targets, expected)


def test_mask_target_rounds_half_up():
    # mask[6:14, 6:14]: output rows/cols 1 and 3 see one of their two taps ({5, 6} and {13, 14})
    # -> coverage 0.5 per axis; row/col 2 ({9, 10}) is fully covered. Products: 0.25 at the
    # corners -> 0, 0.5 on the edges -> rounds up to 1 (as OpenCV does), 1 at (2, 2).
    masks, boxes = square_instances((64, 64), [(6, 6, 14, 14)])
    targets = assign(masks, boxes, [0])
    expected = torch.zeros((16, 16), dtype=torch.uint8)
    expected[1:4, 2] = 1
    expected[2, 1:4] = 1
    assert torch.equal(targets.mask_targets[0], expected)


def test_scale_on_range_boundary_hits_both_levels():
    # Ranges (1, 16) and (16, 64) share 16. mask[24:40, 24:40]: scale 16 -> both levels.
    # center 31.5 (0.4922). S = 4: cell 1; half 1.6 -> cell(29.9) = 1, cell(33.1) = 2: rows and
    # cols 1..2 -> cells 5, 6, 9, 10. S = 3: 0.4922 // 0.333 = 1, cell(29.9) = cell(33.1) = 1 -> 4.
    # mask[0:17, 0:16]: scale sqrt(272) = 16.49 -> level 1 only; center (8, 7.5) -> cells 0 there
    # (half (1.7, 1.6): rows cell(6.3)..cell(9.7) = 0, cols cell(5.9)..cell(9.1) = 0).
    masks, boxes = square_instances((64, 64), [(24, 24, 40, 40), (0, 0, 17, 16)])
    targets = assign(masks, boxes, [1, 2], num_grids=(4, 3), scale_ranges=((1, 16), (16, 64)))
    assert_level(
        targets, 0, [5, 6, 9, 10], [0, 0, 0, 0], category_grid(dict.fromkeys([5, 6, 9, 10], 1), 4)
    )
    assert_level(targets, 1, [4, 0], [0, 1], category_grid({4: 1, 0: 2}, 3))


def test_sigma_large_is_clipped_to_3x3_and_small_is_not():
    # Full 64x64 mask: scale 64, center 31.5 -> cell (1, 1) at S = 4.
    masks, boxes = square_instances((64, 64), [(0, 0, 64, 64)])
    # sigma 1.0: half 32 -> cell(-0.5) = -1 -> 0 and cell(63.5) = 3: the whole grid, clipped to
    # the 3x3 around (1, 1): rows/cols 0..2.
    large = assign(masks, boxes, [4], sigma=1.0)
    cells = [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert_level(large, 0, cells, [0] * 9, category_grid(dict.fromkeys(cells, 4), 4))
    # sigma 0.2: half 6.4 -> cell(25.1) = 1, cell(37.9) = 2: rows/cols 1..2.
    small = assign(masks, boxes, [4], sigma=0.2)
    cells = [5, 6, 9, 10]
    assert_level(small, 0, cells, [0] * 4, category_grid(dict.fromkeys(cells, 4), 4))
    # sigma 0: the center cell alone.
    assert assign(masks, boxes, [4], sigma=0.0).positive_cells[0].tolist() == [5]


def test_region_clipped_at_grid_border():
    # Top-left mask[0:24, 0:24], sigma 1: center 11.5 -> cell 0, half 12: cell(-0.5) = -1 -> 0,
    # cell(23.5) = 1 -> rows/cols 0..1 -> cells 0, 1, 4, 5.
    # Bottom-right mask[40:64, 40:64], sigma 2: center 51.5 -> cell 3, half 24: cell(27.5) = 1,
    # raised to center - 1 = 2; cell(75.5) = 4, lowered to S - 1 = 3 -> rows/cols 2..3 ->
    # cells 10, 11, 14, 15.
    masks, boxes = square_instances((64, 64), [(0, 0, 24, 24)])
    targets = assign(masks, boxes, [5], sigma=1.0)
    assert_level(
        targets, 0, [0, 1, 4, 5], [0] * 4, category_grid(dict.fromkeys([0, 1, 4, 5], 5), 4)
    )
    masks, boxes = square_instances((64, 64), [(40, 40, 64, 64)])
    targets = assign(masks, boxes, [5], sigma=2.0)
    cells = [10, 11, 14, 15]
    assert_level(targets, 0, cells, [0] * 4, category_grid(dict.fromkeys(cells, 5), 4))


@pytest.mark.parametrize("reverse", [False, True])
def test_overlapping_instances_last_wins_category_and_both_pairs_listed(reverse):
    # A = mask[16:48, 16:48] class 2: center 31.5 -> cell 1, half 3.2 -> cell(28.3) = 1,
    # cell(34.7) = 2 -> cells 5, 6, 9, 10.
    # B = mask[30:50, 30:50] class 5: center 39.5 (0.617) -> cell 2, half 2 -> cell(37.5) =
    # cell(41.5) = 2 -> cell 10, shared with A.
    squares = [(16, 16, 48, 48), (30, 30, 50, 50)]
    classes = [2, 5]
    if reverse:
        squares, classes = squares[::-1], classes[::-1]
    masks, boxes = square_instances((64, 64), squares)
    targets = assign(masks, boxes, classes)
    if not reverse:
        expected = category_grid({5: 2, 6: 2, 9: 2, 10: 5}, 4)
        assert_level(targets, 0, [5, 6, 9, 10, 10], [0, 0, 0, 0, 1], expected)
    else:
        expected = category_grid({5: 2, 6: 2, 9: 2, 10: 2}, 4)
        assert_level(targets, 0, [10, 5, 6, 9, 10], [0, 1, 1, 1, 1], expected)


def test_empty_mask_is_skipped_but_keeps_its_index():
    # Instance 0 has a box but no pixels: no cell, no category; its mask target is all zero and
    # instance 1 (mask[8:16, 8:16] -> cell 0 as in the first test) keeps index 1.
    masks, boxes = square_instances((64, 64), [(20, 20, 40, 40), (8, 8, 16, 16)])
    masks[0] = False
    targets = assign(masks, boxes, [6, 1])
    assert_level(targets, 0, [0], [1], category_grid({0: 1}, 4))
    assert targets.mask_targets.shape == (2, 16, 16)
    assert targets.mask_targets[0].sum() == 0
    assert targets.mask_targets[1].sum() == 4


def test_no_instances():
    masks = torch.zeros((0, 50, 70), dtype=torch.bool)
    targets = assign(
        masks,
        torch.zeros((0, 4)),
        [],
        padded_size=(64, 96),
        num_grids=(4, 3),
        scale_ranges=((1, 32), (16, 64)),
    )
    for level, num_grid in enumerate((4, 3)):
        assert_level(targets, level, [], [], category_grid({}, num_grid))
        assert targets.positive_cells[level].dtype == torch.int64
        assert targets.positive_instances[level].dtype == torch.int64
    assert targets.mask_targets.shape == (0, 16, 24)
    assert targets.mask_targets.dtype == torch.uint8


def test_non_square_image_padded():
    # 50x70 image padded to 64x96: the grid spans 64 rows and 96 columns.
    # A = whole image, class 3: box (0, 0, 70, 50), scale sqrt(3500) = 59.2 -> level 1 only
    # (ranges (1, 48), (32, 128)). Center (24.5, 34.5); S = 3: rows 24.5 / 64 = 0.383 -> 1,
    # cols 34.5 / 96 = 0.359 -> 1. Half (5, 7): rows cell(19.5 / 64) = 0 .. cell(29.5 / 64) = 1,
    # cols cell(27.5 / 96) = 0 .. cell(41.5 / 96) = 1 -> cells 0, 1, 3, 4.
    # B = mask[10:20, 60:70], class 4: scale 10 -> level 0; center (14.5, 64.5); S = 4:
    # row 0.227 -> 0, col 0.672 -> 2; half 1: rows cell(13.5), cell(15.5) = 0, cols
    # cell(63.5 / 96 = 0.661) = cell(65.5 / 96 = 0.682) = 2 -> cell 2.
    masks, boxes = square_instances((50, 70), [(0, 0, 50, 70), (10, 60, 20, 70)])
    targets = assign(
        masks,
        boxes,
        [3, 4],
        padded_size=(64, 96),
        num_grids=(4, 3),
        scale_ranges=((1, 48), (32, 128)),
    )
    assert_level(targets, 0, [2], [1], category_grid({2: 4}, 4))
    assert_level(
        targets, 1, [0, 1, 3, 4], [0] * 4, category_grid(dict.fromkeys([0, 1, 3, 4], 3), 3)
    )
    # Mask targets: (int(50 / 4 + 0.5), int(70 / 4 + 0.5)) = (13, 18) pasted top-left into the
    # 16x24 feature; the full-image mask stays all ones there, zeros in the padding.
    assert targets.mask_targets.shape == (2, 16, 24)
    expected = torch.zeros((16, 24), dtype=torch.uint8)
    expected[:13, :18] = 1
    assert torch.equal(targets.mask_targets[0], expected)
    # B, rows 10..19 and cols 60..69. Output row r samples input row (r + 0.5) * 50 / 13 - 0.5:
    # r = 2 -> 9.12 (weight 0.12 on row 10, below 0.5), r = 3 -> 12.96, r = 4 -> 16.81 (inside),
    # r = 5 -> 20.65 (outside). Column c samples (c + 0.5) * 70 / 18 - 0.5: c = 14 -> 55.9
    # (outside), c = 15 -> 59.78 (weight 0.78 on col 60), c = 16, 17 -> 63.7, 67.6 (inside).
    expected = torch.zeros((16, 24), dtype=torch.uint8)
    expected[3:5, 15:18] = 1
    assert torch.equal(targets.mask_targets[1], expected)
    assert torch.equal(
        targets.mask_targets[1, :13, :18], torch.from_numpy(_cv2_resize(masks[1], 13, 18))
    )


def test_center_on_cell_boundary_uses_python_float_floor_division():
    # mask[30:35, 30:35] on 64x64: center exactly (32, 32), i.e. 0.5 of the grid. With S = 10,
    # 0.5 // 0.1 == 4.0 in Python (the double 0.1 is a bit above 1/10), whereas floor(0.5 * 10)
    # would give 5. sigma 10: half 25 -> cell(7) = 1 .. cell(57) = 8, clipped to the 3x3 around
    # the center cell (4, 4): rows/cols 3..5.
    assert (32 / 64) // (1 / 10) == 4.0
    masks, boxes = square_instances((64, 64), [(30, 30, 35, 35)])
    targets = assign(masks, boxes, [1], num_grids=(10,), sigma=10.0)
    assert targets.positive_cells[0].tolist() == [33, 34, 35, 43, 44, 45, 53, 54, 55]
    # With S = 4 the boundary is exact in binary: 0.5 // 0.25 == 2, so the 3x3 is rows/cols 1..3.
    targets = assign(masks, boxes, [1], num_grids=(4,), sigma=10.0)
    assert targets.positive_cells[0].tolist() == [5, 6, 7, 9, 10, 11, 13, 14, 15]


def _reference_assignment(masks, boxes, classes, padded_size, num_grids, scale_ranges, sigma):
    """Per-instance, per-cell loops with Python floats, written straight from the rules."""
    upsampled_h, upsampled_w = padded_size[0] // 4 * 4, padded_size[1] // 4 * 4
    masks_np = masks.numpy().astype(np.float64)
    levels = []
    for num_grid, (lower, upper) in zip(num_grids, scale_ranges):
        grid = [BACKGROUND] * (num_grid * num_grid)
        cells, owners = [], []
        for k in range(masks.shape[0]):
            x1, y1, x2, y2 = boxes[k].tolist()
            scale = float(torch.sqrt((boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])))
            if not (lower <= scale <= upper) or masks_np[k].sum() == 0:
                continue
            ys, xs = np.nonzero(masks_np[k])
            cy, cx = float(ys.sum()) / len(ys), float(xs.sum()) / len(xs)
            half_w = float(0.5 * (boxes[k, 2] - boxes[k, 0]) * sigma)
            half_h = float(0.5 * (boxes[k, 3] - boxes[k, 1]) * sigma)

            def cell(v, length):
                return int((v / length) // (1.0 / num_grid))

            ch, cw = cell(cy, upsampled_h), cell(cx, upsampled_w)
            top = max(0, cell(cy - half_h, upsampled_h), ch - 1)
            down = min(num_grid - 1, cell(cy + half_h, upsampled_h), ch + 1)
            left = max(0, cell(cx - half_w, upsampled_w), cw - 1)
            right = min(num_grid - 1, cell(cx + half_w, upsampled_w), cw + 1)
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    grid[i * num_grid + j] = int(classes[k])
                    cells.append(i * num_grid + j)
                    owners.append(k)
        levels.append((grid, cells, owners))
    return levels


def test_matches_loop_reference_on_random_instances():
    generator = torch.Generator().manual_seed(0)
    num_grids, scale_ranges = (12, 8, 5), ((1, 24), (16, 48), (40, 200))
    for trial in range(12):
        height, width = [int(v) for v in torch.randint(40, 130, (2,), generator=generator)]
        padded_size = ((height + 31) // 32 * 32, (width + 31) // 32 * 32)
        num_instances = int(torch.randint(0, 9, (1,), generator=generator))
        masks = torch.zeros((num_instances, height, width), dtype=torch.bool)
        boxes = torch.zeros((num_instances, 4))
        for k in range(num_instances):
            y0 = int(torch.randint(0, height - 2, (1,), generator=generator))
            x0 = int(torch.randint(0, width - 2, (1,), generator=generator))
            y1 = int(torch.randint(y0 + 1, height + 1, (1,), generator=generator))
            x1 = int(torch.randint(x0 + 1, width + 1, (1,), generator=generator))
            blob = torch.rand((y1 - y0, x1 - x0), generator=generator) < 0.6
            masks[k, y0:y1, x0:x1] = blob
            boxes[k] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        classes = torch.randint(0, NUM_CLASSES, (num_instances,), generator=generator)
        sigma = [0.2, 0.5, 1.5][trial % 3]
        targets = assign_targets_single_image(
            masks,
            boxes,
            classes,
            padded_size,
            list(num_grids),
            list(scale_ranges),
            sigma,
            NUM_CLASSES,
        )
        reference = _reference_assignment(
            masks, boxes, classes, padded_size, num_grids, scale_ranges, sigma
        )
        for level, (grid, cells, owners) in enumerate(reference):
            assert targets.category_targets[level].tolist() == grid
            assert targets.positive_cells[level].tolist() == cells
            assert targets.positive_instances[level].tolist() == owners


def _random_masks(generator, num_masks, height, width):
    """Noise, rectangles and discs: noise stresses rounding, shapes look like real masks."""

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    def uniform(scale):
        return float(torch.rand((), generator=generator)) * scale

    masks = torch.zeros((num_masks, height, width), dtype=torch.bool)
    ys = torch.arange(height)[:, None].float()
    xs = torch.arange(width)[None, :].float()
    for k in range(num_masks):
        kind = k % 3
        if kind == 0:
            masks[k] = torch.rand((height, width), generator=generator) < uniform(1.0)
        elif kind == 1:
            top, left = randint(0, height), randint(0, width)
            masks[k, top : top + randint(1, height + 1), left : left + randint(1, width + 1)] = True
        else:
            center_y, center_x, radius = (
                uniform(height),
                uniform(width),
                uniform(max(height, width)),
            )
            masks[k] = (ys - center_y) ** 2 + (xs - center_x) ** 2 < radius**2
    return masks


def test_mask_resize_matches_cv2_exactly():
    # Odd and even sizes, tiny ones included (2..5 px resize to 1 px). OpenCV resizes uint8 in
    # fixed point; the torch port replays that arithmetic, so every pixel must agree.
    generator = torch.Generator().manual_seed(1)
    sizes = [(2, 2), (3, 5), (5, 3), (7, 9), (13, 29), (50, 70), (61, 47), (99, 101), (127, 255)]
    sizes += [
        tuple(int(v) for v in torch.randint(6, 200, (2,), generator=generator)) for _ in range(25)
    ]
    compared = 0
    for height, width in sizes:
        masks = _random_masks(generator, 6, height, width)
        out_h, out_w = int(height / 4 + 0.5), int(width / 4 + 0.5)
        resized = resize_masks_like_cv2(masks, out_h, out_w)
        reference = torch.stack([torch.from_numpy(_cv2_resize(m, out_h, out_w)) for m in masks])
        assert torch.equal(resized, reference), (height, width)
        compared += reference.numel()
        if (height, width) == (2, 2):
            # 2x2 -> 1x1 is an exact 2x downscale, which OpenCV hands to INTER_AREA; with more
            # than 4 channels that path rounds 0.5 down. No real image is 2x2: skip it below.
            continue
        # OpenCV on all masks at once as channels, as the official code does (uint8 H x W x K).
        channels = _cv2_resize(masks.permute(1, 2, 0), out_h, out_w)
        channels = torch.from_numpy(channels.reshape(out_h, out_w, -1)).permute(2, 0, 1)
        assert torch.equal(resized, channels), (height, width)
    assert compared > 50_000


def test_mask_resize_matches_cv2_where_weight_rounding_matters():
    # At these sizes some interpolation weights land on a tie of the 2**11 fixed-point scale
    # (heights 259, 261) or the sample position differs between float and double (widths 251,
    # 373): rounding ties up, or computing positions in double, flips pixels of dense noise.
    generator = torch.Generator().manual_seed(3)
    for height, width in [(261, 251), (259, 373), (111, 373)]:
        masks = torch.rand((4, height, width), generator=generator) < 0.5
        out_h, out_w = int(height / 4 + 0.5), int(width / 4 + 0.5)
        reference = torch.stack([torch.from_numpy(_cv2_resize(m, out_h, out_w)) for m in masks])
        assert torch.equal(resize_masks_like_cv2(masks, out_h, out_w), reference), (height, width)


def test_mask_targets_match_cv2_through_the_assigner():
    generator = torch.Generator().manual_seed(2)
    masks = _random_masks(generator, 5, 93, 131)
    boxes = torch.tensor([[0.0, 0.0, 131.0, 93.0]]).repeat(5, 1)
    targets = assign(masks, boxes, [0] * 5, padded_size=(96, 160))
    for k in range(5):
        reference = _cv2_resize(masks[k], 23, 33)
        assert torch.equal(targets.mask_targets[k, :23, :33], torch.from_numpy(reference))
    assert targets.mask_targets[:, 23:].sum() == 0 and targets.mask_targets[:, :, 33:].sum() == 0


def test_uint8_masks_equal_bool_masks():
    masks, boxes = square_instances((64, 64), [(6, 6, 14, 14), (20, 20, 44, 44)])
    from_bool = assign(masks, boxes, [1, 2])
    from_uint8 = assign(masks.to(torch.uint8), boxes, [1, 2])
    for field_bool, field_uint8 in zip(from_bool, from_uint8):
        if isinstance(field_bool, list):
            assert all(torch.equal(a, b) for a, b in zip(field_bool, field_uint8))
        else:
            assert torch.equal(field_bool, field_uint8)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(boxes=torch.zeros((2, 4))), "same instances"),
        (dict(classes=[1, 2]), "same instances"),
        (dict(classes=[NUM_CLASSES]), r"\[0, num_classes=7\)"),
        (dict(classes=[-1]), r"\[0, num_classes=7\)"),
        (dict(padded_size=(32, 64)), "smaller than"),
        (dict(padded_size=(64, 48)), "smaller than"),
        (dict(num_grids=[4, 3]), "one entry per FPN level"),
        (dict(masks=torch.ones((64, 64), dtype=torch.bool)), r"\(K, h, w\)"),
        (dict(boxes=torch.zeros((1, 5))), r"\(K, 4\)"),
        (
            dict(padded_size=(66, 64), masks=torch.ones((1, 66, 64), dtype=torch.bool)),
            "multiple of 4",
        ),
    ],
)
def test_invalid_inputs_raise(change, message):
    masks, boxes = square_instances((64, 64), [(8, 8, 16, 16)])
    arguments = dict(
        masks=masks,
        boxes=boxes,
        classes=[1],
        padded_size=(64, 64),
        num_grids=[4],
        scale_ranges=[(1, 64)],
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        assign(**arguments)


def test_objects_outside_all_scale_ranges_go_to_the_first_or_last_level():
    """A 60x60 object with ranges topping out at 40 trains the last level; a 1x2 box (scale 1.41)
    with ranges starting at 4 trains the first level. Neither is dropped."""
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 2:62, 2:62] = True
    masks[1, 30:31, 30:32] = True
    boxes = torch.tensor([[2.0, 2.0, 62.0, 62.0], [30.0, 30.0, 32.0, 31.0]])
    classes = torch.tensor([0, 1])
    targets = assign_targets_single_image(
        masks, boxes, classes, (64, 64), [4, 2], [(4, 20), (16, 40)], 0.2, 3
    )
    assert torch.equal(targets.positive_instances[0].unique(), torch.tensor([1]))
    assert torch.equal(targets.positive_instances[1].unique(), torch.tensor([0]))
    assert (targets.category_targets[1] == 0).any()
    assert (targets.category_targets[0] == 1).any()
