// Packed quantized weights and the matmul kernels over them: plain C++, no torch headers, so
// the per-ISA translation units compile in seconds. ops.cpp is the only torch-facing file.
//
// Packed layout (decided once, at load, by repack): output rows are taken in groups of
// G = 16; a group's K/32 blocks follow one another, and each (group, block) record is
//
//   d[16] fp16 | (Q4_1 only) m[16] fp16 | quants
//
// with the quants stored "4 k values of 16 rows" at a time: byte c*64 + r*4 + j holds, for
// row r of the group,
//   Q8_0 (c = 0..7): the int8 weight k = 4c + j
//   Q4_0/Q4_1 (c = 0..3): low nibble k = 4c + j, high nibble k = 16 + 4c + j
//                         (exactly GGUF's byte 4c + j of that row's block).
// One 32-bit lane of a vector then holds 4 consecutive k of one row, so a byte dot product
// against 4 broadcast activation bytes (maddubs+madd on AVX2, dpbusd with VNNI) yields one
// int32 per output row: 8 rows per ymm, 16 per zmm, no horizontal sums in the hot loop.
// A group's weights are one sequential stream (the prefetchers like that); rows past N in
// the last group are zero (scale 0) and never stored.
#pragma once

#include <cstddef>
#include <cstdint>

