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

// Where weight k (0..31) of row r sits in a 32-block's packed quants: byte and bit shift.
static inline int qpos(int bits, int r, int k, int& shift) {
  if (bits == 8) {
    shift = 0;
    return (k / 4) * 64 + r * 4 + k % 4;
  }
  if (bits == 4) {
    const int kk = k & 15;
    shift = k < 16 ? 0 : 4;
    return (kk / 4) * 64 + r * 4 + kk % 4;
  }
  shift = 2 * ((k % 16) / 4);
  return (k / 16) * 64 + r * 4 + k % 4;
}

// A raw block's scale offsets (d, and m for the asymmetric formats) and where weight k of
// the block is: byte offset, bit shift, code mask.
static inline int raw_d_off(int fmt) { return fmt == TQ2_0 ? 64 : 0; }
static inline int raw_q_off(int fmt) { return fmt == TQ2_0 ? 0 : fmt == I8_ROW ? 4 : fmt_asym(fmt) ? 4 : 2; }
static inline int raw_pos(int fmt, int64_t k, int& shift) {
  const int bits = fmt_bits(fmt);
  if (bits == 8) {
    shift = 0;
    return raw_q_off(fmt) + int(k);
  }
  if (bits == 4) {  // per 32-block 16 bytes, low nibble k, high nibble k + 16
    const int kk = int(k % 32);
    shift = kk < 16 ? 0 : 4;
    return raw_q_off(fmt) + int(k / 32) * 16 + (kk & 15);
  }
  shift = 2 * int((k % 128) / 32);  // TQ2_0: byte 32*(k/128) + k%32, bits 2*((k%128)/32)
  return int(k / 128) * 32 + int(k % 32);
}

// Formats without a GGUF byte layout to copy: code by code (exact; load time only).
static void repack_generic(const uint8_t* raw, uint8_t* packed, int fmt, int64_t N, int64_t K,
                           int64_t g0, int64_t g1) {
  const int64_t rw = raw_block_weights(fmt, K), rb = raw_block_bytes(fmt, K), rec = rec_bytes(fmt, K);
  const int64_t nrec = K / rw, qb = block_qbytes(fmt), qo = rec_qoff(fmt);
  const int bits = fmt_bits(fmt), mask = (1 << bits) - 1, sd = fmt == I8_ROW ? 4 : 2;
  for (int64_t g = g0; g < g1; ++g) {
    uint8_t* dst = packed + g * nrec * rec;
    std::memset(dst, 0, nrec * rec);
    for (int r = 0; r < G && g * G + r < N; ++r) {
      const uint8_t* row = raw + (g * G + r) * nrec * rb;
      for (int64_t t = 0; t < nrec; ++t) {
        const uint8_t* src = row + t * rb;
        uint8_t* o = dst + t * rec;
        std::memcpy(o + sd * r, src + raw_d_off(fmt), sd);
        if (fmt_asym(fmt)) std::memcpy(o + 32 + 2 * r, src + 2, 2);
        if (bits != 2) {  // int8 / nibble bytes are already in chunk order: 4 at a time
          const int nc = bits == 8 ? 8 : 4, bb = bits == 8 ? 32 : 16;
          for (int64_t b = 0; b < rw / QK; ++b)
            for (int c = 0; c < nc; ++c)
              std::memcpy(o + qo + b * qb + c * 64 + r * 4, src + raw_q_off(fmt) + b * bb + 4 * c, 4);
          continue;
        }
        for (int64_t k = 0; k < rw; ++k) {
          int si, so;
          const int code = (src[raw_pos(fmt, k, si)] >> si) & mask;
          const int byte = qpos(bits, r, int(k % QK), so);
          o[qo + (k / QK) * qb + byte] |= uint8_t(code << so);
        }
      }
    }
  }
}

static void unpack_generic(const uint8_t* packed, uint8_t* raw, int fmt, int64_t N, int64_t K,
                           int64_t g0, int64_t g1) {
  const int64_t rw = raw_block_weights(fmt, K), rb = raw_block_bytes(fmt, K), rec = rec_bytes(fmt, K);
  const int64_t nrec = K / rw, qb = block_qbytes(fmt), qo = rec_qoff(fmt);
  const int bits = fmt_bits(fmt), mask = (1 << bits) - 1, sd = fmt == I8_ROW ? 4 : 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* src = packed + g * nrec * rec;
    for (int r = 0; r < G && g * G + r < N; ++r) {
      uint8_t* row = raw + (g * G + r) * nrec * rb;
      std::memset(row, 0, nrec * rb);
      for (int64_t t = 0; t < nrec; ++t) {
        const uint8_t* i = src + t * rec;
        uint8_t* o = row + t * rb;
        std::memcpy(o + raw_d_off(fmt), i + sd * r, sd);
        if (fmt_asym(fmt)) std::memcpy(o + 2, i + 32 + 2 * r, 2);
        if (bits != 2) {
          const int nc = bits == 8 ? 8 : 4, bb = bits == 8 ? 32 : 16;
          for (int64_t b = 0; b < rw / QK; ++b)
            for (int c = 0; c < nc; ++c)
              std::memcpy(o + raw_q_off(fmt) + b * bb + 4 * c, i + qo + b * qb + c * 64 + r * 4, 4);
          continue;
        }
        for (int64_t k = 0; k < rw; ++k) {
          int si, so;
          const int byte = qpos(bits, r, int(k % QK), si);
          const int code = (i[qo + (k / QK) * qb + byte] >> si) & mask;
          o[raw_pos(fmt, k, so)] |= uint8_t(code << so);
        }
      }
    }
  }
}

