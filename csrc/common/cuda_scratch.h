// Stream-ordered scratch for the CUDA entry points: every block allocated through it is freed on
// the same stream when the guard goes out of scope, on the error paths too (a throw between two
// allocations used to leak the first).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace cleandift {

// Throws std::runtime_error "<op> <what>: <cudaError name>: <message>" unless err is cudaSuccess.
inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + " " + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

class AsyncScratch {
 public:
  AsyncScratch(cudaStream_t stream, const char* op) : stream_(stream), op_(op) {}
  AsyncScratch(const AsyncScratch&) = delete;
  AsyncScratch& operator=(const AsyncScratch&) = delete;
  ~AsyncScratch() {
    for (void* p : blocks_) cudaFreeAsync(p, stream_);  // errors here resurface on the next CUDA call
  }

  template <class T>
  T* alloc(size_t count, const char* what) {
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, sizeof(T) * (count ? count : 1), stream_), op_, what);
    blocks_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t stream_;
  const char* op_;
  std::vector<void*> blocks_;
};

}  // namespace cleandift
