#include <string>

#include "ops.h"

// setup.py defines SOLOV2_D2_TORCH_VERSION as the torch the extension is compiled against;
// native.py refuses the module under any other torch (the C++ ABI is not stable across them).
#ifndef SOLOV2_D2_TORCH_VERSION
#error "SOLOV2_D2_TORCH_VERSION must be defined (setup.py does)"
#endif

#define SOLOV2_D2_STRING(x) #x
#define SOLOV2_D2_EXPANDED_STRING(x) SOLOV2_D2_STRING(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("torch_version", [] { return std::string(SOLOV2_D2_EXPANDED_STRING(SOLOV2_D2_TORCH_VERSION)); },
             "the torch version this extension was compiled against");
  module.def("upsample_threshold", &upsample_threshold,
             "x4 bilinear upsampling, crop, bilinear resize and threshold of soft masks");
  module.def("same_class_intersections", &same_class_intersections,
             "pairwise intersections (pixel counts) of same-class binary masks");
}
