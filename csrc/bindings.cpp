// pybind11 module tellneo._C. No torch headers: arrays arrive as NumPy buffers (CPU) or raw device pointers plus
// a CUDA stream handle (GPU). Every argument is checked here, with its name in the error, before any loop runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mixer/emit.h"
#include "tellneo_build_info.h"
#include "mixer/plan.h"
#include "mixer/segments.h"

namespace py = pybind11;
using namespace tellneo::mixer;

namespace {

// A 1-D, C-contiguous array of the given dtype, or a TypeError/ValueError that names the argument.
template <typename T>
py::array_t<T> checked(const py::handle& obj, const char* name, bool writeable = false, int64_t size = -1) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a NumPy array");
  }
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + "-D");
  if (!(arr.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be contiguous");
  if (writeable && !arr.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  if (size >= 0 && arr.shape(0) != size) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(size) + " elements, got " +
                          std::to_string(arr.shape(0)));
  }
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

// Hands a vector to NumPy without copying it.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& values) {
  auto* owned = new std::vector<int64_t>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, {sizeof(int64_t)}, owned->data(),
                              free_when_done);
}

Strategy parse_strategy(const std::string& s) {
  if (s == "bfd") return Strategy::kBestFitDecreasing;
  if (s == "ffd") return Strategy::kFirstFitDecreasing;
  if (s == "wrap") return Strategy::kWrap;
  throw py::value_error("strategy must be 'bfd', 'ffd' or 'wrap', got '" + s + "'");
}

Overlong parse_overlong(const std::string& s) {
  if (s == "error") return Overlong::kError;
  if (s == "truncate") return Overlong::kTruncate;
  if (s == "split") return Overlong::kSplit;
  throw py::value_error("overlong must be 'error', 'truncate' or 'split', got '" + s + "'");
}

py::dict py_plan(const py::handle& lengths_obj, int64_t seq_len, const std::string& strategy,
              const std::string& overlong, int64_t window) {
  auto lengths = checked<int64_t>(lengths_obj, "lengths");
  const Strategy strat = parse_strategy(strategy);
  const Overlong over = parse_overlong(overlong);
  Plan p;
  {
    py::gil_scoped_release release;
    p = make_plan(lengths.data(), lengths.shape(0), seq_len, strat, over, window);
  }
  py::dict out;
  out["num_rows"] = p.num_rows;
  out["num_tokens"] = p.num_tokens;
  out["sample"] = to_numpy(std::move(p.sample));
  out["start"] = to_numpy(std::move(p.start));
  out["length"] = to_numpy(std::move(p.length));
  out["row"] = to_numpy(std::move(p.row));
  out["offset"] = to_numpy(std::move(p.offset));
  out["row_ptr"] = to_numpy(std::move(p.row_ptr));
  out["row_pieces"] = to_numpy(std::move(p.row_pieces));
  return out;
}

py::tuple py_row_segments(int64_t seq_len, const py::handle& sample, const py::handle& start, const py::handle& length,
                       const py::handle& offset, const py::handle& row_ptr, const py::handle& row_pieces,
                       const py::handle& sample_offsets, const py::handle& rows) {
  auto sample_a = checked<int64_t>(sample, "plan.sample");
  const int64_t pieces = sample_a.shape(0);
  auto start_a = checked<int64_t>(start, "plan.start", false, pieces);
  auto length_a = checked<int64_t>(length, "plan.length", false, pieces);
  auto offset_a = checked<int64_t>(offset, "plan.offset", false, pieces);
  auto row_ptr_a = checked<int64_t>(row_ptr, "plan.row_ptr");
  auto row_pieces_a = checked<int64_t>(row_pieces, "plan.row_pieces", false, pieces);
  auto offsets_a = checked<int64_t>(sample_offsets, "sample_offsets");
  auto rows_a = checked<int64_t>(rows, "rows");
  if (row_ptr_a.shape(0) < 1) throw py::value_error("plan.row_ptr must have num_rows + 1 >= 1 elements");
  if (offsets_a.shape(0) < 1) throw py::value_error("sample_offsets must have num_samples + 1 >= 1 elements");
  const int64_t num_rows = row_ptr_a.shape(0) - 1;
  const int64_t* rp = row_ptr_a.data();
  if (rp[0] != 0 || rp[num_rows] != pieces) throw py::value_error("plan.row_ptr does not index plan.row_pieces");
  for (int64_t r = 0; r < num_rows; ++r) {
    if (rp[r + 1] < rp[r]) throw py::value_error("plan.row_ptr must be non-decreasing");
  }
  PlanView view{seq_len,        num_rows,        pieces,        sample_a.data(), start_a.data(),
                length_a.data(), offset_a.data(), rp,            row_pieces_a.data()};
  Segments seg;
  {
    py::gil_scoped_release release;
    seg = tellneo::mixer::row_segments(view, offsets_a.data(), offsets_a.shape(0) - 1, rows_a.data(),
                                       rows_a.shape(0));
  }
  return py::make_tuple(to_numpy(std::move(seg.src)), to_numpy(std::move(seg.length)));
}

