// Float32 matmul for XLA:CPU through Intel MKL's sgemm, as an XLA FFI handler (lmjax/models/cpu_matmul.py).
//
// Why: on the bench's shapes XLA:CPU's own matmuls (YNNPACK for [M, K] x [K, N], Eigen for the weight
// gradients, whose left operand is contracted over its major axis) reach ~80-85% of the rate MKL's
// sgemm reaches on one core, and the weight gradients less (experiments/bench/README.md, fourteenth
// round). The training step's matmuls are most of its time, so that gap is most of lmjax's gap to a
// PyTorch peer, which runs MKL.
//
// C[m, n] = op(A) op(B), row-major, op transposing where asked: the forward x W, the input gradient
// dy W^T and the weight gradient x^T dy, each without a transposed copy of an operand. MKL runs
// sequentially (linked against mkl_sequential: no OpenMP pool competing with XLA's threads for the
// cores); the output is cut into as many slabs as XLA's intra-op pool has threads, and each slab is
// one sgemm on a pool thread.

#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lmjax::ParallelFor;

extern "C" {
// MKL's CBLAS, LP64 interface (libmkl_intel_lp64).
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("lmjax matmul: operands and result must be 2-D");
  const int64_t m = cd[0], n = cd[1];
  const int64_t k = trans_a ? ad[0] : ad[1];
  if ((trans_a ? ad[1] : ad[0]) != m || (trans_b ? bd[1] : bd[0]) != k || (trans_b ? bd[0] : bd[1]) != n)
    return ffi::Error::InvalidArgument("lmjax matmul: operand shapes do not match the result");
  const int64_t lda = ad[1], ldb = bd[1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  if (k == 0) {
    std::fill(C, C + m * n, 0.0f);
    return ffi::Error::Success();
  }
  // Slabs along the longer side of C: each slab packs its share of one operand and all of the other,
  // so cutting the longer side repacks the smaller operand. Slab edges on 16-float (one AVX-512
  // vector) boundaries; at least 64 rows or columns per slab, so small products stay one call.
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), extent / 64));
  const int64_t ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  ParallelFor(pool, slabs, [&](int64_t i) {
    const int64_t lo = (extent * i / slabs) / 16 * 16;
    const int64_t hi = i + 1 == slabs ? extent : (extent * (i + 1) / slabs) / 16 * 16;
    if (hi <= lo) return;
    if (by_rows) {  // rows lo..hi of C: rows of op(A)
      const float* a_rows = trans_a ? A + lo : A + lo * lda;
      cblas_sgemm(kRowMajor, ta, tb, hi - lo, n, k, 1.0f, a_rows, lda, B, ldb, 0.0f, C + lo * n, n);
    } else {  // columns lo..hi of C: columns of op(B)
      const float* b_cols = trans_b ? B + lo * ldb : B + lo;
      cblas_sgemm(kRowMajor, ta, tb, m, hi - lo, k, 1.0f, A, lda, b_cols, ldb, 0.0f, C + lo, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
