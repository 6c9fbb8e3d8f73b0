// Operator definitions of fgattn's CUDA backend (library "fgattn_cuda"); the CUDA implementations
// are registered in fgattn_cuda_kernels.cu, the fake and autograd ones in
// fgattn/ops/cuda_backend.py. Loaded with torch.ops.load_library (JIT build) or imported as the
// Python module fgattn._cuda_ext (install-time build), hence the empty module init below.
#include <Python.h>
#include <torch/library.h>

#include "schema.h"

extern "C" {
// An importable, empty module: importing it loads the library and runs the registrations.
PyObject* PyInit__cuda_ext(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_ext", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fgattn_cuda, m) { fgattn::define_ops(m); }
