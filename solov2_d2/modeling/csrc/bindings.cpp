#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("upsample_threshold", &upsample_threshold,
             "x4 bilinear upsampling, crop, bilinear resize and threshold of soft masks");
  module.def("same_class_intersections", &same_class_intersections,
             "pairwise intersections (pixel counts) of same-class binary masks");
}
