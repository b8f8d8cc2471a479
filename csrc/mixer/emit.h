// Emit: write input_ids / labels / position_ids / seq_idx for a list of checked segments (see segments.h).
#pragma once

#include <cstdint>

namespace tellneo {
namespace mixer {

constexpr int64_t kIgnoreIndex = -100;

// The math every backend implements, per segment s and position i inside it (t = cu_seqlens[s] + i):
//   input_ids[t]    = src[s] >= 0 ? tokens[src[s] + i] : pad_id
//   labels[t]       = (src[s] >= 0 && i > 0) ? (labels_in ? labels_in[src[s] + i] : tokens[src[s] + i]) : -100
//   position_ids[t] = i
//   seq_idx[t]      = s
// so no position is trained to predict across a segment boundary, and padding is never trained.
struct EmitOutputs {
  int64_t* input_ids;
  int64_t* labels;
  int64_t* position_ids;
  int32_t* seq_idx;
};

// tokens: int32 (token_bytes == 4) or int64 (8). labels_in may be null. Segments must have been checked.
void emit_cpu(const void* tokens, int token_bytes, const int64_t* labels_in, const int64_t* src,
              const int32_t* cu_seqlens, int64_t num_segments, int64_t pad_id, const EmitOutputs& out,
              int num_threads);

#ifdef TELLNEO_WITH_CUDA
// Same math on the GPU; every pointer is device memory, stream is a cudaStream_t. Returns a CUDA error string or
// nullptr.
const char* emit_cuda(const void* tokens, int token_bytes, const int64_t* labels_in, const int64_t* src,
                      const int32_t* cu_seqlens, int64_t num_segments, int64_t pad_id, const EmitOutputs& out,
                      void* stream);
// Number of CUDA devices the runtime sees, or -1 with the error in *error when the runtime cannot start.
int cuda_device_count(const char** error);
#endif

}  // namespace mixer
}  // namespace tellneo
