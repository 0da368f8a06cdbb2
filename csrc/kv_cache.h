// KV cache element types, shared by the attention kernels (reading) and rope_kv_write
// (writing). A cache tensor is [S, Hkv, R] per layer:
//   KV_F32, KV_F16: R = D floats (fp16 converted round-to-nearest-even on write).
//   KV_I8:          R = D + 2 bytes per head row: D int8 values q, then the row's scale d as
//                   fp16 (little-endian), x ~ d * q. On write, per token and kv head:
//                   d = fp16(amax / 127), q = clamp(round-half-even(x * (1 / d)), -127, 127)
//                   (d = 0: q = 0). Half the bytes of fp16 plus 2 per row, so a pool of the same
//                   size holds 2D / (D + 2) times the tokens (1.94x at D = 64). Attention folds
//                   d into the scores (K) and the softmax weights (V): no dequantized copy.
#pragma once

#include <cstdint>

namespace metroline {

enum KvType : int { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };

// Elements (bytes for KV_I8) of one head's row.
constexpr int64_t kv_row_elems(int kv, int64_t D) { return kv == KV_I8 ? D + 2 : D; }

}  // namespace metroline
