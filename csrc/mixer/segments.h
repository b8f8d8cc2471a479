// Segments: the unit of emission. The output of one emit call is the concatenation of its segments; a segment
// copies `length` tokens of the flat token array starting at `src`, or is padding when src == -1.
#pragma once

#include <cstdint>
#include <vector>

namespace tellneo {
namespace mixer {

struct Segments {
  std::vector<int64_t> src;     // [S] start in the flat token array, -1 for padding
  std::vector<int64_t> length;  // [S]
};

// Plan arrays as produced by make_plan (see plan.h). The segments lay out `rows` one after the other, each row
// as its pieces in offset order followed by one padding segment when the row is not full. Checks that every
// index is in range and that each row's pieces tile it from offset 0; throws std::invalid_argument otherwise.
struct PlanView {
  int64_t seq_len;
  int64_t num_rows;
  int64_t num_pieces;
  const int64_t* sample;
  const int64_t* start;
  const int64_t* length;
  const int64_t* offset;
  const int64_t* row_ptr;
  const int64_t* row_pieces;
};

Segments row_segments(const PlanView& plan, const int64_t* sample_offsets, int64_t num_samples,
                      const int64_t* rows, int64_t num_selected);

// Checks src/length against a flat token array of n_tokens and writes cu_seqlens [S + 1] (int32). Returns the
// longest segment. Throws std::invalid_argument on out-of-range segments or a total that overflows int32.
int64_t check_segments(const int64_t* src, const int64_t* length, int64_t num_segments, int64_t n_tokens,
                       int32_t* cu_seqlens);

}  // namespace mixer
}  // namespace tellneo
