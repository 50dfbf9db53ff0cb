// Sparse FFN kernels for x86-64 CPUs with AVX2 and FMA (fp32).
//
// Shape legend:
//   N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert
//   (2S gated: gate rows then up rows; S otherwise), I: input features, O: output features.
//
// Both kernels are bandwidth-bound at small N: they read each selected weight row once for all
// tokens that need it, straight from the model's own tensors (no copies), spread row chunks over
// the intra-op threads, and let every thread accumulate into its own output buffer; the buffers
// are summed at the end (N x D floats per thread, negligible beside the weights).
//
// expert_ffn:      out[t] = b_out + sum_{e selected by t} act(W_in_e x_t + b_in_e) @ W_out_e
// routed_expert_ffn: a linear / MLP router's top-k experts per token, then expert_ffn over them
// threshold_linear out[t] = bias + sum_{i : !(|x_ti| <= thr_i)} x_ti * W_t[i]   (W_t is (I, O))
//
// Python calls them through the bindings at the end of this file (eager calls), and they are the
// CPU implementations of the torch.ops.moefy operators (compiled graphs).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;        // floats per AVX register
constexpr int64_t kLineFloats = 16;  // floats per 64-byte cache line
constexpr int64_t kPrefetchRowFloats = 1024;  // rows up to 4 KiB: axpy_rows prefetches them
constexpr int64_t kTokenGroup = 8;   // tokens whose dot products share one pass over a row
constexpr int64_t kAxpyRows = 8;     // weight rows applied together in the accumulation
constexpr int64_t kChunksPerThread = 4;  // work units per thread, for load balance

enum Activation : int64_t { kReLU = 0, kSiLU = 1, kGeluTanh = 2, kGeluErf = 3 };

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r * stride + t] = dot(rows[r], xs[t]) over D, for R rows and T tokens.
template <int R, int T>
inline void dot_block(const float* const* rows, const float* const* xs, int64_t D, float* out,
                      int64_t stride) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    __m256 w[R];
    for (int r = 0; r < R; ++r) w[r] = _mm256_loadu_ps(rows[r] + d);
    for (int t = 0; t < T; ++t) {
      const __m256 x = _mm256_loadu_ps(xs[t] + d);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], x, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t j = d; j < D; ++j) s += rows[r][j] * xs[t][j];
      out[r * stride + t] = s;
    }
  }
}

// Rows per block for T tokens: as many as the 16 vector registers allow (one token: the
// weights are FMA memory operands, so 12 accumulators; more rows in flight read faster).
template <int T>
constexpr int rows_for_tokens() {
  return T == 1 ? 12 : T == 2 ? 4 : T == 3 ? 3 : T <= 6 ? 2 : 1;
}

// pre[r * stride + t] = dot(rows[r], xs[t]) for n_rows rows and T tokens.
template <int T>
void dot_rows(const float* const* rows, int64_t n_rows, const float* const* xs, int64_t D,
              float* pre, int64_t stride) {
  constexpr int R = rows_for_tokens<T>();
  int64_t r = 0;
  for (; r + R <= n_rows; r += R) dot_block<R, T>(rows + r, xs, D, pre + r * stride, stride);
  for (; r < n_rows; ++r) dot_block<1, T>(rows + r, xs, D, pre + r * stride, stride);
}

// Dispatch on the token count of one group (1..kTokenGroup).
void dot_rows_any(const float* const* rows, int64_t n_rows, const float* const* xs, int64_t T,
                  int64_t D, float* pre, int64_t stride) {
  switch (T) {
    case 1: return dot_rows<1>(rows, n_rows, xs, D, pre, stride);
    case 2: return dot_rows<2>(rows, n_rows, xs, D, pre, stride);
    case 3: return dot_rows<3>(rows, n_rows, xs, D, pre, stride);
    case 4: return dot_rows<4>(rows, n_rows, xs, D, pre, stride);
    case 5: return dot_rows<5>(rows, n_rows, xs, D, pre, stride);
    case 6: return dot_rows<6>(rows, n_rows, xs, D, pre, stride);
    case 7: return dot_rows<7>(rows, n_rows, xs, D, pre, stride);
    default: return dot_rows<8>(rows, n_rows, xs, D, pre, stride);
  }
}