namespace metroline {

// Formats. GGUF's own blocks keep their GGML type numbers, so the Python side can pass
// gguf.GGMLQuantizationType values directly (Q4_0, Q4_1, Q8_0, TQ2_0); metroline's own formats,
// which no GGUF type holds, are numbered from 100 on, outside GGML's numbering.
//
//   fmt  name           weights                          scale(s)                    bits/weight
//   2    Q4_0           d*(q-8), q 0..15                 fp16 d per 32               4.5
//   3    Q4_1           d*q + m, q 0..15                 fp16 d, m per 32            5.0
//   8    Q8_0           d*q, q int8                      fp16 d per 32               8.5
//   35   TQ2_0          d*(q-1), q 0..2 (ternary)        fp16 d per 256              2.0625
//   100  I8_ROW         d*q, q int8                      fp32 d per output row       8 + 32/K
//   101  I4_G64         d*(q-8), q 0..15                 fp16 d per 64               4.25
//   102  I4_G64_ASYM    d*q + m, q 0..15                 fp16 d, m per 64            4.5
//   103  I4_G128        d*(q-8)                          fp16 d per 128              4.125
//   104  I4_G128_ASYM   d*q + m                          fp16 d, m per 128           4.25
//
// The quants of every format are laid out per 32-block of 16 rows as above ("4 k values of 16
// rows" per 64-byte chunk): 8-bit formats in 8 chunks (byte c*64 + r*4 + j = weight k = 4c+j),
// 4-bit ones in 4 (low nibble k = 4c+j, high nibble k = 16+4c+j), TQ2_0 in 2 chunks of 2-bit
// codes (bits 2l..2l+1 of byte c*64 + r*4 + j = weight k = 16c + 4l + j). A record covers one
// scale group along K (1, 2, 4 or 8 32-blocks; for I8_ROW the whole row):
//
//   d[16] (fp16; I8_ROW: fp32) | m[16] fp16 (asymmetric formats) | the group's 32-blocks' quants
//
// so a scale is loaded once per record and used for all its 32-blocks. Raw (row-major,
// unpacked) rows: GGUF's blocks for the GGUF formats; I4_* one block per group, d fp16 |
// (m fp16) | per 32-block 16 bytes as Q4_0's (byte j: low nibble k = j, high k = 16+j);
// I8_ROW: d fp32 | K int8.
enum Fmt : int {
  Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, TQ2_0 = 35,
  I8_ROW = 100, I4_G64 = 101, I4_G64_ASYM = 102, I4_G128 = 103, I4_G128_ASYM = 104
};
enum Isa : int { ISA_AUTO = -1, ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

constexpr int QK = 32;  // weights per block (along K)
constexpr int G = 16;   // output rows per packed group

constexpr bool fmt_valid(int fmt) {
  return fmt == Q4_0 || fmt == Q4_1 || fmt == Q8_0 || fmt == TQ2_0 || (fmt >= I8_ROW && fmt <= I4_G128_ASYM);
}
// Bits per quant: 8, 4 or 2.
constexpr int fmt_bits(int fmt) { return fmt == Q8_0 || fmt == I8_ROW ? 8 : fmt == TQ2_0 ? 2 : 4; }
constexpr bool fmt_asym(int fmt) { return fmt == Q4_1 || fmt == I4_G64_ASYM || fmt == I4_G128_ASYM; }
// Weights per scale along K (0: the whole row, I8_ROW).
constexpr int fmt_group(int fmt) {
  return fmt == I8_ROW ? 0 : fmt == TQ2_0 ? 256 : (fmt == I4_G64 || fmt == I4_G64_ASYM) ? 64
         : (fmt == I4_G128 || fmt == I4_G128_ASYM) ? 128 : 32;
}
// The integer subtracted from a quant before scaling (Q8_0's VNNI offset is the kernel's own).
constexpr int fmt_zero(int fmt) {
  return fmt == TQ2_0 ? 1 : (fmt == Q4_0 || fmt == I4_G64 || fmt == I4_G128) ? 8 : 0;
}
// K this format can hold: a positive multiple of its group (of 32 for I8_ROW).
inline bool fmt_k_ok(int fmt, int64_t K) {
  const int64_t g = fmt_group(fmt) ? fmt_group(fmt) : QK;
  return K > 0 && K % g == 0;
}
// 32-blocks per record, the quant bytes of one 32-block (16 rows), the quants' offset in a
// record and the record's size.
inline int64_t rec_blocks(int fmt, int64_t K) { return fmt_group(fmt) ? fmt_group(fmt) / QK : K / QK; }
constexpr int block_qbytes(int fmt) { return G * QK * fmt_bits(fmt) / 8; }
constexpr int rec_qoff(int fmt) { return fmt == I8_ROW ? 64 : fmt_asym(fmt) ? 64 : 32; }
inline int64_t rec_bytes(int fmt, int64_t K) { return rec_qoff(fmt) + rec_blocks(fmt, K) * block_qbytes(fmt); }
inline int64_t n_groups(int64_t N) { return (N + G - 1) / G; }
inline int64_t packed_bytes(int fmt, int64_t N, int64_t K) {
  return n_groups(N) * (K / QK / rec_blocks(fmt, K)) * rec_bytes(fmt, K);
}
// Raw rows: weights per raw block and its bytes (I8_ROW: one block of K weights, 4 + K bytes).
inline int64_t raw_block_weights(int fmt, int64_t K) { return fmt_group(fmt) ? fmt_group(fmt) : K; }
inline int64_t raw_block_bytes(int fmt, int64_t K) {
  return fmt == I8_ROW ? 4 + K : rec_qoff(fmt) / G + raw_block_weights(fmt, K) * fmt_bits(fmt) / 8;
}
inline int64_t raw_row_bytes(int fmt, int64_t K) { return K / raw_block_weights(fmt, K) * raw_block_bytes(fmt, K); }
// K of a raw row of `row_bytes` bytes, or -1 when no K fits.
inline int64_t raw_row_k(int fmt, int64_t row_bytes) {
  if (fmt == I8_ROW) return row_bytes > 4 && (row_bytes - 4) % QK == 0 ? row_bytes - 4 : -1;
  const int64_t rb = raw_block_bytes(fmt, 0);
  return row_bytes > 0 && row_bytes % rb == 0 ? row_bytes / rb * fmt_group(fmt) : -1;
}

// Activations quantized once per call, llama.cpp's Q8 style: per row and 32-block an int8
// vector q, its scale d (x ~ d*q) and sum(q) (s); ds = d*s feeds Q4_1's m term.
struct QX {
  const int8_t* q;  // [M, K]
  const float* d;   // [M, K/32]
  const int32_t* s; // [M, K/32]
  const float* ds;  // [M, K/32]
};

struct QArgs {
  const uint8_t* w;  // packed weights
  int fmt;
  int64_t N, K, nb;  // nb = K/32
  QX x;
  int64_t M;
  float* y;  // [M, N] row-major
};

// Layout conversion (scalar, exact): raw is [N, raw_row_bytes], packed as above.
void repack_groups(const uint8_t* raw, uint8_t* packed, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1);
void unpack_groups(const uint8_t* packed, uint8_t* raw, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1);
// fp32 weights [N, K], bit-identical to gguf.quants.dequantize (d*q, d*(q-z), d*q + m in fp32).
void dequant_groups(const uint8_t* packed, float* out, int fmt, int64_t N, int64_t K,
                    int64_t g0, int64_t g1);

// Per ISA: quantize rows [m0, m1) of x [M, K] into the QX buffers, and compute y for output
// groups [g0, g1) and all M rows.
struct QXBuf {
  int8_t* q;
  float* d;
  int32_t* s;
  float* ds;
};
void quantize_x_scalar(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out);
void quantize_x_avx2(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out);
void quantize_x_avx512(const float* x, int64_t K, int64_t m0, int64_t m1, QXBuf out);
void qmm_scalar(const QArgs& a, int64_t g0, int64_t g1);
void qmm_avx2(const QArgs& a, int64_t g0, int64_t g1);
void qmm_avx512(const QArgs& a, int64_t g0, int64_t g1);
// Whether this build carries the ISA's code at all (false off x86-64).
bool built_avx2();
bool built_avx512();

float fp16_to_fp32(uint16_t h);

// The matmul path to run for `isa` (ISA_AUTO: the best this CPU and build run); ops.cpp
// checks the CPU and throws (a c10::Error) when it cannot run the path asked for.
int qmm_resolve_isa(int64_t isa);

}  // namespace metroline
