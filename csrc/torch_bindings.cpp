// The op schemas (TORCH_LIBRARY) and the Python module of sparse_attn._C. Nothing else: each
// device registers its implementation where it lives (cpu_ops.cpp, cuda_ops.cpp), their shared
// argument checks are in op_checks.cpp and the compute in csrc/kernels.
#include <Python.h>
#include <torch/library.h>

// Importing sparse_attn._C loads this library, and so registers the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sparse_attn, m) {
  m.def("cumulative_scores(Tensor q, Tensor k, float? scale=None, bool causal=True, "
        "Tensor? key_mask=None) -> Tensor");
  m.def("topp_select(Tensor scores, float p, Tensor? p_rows=None, Tensor? valid_mask=None, "
        "int keep_first=0, int keep_last=0, Tensor? candidate_mask=None) -> (Tensor, Tensor)");
  m.def("gather_kv(Tensor k, Tensor v, Tensor indices, Tensor counts, SymInt? capacity=None) "
        "-> (Tensor, Tensor)");
  m.def("scatter_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor indices, "
        "Tensor? counts=None) -> ()");
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor lengths, "
        "float? scale=None, bool check_lengths=True) -> Tensor");
}