// outs[t] += sum_r coef[r * stride + t] * rows[r] over D, for R rows and m tokens. ``ahead``
// (R pointers, each may be null, or null itself) names the rows the caller reads next: their
// cache lines are prefetched in step with this block's, so a new row does not start with
// misses (see axpy_rows).
template <int R>
inline void axpy_block(const float* const* rows, const float* coef, int64_t stride,
                       float* const* outs, int64_t m, int64_t D,
                       const float* const* ahead = nullptr) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    if (ahead != nullptr && d % kLineFloats == 0)
      for (int r = 0; r < R; ++r)
        if (ahead[r] != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead[r] + d), _MM_HINT_T0);
    __m256 w[R];
    for (int r = 0; r < R; ++r) w[r] = _mm256_loadu_ps(rows[r] + d);
    for (int64_t t = 0; t < m; ++t) {
      __m256 o = _mm256_loadu_ps(outs[t] + d);
      for (int r = 0; r < R; ++r) o = _mm256_fmadd_ps(w[r], _mm256_set1_ps(coef[r * stride + t]), o);
      _mm256_storeu_ps(outs[t] + d, o);
    }
  }
  for (; d < D; ++d)
    for (int64_t t = 0; t < m; ++t) {
      float o = outs[t][d];
      for (int r = 0; r < R; ++r) o += rows[r][d] * coef[r * stride + t];
      outs[t][d] = o;
    }
}

// outs[t] += sum over the listed rows of coef[row, t] * row; rows whose coefficients are all zero
// were dropped by the caller, so their bytes are never read. ``scattered``: the rows lie apart
// (threshold_linear's kept inputs). Short scattered rows are then prefetched a block ahead: the
// hardware prefetchers only find a stream after its first misses, and each such row is a new
// stream shorter than their ramp (rows of 192 and 576 floats, cold weights: 8-18 % faster on 1
// thread, 0-11 % on 2; benchmarks/threshold_prefetch.py). Rows of 1,536 and 2,048 floats ran
// 3-18 % slower with it, and contiguous rows (expert_ffn's) showed no gain: those are left to the
// hardware.
void axpy_rows(const float* const* rows, const float* const* coefs, int64_t n_rows,
               float* const* outs, int64_t m, int64_t D, bool scattered = false) {
  // Pack R coefficient rows contiguously so axpy_block reads them with one stride.
  std::vector<float> packed(kAxpyRows * m);
#ifdef MOEFY_NO_SCATTER_PREFETCH  // the baseline that benchmarks/threshold_prefetch.py builds
  const bool prefetch = false && scattered;
#else
  const bool prefetch = scattered && D <= kPrefetchRowFloats;
#endif
  const float* ahead[kAxpyRows];
  int64_t r = 0;
  for (; r + kAxpyRows <= n_rows; r += kAxpyRows) {
    for (int64_t i = 0; i < kAxpyRows; ++i) {
      std::copy(coefs[r + i], coefs[r + i] + m, packed.data() + i * m);
      const int64_t next = r + kAxpyRows + i;
      ahead[i] = next < n_rows ? rows[next] : nullptr;
    }
    axpy_block<kAxpyRows>(rows + r, packed.data(), m, outs, m, D, prefetch ? ahead : nullptr);
  }
  for (; r < n_rows; ++r) axpy_block<1>(rows + r, coefs[r], m, outs, m, D);
}

inline float activate(float v, int64_t act) {
  switch (act) {
    case kReLU: return v > 0.0f ? v : (v == v ? 0.0f : v);  // keep NaN, as torch does
    case kSiLU: return v / (1.0f + std::exp(-v));
    case kGeluTanh: {
      constexpr float kSqrt2OverPi = 0.7978845608028654f;
      return 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
    }
    default: return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
  }
}

int64_t chunk_size(int64_t total_rows, int64_t rows_per_unit_max, int64_t threads) {
  const int64_t units = std::max<int64_t>(1, threads * kChunksPerThread);
  const int64_t size = (total_rows + units - 1) / units;
  return std::max<int64_t>(1, std::min(rows_per_unit_max, std::max<int64_t>(size, kLanes)));
}

// Sum the per-thread buffers (threads, N, C) into out (N, C), plus an optional bias (C,).
void reduce_into(const at::Tensor& partial, int64_t used, const std::optional<at::Tensor>& bias,
                 at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1);
  const float* src = partial.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < N * C; ++i) {
    float s = b != nullptr ? b[i % C] : 0.0f;
    for (int64_t k = 0; k < used; ++k) s += src[k * N * C + i];
    dst[i] = s;
  }
}

void check_f32_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct ExpertUnit {
  int64_t expert, slot_begin, slot_end;
};