static bool gguf_bytes(int fmt) { return fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1; }

void repack_groups(const uint8_t* raw, uint8_t* packed, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1) {
  if (!gguf_bytes(fmt)) return repack_generic(raw, packed, fmt, N, K, g0, g1);
  const int64_t nb = K / QK, rb = raw_block_bytes(fmt, K), rec = rec_bytes(fmt, K);
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
  if (!gguf_bytes(fmt)) return unpack_generic(packed, raw, fmt, N, K, g0, g1);
  const int64_t nb = K / QK, rb = raw_block_bytes(fmt, K), rec = rec_bytes(fmt, K);
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

// Weight k (0..31) of row r in a 32-block's packed quants, as the integer the format
// multiplies by d: the int8 of the 8-bit formats, else the unsigned code (nibble, 2-bit).
static inline int packed_q(const uint8_t* q, int fmt, int r, int k) {
  const int bits = fmt_bits(fmt);
  int shift;
  const uint8_t byte = q[qpos(bits, r, k, shift)];
  if (bits == 8) return int8_t(byte);
  return (byte >> shift) & ((1 << bits) - 1);
}

template <int FMT>
static void dequant_t(const uint8_t* packed, float* out, int64_t N, int64_t K, int64_t g0, int64_t g1) {
  constexpr int QB = FMT == Q8_0 ? 32 : 16, NC = QB / 4, REC = FMT == Q8_0 ? 544 : FMT == Q4_1 ? 320 : 288;
  constexpr int QO = rec_qoff(FMT);
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

// The other formats: value by value, the same fp32 operations as the numpy reference
// (metroline.quant.formats): d*q (8-bit), d*(q - z), d*q + m.
static void dequant_generic(const uint8_t* packed, float* out, int fmt, int64_t N, int64_t K,
                            int64_t g0, int64_t g1) {
  const int64_t bpr = rec_blocks(fmt, K), rec = rec_bytes(fmt, K), nrec = K / QK / bpr;
  const int64_t qb = block_qbytes(fmt), qo = rec_qoff(fmt);
  const int z = fmt_zero(fmt), bits = fmt_bits(fmt);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < G && g * G + r < N; ++r) {
      float* o = out + (g * G + r) * K;
      for (int64_t t = 0; t < nrec; ++t) {
        const uint8_t* p = packed + (g * nrec + t) * rec;
        float d;
        if (fmt == I8_ROW) std::memcpy(&d, p + 4 * r, 4);
        else d = fp16_to_fp32(load_u16(p + 2 * r));
        const float m = fmt_asym(fmt) ? fp16_to_fp32(load_u16(p + 32 + 2 * r)) : 0.f;
        for (int64_t b = 0; b < bpr; ++b, o += QK) {
          const uint8_t* q = p + qo + b * qb;
          for (int k = 0; k < QK; ++k) {
            const int v = packed_q(q, fmt, r, k);
            if (bits == 8) o[k] = float(v) * d;
            else if (fmt_asym(fmt)) o[k] = d * float(v) + m;
            else o[k] = d * float(v - z);
          }
        }
      }
    }
  }
}

void dequant_groups(const uint8_t* packed, float* out, int fmt, int64_t N, int64_t K,
                    int64_t g0, int64_t g1) {
  if (fmt == Q8_0) return dequant_t<Q8_0>(packed, out, N, K, g0, g1);
  if (fmt == Q4_0) return dequant_t<Q4_0>(packed, out, N, K, g0, g1);
  if (fmt == Q4_1) return dequant_t<Q4_1>(packed, out, N, K, g0, g1);
  return dequant_generic(packed, out, fmt, N, K, g0, g1);
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
  const int fmt = a.fmt, z = fmt_zero(fmt);
  const bool row_scale = fmt == I8_ROW, asym = fmt_asym(fmt);
  const int64_t nb = a.nb, bpr = rec_blocks(fmt, a.K), rec = rec_bytes(fmt, a.K), nrec = nb / bpr;
  const int64_t qb = block_qbytes(fmt), qo = rec_qoff(fmt);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < G && g * G + r < a.N; ++r) {
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* p = a.w + (g * nrec + b / bpr) * rec;
          const uint8_t* q = p + qo + (b % bpr) * qb;
          const int8_t* xq = a.x.q + m * a.K + b * QK;
          const int64_t i = m * nb + b;
          int32_t dot = 0;
          for (int k = 0; k < QK; ++k) dot += packed_q(q, fmt, r, k) * xq[k];
          dot -= z * a.x.s[i];
          if (row_scale) {
            acc = std::fma(float(dot), a.x.d[i], acc);
            continue;
          }
          const float d = fp16_to_fp32(load_u16(p + 2 * r));
          acc = std::fma(float(dot), d * a.x.d[i], acc);
          if (asym) acc = std::fma(fp16_to_fp32(load_u16(p + 32 + 2 * r)), a.x.ds[i], acc);
        }
        if (row_scale) {
          float d;
          std::memcpy(&d, a.w + g * rec + 4 * r, 4);
          acc = acc * d;
        }
        a.y[m * a.N + g * G + r] = acc;
      }
    }
  }
}

}  // namespace metroline
