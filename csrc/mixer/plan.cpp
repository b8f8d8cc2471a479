#include "mixer/plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace tellneo {
namespace mixer {
namespace {

struct Item {
  int64_t sample;
  int64_t start;
  int64_t length;
};

std::vector<Item> make_items(const int64_t* lengths, int64_t n, int64_t seq_len, Overlong overlong) {
  std::vector<Item> items;
  items.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = lengths[i];
    if (len <= 0) {
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                                  ": every sample needs at least one token");
    }
    if (len <= seq_len) {
      items.push_back({i, 0, len});
      continue;
    }
    switch (overlong) {
      case Overlong::kError:
        throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(len) +
                                    " tokens, more than seq_len=" + std::to_string(seq_len) +
                                    " (overlong='error'; use overlong='truncate' or 'split')");
      case Overlong::kTruncate:
        items.push_back({i, 0, seq_len});
        break;
      case Overlong::kSplit:
        for (int64_t s = 0; s < len; s += seq_len) items.push_back({i, s, std::min(seq_len, len - s)});
        break;
    }
  }
  return items;
}

// Item indices of [begin, end) sorted by length, longest first; ties keep input order (counting sort).
std::vector<int64_t> sort_decreasing(const std::vector<Item>& items, int64_t begin, int64_t end,
                                     int64_t seq_len, std::vector<int64_t>& counts) {
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t i = begin; i < end; ++i) ++counts[static_cast<size_t>(seq_len - items[i].length)];
  int64_t running = 0;
  for (auto& c : counts) {
    const int64_t here = c;
    c = running;
    running += here;
  }
  std::vector<int64_t> order(static_cast<size_t>(end - begin));
  for (int64_t i = begin; i < end; ++i) order[counts[static_cast<size_t>(seq_len - items[i].length)]++] = i;
  return order;
}

// Counts of open rows per remaining capacity 0..seq_len, with "smallest capacity >= x that has a row".
class CapacityTree {
 public:
  explicit CapacityTree(int64_t max_capacity) {
    size_ = 1;
    while (size_ < max_capacity + 1) size_ <<= 1;
    tree_.assign(static_cast<size_t>(2 * size_), 0);
  }
  void add(int64_t capacity, int64_t delta) {
    for (int64_t node = capacity + size_; node >= 1; node >>= 1) tree_[node] += delta;
  }
  // Smallest capacity >= lo with a non-zero count, or -1.
  int64_t first_at_least(int64_t lo) const { return find(1, 0, size_ - 1, lo); }

 private:
  int64_t find(int64_t node, int64_t node_lo, int64_t node_hi, int64_t lo) const {
    if (node_hi < lo || tree_[node] == 0) return -1;
    if (node_lo == node_hi) return node_lo;
    const int64_t mid = (node_lo + node_hi) / 2;
    const int64_t left = find(2 * node, node_lo, mid, lo);
    return left >= 0 ? left : find(2 * node + 1, mid + 1, node_hi, lo);
  }
  int64_t size_;
  std::vector<int64_t> tree_;
};

// Max remaining capacity over rows, with "leftmost row whose remaining capacity >= x".
class LeftmostFitTree {
 public:
  explicit LeftmostFitTree(int64_t max_rows) {
    size_ = 1;
    while (size_ < std::max<int64_t>(max_rows, 1)) size_ <<= 1;
    tree_.assign(static_cast<size_t>(2 * size_), 0);
  }
  void set(int64_t row, int64_t remaining) {
    int64_t node = row + size_;
    tree_[node] = remaining;
    for (node >>= 1; node >= 1; node >>= 1) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }
  int64_t leftmost_at_least(int64_t need) const {
    if (tree_[1] < need) return -1;
    int64_t node = 1;
    while (node < size_) node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - size_;
  }

 private:
  int64_t size_;
  std::vector<int64_t> tree_;
};

void add_piece(Plan& plan, const Item& item, int64_t row, int64_t offset) {
  plan.sample.push_back(item.sample);
  plan.start.push_back(item.start);
  plan.length.push_back(item.length);
  plan.row.push_back(row);
  plan.offset.push_back(offset);
}

// Best fit decreasing in O(n log seq_len): rows are bucketed by remaining capacity; each item goes to a row with
// the smallest remaining capacity that holds it (the most recently filled such row), or opens a new row.
void pack_best_fit(const std::vector<Item>& items, int64_t begin, int64_t end, int64_t seq_len,
                   std::vector<int64_t>& counts, std::vector<int64_t>& item_row,
                   std::vector<int64_t>& item_offset, int64_t& num_rows) {
  CapacityTree tree(seq_len);
  std::vector<std::vector<int64_t>> rows_by_capacity(static_cast<size_t>(seq_len + 1));
  for (int64_t i : sort_decreasing(items, begin, end, seq_len, counts)) {
    const int64_t len = items[i].length;
    const int64_t capacity = tree.first_at_least(len);
    int64_t row;
    int64_t remaining;
    if (capacity < 0) {
      row = num_rows++;
      remaining = seq_len;
    } else {
      auto& bucket = rows_by_capacity[static_cast<size_t>(capacity)];
      row = bucket.back();
      bucket.pop_back();
      tree.add(capacity, -1);
      remaining = capacity;
    }
    item_row[i] = row;
    item_offset[i] = seq_len - remaining;
    remaining -= len;
    if (remaining > 0) {
      rows_by_capacity[static_cast<size_t>(remaining)].push_back(row);
      tree.add(remaining, 1);
    }
  }
}

