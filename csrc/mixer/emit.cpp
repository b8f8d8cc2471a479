#include "mixer/emit.h"

#include <algorithm>
#include <thread>
#include <vector>

namespace tellneo {
namespace mixer {
namespace {

template <typename Token>
void emit_range(const Token* tokens, const int64_t* labels_in, const int64_t* src, const int32_t* cu_seqlens,
                int64_t seg_begin, int64_t seg_end, int64_t pad_id, const EmitOutputs& out) {
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    const int64_t dst = cu_seqlens[s];
    const int64_t len = cu_seqlens[s + 1] - dst;
    int64_t* ids = out.input_ids + dst;
    int64_t* labels = out.labels + dst;
    int64_t* positions = out.position_ids + dst;
    int32_t* seq = out.seq_idx + dst;
    for (int64_t i = 0; i < len; ++i) positions[i] = i;
    std::fill(seq, seq + len, static_cast<int32_t>(s));
    if (src[s] < 0) {
      std::fill(ids, ids + len, pad_id);
      std::fill(labels, labels + len, kIgnoreIndex);
      continue;
    }
    const Token* tok = tokens + src[s];
    for (int64_t i = 0; i < len; ++i) ids[i] = static_cast<int64_t>(tok[i]);
    if (labels_in != nullptr) {
      std::copy(labels_in + src[s], labels_in + src[s] + len, labels);
    } else {
      std::copy(ids, ids + len, labels);
    }
    labels[0] = kIgnoreIndex;
  }
}

template <typename Token>
void emit_typed(const Token* tokens, const int64_t* labels_in, const int64_t* src, const int32_t* cu_seqlens,
                int64_t num_segments, int64_t pad_id, const EmitOutputs& out, int num_threads) {
  const int64_t total = num_segments > 0 ? cu_seqlens[num_segments] : 0;
  // Threads only pay off for big batches; split the segments so each thread writes about the same tokens.
  constexpr int64_t kTokensPerThread = 1 << 17;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kTokensPerThread)));
  if (threads <= 1) {
    emit_range(tokens, labels_in, src, cu_seqlens, 0, num_segments, pad_id, out);
    return;
  }
  std::vector<std::thread> pool;
  int64_t seg = 0;
  for (int t = 0; t < threads; ++t) {
    const int64_t target = total * (t + 1) / threads;
    const int64_t begin = seg;
    while (seg < num_segments && (t == threads - 1 || cu_seqlens[seg] < target)) ++seg;
    pool.emplace_back(emit_range<Token>, tokens, labels_in, src, cu_seqlens, begin, seg, pad_id, std::cref(out));
  }
  for (auto& th : pool) th.join();
}

}  // namespace

void emit_cpu(const void* tokens, int token_bytes, const int64_t* labels_in, const int64_t* src,
              const int32_t* cu_seqlens, int64_t num_segments, int64_t pad_id, const EmitOutputs& out,
              int num_threads) {
  if (token_bytes == 4) {
    emit_typed(static_cast<const int32_t*>(tokens), labels_in, src, cu_seqlens, num_segments, pad_id, out,
               num_threads);
  } else {
    emit_typed(static_cast<const int64_t*>(tokens), labels_in, src, cu_seqlens, num_segments, pad_id, out,
               num_threads);
  }
}

}  // namespace mixer
}  // namespace tellneo