py::tuple py_check_segments(const py::handle& src, const py::handle& length, int64_t n_tokens) {
  auto src_a = checked<int64_t>(src, "src");
  auto length_a = checked<int64_t>(length, "length", false, src_a.shape(0));
  const int64_t n = src_a.shape(0);
  py::array_t<int32_t> cu(n + 1);
  int64_t longest;
  {
    py::gil_scoped_release release;
    longest = tellneo::mixer::check_segments(src_a.data(), length_a.data(), n, n_tokens, cu.mutable_data());
  }
  return py::make_tuple(cu, longest);
}

void py_emit(const py::handle& tokens, const py::object& labels_in, const py::handle& src, const py::handle& cu_seqlens,
          int64_t pad_id, const py::handle& input_ids, const py::handle& labels, const py::handle& position_ids,
          const py::handle& seq_idx, int num_threads) {
  py::array tok = py::reinterpret_borrow<py::array>(tokens);
  int token_bytes;
  const void* tok_ptr;
  int64_t n_tokens;
  if (py::isinstance<py::array_t<int32_t>>(tokens) && tok.dtype().is(py::dtype::of<int32_t>())) {
    auto t = checked<int32_t>(tokens, "tokens");
    token_bytes = 4, tok_ptr = t.data(), n_tokens = t.shape(0);
  } else {
    auto t = checked<int64_t>(tokens, "tokens");
    token_bytes = 8, tok_ptr = t.data(), n_tokens = t.shape(0);
  }
  const int64_t* labels_ptr = nullptr;
  py::array_t<int64_t> labels_arr;
  if (!labels_in.is_none()) {
    labels_arr = checked<int64_t>(labels_in, "labels_in", false, n_tokens);
    labels_ptr = labels_arr.data();
  }
  auto src_a = checked<int64_t>(src, "src");
  const int64_t n = src_a.shape(0);
  auto cu = checked<int32_t>(cu_seqlens, "cu_seqlens", false, n + 1);
  const int64_t total = cu.data()[n];
  auto ids = checked<int64_t>(input_ids, "input_ids", true, total);
  auto lab = checked<int64_t>(labels, "labels", true, total);
  auto pos = checked<int64_t>(position_ids, "position_ids", true, total);
  auto seq = checked<int32_t>(seq_idx, "seq_idx", true, total);
  // Re-derive the bounds from cu_seqlens: emit must never write or read outside the arrays it was given.
  for (int64_t s = 0; s < n; ++s) {
    const int64_t len = static_cast<int64_t>(cu.data()[s + 1]) - cu.data()[s];
    const int64_t from = src_a.data()[s];
    if (len <= 0 || from < -1 || (from >= 0 && from + len > n_tokens)) {
      throw py::value_error("segment " + std::to_string(s) + " is out of range; call check_segments first");
    }
  }
  if (n > 0 && cu.data()[0] != 0) throw py::value_error("cu_seqlens[0] must be 0");
  EmitOutputs out{ids.mutable_data(), lab.mutable_data(), pos.mutable_data(), seq.mutable_data()};
  py::gil_scoped_release release;
  emit_cpu(tok_ptr, token_bytes, labels_ptr, src_a.data(), cu.data(), n, pad_id, out, num_threads);
}