// Start loading the heads of the next unit's three weight streams (gate, up, down rows) while
// this unit computes: the hardware prefetchers only find a new stream after its first misses.
inline void prefetch_unit_heads(const ExpertUnit& unit, const float* win, const float* wout,
                                int64_t S, int64_t S_in, int64_t D, bool gated) {
  constexpr int64_t kHeadFloats = 2048;  // 8 KiB of each stream
  const int64_t e = unit.expert;
  const int64_t n = std::min(kHeadFloats, (unit.slot_end - unit.slot_begin) * D);
  const float* heads[3] = {win + (e * S_in + unit.slot_begin) * D,
                           gated ? win + (e * S_in + S + unit.slot_begin) * D : nullptr,
                           wout + (e * S + unit.slot_begin) * D};
  for (const float* head : heads) {
    if (head == nullptr) continue;
    for (int64_t i = 0; i < n; i += kLineFloats)
      _mm_prefetch(reinterpret_cast<const char*>(head + i), _MM_HINT_T0);
  }
}

}  // namespace

// x (N, D), mask (N, E) bool, w_in (E, S_in, D), w_out (E, S, D), b_in (E, S_in) or None,
// b_out (D,) or None -> (N, D).
at::Tensor expert_ffn(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& w_in,
                      const at::Tensor& w_out, const std::optional<at::Tensor>& b_in,
                      const std::optional<at::Tensor>& b_out, int64_t act, bool gated) {
  check_f32_contiguous(x, "x");
  check_f32_contiguous(w_in, "w_in");
  check_f32_contiguous(w_out, "w_out");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be bool");
  TORCH_CHECK(act >= kReLU && act <= kGeluErf, "unknown activation code ", act);
  const int64_t N = x.size(0), D = x.size(1), E = w_in.size(0), S_in = w_in.size(1);
  const int64_t S = w_out.size(1);
  TORCH_CHECK(w_in.size(2) == D && w_out.size(0) == E && w_out.size(2) == D, "weight shapes");
  TORCH_CHECK(S_in == (gated ? 2 * S : S), "w_in rows do not match w_out and gated");
  TORCH_CHECK(mask.size(0) == N && mask.size(1) == E, "mask must be (N, E)");
  if (b_in.has_value()) check_f32_contiguous(*b_in, "b_in");
  if (b_out.has_value()) check_f32_contiguous(*b_out, "b_out");

  // Tokens of each expert, in CSR form: tokens[offsets[e] .. offsets[e + 1]).
  const bool* sel = mask.data_ptr<bool>();
  std::vector<int64_t> offsets(E + 1, 0), tokens;
  tokens.reserve(N * E);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < N; ++t)
      if (sel[t * E + e]) tokens.push_back(t);
    offsets[e + 1] = static_cast<int64_t>(tokens.size());
  }
  const int64_t threads = at::get_num_threads();
  int64_t active_slots = 0;
  for (int64_t e = 0; e < E; ++e) active_slots += offsets[e + 1] > offsets[e] ? S : 0;
  const int64_t chunk = chunk_size(active_slots, S, threads);
  std::vector<ExpertUnit> units;
  for (int64_t e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (int64_t s = 0; s < S; s += chunk) units.push_back({e, s, std::min(S, s + chunk)});
  }

  auto out = at::empty({N, D}, x.options());
  auto partial = at::zeros({threads, N, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wout = w_out.data_ptr<float>();
  const float* bin = b_in.has_value() ? b_in->data_ptr<float>() : nullptr;
  float* part = partial.data_ptr<float>();

  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "more threads than accumulators");
    float* acc = part + tid * N * D;
    std::vector<const float*> rows, xs(kTokenGroup), live_rows, live_coefs;
    std::vector<float*> outs;
    std::vector<float> pre, hidden;
    for (int64_t u = begin; u < end; ++u) {
      const ExpertUnit& unit = units[u];
      if (u + 1 < end) prefetch_unit_heads(units[u + 1], win, wout, S, S_in, D, gated);
      const int64_t e = unit.expert, n = unit.slot_end - unit.slot_begin;
      const int64_t* tok = tokens.data() + offsets[e];
      const int64_t m = offsets[e + 1] - offsets[e];
      const int64_t n_in = gated ? 2 * n : n;
      // Input rows of this chunk: its gate rows then its up rows.
      rows.resize(n_in);
      for (int64_t s = 0; s < n; ++s) {
        rows[s] = win + (e * S_in + unit.slot_begin + s) * D;
        if (gated) rows[n + s] = win + (e * S_in + S + unit.slot_begin + s) * D;
      }
      pre.assign(n_in * m, 0.0f);  // (n_in, m)
      for (int64_t g = 0; g < m; g += kTokenGroup) {
        const int64_t T = std::min(kTokenGroup, m - g);
        for (int64_t t = 0; t < T; ++t) xs[t] = xp + tok[g + t] * D;
        dot_rows_any(rows.data(), n_in, xs.data(), T, D, pre.data() + g, m);
      }
      hidden.resize(n * m);  // (n, m)
      for (int64_t s = 0; s < n; ++s) {
        const int64_t slot = unit.slot_begin + s;
        for (int64_t t = 0; t < m; ++t) {
          float g = pre[s * m + t] + (bin != nullptr ? bin[e * S_in + slot] : 0.0f);
          float h = activate(g, act);
          if (gated) h *= pre[(n + s) * m + t] + (bin != nullptr ? bin[e * S_in + S + slot] : 0.0f);
          hidden[s * m + t] = h;
        }
      }
      // Down rows whose activations are all zero (ReLU) are skipped unread.
      live_rows.clear();
      live_coefs.clear();
      for (int64_t s = 0; s < n; ++s) {
        const float* h = hidden.data() + s * m;
        if (std::any_of(h, h + m, [](float v) { return v != 0.0f; })) {
          live_rows.push_back(wout + (e * S + unit.slot_begin + s) * D);
          live_coefs.push_back(h);
        }
      }
      outs.resize(m);
      for (int64_t t = 0; t < m; ++t) outs[t] = acc + tok[t] * D;
      axpy_rows(live_rows.data(), live_coefs.data(), static_cast<int64_t>(live_rows.size()),
                outs.data(), m, D);
    }
  });
  reduce_into(partial, threads, b_out, out);
  return out;
}

