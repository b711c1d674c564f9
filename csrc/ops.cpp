// Every ordercomp op schema, declared once. Device kernels register in csrc/cpu and csrc/cuda;
// fake kernels and autograd are registered from Python (ordercomp/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace ordercomp {

// How this library was built, as a JSON object (read by ordercomp.backend_info()).
std::string build_info() {
  std::string info = "{";
#ifdef ORDERCOMP_WITH_CUDA
  info += "\"cuda\": true, ";
#else
  info += "\"cuda\": false, ";
#endif
#ifdef _OPENMP
  info += "\"openmp\": true, ";
#else
  info += "\"openmp\": false, ";
#endif
  info += "\"compiler\": \"" + std::string(__VERSION__) + "\"}";
  return info;
}

TORCH_LIBRARY(ordercomp, m) {
  // Activation fake-quant: returns (out, region); region is int8, -1 below / 0 inside / +1 above the clip range.
  m.def("fake_quant_act(Tensor x, Tensor alpha, int bits, bool signed) -> (Tensor, Tensor)");
  // Straight-through backward: (grad_x, grad_alpha) from the incoming gradient and the region.
  m.def("fake_quant_act_backward(Tensor grad, Tensor region, bool signed) -> (Tensor, Tensor)");
  // DoReFa weight quantizer and its straight-through backward.
  m.def("quantize_weight(Tensor w, int bits) -> Tensor");
  m.def("quantize_weight_backward(Tensor grad, Tensor w, int bits) -> Tensor");
  // Early-exit decision: logits [B, C] -> (confidence [B], prediction [B] int64, exit_mask [B] bool).
  m.def("exit_check(Tensor logits, float threshold, str criterion) -> (Tensor, Tensor, Tensor)");
  // counter[i] += bitops where active_mask[i], in place.
  m.def("accumulate_bitops(Tensor(a!) counter, Tensor active_mask, float bitops) -> ()");
  m.def("build_info() -> str", &build_info);
}

}  // namespace ordercomp

// Importing ordercomp._C loads this library, which registers the ops above with torch.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
