// Final SOLOv2 masks on the CPU: soft masks at mask-feature resolution -> x4 bilinear upsampling
// to the padded input -> crop to the image -> bilinear resize to the output size -> threshold,
// plus the rows and columns each mask touches (for its tight box), in one pass per mask.
//
// It computes the definition of solov2_d2/modeling/mask_upsample.py, whose PyTorch ops it must
// reproduce bit for bit: per axis, equal sizes are the identity; otherwise, in double,
// src = max((d + 0.5) * (in / out) - 0.5, 0), i0 = min(floor(src), in - 1),
// i1 = min(i0 + 1, in - 1), l1 = src - i0, and the float weights are w1 = (float)l1,
// w0 = (float)(1 - l1); a value is a * w0 + b * w1 in float (two rounded products, one rounded
// sum). A 2-D resize is the width step, then the height step.
//
// Build flags (setup.py): -ffp-contract=off, so that the compiler fuses no multiply-add.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

struct Axis {
  bool identity = false;
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

Axis linear_axis(int64_t in, int64_t out) {
  Axis axis;
  axis.identity = in == out;
  axis.i0.resize(out);
  axis.i1.resize(out);
  axis.w0.resize(out);
  axis.w1.resize(out);
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  for (int64_t d = 0; d < out; ++d) {
    double src = (static_cast<double>(d) + 0.5) * scale - 0.5;
    if (src < 0.0) src = 0.0;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const double l1 = src - static_cast<double>(i0);
    axis.i0[d] = axis.identity ? d : i0;
    axis.i1[d] = axis.identity ? d : std::min(i0 + 1, in - 1);
    axis.w1[d] = static_cast<float>(l1);
    axis.w0[d] = static_cast<float>(1.0 - l1);
  }
  return axis;
}

// dst[x] = src[i0[x]] * w0[x] + src[i1[x]] * w1[x]: the step along a row.
inline void along_row(const float* src, const Axis& axis, float* dst, int64_t n) {
  if (axis.identity) {
    std::copy(src, src + n, dst);
    return;
  }
  for (int64_t x = 0; x < n; ++x) {
    const float a = src[axis.i0[x]] * axis.w0[x];
    const float b = src[axis.i1[x]] * axis.w1[x];
    dst[x] = a + b;
  }
}

// dst[x] = t0[x] * w0 + t1[x] * w1: the step between two rows.
inline void between_rows(const float* t0, const float* t1, float w0, float w1, float* dst,
                         int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const float a = t0[x] * w0;
    const float b = t1[x] * w1;
    dst[x] = a + b;
  }
}

}  // namespace

// soft: (k, hf, wf) float32, contiguous. Returns (masks (k, out_h, out_w) bool,
// rows_any (k, out_h) bool, cols_any (k, out_w) bool).
std::vector<torch::Tensor> upsample_threshold(const torch::Tensor& soft, int64_t image_h,
                                              int64_t image_w, int64_t out_h, int64_t out_w,
                                              double threshold) {
  TORCH_CHECK(soft.dim() == 3, "soft masks must be (k, H, W)");
  TORCH_CHECK(soft.scalar_type() == torch::kFloat, "soft masks must be float32");
  TORCH_CHECK(soft.device().is_cpu() && soft.is_contiguous(), "soft masks: contiguous CPU");
  const int64_t num = soft.size(0), feat_h = soft.size(1), feat_w = soft.size(2);
  TORCH_CHECK(image_h >= 1 && image_h <= 4 * feat_h && image_w >= 1 && image_w <= 4 * feat_w,
              "image size must lie inside the padded input (4x the soft masks)");
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "output size must be positive");
  const auto bools = soft.options().dtype(torch::kBool);
  auto masks = torch::empty({num, out_h, out_w}, bools);
  auto rows_any = torch::empty({num, out_h}, bools);
  auto cols_any = torch::zeros({num, out_w}, bools);
  if (num == 0) return {masks, rows_any, cols_any};

  // x4 step (to the padded input; only its first image_h rows / image_w columns are used).
  const Axis up_y = linear_axis(feat_h, 4 * feat_h), up_x = linear_axis(feat_w, 4 * feat_w);
  const bool resize = out_h != image_h || out_w != image_w;
  const Axis rs_y = linear_axis(image_h, out_h), rs_x = linear_axis(image_w, out_w);
  const float t = static_cast<float>(threshold);
  const float* soft_data = soft.data_ptr<float>();
  uint8_t* mask_data = reinterpret_cast<uint8_t*>(masks.data_ptr<bool>());
  uint8_t* rows_data = reinterpret_cast<uint8_t*>(rows_any.data_ptr<bool>());
  uint8_t* cols_data = reinterpret_cast<uint8_t*>(cols_any.data_ptr<bool>());

  // One mask per task: a task writes only its own mask, rows and columns.
  at::parallel_for(0, num, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> across(feat_h * image_w);  // x4 step along every source row
    std::vector<float> padded_row(image_w), slot_a(out_w), slot_b(out_w), values(out_w);
    for (int64_t m = begin; m < end; ++m) {
      const float* source = soft_data + m * feat_h * feat_w;
      for (int64_t r = 0; r < feat_h; ++r) {
        along_row(source + r * feat_w, up_x, across.data() + r * image_w, image_w);
      }
      // Row y of the cropped x4 image, resized along the row (the resize step's t0 / t1).
      auto resized_row = [&](int64_t y, float* dst) {
        between_rows(across.data() + up_y.i0[y] * image_w, across.data() + up_y.i1[y] * image_w,
                     up_y.w0[y], up_y.w1[y], padded_row.data(), image_w);
        along_row(padded_row.data(), rs_x, dst, out_w);
      };
      int64_t row_a = -1, row_b = -1;  // the resize step reads rows in non-decreasing order
      uint8_t* cols = cols_data + m * out_w;
      for (int64_t y = 0; y < out_h; ++y) {
        if (!resize) {
          between_rows(across.data() + up_y.i0[y] * image_w,
                       across.data() + up_y.i1[y] * image_w, up_y.w0[y], up_y.w1[y],
                       values.data(), out_w);
        } else {
          const int64_t need_a = rs_y.i0[y], need_b = rs_y.i1[y];
          if (need_a != row_a) {
            if (need_a == row_b) {
              std::swap(slot_a, slot_b);
              std::swap(row_a, row_b);
            } else {
              resized_row(need_a, slot_a.data());
              row_a = need_a;
            }
          }
          if (need_b != row_b) {
            if (need_b == row_a) {
              slot_b = slot_a;
            } else {
              resized_row(need_b, slot_b.data());
            }
            row_b = need_b;
          }
          between_rows(slot_a.data(), slot_b.data(), rs_y.w0[y], rs_y.w1[y], values.data(),
                       out_w);
        }
        uint8_t* row = mask_data + (m * out_h + y) * out_w;
        uint8_t any = 0;
        for (int64_t x = 0; x < out_w; ++x) {
          const uint8_t inside = values[x] > t;
          row[x] = inside;
          cols[x] |= inside;
          any |= inside;
        }
        rows_data[m * out_h + y] = any;
      }
    }
  });
  return {masks, rows_any, cols_any};
}
