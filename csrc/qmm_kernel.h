// The quantized matmul, written once over a small vector-ops struct V and instantiated per
// ISA (qmm_avx2.cpp, qmm_avx512.cpp). Include it inside an anonymous namespace, after the
// file's target pragma: every symbol then stays local to that ISA's translation unit, so
// the linker can never pick an AVX-512 copy of a helper for the AVX2 path.
//
// V provides (R = output rows per vector, 8 for ymm, 16 for zmm):
//   I load(const uint8_t*)           R*4 bytes of packed quants
//   I bcast4(const int8_t*)          4 activation bytes to every 32-bit lane
//   I lo4(I), hi4(I)                 nibbles of Q4 bytes
//   I crumb(I, l)                    bits 2l..2l+1 of every byte (TQ2_0 codes)
//   I dot_q4(I acc, I w, I x), I fin_q4(I acc)      u4 x s8 sums -> int32 per lane
//   W8 prep_q8(I w); I dot_q8(I acc, W8, I x); I fin_q8(I acc)   s8 x s8
//   Q8_OFF: dot_q8 sums (w + Q8_OFF) * x (VNNI multiplies unsigned by signed bytes)
//   F load_h(const uint8_t*)         R fp16 scales -> fp32; F load_f(const float*) R fp32
//   zero_i, zero_f, bcastf, cvt, mul, fmadd, sub_bcast, store(float*, F, n valid)
//   MT_MAX: activation rows per register tile; RV_FULL_UPTO: up to that tile height a tile
//   covers all G rows of a group (G/R vectors), above it one vector of rows at a time.

// Not inlined: one tile is a whole pass over a group's K (thousands of cycles), and separate
// functions keep register allocation per tile shape honest and the asm readable.
//
// Per 32-block b the integer sums isum = sum_k q_k * xq_k (minus z * s for a format whose
// quants carry a zero point z: Q4_0 / I4_G* 8, TQ2_0 1; Q8_0 on VNNI V::Q8_OFF) become
//   acc += isum * (d * d_x[b])        (+ m * d_x[b] * s[b] for the asymmetric formats)
// with d (and m) loaded once per record, i.e. once per scale group; I8_ROW accumulates
// acc += isum * d_x[b] over the whole row and multiplies by its row scale d once at the end.
template <class V, int FMT, int RV, int MT>
__attribute__((noinline)) static void qmm_tile(const QArgs& a, int64_t g, int v0, int64_t m0) {
  constexpr int R = V::R, BITS = fmt_bits(FMT), NC = BITS == 8 ? 8 : BITS == 4 ? 4 : 2;
  constexpr int QB = block_qbytes(FMT), QO = rec_qoff(FMT);
  constexpr int OFF = BITS == 8 ? V::Q8_OFF : fmt_zero(FMT);
  constexpr bool ROW = FMT == I8_ROW, ASYM = fmt_asym(FMT);
  using I = typename V::I;
  using F = typename V::F;
  const int64_t nb = a.nb, K = a.K, bpr = rec_blocks(FMT, K), REC = rec_bytes(FMT, K);
  const uint8_t* rec = a.w + g * (nb / bpr) * REC;
  const int8_t* xq = a.x.q + m0 * K;
  F acc[RV][MT];
#pragma GCC unroll 16
  for (int v = 0; v < RV; ++v)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[v][m] = V::zero_f();

  for (int64_t b0 = 0; b0 < nb; b0 += bpr, rec += REC) {
    F d[RV], mn[RV];
    if constexpr (!ROW) {
#pragma GCC unroll 16
      for (int v = 0; v < RV; ++v) {
        d[v] = V::load_h(rec + (v0 + v) * R * 2);
        if constexpr (ASYM) mn[v] = V::load_h(rec + 32 + (v0 + v) * R * 2);
      }
    }
    const uint8_t* qb = rec + QO;
    for (int64_t b = b0; b < b0 + bpr; ++b, qb += QB, xq += QK) {
      I ia[RV][MT];
#pragma GCC unroll 16
      for (int v = 0; v < RV; ++v)
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) ia[v][m] = V::zero_i();
      auto chunk = [&](int c) __attribute__((always_inline)) {
#pragma GCC unroll 16
        for (int v = 0; v < RV; ++v) {
          const I w = V::load(qb + c * 64 + (v0 + v) * R * 4);
          if constexpr (BITS == 8) {
            const auto w8 = V::prep_q8(w);
#pragma GCC unroll 16
            for (int m = 0; m < MT; ++m)
              ia[v][m] = V::dot_q8(ia[v][m], w8, V::bcast4(xq + m * K + 4 * c));
          } else if constexpr (BITS == 4) {
            const I lo = V::lo4(w), hi = V::hi4(w);
#pragma GCC unroll 16
            for (int m = 0; m < MT; ++m) {
              ia[v][m] = V::dot_q4(ia[v][m], lo, V::bcast4(xq + m * K + 4 * c));
              ia[v][m] = V::dot_q4(ia[v][m], hi, V::bcast4(xq + m * K + 16 + 4 * c));
            }
          } else {  // 2-bit codes: bits 2l of byte j are weight 16c + 4l + j
#pragma GCC unroll 4
            for (int l = 0; l < 4; ++l) {
              const I q2 = V::crumb(w, l);
#pragma GCC unroll 16
              for (int m = 0; m < MT; ++m)
                ia[v][m] = V::dot_q4(ia[v][m], q2, V::bcast4(xq + m * K + 16 * c + 4 * l));
            }
          }
        }
      };
      // A rolled chunk loop keeps GCC from re-associating the integer sums into a tree of
      // temporaries that spill (16 ymm registers); with 32 zmm registers unrolling is free.
      if constexpr (V::ROLL_CHUNKS) {
#pragma GCC unroll 1
        for (int c = 0; c < NC; ++c) chunk(c);
      } else {
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) chunk(c);
      }
#pragma GCC unroll 16
      for (int v = 0; v < RV; ++v) {
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const int64_t i = (m0 + m) * nb + b;
          I s = BITS == 8 ? V::fin_q8(ia[v][m]) : V::fin_q4(ia[v][m]);
          if constexpr (OFF != 0) s = V::sub_bcast(s, OFF * a.x.s[i]);
          if constexpr (ROW) {
            acc[v][m] = V::fmadd(V::cvt(s), V::bcastf(a.x.d[i]), acc[v][m]);
          } else {
            acc[v][m] = V::fmadd(V::cvt(s), V::mul(d[v], V::bcastf(a.x.d[i])), acc[v][m]);
            if constexpr (ASYM) acc[v][m] = V::fmadd(mn[v], V::bcastf(a.x.ds[i]), acc[v][m]);
          }
        }
      }
    }
  }
  if constexpr (ROW) {
    rec -= REC;
#pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) {
      const F d = V::load_f(reinterpret_cast<const float*>(rec) + (v0 + v) * R);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[v][m] = V::mul(acc[v][m], d);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < RV; ++v) {
    const int64_t row = g * G + (v0 + v) * R;
    const int n = a.N - row < R ? int(a.N - row) : R;
    if (n <= 0) continue;
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) V::store(a.y + (m0 + m) * a.N + row, acc[v][m], n);
  }
}

