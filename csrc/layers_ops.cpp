// Every decoder layer of a Llama-family forward in one call (`decode_layers`): the CPU
// decode hot path without Python, the dispatcher or a thread-pool wake-up between ops.
//
// Per layer, on packed weights (qmm.h) and the paged fp16/fp32 KV cache:
//   qkv = h @ Wqkv;  RoPE(q, k) and k, v -> cache;  a = paged attention(q);  o = a @ Wo
//   residual += o;  h2 = rmsnorm(residual) * post_ln;  g = silu(h2 @ Wgate) * (h2 @ Wup)
//   residual += g @ Wdown;  h = rmsnorm(residual) * next_ln  (the next layer's input norm,
//   or the final norm after the last layer)
// with exactly the kernels, splits and order of operations of the op-by-op path
// (qmatmul, rope_kv_write, paged_attention_decode, add_rms_norm, silu_mul), so the result is
// bit-identical to it: tests/unit/test_decode_layers.py checks that.
//
// Threads: one OpenMP region for the whole call. Each op is cut into a few chunks per thread
// (output-row groups of a matmul, token rows of the small ops, attention items longest
// first) that the threads take from an atomic counter; the next op starts when every chunk
// of this one is done. That costs ~0.1 us an op, where a torch parallel region per op costs
// a pool wake-up (futex, several us under OMP_WAIT_POLICY=PASSIVE) and a Python round trip,
// and a thread that another process holds off its core delays the step by at most the chunk
// it holds, not by its whole time slice as at a barrier. Between calls the threads sleep as
// OpenMP's policy says, so a server's HTTP loop keeps its core.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "attention_ops.h"
#include "fused.h"
#include "qmm.h"
#include "vec_cpu.h"

namespace metroline {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_ia32_pause();
#endif
}

// One op of the step, cut into n chunks that the threads take one at a time; the next op
// starts when all n are done. A thread that arrives late (another process had its core)
// finds the chunks taken and goes on, so nobody waits for a thread that is not running,
// only for chunks in progress: a plain barrier would stall the step for a whole time slice.
struct alignas(64) Phase {
  std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
};

inline void wait_done(const Phase& ph, int64_t n) {
  for (int spins = 0; ph.done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < (1 << 15))
      cpu_relax();
    else
      std::this_thread::yield();  // the machine is shared: let the late thread run
  }
}

struct Linear {
  const uint8_t* w;
  int fmt;
  int64_t N, K;
};

struct Layer {
  Linear qkv, o, gate_up, down;
  const float* post_ln;
  const float* next_ln;
  void* k_cache;
  void* v_cache;
};

using QuantFn = void (*)(const float*, int64_t, int64_t, int64_t, QXBuf);
using MatmulFn = void (*)(const QArgs&, int64_t, int64_t);
using NormFn = void (*)(const NormArgs&, int64_t, int64_t);
using SiluFn = void (*)(const SiluArgs&, int64_t, int64_t);
using RopeFn = void (*)(const RopeArgs&, int64_t, int64_t);

Linear linear(const char* op, const at::Tensor& w, int64_t fmt, int64_t N, int64_t K, int64_t layer,
              const char* name) {
  TORCH_CHECK(fmt_valid(int(fmt)), op, "layer ", layer, " ", name, ": unsupported weight format ", fmt);
  TORCH_CHECK(fmt_k_ok(int(fmt), K), op, "layer ", layer, " ", name, ": K=", K, " is not a multiple of fmt ", fmt,
              "'s group");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.numel() == packed_bytes(int(fmt), N, K),
              op, "layer ", layer, " ", name, ": expected ", packed_bytes(int(fmt), N, K),
              " contiguous CPU bytes of packed weights for N=", N, " K=", K, ", got ", w.numel(), " ",
              w.scalar_type());
  return {w.data_ptr<uint8_t>(), int(fmt), N, K};
}

