// The Python module `sala_sglang._C`. Importing it runs the static registrations of every kernel
// file, so the ops appear as torch.ops.sala_sglang.*; the module itself exposes nothing.
// Each kernel file declares its own ops with TORCH_LIBRARY_FRAGMENT(sala_sglang, m) and binds the
// CUDA implementation with TORCH_LIBRARY_IMPL(sala_sglang, CUDA, m).

#include <Python.h>
#include <torch/library.h>

// The namespace is owned here, once; the ops are declared next to their kernels.
TORCH_LIBRARY(sala_sglang, m) {}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
