// Packing plan: where every piece of every sample goes in rows of seq_len tokens.
#pragma once

#include <cstdint>
#include <vector>

namespace tellneo {
namespace mixer {

enum class Strategy { kBestFitDecreasing, kFirstFitDecreasing, kWrap };
enum class Overlong { kError, kTruncate, kSplit };

// A piece is a contiguous run of one sample's tokens placed in one row. Pieces are listed in sample order
// (the pieces of a split sample are consecutive and in token order).
struct Plan {
  int64_t seq_len = 0;
  int64_t num_rows = 0;
  int64_t num_tokens = 0;           // tokens placed, after truncation
  std::vector<int64_t> sample;      // [P] source sample index
  std::vector<int64_t> start;       // [P] first token of the piece inside its sample
  std::vector<int64_t> length;      // [P]
  std::vector<int64_t> row;         // [P]
  std::vector<int64_t> offset;      // [P] position of the piece's first token inside its row
  std::vector<int64_t> row_ptr;     // [num_rows + 1] pieces of row r: row_pieces[row_ptr[r] : row_ptr[r + 1]]
  std::vector<int64_t> row_pieces;  // [P] piece indices sorted by (row, offset)
};

// lengths: [n] tokens per sample (each >= 1). window: pack consecutive windows of this many pieces
// independently (0 = one window over everything); ignored by kWrap. Throws std::invalid_argument on bad input.
Plan make_plan(const int64_t* lengths, int64_t n, int64_t seq_len, Strategy strategy, Overlong overlong,
               int64_t window);

}  // namespace mixer
}  // namespace tellneo
