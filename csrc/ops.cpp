// The torch-facing side: op schemas, argument checks, CPU feature detection, threading.
// Kernels live in qmm_*.cpp (no torch headers there).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "qmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace metroline {
namespace {

struct Cpu {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, vnni = false;
  bool os_avx = false, os_avx512 = false;
};

Cpu detect_cpu() {
  Cpu c;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, cx, d;
  if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
  c.fma = cx >> 12 & 1;
  c.f16c = cx >> 29 & 1;
  const bool osxsave = cx >> 27 & 1, avx = cx >> 28 & 1;
  if (osxsave && avx) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    c.os_avx = (lo & 0x6) == 0x6;            // XMM and YMM state saved by the OS
    c.os_avx512 = c.os_avx && (lo & 0xe0) == 0xe0;  // opmask, ZMM0-15 high, ZMM16-31
  }
  if (__get_cpuid_count(7, 0, &a, &b, &cx, &d)) {
    c.avx2 = b >> 5 & 1;
    c.avx512f = b >> 16 & 1;
    c.avx512dq = b >> 17 & 1;
    c.avx512bw = b >> 30 & 1;
    c.avx512vl = b >> 31 & 1;
    c.vnni = cx >> 11 & 1;
  }
#endif
  return c;
}

const Cpu& cpu() {
  static const Cpu c = detect_cpu();
  return c;
}

// The CPU is checked before built_*(): those live in the ISA's own file, compiled for it.
bool can_avx2() {
  const Cpu& c = cpu();
  return c.os_avx && c.avx2 && c.fma && c.f16c && built_avx2();
}
bool can_avx512() {
  const Cpu& c = cpu();
  return c.os_avx512 && c.avx512f && c.avx512bw && c.avx512vl && c.avx512dq && c.vnni && can_avx2() &&
         built_avx512();
}

int best_isa() { return can_avx512() ? ISA_AVX512 : can_avx2() ? ISA_AVX2 : ISA_SCALAR; }

const char* isa_name(int isa) {
  return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "scalar";
}

int resolve_isa(int64_t isa) {
  if (isa == ISA_AUTO) return best_isa();
  TORCH_CHECK(isa == ISA_SCALAR || isa == ISA_AVX2 || isa == ISA_AVX512, "metroline: unknown isa ", isa);
  TORCH_CHECK(isa == ISA_SCALAR || (isa == ISA_AVX2 ? can_avx2() : can_avx512()),
              "metroline: this CPU (or build) cannot run the ", isa_name(int(isa)), " kernels");
  return int(isa);
}

void check_fmt(int64_t fmt) {
  TORCH_CHECK(fmt_valid(int(fmt)), "metroline: unsupported weight format ", fmt,
              " (Q4_0=2, Q4_1=3, Q8_0=8, TQ2_0=35, I8_ROW=100, I4_G64=101, I4_G64_ASYM=102, I4_G128=103, "
              "I4_G128_ASYM=104)");
}

void check_packed(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K) {
  check_fmt(fmt);
  TORCH_CHECK(N > 0 && fmt_k_ok(int(fmt), K), "metroline: need N > 0 and K a positive multiple of ",
              fmt_group(int(fmt)) ? fmt_group(int(fmt)) : QK, " for fmt ", fmt, ", got N=", N, " K=", K);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "metroline: packed weights must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(packed.numel() == packed_bytes(int(fmt), N, K), "metroline: packed weights hold ",
              packed.numel(), " bytes, expected ", packed_bytes(int(fmt), N, K), " for fmt ", fmt,
              " N=", N, " K=", K);
}

// Minimum work (multiply-adds) per thread before splitting: waking the pool costs a few us.
constexpr int64_t kMinWorkPerTask = 1 << 18;

at::Tensor repack(const at::Tensor& raw, int64_t fmt) {
  check_fmt(fmt);
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2,
              "metroline.repack: raw must be a CPU uint8 tensor [N, row_bytes]");
  const int64_t N = raw.size(0), K = raw_row_k(int(fmt), raw.size(1));
  TORCH_CHECK(N > 0 && K > 0, "metroline.repack: row_bytes ", raw.size(1),
              fmt == I8_ROW ? " is not 4 + a multiple of 32 (I8_ROW rows: fp32 d | K int8)"
                            : " is not a multiple of the block size ",
              fmt == I8_ROW ? 0 : raw_block_bytes(int(fmt), 0));
  const at::Tensor r = raw.contiguous();
  at::Tensor out = at::empty({packed_bytes(int(fmt), N, K)}, raw.options());
  const uint8_t* src = r.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n_groups(N), 64, [&](int64_t g0, int64_t g1) {
    repack_groups(src, dst, int(fmt), N, K, g0, g1);
  });
  return out;
}

