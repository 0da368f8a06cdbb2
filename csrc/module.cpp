// Makes the library importable as metroline._C; importing it runs the TORCH_LIBRARY
// registrations in ops.cpp. No pybind11: the ops are reached through torch.ops.metroline.
#include <Python.h>

static struct PyModuleDef metroline_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&metroline_c_module); }