// First fit decreasing in O(n log n): each item goes to the lowest-numbered open row that holds it.
void pack_first_fit(const std::vector<Item>& items, int64_t begin, int64_t end, int64_t seq_len,
                    std::vector<int64_t>& counts, std::vector<int64_t>& item_row,
                    std::vector<int64_t>& item_offset, int64_t& num_rows) {
  const int64_t first_row = num_rows;
  LeftmostFitTree tree(end - begin);
  std::vector<int64_t> remaining;
  for (int64_t i : sort_decreasing(items, begin, end, seq_len, counts)) {
    const int64_t len = items[i].length;
    int64_t local = tree.leftmost_at_least(len);
    if (local < 0) {
      local = static_cast<int64_t>(remaining.size());
      remaining.push_back(seq_len);
      ++num_rows;
    }
    item_row[i] = first_row + local;
    item_offset[i] = seq_len - remaining[local];
    remaining[local] -= len;
    tree.set(local, remaining[local]);
  }
}

void build_row_index(Plan& plan) {
  const size_t pieces = plan.row.size();
  plan.row_ptr.assign(static_cast<size_t>(plan.num_rows + 1), 0);
  for (int64_t r : plan.row) ++plan.row_ptr[static_cast<size_t>(r + 1)];
  for (size_t r = 0; r < static_cast<size_t>(plan.num_rows); ++r) plan.row_ptr[r + 1] += plan.row_ptr[r];
  std::vector<int64_t> cursor(plan.row_ptr.begin(), plan.row_ptr.end() - 1);
  plan.row_pieces.assign(pieces, 0);
  for (size_t p = 0; p < pieces; ++p) plan.row_pieces[cursor[plan.row[p]]++] = static_cast<int64_t>(p);
  for (int64_t r = 0; r < plan.num_rows; ++r) {
    auto first = plan.row_pieces.begin() + plan.row_ptr[r];
    auto last = plan.row_pieces.begin() + plan.row_ptr[r + 1];
    std::sort(first, last, [&](int64_t a, int64_t b) { return plan.offset[a] < plan.offset[b]; });
  }
}

}  // namespace

Plan make_plan(const int64_t* lengths, int64_t n, int64_t seq_len, Strategy strategy, Overlong overlong,
               int64_t window) {
  if (seq_len <= 0) throw std::invalid_argument("seq_len must be positive, got " + std::to_string(seq_len));
  if (n < 0) throw std::invalid_argument("number of samples must be >= 0");
  if (window < 0) throw std::invalid_argument("window must be >= 0 (0 = no window), got " + std::to_string(window));
  const std::vector<Item> items = make_items(lengths, n, seq_len, overlong);
  const int64_t num_items = static_cast<int64_t>(items.size());

  Plan plan;
  plan.seq_len = seq_len;
  if (strategy == Strategy::kWrap) {
    int64_t row = 0;
    int64_t fill = 0;
    for (const Item& item : items) {
      Item rest = item;
      while (rest.length > 0) {
        const int64_t take = std::min(rest.length, seq_len - fill);
        add_piece(plan, {rest.sample, rest.start, take}, row, fill);
        fill += take;
        rest.start += take;
        rest.length -= take;
        if (fill == seq_len) {
          ++row;
          fill = 0;
        }
      }
    }
    plan.num_rows = row + (fill > 0 ? 1 : 0);
  } else {
    std::vector<int64_t> item_row(static_cast<size_t>(num_items));
    std::vector<int64_t> item_offset(static_cast<size_t>(num_items));
    std::vector<int64_t> counts(static_cast<size_t>(seq_len + 1));
    const int64_t step = window > 0 ? window : std::max<int64_t>(num_items, 1);
    for (int64_t begin = 0; begin < num_items; begin += step) {
      const int64_t end = std::min(num_items, begin + step);
      if (strategy == Strategy::kBestFitDecreasing) {
        pack_best_fit(items, begin, end, seq_len, counts, item_row, item_offset, plan.num_rows);
      } else {
        pack_first_fit(items, begin, end, seq_len, counts, item_row, item_offset, plan.num_rows);
      }
    }
    for (int64_t i = 0; i < num_items; ++i) add_piece(plan, items[i], item_row[i], item_offset[i]);
  }
  for (int64_t len : plan.length) plan.num_tokens += len;
  build_row_index(plan);
  return plan;
}

}  // namespace mixer
}  // namespace tellneo
