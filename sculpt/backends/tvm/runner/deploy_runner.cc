// sculpt deploy runner: loads a sculpt/TVM artifact (a shared library holding a Relax VM
// executable), feeds it inputs read from .npy files, writes its outputs as .npy files and reports
// the median latency of N runs. Built by sculpt for the host and for aarch64
// (sculpt.backends.tvm.runner); it needs only the TVM runtime (libtvm_runtime, libtvm_ffi).
//
//   sculpt_deploy_runner ARTIFACT.so [--input FILE.npy]... [--output-dir DIR] [--runs N] [--warmup N]
//                        [--thread-policy shared|dedicated|stealing]
//
// Inputs are passed to `main` in the order given. On success the last line of stdout is one JSON
// object: {"outputs": [...paths...], "median_ms": ..., "runs": N, "times_ms": [...]}.
// "thread_pool" says whose pool ran its parallel loops ("sculpt" or "tvm").
// On failure one line "deploy_runner: error: ..." goes to stderr and the exit status is nonzero.

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

extern "C" int sculpt_pool_install_library(const char* path);  // work_pool.cc

namespace {

struct HostAllocator {
  void AllocData(DLTensor* tensor) {
    size_t bytes = ffi::GetDataSize(*tensor);
    // 64-byte alignment, as the TVM runtime expects for its own CPU tensors
    void* ptr = nullptr;
    if (posix_memalign(&ptr, 64, bytes == 0 ? 64 : bytes) != 0) throw std::runtime_error("out of memory");
    tensor->data = ptr;
  }
  void FreeData(DLTensor* tensor) { free(tensor->data); }
};

struct NpyType {
  const char* descr;  // numpy dtype string without the byte-order mark
  DLDataType dl;
};

const NpyType kNpyTypes[] = {
    {"f4", {kDLFloat, 32, 1}}, {"f8", {kDLFloat, 64, 1}}, {"f2", {kDLFloat, 16, 1}},
    {"i1", {kDLInt, 8, 1}},    {"i2", {kDLInt, 16, 1}},   {"i4", {kDLInt, 32, 1}},
    {"i8", {kDLInt, 64, 1}},   {"u1", {kDLUInt, 8, 1}},   {"u2", {kDLUInt, 16, 1}},
    {"u4", {kDLUInt, 32, 1}},  {"u8", {kDLUInt, 64, 1}},  {"b1", {kDLBool, 8, 1}},
};

std::string DescrOf(DLDataType t) {
  for (const auto& n : kNpyTypes) {
    if (n.dl.code == t.code && n.dl.bits == t.bits && n.dl.lanes == t.lanes) return n.descr;
  }
  throw std::runtime_error("output of an unsupported dtype (code " + std::to_string(t.code) + ", bits " +
                           std::to_string(t.bits) + ")");
}

// The value of `key` in a numpy header dict ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }").
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  at = header.find(':', at);
  size_t begin = header.find_first_not_of(' ', at + 1);
  size_t end;
  if (header[begin] == '(') {
    end = header.find(')', begin) + 1;
  } else if (header[begin] == '\'') {
    end = header.find('\'', begin + 1) + 1;
  } else {
    end = header.find_first_of(",}", begin);
  }
  return header.substr(begin, end - begin);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) throw std::runtime_error(path + ": truncated .npy header");

  std::string descr = HeaderField(header, "descr", path);
  descr = descr.substr(1, descr.size() - 2);
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|')) {
    throw std::runtime_error(path + ": dtype '" + descr + "' is not little-endian numeric");
  }
  const NpyType* type = nullptr;
  for (const auto& n : kNpyTypes) {
    if (descr.substr(1) == n.descr) type = &n;
  }
  if (!type) throw std::runtime_error(path + ": unsupported dtype '" + descr + "'");
  if (HeaderField(header, "fortran_order", path) != "False") {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  std::string dims = HeaderField(header, "shape", path);
  std::vector<int64_t> shape;
  std::stringstream ss(dims.substr(1, dims.size() - 2));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    shape.push_back(std::stoll(item));
  }
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(HostAllocator(), ffi::ShapeView(shape.data(), shape.size()),
                                                type->dl, cpu);
  size_t bytes = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  in.read(static_cast<char*>(tensor.data_ptr()), bytes);
  if (static_cast<size_t>(in.gcount()) != bytes) throw std::runtime_error(path + ": truncated data");
  return tensor;
}

void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->device.device_type != kDLCPU) throw std::runtime_error("output is not on the CPU");
  std::string shape = "(";
  for (int i = 0; i < t->ndim; ++i) shape += std::to_string(t->shape[i]) + (t->ndim == 1 ? "," : (i + 1 < t->ndim ? ", " : ""));
  shape += ")";
  std::string descr = DescrOf(t->dtype);
  std::string header = "{'descr': '" + std::string(descr == "b1" || descr[1] == '1' ? "|" : "<") + descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw std::runtime_error(path + ": cannot write");
    out.write("\x93NUMPY\x01\x00", 8);
    uint16_t len = static_cast<uint16_t>(header.size());
    char lb[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    out.write(lb, 2);
    out.write(header.data(), header.size());
    // outputs are compact row-major tensors; byte_offset is honoured
    const char* data = static_cast<const char*>(t->data) + t->byte_offset;
    out.write(data, ffi::GetDataSize(*t));
    if (!out) throw std::runtime_error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": rename failed");
}

void CollectTensors(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
    return;
  }
  if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) CollectTensors(item, out);
    return;
  }
  throw std::runtime_error("the model returned a value that is neither a tensor nor a tuple (type " +
                           std::string(value.GetTypeKey()) + ")");
}