at::Tensor unpack(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K) {
  check_packed(packed, fmt, N, K);
  at::Tensor out = at::empty({N, raw_row_bytes(int(fmt), K)}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n_groups(N), 64, [&](int64_t g0, int64_t g1) {
    unpack_groups(src, dst, int(fmt), N, K, g0, g1);
  });
  return out;
}

at::Tensor dequant(const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K) {
  check_packed(packed, fmt, N, K);
  at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kFloat));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n_groups(N), 16, [&](int64_t g0, int64_t g1) {
    dequant_groups(src, dst, int(fmt), N, K, g0, g1);
  });
  return out;
}

// Quantized activations: one byte tensor carved into q [M*K] int8 and d, s, ds [M*nb].
struct QXTensors {
  at::Tensor storage;
  QXBuf buf;
};

QXTensors quantize_x(const float* x, int64_t M, int64_t K, int isa) {
  const int64_t nb = K / QK, qbytes = (M * K + 63) / 64 * 64;
  QXTensors t;
  t.storage = at::empty({qbytes + 12 * M * nb}, at::TensorOptions().dtype(at::kByte));
  uint8_t* p = t.storage.data_ptr<uint8_t>();
  t.buf = {reinterpret_cast<int8_t*>(p), reinterpret_cast<float*>(p + qbytes),
           reinterpret_cast<int32_t*>(p + qbytes + 4 * M * nb),
           reinterpret_cast<float*>(p + qbytes + 8 * M * nb)};
  auto fn = isa == ISA_AVX512 ? quantize_x_avx512 : isa == ISA_AVX2 ? quantize_x_avx2 : quantize_x_scalar;
  const QXBuf buf = t.buf;
  at::parallel_for(0, M, (1 << 16) / K + 1, [&](int64_t m0, int64_t m1) { fn(x, K, m0, m1, buf); });
  return t;
}

// x [..., K] float32 on CPU -> contiguous [M, K] (a view when it already is).
at::Tensor check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "metroline: x must be a float32 CPU tensor [..., K], got ", x.scalar_type(), " with ", x.dim(),
              " dims");
  TORCH_CHECK(x.size(-1) == K, "metroline: x has ", x.size(-1), " columns, weights have K=", K);
  return x.contiguous().view({-1, K});
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& packed, int64_t fmt, int64_t N, int64_t K,
                   int64_t isa) {
  check_packed(packed, fmt, N, K);
  const at::Tensor xc = check_x(x, K);
  const int use = resolve_isa(isa);
  const int64_t M = xc.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, xc.options());
  if (M == 0) return y;
  const QXTensors qx = quantize_x(xc.data_ptr<float>(), M, K, use);
  QArgs a;
  a.w = packed.data_ptr<uint8_t>();
  a.fmt = int(fmt);
  a.N = N;
  a.K = K;
  a.nb = K / QK;
  a.x = {qx.buf.q, qx.buf.d, qx.buf.s, qx.buf.ds};
  a.M = M;
  a.y = y.data_ptr<float>();
  auto fn = use == ISA_AVX512 ? qmm_avx512 : use == ISA_AVX2 ? qmm_avx2 : qmm_scalar;
  const int64_t per_group = M * K * G;
  at::parallel_for(0, n_groups(N), kMinWorkPerTask / per_group + 1,
                   [&](int64_t g0, int64_t g1) { fn(a, g0, g1); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> quantize_q8(const at::Tensor& x, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "metroline.quantize_q8: x must be [M, K] with K % 32 == 0");
  const int64_t K = x.size(1), M = x.size(0);
  const at::Tensor xc = check_x(x, K);
  const QXTensors qx = quantize_x(xc.data_ptr<float>(), M, K, resolve_isa(isa));
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / QK}, x.options());
  std::memcpy(q.data_ptr<int8_t>(), qx.buf.q, M * K);
  std::memcpy(d.data_ptr<float>(), qx.buf.d, M * (K / QK) * sizeof(float));
  return {q, d};
}

