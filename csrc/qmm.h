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

// GGML type numbers, so the Python side can pass gguf.GGMLQuantizationType values directly.
enum Fmt : int { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };
enum Isa : int { ISA_AUTO = -1, ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

constexpr int QK = 32;  // weights per block (along K)
constexpr int G = 16;   // output rows per packed group

constexpr bool fmt_valid(int fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q8_0; }
// GGUF bytes per block.
constexpr int raw_block_bytes(int fmt) { return fmt == Q8_0 ? 34 : fmt == Q4_1 ? 20 : 18; }
// Offset of the quants inside a packed record, and the record's size.
constexpr int rec_qoff(int fmt) { return fmt == Q4_1 ? 64 : 32; }
constexpr int rec_bytes(int fmt) { return rec_qoff(fmt) + G * (fmt == Q8_0 ? 32 : 16); }
inline int64_t n_groups(int64_t N) { return (N + G - 1) / G; }
inline int64_t packed_bytes(int fmt, int64_t N, int64_t K) {
  return n_groups(N) * (K / QK) * rec_bytes(fmt);
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

// Layout conversion (scalar, exact): raw is [N, K/32 * raw_block_bytes], packed as above.
void repack_groups(const uint8_t* raw, uint8_t* packed, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1);
void unpack_groups(const uint8_t* packed, uint8_t* raw, int fmt, int64_t N, int64_t K,
                   int64_t g0, int64_t g1);
// fp32 weights [N, K], bit-identical to gguf.quants.dequantize (d*q, d*q + m in fp32).
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
