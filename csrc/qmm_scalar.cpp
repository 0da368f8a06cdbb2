// Portable code: layout conversion, dequantization, and the scalar slow twin of the kernels
// (the tests compare every vector path with it).
#include <cmath>
#include <cstring>

#include "qmm.h"

namespace metroline {

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Bytes of a quant chunk: Q8_0 has 8 chunks of 4 k values, Q4_x 4 chunks of 4 packed bytes.
static inline int n_chunks(int fmt) { return fmt == Q8_0 ? 8 : 4; }

void repack_groups(const uint8_t* raw, uint8_t* packed, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1) {
  const int64_t nb = K / QK, rb = raw_block_bytes(fmt), rec = rec_bytes(fmt);
  const int qoff = rec_qoff(fmt), nc = n_chunks(fmt), raw_q = fmt == Q4_1 ? 4 : 2;
  for (int64_t g = g0; g < g1; ++g) {
    uint8_t* dst = packed + g * nb * rec;
    std::memset(dst, 0, nb * rec);
    for (int r = 0; r < G && g * G + r < N; ++r) {
      const uint8_t* row = raw + (g * G + r) * nb * rb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* src = row + b * rb;
        uint8_t* o = dst + b * rec;
        std::memcpy(o + 2 * r, src, 2);                             // d
        if (fmt == Q4_1) std::memcpy(o + 32 + 2 * r, src + 2, 2);  // m
        for (int c = 0; c < nc; ++c) std::memcpy(o + qoff + c * 64 + r * 4, src + raw_q + 4 * c, 4);
      }
    }
  }
}

void unpack_groups(const uint8_t* packed, uint8_t* raw, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1) {
  const int64_t nb = K / QK, rb = raw_block_bytes(fmt), rec = rec_bytes(fmt);
  const int qoff = rec_qoff(fmt), nc = n_chunks(fmt), raw_q = fmt == Q4_1 ? 4 : 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* src = packed + g * nb * rec;
    for (int r = 0; r < G && g * G + r < N; ++r) {
      uint8_t* row = raw + (g * G + r) * nb * rb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* i = src + b * rec;
        uint8_t* o = row + b * rb;
        std::memcpy(o, i + 2 * r, 2);
        if (fmt == Q4_1) std::memcpy(o + 2, i + 32 + 2 * r, 2);
        for (int c = 0; c < nc; ++c) std::memcpy(o + raw_q + 4 * c, i + qoff + c * 64 + r * 4, 4);
      }
    }
  }
}

// Weight k (0..31) of row r in a packed record, as the integer the format multiplies by d:
// Q8_0 the int8, Q4_x the nibble (0..15).
static inline int packed_q(const uint8_t* rec, int fmt, int r, int k) {
  const uint8_t* q = rec + rec_qoff(fmt);
  if (fmt == Q8_0) return int8_t(q[(k / 4) * 64 + r * 4 + k % 4]);
  const int kk = k & 15;
  const uint8_t byte = q[(kk / 4) * 64 + r * 4 + kk % 4];
  return k < 16 ? (byte & 15) : (byte >> 4);
}

template <int FMT>
static void dequant_t(const uint8_t* packed, float* out, int64_t N, int64_t K, int64_t g0, int64_t g1) {
  constexpr int QB = FMT == Q8_0 ? 32 : 16, NC = QB / 4, REC = rec_bytes(FMT), QO = rec_qoff(FMT);
  const int64_t nb = K / QK;
  for (int64_t g = g0; g < g1; ++g) {
    const int rows = N - g * G < G ? int(N - g * G) : G;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = packed + (g * nb + b) * REC;
      uint8_t t[G][QB];  // the block's quants back in GGUF order, so the loops below vectorize
      for (int c = 0; c < NC; ++c)
        for (int r = 0; r < G; ++r) std::memcpy(&t[r][4 * c], p + QO + c * 64 + r * 4, 4);
      for (int r = 0; r < rows; ++r) {
        float* o = out + (g * G + r) * K + b * QK;
        const float d = fp16_to_fp32(load_u16(p + 2 * r));
        // The same operations, in the same order, as gguf.quants (-ffp-contract=off).
        if constexpr (FMT == Q8_0) {
          for (int k = 0; k < QK; ++k) o[k] = float(int8_t(t[r][k])) * d;
        } else if constexpr (FMT == Q4_0) {
          for (int j = 0; j < 16; ++j) o[j] = d * float((t[r][j] & 15) - 8);
          for (int j = 0; j < 16; ++j) o[j + 16] = d * float((t[r][j] >> 4) - 8);
        } else {
          const float m = fp16_to_fp32(load_u16(p + 32 + 2 * r));
          for (int j = 0; j < 16; ++j) o[j] = d * float(t[r][j] & 15) + m;
          for (int j = 0; j < 16; ++j) o[j + 16] = d * float(t[r][j] >> 4) + m;
        }
      }
    }
  }
}

void dequant_groups(const uint8_t* packed, float* out, int fmt, int64_t N, int64_t K,
                    int64_t g0, int64_t g1) {
  if (fmt == Q8_0) return dequant_t<Q8_0>(packed, out, N, K, g0, g1);
  if (fmt == Q4_0) return dequant_t<Q4_0>(packed, out, N, K, g0, g1);
  return dequant_t<Q4_1>(packed, out, N, K, g0, g1);
}

void quantize_x_scalar(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out) {
  const int64_t nb = K / QK;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * QK;
      float amax = 0.f;
      for (int k = 0; k < QK; ++k) amax = std::fmax(amax, std::fabs(xb[k]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      int32_t s = 0;
      int8_t* q = out.q + m * K + b * QK;
      for (int k = 0; k < QK; ++k) {
        const int v = int(std::nearbyint(xb[k] * id));  // ties to even, as torch.round
        q[k] = int8_t(v);
        s += v;
      }
      out.d[m * nb + b] = d;
      out.s[m * nb + b] = s;
      out.ds[m * nb + b] = d * float(s);
    }
  }
}

// The slow twin: the same integer sums and the same per-block float operations as the vector
// paths (fused multiply-adds included), so its output is bit-identical to theirs.
void qmm_scalar(const QArgs& a, int64_t g0, int64_t g1) {
  const int fmt = a.fmt;
  const int64_t nb = a.nb, rec = rec_bytes(fmt);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < G && g * G + r < a.N; ++r) {
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* p = a.w + (g * nb + b) * rec;
          const int8_t* xq = a.x.q + m * a.K + b * QK;
          int32_t dot = 0;
          for (int k = 0; k < QK; ++k) dot += packed_q(p, fmt, r, k) * xq[k];
          if (fmt == Q4_0) dot -= 8 * a.x.s[m * nb + b];
          const float d = fp16_to_fp32(load_u16(p + 2 * r));
          acc = std::fma(float(dot), d * a.x.d[m * nb + b], acc);
          if (fmt == Q4_1) acc = std::fma(fp16_to_fp32(load_u16(p + 32 + 2 * r)), a.x.ds[m * nb + b], acc);
        }
        a.y[m * a.N + g * G + r] = acc;
      }
    }
  }
}

}  // namespace metroline
