// solov2_d2's CPU kernels, compiled by setup.py into solov2_d2._C (loaded by
// solov2_d2/modeling/native.py).
#pragma once

#include <torch/extension.h>

#include <vector>

// mask_upsample.cpp: final masks and the rows / columns they touch.
std::vector<torch::Tensor> upsample_threshold(const torch::Tensor& soft, int64_t image_h,
                                              int64_t image_w, int64_t out_h, int64_t out_w,
                                              double threshold);

// mask_intersections.cpp: pixel counts of pairwise intersections of same-class masks.
torch::Tensor same_class_intersections(const torch::Tensor& masks, const torch::Tensor& labels);