// A router and its top-k choice in one call, then expert_ffn over the chosen experts (decode:
// one call per layer instead of a dozen small torch ops).
// router: weight (O_i, I_i), bias (O_i,) or an empty tensor, for each linear layer in turn, with
// ReLU between layers; the last layer's output (N, E) orders the experts (a router's scores are
// a monotone map of it). Each token keeps its k best experts (NaN ranks first, as in
// torch.topk; ties go to the lower index); counts (E,) int64 gains the selections and
// tokens_seen (int64 scalar) gains N.
at::Tensor routed_expert_ffn(const at::Tensor& x, const std::vector<at::Tensor>& router, int64_t k,
                             at::Tensor counts, at::Tensor tokens_seen, const at::Tensor& w_in,
                             const at::Tensor& w_out, const std::optional<at::Tensor>& b_in,
                             const std::optional<at::Tensor>& b_out, int64_t act, bool gated) {
  check_f32_contiguous(x, "x");
  TORCH_CHECK(!router.empty() && router.size() % 2 == 0, "router must be (weight, bias) pairs");
  at::Tensor h = x;
  for (size_t i = 0; i < router.size(); i += 2) {
    const at::Tensor& weight = router[i];
    const at::Tensor& bias = router[i + 1];
    TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
                "router weights must be float32 on the CPU");
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h.size(1), "router layer ", i / 2,
                " does not fit its input");
    if (i > 0) h = at::relu(h);
    h = bias.numel() > 0 ? at::addmm(bias, h, weight.t()) : at::mm(h, weight.t());
  }
  const at::Tensor logits = h.contiguous();
  const int64_t N = x.size(0), E = w_in.size(0);
  TORCH_CHECK(logits.size(0) == N && logits.size(1) == E, "router output must be (N, E)");
  TORCH_CHECK(k >= 1 && k <= E, "k=", k, " experts is out of range 1..", E);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.numel() == E,
              "counts must be int64 (E,)");
  TORCH_CHECK(tokens_seen.scalar_type() == at::kLong && tokens_seen.numel() == 1,
              "tokens_seen must be an int64 scalar");
  auto mask = at::zeros({N, E}, x.options().dtype(at::kBool));
  bool* sel = mask.data_ptr<bool>();
  int64_t* count = counts.data_ptr<int64_t>();
  const float* score = logits.data_ptr<float>();
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < N; ++t) {
    const float* row = score + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t b) {
      const bool nan_a = std::isnan(row[a]), nan_b = std::isnan(row[b]);
      if (nan_a != nan_b) return nan_a;
      if (!nan_a && row[a] != row[b]) return row[a] > row[b];
      return a < b;
    });
    for (int64_t j = 0; j < k; ++j) {
      sel[t * E + order[j]] = true;
      ++count[order[j]];
    }
  }
  tokens_seen.add_(N);
  return expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated);
}