py::dict py_build_info() {
  py::dict info;
  info["version"] = TELLNEO_VERSION;
  info["build_type"] = TELLNEO_BUILD_TYPE;
  info["cxx_compiler"] = TELLNEO_CXX_COMPILER;
  info["cxx_standard"] = 17;
#ifdef TELLNEO_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = TELLNEO_CUDA_ARCHS;
  info["cuda_compiler"] = TELLNEO_CUDA_COMPILER;
  return info;
}

#ifdef TELLNEO_WITH_CUDA
py::tuple py_cuda_device_count() {
  const char* error = nullptr;
  const int count = tellneo::mixer::cuda_device_count(&error);
  return py::make_tuple(count, error ? py::str(error) : py::str(""));
}

void py_emit_cuda(uintptr_t tokens, int token_bytes, uintptr_t labels_in, uintptr_t src, uintptr_t cu_seqlens,
               int64_t num_segments, int64_t pad_id, uintptr_t input_ids, uintptr_t labels, uintptr_t position_ids,
               uintptr_t seq_idx, uintptr_t stream) {
  if (token_bytes != 4 && token_bytes != 8) throw py::value_error("token_bytes must be 4 (int32) or 8 (int64)");
  if (num_segments < 0) throw py::value_error("num_segments must be >= 0");
  const std::pair<uintptr_t, const char*> required[] = {{tokens, "tokens"},       {src, "src"},
                                                        {cu_seqlens, "cu_seqlens"}, {input_ids, "input_ids"},
                                                        {labels, "labels"},       {position_ids, "position_ids"},
                                                        {seq_idx, "seq_idx"}};
  for (const auto& [ptr, name] : required) {
    if (ptr == 0 && num_segments > 0) throw py::value_error(std::string(name) + " is a null device pointer");
  }
  EmitOutputs out{reinterpret_cast<int64_t*>(input_ids), reinterpret_cast<int64_t*>(labels),
                  reinterpret_cast<int64_t*>(position_ids), reinterpret_cast<int32_t*>(seq_idx)};
  const char* err = tellneo::mixer::emit_cuda(reinterpret_cast<const void*>(tokens), token_bytes,
                                              reinterpret_cast<const int64_t*>(labels_in),
                                              reinterpret_cast<const int64_t*>(src),
                                              reinterpret_cast<const int32_t*>(cu_seqlens), num_segments, pad_id,
                                              out, reinterpret_cast<void*>(stream));
  if (err) throw std::runtime_error(std::string("tellneo CUDA emit failed: ") + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tellneo native extension: the packed-sequence mixer (plan, segments, emit on CPU and CUDA)";
  m.def("build_info", &py_build_info, "Compiler, build type and whether CUDA sources were compiled in.");
  m.def("plan", &py_plan, py::arg("lengths"), py::arg("seq_len"), py::arg("strategy"), py::arg("overlong"),
        py::arg("window"), "Pack samples of the given lengths into rows of seq_len tokens.");
  m.def("row_segments", &py_row_segments, py::arg("seq_len"), py::arg("sample"), py::arg("start"), py::arg("length"),
        py::arg("offset"), py::arg("row_ptr"), py::arg("row_pieces"), py::arg("sample_offsets"), py::arg("rows"),
        "Segments (src, length) that lay out the selected plan rows one after the other, padding included.");
  m.def("check_segments", &py_check_segments, py::arg("src"), py::arg("length"), py::arg("n_tokens"),
        "Bounds-check segments; returns (cu_seqlens int32 [S+1], longest segment).");
  m.def("emit", &py_emit, py::arg("tokens"), py::arg("labels_in"), py::arg("src"), py::arg("cu_seqlens"),
        py::arg("pad_id"), py::arg("input_ids"), py::arg("labels"), py::arg("position_ids"), py::arg("seq_idx"),
        py::arg("num_threads") = 1, "Write the packed outputs for checked segments into preallocated arrays.");
#ifdef TELLNEO_WITH_CUDA
  m.def("cuda_device_count", &py_cuda_device_count, "(count, error): count is -1 when the CUDA runtime cannot start.");
  m.def("emit_cuda", &py_emit_cuda, py::arg("tokens"), py::arg("token_bytes"), py::arg("labels_in"), py::arg("src"),
        py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("pad_id"), py::arg("input_ids"), py::arg("labels"),
        py::arg("position_ids"), py::arg("seq_idx"), py::arg("stream"),
        "emit on device pointers, asynchronously on the given CUDA stream.");
#endif
}
