// Matrix NMS needs the intersection (in pixels) of every pair of same-class masks. The official
// code gets all pairs from one float matmul of the flattened masks; here each mask is packed into
// 64-bit words row by row, and a pair costs one AND + popcount per word over the rows both masks
// occupy. The counts are integers, so the result equals the matmul's (exact in float32 below
// 2^24 pixels per mask) whatever the order of operations.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

torch::Tensor same_class_intersections(const torch::Tensor& masks, const torch::Tensor& labels) {
  TORCH_CHECK(masks.dim() == 3 && masks.scalar_type() == torch::kBool, "masks: (N, H, W) bool");
  TORCH_CHECK(masks.device().is_cpu() && masks.is_contiguous(), "masks: contiguous CPU tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == masks.size(0), "labels: (N,)");
  const int64_t num = masks.size(0), height = masks.size(1), width = masks.size(2);
  TORCH_CHECK(height * width < (int64_t(1) << 24), "masks above 2^24 pixels");
  const int64_t words = (width + 63) / 64;  // per row
  const uint8_t* pixels = reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>());
  auto labels_cpu = labels.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* label = labels_cpu.data_ptr<int64_t>();

  // Packed rows and the span [first, end) of occupied rows of every mask.
  std::vector<uint64_t> bits(num * height * words, 0);
  std::vector<int64_t> first(num, 0), end(num, 0);
  at::parallel_for(0, num, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t m = begin; m < stop; ++m) {
      int64_t lo = height, hi = 0;
      for (int64_t y = 0; y < height; ++y) {
        const uint8_t* row = pixels + (m * height + y) * width;
        uint64_t* packed = bits.data() + (m * height + y) * words;
        uint64_t any = 0;
        // 8 pixels (0/1 bytes) at a time: the top byte of v * 0x0102040810204080 holds one bit
        // per byte (in some fixed order, all a popcount of an AND needs).
        int64_t x = 0;
        for (; x + 8 <= width; x += 8) {
          uint64_t v;
          std::memcpy(&v, row + x, 8);
          packed[x >> 6] |= ((v * 0x0102040810204080ULL) >> 56) << (x & 63);
        }
        for (; x < width; ++x) packed[x >> 6] |= static_cast<uint64_t>(row[x] != 0) << (x & 63);
        for (int64_t w = 0; w < words; ++w) any |= packed[w];
        if (any) {
          lo = std::min(lo, y);
          hi = y + 1;
        }
      }
      first[m] = std::min(lo, hi);
      end[m] = hi;
    }
  });

  // Members of each class, in input order.
  std::map<int64_t, std::vector<int64_t>> classes;
  for (int64_t m = 0; m < num; ++m) classes[label[m]].push_back(m);
  std::vector<int64_t> group_of(num), position(num);
  std::vector<const std::vector<int64_t>*> groups;
  for (const auto& entry : classes) groups.push_back(&entry.second);
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t p = 0; p < groups[g]->size(); ++p) {
      group_of[(*groups[g])[p]] = static_cast<int64_t>(g);
      position[(*groups[g])[p]] = static_cast<int64_t>(p);
    }
  }

  auto inter = torch::zeros({num, num}, masks.options().dtype(torch::kFloat));
  float* out = inter.data_ptr<float>();
  // Row i holds i's intersections with the same-class masks after it (and itself); the lower
  // triangle is mirrored afterwards, so every pair is counted once.
  at::parallel_for(0, num, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const std::vector<int64_t>& members = *groups[group_of[i]];
      for (size_t p = position[i]; p < members.size(); ++p) {
        const int64_t j = members[p];
        const int64_t y0 = std::max(first[i], first[j]), y1 = std::min(end[i], end[j]);
        int64_t count = 0;
        for (int64_t y = y0; y < y1; ++y) {
          const uint64_t* a = bits.data() + (i * height + y) * words;
          const uint64_t* b = bits.data() + (j * height + y) * words;
          for (int64_t w = 0; w < words; ++w) count += __builtin_popcountll(a[w] & b[w]);
        }
        out[i * num + j] = static_cast<float>(count);
      }
    }
  });
  for (int64_t i = 0; i < num; ++i) {
    for (int64_t j = 0; j < i; ++j) out[i * num + j] = out[j * num + i];
  }
  return inter;
}