// Rows ids of a GGUF-format table (raw [V, K/32 * block bytes]) dequantized to fp32 [T, K],
// bit-identical to gguf.quants.dequantize (d*q, d*(q-8), d*q + m in fp32): the embedding
// lookup reads a few rows of the table, never the whole of it.
at::Tensor embed_rows(const at::Tensor& raw, const at::Tensor& ids, int64_t fmt) {
  const char* op = "metroline.embed_rows: ";
  TORCH_CHECK(fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1, op, "unsupported table format ", fmt,
              " (Q4_0=2, Q4_1=3, Q8_0=8)");
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(), op,
              "raw must be a contiguous CPU uint8 tensor [V, row_bytes]");
  const int64_t rb = raw_block_bytes(int(fmt), 0), V = raw.size(0), row_bytes = raw.size(1);
  TORCH_CHECK(row_bytes > 0 && row_bytes % rb == 0, op, "row_bytes ", row_bytes, " is not a multiple of ", rb);
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1, op,
              "ids must be an int64 CPU vector");
  const at::Tensor idc = ids.contiguous();
  const int64_t T = idc.size(0), nb = row_bytes / rb, K = nb * QK;
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < V, op, "token id ", id[t], " is outside the table's ", V, " rows");
  at::Tensor out = at::empty({T, K}, raw.options().dtype(at::kFloat));
  const uint8_t* base = raw.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  auto half = [](const uint8_t* p) { return fp16_to_fp32(uint16_t(p[0] | p[1] << 8)); };
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* row = base + id[t] * row_bytes;
      float* dst = y + t * K;
      for (int64_t b = 0; b < nb; ++b, row += rb, dst += QK) {
        const float d = half(row);
        if (fmt == Q8_0) {
          for (int j = 0; j < QK; ++j) dst[j] = d * float(int8_t(row[2 + j]));
        } else if (fmt == Q4_0) {
          for (int j = 0; j < 16; ++j) {
            dst[j] = d * float(int(row[2 + j] & 15) - 8);
            dst[16 + j] = d * float(int(row[2 + j] >> 4) - 8);
          }
        } else {
          const float m = half(row + 2);
          for (int j = 0; j < 16; ++j) {
            dst[j] = d * float(row[4 + j] & 15) + m;
            dst[16 + j] = d * float(row[4 + j] >> 4) + m;
          }
        }
      }
    }
  });
  return out;
}

std::string cpu_isa() { return isa_name(best_isa()); }

std::string cpu_features() {
  const Cpu& c = cpu();
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ",";
    s += name;
  };
  add(c.os_avx && c.avx2, "avx2");
  add(c.os_avx && c.fma, "fma");
  add(c.os_avx && c.f16c, "f16c");
  add(c.os_avx512 && c.avx512f, "avx512f");
  add(c.os_avx512 && c.avx512bw, "avx512bw");
  add(c.os_avx512 && c.avx512vl, "avx512vl");
  add(c.os_avx512 && c.avx512dq, "avx512dq");
  add(c.os_avx512 && c.vnni, "avx512vnni");
  return s;
}

int64_t packed_nbytes(int64_t fmt, int64_t N, int64_t K) {
  check_fmt(fmt);
  TORCH_CHECK(N > 0 && fmt_k_ok(int(fmt), K), "metroline.packed_nbytes: need N > 0 and K a positive multiple of ",
              fmt_group(int(fmt)) ? fmt_group(int(fmt)) : QK, " for fmt ", fmt, ", got N=", N, " K=", K);
  return packed_bytes(int(fmt), N, K);
}

}  // namespace

int qmm_resolve_isa(int64_t isa) { return resolve_isa(isa); }

}  // namespace metroline

TORCH_LIBRARY(metroline, m) {
  m.def("repack(Tensor raw, int fmt) -> Tensor");
  m.def("unpack(Tensor packed, int fmt, int N, int K) -> Tensor");
  m.def("dequant(Tensor packed, int fmt, int N, int K) -> Tensor");
  // x [..., K] float32 -> y [..., N]
  m.def("qmatmul(Tensor x, Tensor packed, int fmt, int N, int K, int isa=-1) -> Tensor");
  m.def("quantize_q8(Tensor x, int isa=-1) -> (Tensor, Tensor)");
  // raw GGUF rows [V, row_bytes], ids [T] -> fp32 [T, K]
  m.def("embed_rows(Tensor raw, Tensor ids, int fmt) -> Tensor");
  m.def("cpu_isa() -> str", &metroline::cpu_isa);
  m.def("cpu_features() -> str", &metroline::cpu_features);
  m.def("packed_nbytes(int fmt, int N, int K) -> int", &metroline::packed_nbytes);
}

TORCH_LIBRARY_IMPL(metroline, CPU, m) {
  m.impl("repack", &metroline::repack);
  m.impl("unpack", &metroline::unpack);
  m.impl("dequant", &metroline::dequant);
  m.impl("qmatmul", &metroline::qmatmul);
  m.impl("quantize_q8", &metroline::quantize_q8);
  m.impl("embed_rows", &metroline::embed_rows);
}
