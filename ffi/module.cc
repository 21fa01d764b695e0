// The nanobind module jax_ds._C: hands every FFI handler to Python as a capsule, and says which
// XLA FFI API version it was compiled against (a newer one is refused by an older jaxlib).
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsQuantizeFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsFp8Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsGroupedFp8Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMaskedGroupedFp8Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsGroupedBf16Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMoeLayout);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMoePermute);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMoePermuteFp8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMoeUnpermute);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxDsMlaDecode);

#ifdef JAX_DS_MLA_TRACE
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace jax_ds::mla {
size_t TraceBytes();
cudaError_t TraceReset();
cudaError_t TraceRead(void* host);
}  // namespace jax_ds::mla
#endif

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_C, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_ds_quantize_fp8"] = Capsule(JaxDsQuantizeFp8);
    targets["jax_ds_fp8_gemm"] = Capsule(JaxDsFp8Gemm);
    targets["jax_ds_grouped_fp8_gemm"] = Capsule(JaxDsGroupedFp8Gemm);
    targets["jax_ds_masked_grouped_fp8_gemm"] = Capsule(JaxDsMaskedGroupedFp8Gemm);
    targets["jax_ds_grouped_bf16_gemm"] = Capsule(JaxDsGroupedBf16Gemm);
    targets["jax_ds_moe_layout"] = Capsule(JaxDsMoeLayout);
    targets["jax_ds_moe_permute"] = Capsule(JaxDsMoePermute);
    targets["jax_ds_moe_permute_fp8"] = Capsule(JaxDsMoePermuteFp8);
    targets["jax_ds_moe_unpermute"] = Capsule(JaxDsMoeUnpermute);
    targets["jax_ds_mla_decode"] = Capsule(JaxDsMlaDecode);
    return targets;
  });
  m.def("ffi_api_version",
        []() { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
#ifdef JAX_DS_MLA_TRACE
  // A tracing build (CMake option JAX_DS_MLA_TRACE): the MLA decode kernel's timestamps,
  // read by scripts/mla_trace.py.
  m.def("mla_trace_reset", []() {
    if (cudaError_t e = jax_ds::mla::TraceReset(); e != cudaSuccess)
      throw std::runtime_error(cudaGetErrorString(e));
  });
  m.def("mla_trace_read", []() {
    std::string buf(jax_ds::mla::TraceBytes(), '\0');
    if (cudaError_t e = jax_ds::mla::TraceRead(buf.data()); e != cudaSuccess)
      throw std::runtime_error(cudaGetErrorString(e));
    return nb::bytes(buf.data(), buf.size());
  });
#endif
}