ffi::Function Require(const ffi::Module& mod, const char* name) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name, true);
  if (!f.has_value()) throw std::runtime_error(std::string("the artifact has no function '") + name + "'");
  return *f;
}

struct Options {
  std::string artifact;
  std::vector<std::string> inputs;
  std::string output_dir;
  int runs = 1;
  int warmup = 0;
  std::string thread_policy;  // "", "shared", "dedicated" or "stealing"
};

int ParseCount(const std::string& flag, const char* value, int minimum) {
  char* end = nullptr;
  long v = std::strtol(value, &end, 10);
  if (*end != '\0' || v < minimum || v > 1000000) {
    throw std::runtime_error(flag + " takes an integer >= " + std::to_string(minimum) + ", got '" + value + "'");
  }
  return static_cast<int>(v);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") {
      o.inputs.push_back(next());
    } else if (a == "--output-dir") {
      o.output_dir = next();
    } else if (a == "--runs") {
      o.runs = ParseCount(a, next(), 1);
    } else if (a == "--warmup") {
      o.warmup = ParseCount(a, next(), 0);
    } else if (a == "--thread-policy") {
      o.thread_policy = next();
      if (o.thread_policy != "shared" && o.thread_policy != "dedicated" && o.thread_policy != "stealing") {
        throw std::runtime_error("--thread-policy must be shared, dedicated or stealing, got " + o.thread_policy);
      }
    } else if (!a.empty() && a[0] == '-') {
      throw std::runtime_error("unknown option " + a);
    } else if (o.artifact.empty()) {
      o.artifact = a;
    } else {
      throw std::runtime_error("more than one artifact given: " + o.artifact + ", " + a);
    }
  }
  if (o.artifact.empty()) {
    throw std::runtime_error(
        "usage: sculpt_deploy_runner ARTIFACT.so [--input FILE.npy]... [--output-dir DIR] [--runs N] [--warmup N] "
        "[--thread-policy shared|dedicated|stealing]");
  }
  return o;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// The CPU thread pool. "stealing" (the default): the artifact's parallel loops run on sculpt's pool
// (work_pool.cc): a thread runs its own chunks of a loop, then the unstarted chunks of a late one.
// "shared": TVM's pool, workers not pinned to cores and not spinning, so that a core busy with
// another process does not stall the model. "dedicated": TVM's own pinned, spinning pool. TVM's pool
// reads its variables once, at its first parallel call. Without --thread-policy the policy comes from
// SCULPT_THREAD_POOL (stealing, or tvm: TVM's pool as its variables say, shared if unset), and
// variables the caller set win.
std::string ApplyThreadPolicy(const Options& o) {
  const char* pool = getenv("SCULPT_THREAD_POOL");
  std::string policy = !o.thread_policy.empty()                      ? o.thread_policy
                       : pool != nullptr && std::string(pool) == "tvm" ? "shared"
                                                                      : "stealing";
  const bool dedicated = policy == "dedicated";
  const int overwrite = o.thread_policy.empty() ? 0 : 1;
  setenv("TVM_BIND_THREADS", dedicated ? "1" : "0", overwrite);
  setenv("TVM_THREAD_POOL_SPIN_COUNT", dedicated ? "300000" : "0", overwrite);
  return policy;
}

// Points the loaded artifact's parallel loops at sculpt's pool; false (TVM's pool kept) when the
// artifact has no parallel loops or loops with a barrier inside.
bool InstallWorkPool(const std::string& artifact) {
  int status = sculpt_pool_install_library(artifact.c_str());
  if (status < 0) throw std::runtime_error(artifact + ": not loaded, cannot install the thread pool");
  return status == 1;
}

int Run(const Options& o) {
  const std::string policy = ApplyThreadPolicy(o);
  std::vector<ffi::Tensor> inputs;
  for (const auto& path : o.inputs) inputs.push_back(ReadNpy(path));

  ffi::Module lib = ffi::Module::LoadFromFile(o.artifact);
  const bool on_work_pool = policy == "stealing" && InstallWorkPool(o.artifact);
  ffi::Module vm = Require(lib, "vm_load_executable")().cast<ffi::Module>();
  // one CPU device (DLPack type 1, id 0) with the pooled allocator (2), as relax.VirtualMachine does
  Require(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = Require(vm, "main");

  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  for (int i = 0; i < o.warmup; ++i) main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  std::vector<double> times;
  for (int i = 0; i < o.runs; ++i) {
    auto start = std::chrono::steady_clock::now();
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    auto stop = std::chrono::steady_clock::now();
    times.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  std::vector<ffi::Tensor> outputs;
  CollectTensors(result, &outputs);

  std::vector<std::string> written;
  if (!o.output_dir.empty()) {
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::string path = o.output_dir + "/output_" + std::to_string(i) + ".npy";
      WriteNpy(path, outputs[i]);
      written.push_back(path);
    }
  }
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);

  std::ostringstream json;
  json.precision(6);
  json << std::fixed << "{\"outputs\": [";
  for (size_t i = 0; i < written.size(); ++i) json << (i ? ", " : "") << JsonString(written[i]);
  json << "], \"thread_pool\": " << (on_work_pool ? "\"sculpt\"" : "\"tvm\"") << ", \"num_outputs\": " << outputs.size() << ", \"median_ms\": " << median << ", \"runs\": " << n
       << ", \"times_ms\": [";
  for (size_t i = 0; i < times.size(); ++i) json << (i ? ", " : "") << times[i];
  json << "]}";
  std::cout << json.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    std::cerr << "deploy_runner: error: " << msg << std::endl;
    return 1;
  }
}