// x (N, I), weight_t (I, O), bias (O,) or None, threshold (1,) or (I,) -> (N, O).
// zeros_out, an int64 scalar or None, gains the number of zero inputs after dropping.
at::Tensor threshold_linear(const at::Tensor& x, const at::Tensor& weight_t,
                            const std::optional<at::Tensor>& bias, const at::Tensor& threshold,
                            const std::optional<at::Tensor>& zeros_out) {
  check_f32_contiguous(x, "x");
  check_f32_contiguous(weight_t, "weight_t");
  check_f32_contiguous(threshold, "threshold");
  if (bias.has_value()) check_f32_contiguous(*bias, "bias");
  const int64_t N = x.size(0), I = x.size(1), O = weight_t.size(1);
  TORCH_CHECK(weight_t.size(0) == I, "weight_t must be (I, O) with I = x.size(1)");
  TORCH_CHECK(threshold.numel() == 1 || threshold.numel() == I, "threshold must be () or (I,)");
  const float* xp = x.data_ptr<float>();
  const float* thr = threshold.data_ptr<float>();
  const bool per_channel = threshold.numel() == I;

  // Kept inputs as coefficient rows (I, N) (zero where dropped), and the rows any token keeps.
  std::vector<float> coef(I * N);
  std::vector<int64_t> kept_rows;
  int64_t zeros = 0;
  for (int64_t i = 0; i < I; ++i) {
    const float t_i = per_channel ? thr[i] : thr[0];
    bool any = false;
    for (int64_t t = 0; t < N; ++t) {
      const float v = xp[t * I + i];
      const bool keep = !(std::fabs(v) <= t_i);  // NaN is kept, as masked_fill keeps it
      coef[i * N + t] = keep ? v : 0.0f;
      zeros += keep ? (v == 0.0f) : 1;
      any = any || keep;
    }
    if (any) kept_rows.push_back(i);
  }
  if (zeros_out.has_value()) {
    TORCH_CHECK(zeros_out->scalar_type() == at::kLong && zeros_out->numel() == 1,
                "zeros_out must be an int64 scalar");
    zeros_out->add_(zeros);
  }
  const int64_t K = static_cast<int64_t>(kept_rows.size());
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = chunk_size(K, K, threads);
  const int64_t n_units = K == 0 ? 0 : (K + chunk - 1) / chunk;

  auto out = at::empty({N, O}, x.options());
  auto partial = at::zeros({threads, N, O}, x.options());
  const float* w = weight_t.data_ptr<float>();
  float* part = partial.data_ptr<float>();
  at::parallel_for(0, n_units, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "more threads than accumulators");
    std::vector<const float*> rows, coefs;
    std::vector<float*> outs(N);
    for (int64_t t = 0; t < N; ++t) outs[t] = part + (tid * N + t) * O;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r0 = u * chunk, r1 = std::min(K, r0 + chunk);
      rows.clear();
      coefs.clear();
      for (int64_t r = r0; r < r1; ++r) {
        rows.push_back(w + kept_rows[r] * O);
        coefs.push_back(coef.data() + kept_rows[r] * N);
      }
      axpy_rows(rows.data(), coefs.data(), r1 - r0, outs.data(), N, O, /*scattered=*/true);
    }
  });
  reduce_into(partial, threads, bias, out);
  return out;
}

// Sum of a float32 buffer, read once with the same loads and threads as the kernels: the
// streaming read bandwidth that bounds them (the benchmark times it).
double stream_sum(const at::Tensor& buffer) {
  check_f32_contiguous(buffer, "buffer");
  const int64_t n = buffer.numel();
  const float* p = buffer.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  std::vector<double> sums(threads, 0.0);
  const int64_t block = 4 * kLanes;
  at::parallel_for(0, n / block, 1, [&](int64_t begin, int64_t end) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = begin; b < end; ++b) {
      const float* q = p + b * block;
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(q));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(q + kLanes));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(q + 2 * kLanes));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(q + 3 * kLanes));
    }
    sums[at::get_thread_num()] += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  });
  double total = 0.0;
  for (double v : sums) total += v;
  for (int64_t i = (n / block) * block; i < n; ++i) total += p[i];
  return total;
}

