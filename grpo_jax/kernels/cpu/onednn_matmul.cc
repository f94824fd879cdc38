// bf16 x bf16 -> f32 matmul through oneDNN, as an XLA FFI custom call on the CPU.
//
// XLA:CPU picks its own kernels for a dot; oneDNN picks the widest matrix unit the
// CPU has (AMX tiles, AVX-512 BF16), so where XLA leaves a unit idle this call
// reaches it. C[m, n] = op(A) @ op(B), op = transpose when the attribute says so:
// transposes are strides in oneDNN's memory descriptors, never copies. Primitives
// are created once per shape (creation compiles a kernel) and kept for the process.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool>;

struct Cached {
  dnnl::matmul primitive;
  dnnl::memory::desc a, b, c;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Row-major [rows, cols], or its transpose stored row-major as [cols, rows].
dnnl::memory::desc Operand(int64_t rows, int64_t cols, bool transposed,
                           dnnl::memory::data_type type) {
  dnnl::memory::dims strides = transposed ? dnnl::memory::dims{1, rows}
                                          : dnnl::memory::dims{cols, 1};
  return dnnl::memory::desc({rows, cols}, type, strides);
}

const Cached& Primitive(int64_t m, int64_t k, int64_t n, bool ta, bool tb) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Cached>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[Key{m, k, n, ta, tb}];
  if (!slot) {
    using dt = dnnl::memory::data_type;
    auto a = Operand(m, k, ta, dt::bf16);
    auto b = Operand(k, n, tb, dt::bf16);
    auto c = dnnl::memory::desc({m, n}, dt::f32, dnnl::memory::format_tag::ab);
    dnnl::matmul::primitive_desc pd(Engine(), a, b, c);
    slot.reset(new Cached{dnnl::matmul(pd), a, b, c});
  }
  return *slot;
}

ffi::Error MatmulImpl(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::ResultBuffer<ffi::F32> c, bool transpose_a,
                      bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("onednn_matmul: operands must be 2-D");
  }
  const int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int64_t kb = transpose_b ? bd[1] : bd[0], n = transpose_b ? bd[0] : bd[1];
  if (k != kb) {
    return ffi::Error::InvalidArgument("onednn_matmul: contraction sizes differ");
  }
  try {
    const Cached& p = Primitive(m, k, n, transpose_a, transpose_b);
    dnnl::engine& engine = Engine();
    dnnl::memory am(p.a, engine, a.untyped_data());
    dnnl::memory bm(p.b, engine, b.untyped_data());
    dnnl::memory cm(p.c, engine, c->untyped_data());
    dnnl::stream stream(engine);
    p.primitive.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm},
                                 {DNNL_ARG_DST, cm}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmulBf16, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