const float* norm_weight(const char* op, const at::Tensor& w, int64_t H, int64_t layer) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == H &&
                  w.is_contiguous(),
              op, "layer ", layer, ": norm weights must be contiguous float32 CPU vectors of ", H, " values");
  return w.data_ptr<float>();
}

void decode_layers(const at::Tensor& h, const at::Tensor& residual, at::TensorList weights, at::IntArrayRef fmts,
                   at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& positions, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                   const at::Tensor& context_lens, const at::Tensor& query_start_loc, int64_t block_size,
                   int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size, double scale, double eps,
                   int64_t isa) {
  const char* op = "metroline.decode_layers: ";
  // ---- checks (all before the parallel region: nothing in it may throw)
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous() &&
                  residual.sizes() == h.sizes() && residual.scalar_type() == at::kFloat &&
                  residual.is_contiguous() && residual.device().is_cpu(),
              op, "h and residual must be contiguous float32 CPU tensors [T, hidden] of one shape");
  const int64_t L = int64_t(k_caches.size()), T = h.size(0), H = h.size(1);
  TORCH_CHECK(L > 0 && int64_t(v_caches.size()) == L && int64_t(weights.size()) == 6 * L &&
                  int64_t(fmts.size()) == 4 * L,
              op, "need, per layer, 6 weights (qkv, o, gate_up, down, post-attention norm, next norm), 4 formats ",
              "and a k and a v cache; got ", weights.size(), " weights, ", fmts.size(), " formats, ",
              k_caches.size(), " and ", v_caches.size(), " caches");
  TORCH_CHECK(cos.device().is_cpu() && cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.scalar_type() == at::kFloat && sin.is_contiguous(),
              op, "cos and sin must be contiguous float32 CPU tables [max_positions, head_dim]");
  const int64_t Hq = num_heads, Hkv = num_kv_heads, D = cos.size(1), I = intermediate_size, P = cos.size(0);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && D % 16 == 0 && Hq / Hkv <= kAttnMaxRows &&
                  Hq / Hkv * D <= kAttnMaxRowElems && H % QK == 0 && (Hq * D) % QK == 0 && I % QK == 0 && I > 0,
              op, "unsupported shape: hidden ", H, ", heads ", Hq, "/", Hkv, ", head_dim ", D, ", intermediate ", I);
  const int64_t Nqkv = (Hq + 2 * Hkv) * D;
  std::vector<Layer> layers(L);
  const int64_t S = k_caches[0].size(0);
  int kv = KV_F32;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[6 * l];
    Layer& y = layers[l];
    y.qkv = linear(op, w[0], fmts[4 * l], Nqkv, H, l, "qkv");
    y.o = linear(op, w[1], fmts[4 * l + 1], H, Hq * D, l, "o");
    y.gate_up = linear(op, w[2], fmts[4 * l + 2], 2 * I, H, l, "gate_up");
    y.down = linear(op, w[3], fmts[4 * l + 3], H, I, l, "down");
    y.post_ln = norm_weight(op, w[4], H, l);
    y.next_ln = norm_weight(op, w[5], H, l);
    kv = check_kv_caches(op, k_caches[l], v_caches[l], Hkv, D);
    TORCH_CHECK(k_caches[l].size(0) == S && k_caches[l].scalar_type() == k_caches[0].scalar_type(), op,
                "every layer's cache must have the same shape and dtype");
    y.k_cache = k_caches[l].data_ptr();
    y.v_cache = v_caches[l].data_ptr();
  }
  const int64_t* pos = check_positions(op, positions, T, P);
  const int64_t* slots = check_slots(op, slot_mapping, T, S);
  PagedAttnArgs att;
  check_paged_layout(op, block_tables, context_lens, query_start_loc, T, S, block_size, att);
  if (T == 0) return;

  const int qisa = qmm_resolve_isa(isa), visa = vec_resolve_isa(isa);
  const QuantFn quant_fn =
      qisa == ISA_AVX512 ? quantize_x_avx512 : qisa == ISA_AVX2 ? quantize_x_avx2 : quantize_x_scalar;
  const MatmulFn mm_fn = qisa == ISA_AVX512 ? qmm_avx512 : qisa == ISA_AVX2 ? qmm_avx2 : qmm_scalar;
  const NormFn norm_fn = visa == VEC_AVX512 ? rms_norm_avx512 : visa == VEC_AVX2 ? rms_norm_avx2 : rms_norm_scalar;
  const SiluFn silu_fn = visa == VEC_AVX512 ? silu_mul_avx512 : visa == VEC_AVX2 ? silu_mul_avx2 : silu_mul_scalar;
  const RopeFn rope_fn =
      visa == VEC_AVX512 ? rope_kv_write_avx512 : visa == VEC_AVX2 ? rope_kv_write_avx2 : rope_kv_write_scalar;
  const AttendFn attend = attend_fn(visa);

  // ---- the step's attention plan: the same for every layer
  att.Hq = Hq;
  att.Hkv = Hkv;
  att.D = D;
  att.scale = float(scale);
  att.kv = kv;
  const AttnPlan plan = attention_plan(att);
  const int64_t n_items = int64_t(plan.items.size()), n_merges = int64_t(plan.merges.size());

  // ---- scratch: activations between ops, and the int8-quantized matmul input
  const int64_t Kmax = std::max({H, Hq * D, I}), nbmax = Kmax / QK;
  const int64_t f_qkv = T * Nqkv, f_att = T * Hq * D, f_mid = T * H, f_gu = T * 2 * I, f_act = T * I;
  at::Tensor scratch = at::empty({f_qkv + f_att + f_mid + f_gu + f_act + plan.part_floats + 3 * T * nbmax},
                                 h.options());
  float* qkv = scratch.data_ptr<float>();
  float* attn = qkv + f_qkv;
  float* mid = attn + f_att;
  float* gu = mid + f_mid;
  float* act = gu + f_gu;
  float* parts = act + f_act;
  float* qx_f = parts + plan.part_floats;
  at::Tensor qx_bytes = at::empty({T * Kmax}, h.options().dtype(at::kChar));
  const QXBuf qx{qx_bytes.data_ptr<int8_t>(), qx_f, reinterpret_cast<int32_t*>(qx_f + T * nbmax),
                 qx_f + 2 * T * nbmax};
  // Rows no sequence owns (none, as the model calls it) stay zero, as paged_attention_decode leaves them.
  const int32_t* qsl = att.query_start_loc;
  std::fill(attn, attn + qsl[0] * Hq * D, 0.f);
  std::fill(attn + qsl[att.B] * Hq * D, attn + T * Hq * D, 0.f);
  att.out = attn;
  att.q = qkv;
  att.q_tok = Nqkv;
  att.q_head = D;

  float* hp = h.data_ptr<float>();
  float* res = residual.data_ptr<float>();
  RopeArgs rope;
  rope.q = qkv;
  rope.q_tok = Nqkv;
  rope.q_head = D;
  rope.Hq = Hq;
  rope.k = qkv + Hq * D;
  rope.k_tok = Nqkv;
  rope.k_head = D;
  rope.Hkv = Hkv;
  rope.v = qkv + (Hq + Hkv) * D;
  rope.v_tok = Nqkv;
  rope.v_head = D;
  rope.cos = cos.data_ptr<float>();
  rope.sin = sin.data_ptr<float>();
  rope.cos_tok = D;
  rope.sin_tok = D;
  rope.pos = pos;
  rope.kv = kv;
  rope.slots = slots;
  rope.D = D;

  const int threads = int(std::max<int64_t>(1, at::get_num_threads()));
  // Chunks per op: a few per thread, so a thread that is late leaves work the others can take.
  const int64_t per_op = 4 * threads;
  const int64_t row_chunks = std::min<int64_t>(T, per_op), rows_per_chunk = (T + row_chunks - 1) / row_chunks;
  const int64_t phases_per_layer = 10 + (n_merges > 0);
  std::unique_ptr<Phase[]> phases(new Phase[1 + L * phases_per_layer]);

  auto body = [&]() {
    Phase* ph = phases.get();
    // Runs chunks c of the next op as fn(c) until none are left, then waits for the op to end.
    auto run = [&](int64_t n, auto&& fn) {
      Phase& p = *ph++;
      int64_t mine = 0;
      for (int64_t c; (c = p.next.fetch_add(1, std::memory_order_relaxed)) < n; ++mine) fn(c);
      if (mine > 0) p.done.fetch_add(mine, std::memory_order_acq_rel);
      wait_done(p, n);
    };
    auto rows = [&](auto&& fn) {  // fn(t0, t1) over chunks of token rows
      run(row_chunks, [&](int64_t c) { fn(c * rows_per_chunk, std::min(T, (c + 1) * rows_per_chunk)); });
    };
    auto matmul = [&](const Linear& w, float* y) {
      QArgs a;
      a.w = w.w;
      a.fmt = w.fmt;
      a.N = w.N;
      a.K = w.K;
      a.nb = w.K / QK;
      a.x = {qx.q, qx.d, qx.s, qx.ds};
      a.M = T;
      a.y = y;
      const int64_t ng = n_groups(w.N), n = std::min(ng, per_op), step = (ng + n - 1) / n;
      run((ng + step - 1) / step, [&](int64_t c) { mm_fn(a, c * step, std::min(ng, (c + 1) * step)); });
    };
    rows([&](int64_t t0, int64_t t1) { quant_fn(hp, H, t0, t1, qx); });
    for (int64_t l = 0; l < L; ++l) {
      const Layer& y = layers[l];
      matmul(y.qkv, qkv);
      RopeArgs r = rope;
      r.k_cache = y.k_cache;
      r.v_cache = y.v_cache;
      rows([&](int64_t t0, int64_t t1) { rope_fn(r, t0, t1); });
      PagedAttnArgs a = att;
      a.k_cache = y.k_cache;
      a.v_cache = y.v_cache;
      run(n_items, [&](int64_t i) {
        const int64_t it = plan.order[i];
        attend(a, plan.items[it], plan.part_off[it] < 0 ? nullptr : parts + plan.part_off[it]);
      });
      if (n_merges > 0) run(n_merges, [&](int64_t m) { attention_merge(a, plan, plan.merges[m], parts); });
      rows([&](int64_t t0, int64_t t1) { quant_fn(attn, Hq * D, t0, t1, qx); });
      matmul(y.o, mid);
      rows([&](int64_t t0, int64_t t1) {
        norm_fn(NormArgs{mid, H, res, H, y.post_ln, mid, H, H, float(eps)}, t0, t1);
        quant_fn(mid, H, t0, t1, qx);
      });
      matmul(y.gate_up, gu);
      rows([&](int64_t t0, int64_t t1) {
        silu_fn(SiluArgs{gu, 2 * I, act, I, I}, t0, t1);
        quant_fn(act, I, t0, t1, qx);
      });
      matmul(y.down, mid);
      rows([&](int64_t t0, int64_t t1) {
        norm_fn(NormArgs{mid, H, res, H, y.next_ln, hp, H, H, float(eps)}, t0, t1);
        if (l + 1 < L) quant_fn(hp, H, t0, t1, qx);
      });
    }
  };

  if (threads == 1 || omp_in_parallel()) return body();
#pragma omp parallel num_threads(threads)
  body();
}

}  // namespace
}  // namespace metroline

TORCH_LIBRARY_FRAGMENT(metroline, m) {
  m.def(
      "decode_layers(Tensor(a!) h, Tensor(b!) residual, Tensor[] weights, int[] fmts, Tensor(c!)[] k_caches, "
      "Tensor(d!)[] v_caches, Tensor cos, Tensor sin, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
      "Tensor context_lens, Tensor query_start_loc, int block_size, int num_heads, int num_kv_heads, "
      "int intermediate_size, float scale, float eps, int isa=-1) -> ()");
}

TORCH_LIBRARY_IMPL(metroline, CPU, m) { m.impl("decode_layers", &metroline::decode_layers); }
