#pragma once
// A small JSON reader for what the engine loads without Python: a model directory's config.json and
// the header of its model.safetensors. Numbers are kept as double (and as int64 when integral);
// errors name the position in the text.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace costeff::engine::json {

struct Value {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0.0;
  bool integral = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return kind == Kind::kNull; }
  bool has(const std::string& key) const { return kind == Kind::kObject && object.count(key) > 0; }
  // Accessors that throw std::runtime_error naming `what` when the value has another type.
  const Value& at(const std::string& key, const std::string& what) const;
  int64_t as_int(const std::string& what) const;
  double as_double(const std::string& what) const;
  bool as_bool(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
};

// Parses a whole JSON document; throws std::runtime_error("... at offset N") on malformed text.
Value parse(const std::string& text);

}  // namespace costeff::engine::json
