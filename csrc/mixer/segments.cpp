#include "mixer/segments.h"

#include <limits>
#include <stdexcept>
#include <string>

namespace tellneo {
namespace mixer {

Segments row_segments(const PlanView& plan, const int64_t* sample_offsets, int64_t num_samples,
                      const int64_t* rows, int64_t num_selected) {
  Segments out;
  out.src.reserve(static_cast<size_t>(num_selected) * 4);
  out.length.reserve(static_cast<size_t>(num_selected) * 4);
  for (int64_t k = 0; k < num_selected; ++k) {
    const int64_t r = rows[k];
    if (r < 0 || r >= plan.num_rows) {
      throw std::invalid_argument("rows[" + std::to_string(k) + "] = " + std::to_string(r) +
                                  " is out of range for a plan with " + std::to_string(plan.num_rows) + " rows");
    }
    int64_t fill = 0;
    for (int64_t j = plan.row_ptr[r]; j < plan.row_ptr[r + 1]; ++j) {
      const int64_t p = plan.row_pieces[j];
      if (p < 0 || p >= plan.num_pieces) throw std::invalid_argument("plan.row_pieces holds an invalid piece index");
      const int64_t s = plan.sample[p];
      if (s < 0 || s >= num_samples) {
        throw std::invalid_argument("plan refers to sample " + std::to_string(s) + " but the token store holds " +
                                    std::to_string(num_samples) + " samples");
      }
      const int64_t len = plan.length[p];
      if (plan.offset[p] != fill || len <= 0 || plan.start[p] < 0 ||
          plan.start[p] + len > sample_offsets[s + 1] - sample_offsets[s]) {
        throw std::invalid_argument("plan piece " + std::to_string(p) + " (sample " + std::to_string(s) +
                                    ") does not fit its sample or does not tile row " + std::to_string(r) +
                                    "; was the plan made for this token store?");
      }
      out.src.push_back(sample_offsets[s] + plan.start[p]);
      out.length.push_back(len);
      fill += len;
    }
    if (fill > plan.seq_len) throw std::invalid_argument("row " + std::to_string(r) + " overflows seq_len");
    if (fill < plan.seq_len) {
      out.src.push_back(-1);
      out.length.push_back(plan.seq_len - fill);
    }
  }
  return out;
}

int64_t check_segments(const int64_t* src, const int64_t* length, int64_t num_segments, int64_t n_tokens,
                       int32_t* cu_seqlens) {
  int64_t total = 0;
  int64_t longest = 0;
  cu_seqlens[0] = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t len = length[s];
    if (len <= 0) throw std::invalid_argument("segment " + std::to_string(s) + " has length " + std::to_string(len));
    if (src[s] < -1 || (src[s] >= 0 && src[s] + len > n_tokens)) {
      throw std::invalid_argument("segment " + std::to_string(s) + " [" + std::to_string(src[s]) + ", +" +
                                  std::to_string(len) + ") is outside the token array of " +
                                  std::to_string(n_tokens) + " tokens");
    }
    total += len;
    if (total > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("one emitted batch must hold fewer than 2^31 tokens (cu_seqlens is int32)");
    }
    cu_seqlens[s + 1] = static_cast<int32_t>(total);
    if (len > longest) longest = len;
  }
  return longest;
}

}  // namespace mixer
}  // namespace tellneo
