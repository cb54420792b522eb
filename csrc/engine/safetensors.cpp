// A safetensors reader for the engine's model directories (no Python, no pickle; see engine.h).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <fstream>
#include <stdexcept>

#include "engine.h"
#include "json.h"

namespace costeff::engine {

c10::Dict<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK_VALUE(f.good(), "costeff engine: cannot open ", path);
  f.seekg(0, std::ios::end);
  const int64_t size = f.tellg();
  f.seekg(0);
  TORCH_CHECK_VALUE(size >= 8, "costeff engine: ", path, " is not a safetensors file (", size, " bytes)");
  uint64_t header_len = 0;
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  TORCH_CHECK_VALUE(header_len <= static_cast<uint64_t>(size - 8), "costeff engine: ", path, " has a header length past the end of the file");
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  json::Value meta;
  try {
    meta = json::parse(header);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK_VALUE(false, "costeff engine: ", path, " has a corrupt safetensors header: ", e.what());
  }
  TORCH_CHECK_VALUE(meta.kind == json::Value::Kind::kObject, "costeff engine: ", path, ": the safetensors header is not an object");
  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  c10::Dict<std::string, at::Tensor> out;
  for (const auto& [name, info] : meta.object) {
    if (name == "__metadata__") continue;
    try {
      const std::string& dtype = info.at("dtype", name).as_string(name + ".dtype");
      std::vector<int64_t> shape;
      for (const auto& d : info.at("shape", name).array) shape.push_back(d.as_int(name + ".shape"));
      const auto& offsets = info.at("data_offsets", name).array;
      if (offsets.size() != 2) throw std::runtime_error(name + ".data_offsets must hold 2 numbers");
      const int64_t begin = offsets[0].as_int(name + ".data_offsets"), end = offsets[1].as_int(name + ".data_offsets");
      at::ScalarType st;
      if (dtype == "F32") st = at::kFloat;
      else if (dtype == "F16") st = at::kHalf;
      else if (dtype == "BF16") st = at::kBFloat16;
      else if (dtype == "F64") st = at::kDouble;
      else if (dtype == "I64") st = at::kLong;
      else if (dtype == "I32") st = at::kInt;
      else if (dtype == "BOOL") st = at::kBool;
      else throw std::runtime_error(name + " has unsupported dtype " + dtype);
      int64_t numel = 1;
      for (int64_t d : shape) {
        if (d < 0) throw std::runtime_error(name + " has a negative dimension");
        numel *= d;
      }
      const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(st));
      if (begin < 0 || end - begin != nbytes || data_start + end > size)
        throw std::runtime_error(name + ": data_offsets do not match its shape and dtype or run past the end of the file");
      auto t = at::empty(shape, at::TensorOptions().dtype(st));
      f.seekg(data_start + begin);
      f.read(static_cast<char*>(t.data_ptr()), nbytes);
      if (!f.good() && nbytes > 0) throw std::runtime_error(name + ": truncated data");
      out.insert(name, t);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK_VALUE(false, "costeff engine: ", path, ": ", e.what());
    }
  }
  return out;
}
}  // namespace costeff::engine
