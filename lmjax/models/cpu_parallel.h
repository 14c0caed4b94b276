// Work split over XLA's intra-op thread pool, shared by the native CPU kernels (attention_cpu.cc,
// matmul_cpu.cc). Header-only; cpu_kernels.build keys its cache on this file too.
#ifndef LMJAX_MODELS_CPU_PARALLEL_H_
#define LMJAX_MODELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace lmjax {

// Runs body(item) for item in [0, n) on the calling thread and XLA's intra-op pool. Helpers that start
// after the caller has finished find the work closed and return without touching `body`, so the
// caller never waits on a task that has not started (two kernels blocking each other's pool threads).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const Body& body) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> active{0};
    std::atomic<bool> closed{false};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [&body, n](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < n;) body(i);
  };
  const void* body_ptr = &run;  // valid until `closed` is set and no helper is active
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([shared, body_ptr]() {
      shared->active.fetch_add(1);
      if (!shared->closed.load()) (*static_cast<const decltype(run)*>(body_ptr))(*shared);
      shared->active.fetch_sub(1);
    });
  run(*shared);
  shared->closed.store(true);
  while (shared->active.load() != 0) std::this_thread::yield();
}

}  // namespace lmjax

#endif  // LMJAX_MODELS_CPU_PARALLEL_H_
