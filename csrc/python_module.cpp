// Makes costeff._C importable as a Python module; the ops themselves register through
// TORCH_LIBRARY when the shared library is loaded. Kept apart so the CMake (libtorch) build has no
// Python dependency.
#include <Python.h>

#ifndef COSTEFF_WITH_CUDA
#define COSTEFF_WITH_CUDA 0
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "costeff C++/CUDA kernels (ops live in torch.ops.costeff)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "WITH_CUDA", COSTEFF_WITH_CUDA);
  }
  return module;
}
}