template <class V, int FMT, int MT>
static inline void qmm_rows(const QArgs& a, int64_t g, int64_t m0) {
  constexpr int VPG = G / V::R;
  if constexpr (MT <= V::RV_FULL_UPTO) {
    qmm_tile<V, FMT, VPG, MT>(a, g, 0, m0);
  } else {
    for (int v = 0; v < VPG; ++v) qmm_tile<V, FMT, 1, MT>(a, g, v, m0);
  }
}

template <class V, int FMT, int MT>
static inline void qmm_tail(const QArgs& a, int64_t g, int64_t m0, int64_t rem) {
  if constexpr (MT >= 1) {
    if (rem == MT) return qmm_rows<V, FMT, MT>(a, g, m0);
    qmm_tail<V, FMT, MT - 1>(a, g, m0, rem);
  }
}

// Activation rows are taken MB at a time so that block of quantized x stays in L2 while the
// thread's weight slice streams past it; up to MB rows, each weight byte is read once.
template <class V, int FMT>
static void qmm_fmt(const QArgs& a, int64_t g0, int64_t g1) {
  constexpr int64_t MB = 64, T = V::MT_MAX;
  for (int64_t mb = 0; mb < a.M; mb += MB) {
    const int64_t me = a.M < mb + MB ? a.M : mb + MB;
    for (int64_t g = g0; g < g1; ++g) {
      int64_t m = mb;
      for (; me - m >= T; m += T) qmm_rows<V, FMT, T>(a, g, m);
      if (m < me) qmm_tail<V, FMT, T - 1>(a, g, m, me - m);
    }
  }
}

template <class V>
static void qmm_any(const QArgs& a, int64_t g0, int64_t g1) {
  switch (a.fmt) {
    case Q4_0: return qmm_fmt<V, Q4_0>(a, g0, g1);
    case Q4_1: return qmm_fmt<V, Q4_1>(a, g0, g1);
    case Q8_0: return qmm_fmt<V, Q8_0>(a, g0, g1);
    case TQ2_0: return qmm_fmt<V, TQ2_0>(a, g0, g1);
    case I8_ROW: return qmm_fmt<V, I8_ROW>(a, g0, g1);
    case I4_G64: return qmm_fmt<V, I4_G64>(a, g0, g1);
    case I4_G64_ASYM: return qmm_fmt<V, I4_G64_ASYM>(a, g0, g1);
    case I4_G128: return qmm_fmt<V, I4_G128>(a, g0, g1);
    case I4_G128_ASYM: return qmm_fmt<V, I4_G128_ASYM>(a, g0, g1);
  }
}
