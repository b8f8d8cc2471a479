// CUDA emit: the same math as emit_cpu (see mixer/emit.h), bit for bit. One thread block per segment (grid-stride
// over segments), threads stride over the segment's tokens. Segments were checked on the host before upload.
#include <cuda_runtime.h>

#include <cstdint>

#include "mixer/emit.h"

namespace tellneo {
namespace mixer {
namespace {

template <typename Token>
__global__ void emit_kernel(const Token* __restrict__ tokens, const int64_t* __restrict__ labels_in,
                            const int64_t* __restrict__ src, const int32_t* __restrict__ cu_seqlens,
                            int64_t num_segments, int64_t pad_id, int64_t* __restrict__ input_ids,
                            int64_t* __restrict__ labels, int64_t* __restrict__ position_ids,
                            int32_t* __restrict__ seq_idx) {
  for (int64_t s = blockIdx.x; s < num_segments; s += gridDim.x) {
    const int64_t dst = cu_seqlens[s];
    const int64_t len = cu_seqlens[s + 1] - dst;
    const int64_t from = src[s];
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const int64_t t = dst + i;
      int64_t id = pad_id;
      int64_t label = kIgnoreIndex;
      if (from >= 0) {
        id = static_cast<int64_t>(tokens[from + i]);
        if (i > 0) label = labels_in != nullptr ? labels_in[from + i] : id;
      }
      input_ids[t] = id;
      labels[t] = label;
      position_ids[t] = i;
      seq_idx[t] = static_cast<int32_t>(s);
    }
  }
}

}  // namespace

const char* emit_cuda(const void* tokens, int token_bytes, const int64_t* labels_in, const int64_t* src,
                      const int32_t* cu_seqlens, int64_t num_segments, int64_t pad_id, const EmitOutputs& out,
                      void* stream) {
  if (num_segments == 0) return nullptr;
  const int threads = 256;
  const int64_t max_blocks = 65535;
  const unsigned blocks = static_cast<unsigned>(num_segments < max_blocks ? num_segments : max_blocks);
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (token_bytes == 4) {
    emit_kernel<int32_t><<<blocks, threads, 0, cuda_stream>>>(
        static_cast<const int32_t*>(tokens), labels_in, src, cu_seqlens, num_segments, pad_id, out.input_ids,
        out.labels, out.position_ids, out.seq_idx);
  } else {
    emit_kernel<int64_t><<<blocks, threads, 0, cuda_stream>>>(
        static_cast<const int64_t*>(tokens), labels_in, src, cu_seqlens, num_segments, pad_id, out.input_ids,
        out.labels, out.position_ids, out.seq_idx);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cuda_device_count(const char** error) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *error = cudaGetErrorString(err);
    return -1;
  }
  *error = nullptr;
  return count;
}

}  // namespace mixer
}  // namespace tellneo