// The CPU implementations of the torch.ops.moefy operators, whose schemas moefy/kernels/library.py
// declares from the plain-torch twins: the calls above with the schemas' argument types
// (activation names, the router as two lists). Registered when Python asks, so that a compiled
// graph calls them straight from the dispatcher.
namespace {

int64_t activation_code(c10::string_view act) {
  if (act == "relu") return kReLU;
  if (act == "silu") return kSiLU;
  if (act == "gelu_tanh") return kGeluTanh;
  TORCH_CHECK(act == "gelu_erf", "unknown kernel activation ", act);
  return kGeluErf;
}

// A threshold () or (I,) as the kernel reads it: float32 values in place.
at::Tensor threshold_values(const at::Tensor& threshold) {
  return threshold.to(at::kCPU, at::kFloat).contiguous();
}

at::Tensor expert_ffn_op(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& w_in,
                         const at::Tensor& w_out, const std::optional<at::Tensor>& b_in,
                         const std::optional<at::Tensor>& b_out, c10::string_view act,
                         bool gated) {
  return expert_ffn(x.contiguous(), mask.to(at::kBool).contiguous(), w_in, w_out, b_in, b_out,
                    activation_code(act), gated);
}

at::Tensor routed_expert_ffn_op(const at::Tensor& x, at::TensorList router_weights,
                                const c10::List<std::optional<at::Tensor>>& router_biases,
                                int64_t k, at::Tensor& counts, at::Tensor& tokens_seen,
                                const at::Tensor& w_in, const at::Tensor& w_out,
                                const std::optional<at::Tensor>& b_in,
                                const std::optional<at::Tensor>& b_out, c10::string_view act,
                                bool gated) {
  TORCH_CHECK(router_weights.size() == router_biases.size(), "one bias (or None) per weight");
  std::vector<at::Tensor> router;
  for (size_t i = 0; i < router_weights.size(); ++i) {
    const std::optional<at::Tensor> bias = router_biases.get(i);
    router.push_back(router_weights[i]);
    router.push_back(bias.has_value() ? *bias : at::empty({0}, router_weights[i].options()));
  }
  return routed_expert_ffn(x.contiguous(), router, k, counts, tokens_seen, w_in, w_out, b_in,
                           b_out, activation_code(act), gated);
}

at::Tensor threshold_linear_op(const at::Tensor& x, const at::Tensor& weight_t,
                               const std::optional<at::Tensor>& bias, const at::Tensor& threshold,
                               const std::optional<at::Tensor>& zeros_out) {
  return threshold_linear(x.contiguous(), weight_t, bias, threshold_values(threshold), zeros_out);
}

// Two threshold_linear calls; the zero inputs are counted once.
std::tuple<at::Tensor, at::Tensor> threshold_gate_up_op(
    const at::Tensor& x, const at::Tensor& gate_t, const at::Tensor& up_t,
    const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& up_bias,
    const at::Tensor& threshold, const std::optional<at::Tensor>& zeros_out) {
  const at::Tensor tokens = x.contiguous();
  const at::Tensor values = threshold_values(threshold);
  return {threshold_linear(tokens, gate_t, gate_bias, values, zeros_out),
          threshold_linear(tokens, up_t, up_bias, values, std::nullopt)};
}

}  // namespace

void register_operators() {
  static torch::Library library(torch::Library::IMPL, "moefy", c10::DispatchKey::CPU, __FILE__,
                                __LINE__);  // once per process: later calls find it made
  static const bool registered = [] {
    library.impl("expert_ffn", &expert_ffn_op);
    library.impl("routed_expert_ffn", &routed_expert_ffn_op);
    library.impl("threshold_linear", &threshold_linear_op);
    library.impl("threshold_gate_up", &threshold_gate_up_op);
    return true;
  }();
  (void)registered;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moefy sparse FFN kernels (AVX2 + FMA, fp32)";
  m.def("expert_ffn", &expert_ffn, "selected experts' FFN output (N, D)");
  m.def("routed_expert_ffn", &routed_expert_ffn, "router, top-k and selected experts (N, D)");
  m.def("threshold_linear", &threshold_linear, "linear layer skipping zeroed inputs (N, O)");
  m.def("stream_sum", &stream_sum, "sum of a float32 buffer (a streaming read)");
  m.def("register_operators", &register_operators,
        "make these the CPU implementations of the torch.ops.moefy operators");
}
