// The CPU kernel bodies. Included twice by blob_loss_kernel.cpp, in two namespaces: once for the
// baseline ISA and once (GCC on x86-64) under `#pragma GCC target("avx2,fma")`; the dispatcher
// picks the AVX2 build at run time when the CPU has it. No include guard on purpose; include
// only from blob_loss_kernel.cpp, after the standard and ATen headers.
constexpr int64_t kBlock = 64;
constexpr int64_t kGrain = 1 << 15;  // voxels per worker at least

// exp for float in plain arithmetic so that loops over it vectorise (Cephes' expf polynomial,
// about 1 ulp on the clamped range).
inline float vec_exp(float x) {
  // Branch-free clamp (std::min/max on references leaves control flow that blocks vectorising).
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: (v + magic) - magic rounds v to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double vec_exp(double x) { return std::exp(x); }

// log for float in plain arithmetic (Cephes' logf polynomial, about 1 ulp) for normal x > 0;
// -inf from 0 to the smallest normal float, NaN below 0. (Its caller clamps the log at -100 as
// torch's binary_cross_entropy does: torch's float sigmoid is 0 below x = -88.7, where the log
// becomes -inf and the clamp 100; vec_exp's clamp leaves a subnormal p there instead, which this
// maps to the same 100. Only in (-88.7, -87.3) do the two differ.)
inline float vec_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t e = (bits >> 23) - 126;  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  const float fe = static_cast<float>(e) - (small ? 1.0f : 0.0f);
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = m + y;
  r += 0.693359375f * fe;
  // NaN for x < 0 or NaN, as std::log
  return x >= std::numeric_limits<float>::min()
             ? r
             : (x >= 0.0f ? -std::numeric_limits<float>::infinity()
                          : std::numeric_limits<float>::quiet_NaN());
}

template <typename scalar_t>
using acc_type =
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// p = act(x) for sigmoid / none over one block.
template <typename scalar_t, typename acc_t>
inline void activate_block(const scalar_t* x, int64_t m, int32_t act, acc_t* p) {
  if (act == kSigmoid) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j)
      p[j] = acc_t(1) / (acc_t(1) + vec_exp(-static_cast<acc_t>(x[j])));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) p[j] = static_cast<acc_t>(x[j]);
  }
}

// Softmax over C channels (stride V) for one block of positions: p[c * kBlock + j].
template <typename scalar_t, typename acc_t>
inline void softmax_block(const scalar_t* x, int64_t V, int64_t C, int64_t m, acc_t* p) {
  acc_t mx[kBlock], z[kBlock];
  for (int64_t j = 0; j < m; ++j) mx[j] = static_cast<acc_t>(x[j]);
  for (int64_t c = 1; c < C; ++c)
    for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], static_cast<acc_t>(x[c * V + j]));
  for (int64_t j = 0; j < m; ++j) z[j] = 0;
  for (int64_t c = 0; c < C; ++c) {
    acc_t* pc = p + c * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      pc[j] = vec_exp(static_cast<acc_t>(x[c * V + j]) - mx[j]);
      z[j] += pc[j];
    }
  }
  for (int64_t j = 0; j < m; ++j) z[j] = acc_t(1) / z[j];
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < m; ++j) p[c * kBlock + j] *= z[j];
}

// Blob Dice+CE: each voxel's binary cross-entropy against its target [l > 0], in the form of the
// global term (eg) and of the blob terms (eb) (blob_loss_math.h, bce_logits / bce_prob).
// float: in loops the compiler vectorises (vec_exp, vec_log); log1p(u) as log(w) u / (w - 1),
// w = 1 + u, which keeps its relative accuracy for small u.
template <typename scalar_t, typename label_t>
inline void bce_block(const scalar_t* x, const float* p, const label_t* lab, int64_t m,
                      const LossParams& prm, float* eg, float* eb) {
  const bool g_logits = global_ce_on_logits(prm), b_logits = blob_ce_on_logits(prm);
  if (g_logits || b_logits) {
    float* out = g_logits ? eg : eb;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float xj = static_cast<float>(x[j]);
      const float z = lab[j] != 0 ? -xj : xj;
      const float u = vec_exp(xj < 0.0f ? xj : -xj);
      const float w = 1.0f + u;
      const float l1p = w == 1.0f ? u : vec_log(w) * (u / (w - 1.0f));
      out[j] = (z > 0.0f ? z : 0.0f) + l1p;
    }
  }
  if (!g_logits || !b_logits) {
    float* out = g_logits ? eb : eg;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      // log(p) for a target voxel, log1p(-p) for the others (as torch: accurate for small p)
      const float u = -p[j];
      const float w = 1.0f + u;
      const float log1p_u = w == 1.0f ? u : vec_log(w) * (u / (w - 1.0f));
      const float l = lab[j] != 0 ? vec_log(p[j]) : log1p_u;
      out[j] = l > -100.0f || l != l ? -l : 100.0f;  // NaN (p outside [0, 1]) stays NaN
    }
  }
  if (g_logits == b_logits) std::memcpy(eb, eg, sizeof(float) * m);
}

// double: the library functions, as torch computes float64.
template <typename scalar_t, typename label_t>
inline void bce_block(const scalar_t* x, const double* p, const label_t* lab, int64_t m,
                      const LossParams& prm, double* eg, double* eb) {
  using acc_t = double;
  const bool g_logits = global_ce_on_logits(prm), b_logits = blob_ce_on_logits(prm);
  for (int64_t j = 0; j < m; ++j) {
    const bool t = lab[j] != 0;
    const acc_t xj = static_cast<acc_t>(x[j]);
    const acc_t g = g_logits ? bce_logits(xj, t) : bce_prob(p[j], t);
    eg[j] = g;
    eb[j] = b_logits == g_logits ? g : (b_logits ? bce_logits(xj, t) : bce_prob(p[j], t));
  }
}

template <typename label_t>
inline bool block_is_uniform(const label_t* lab, int64_t m) {
  const label_t l0 = lab[0];
  int diff = 0;
  for (int64_t j = 0; j < m; ++j) diff |= (lab[j] != l0);
  return diff == 0;
}

inline bool out_of_range(int64_t k, int64_t K) { return k < 0 || k >= K; }

// Adds one block to the plane's table row[K][ns] (ns = 3, or 5 with the BCE sums of eg, eb).
// Returns false on an out-of-range label.
template <typename label_t, typename acc_t>
inline bool accumulate_block(const acc_t* p, const label_t* lab, int64_t m, int64_t K, bool squared,
                             double* row, int64_t ns = kNumStats, const acc_t* eg = nullptr,
                             const acc_t* eb = nullptr) {
  if (block_is_uniform(lab, m)) {
    const int64_t k = static_cast<int64_t>(lab[0]);
    if (out_of_range(k, K)) return false;
    // In-block sums in acc_t (float for float inputs: at most 64 terms in several SIMD partial
    // sums), across blocks in double.
    acc_t s = 0, q = 0;
    if (squared) {
#pragma omp simd reduction(+ : s, q)
      for (int64_t j = 0; j < m; ++j) {
        s += p[j];
        q += p[j] * p[j];
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) s += p[j];
      q = s;
    }
    double* e = row + k * ns;
    e[0] += static_cast<double>(s);
    e[1] += static_cast<double>(q);
    e[2] += double(m);
    if (eg != nullptr) {
      acc_t sg = 0, sb = 0;
#pragma omp simd reduction(+ : sg, sb)
      for (int64_t j = 0; j < m; ++j) {
        sg += eg[j];
        sb += eb[j];
      }
      e[3] += static_cast<double>(sg);
      e[4] += static_cast<double>(sb);
    }
    return true;
  }
  // Mixed block: aggregate runs of equal labels, flush on change (in double).
  const bool ce = eg != nullptr;
  int64_t cur = static_cast<int64_t>(lab[0]);
  double s = 0.0, q = 0.0, n = 0.0, sg = 0.0, sb = 0.0;
  bool ok = true;
  for (int64_t j = 0; j <= m; ++j) {
    const int64_t k = j < m ? static_cast<int64_t>(lab[j]) : -1;
    if (j == m || k != cur) {
      if (out_of_range(cur, K)) {
        ok = false;
      } else {
        double* e = row + cur * ns;
        e[0] += s;
        e[1] += squared ? q : s;
        e[2] += n;
        if (ce) {
          e[3] += sg;
          e[4] += sb;
        }
      }
      if (j == m) break;
      cur = k;
      s = q = n = sg = sb = 0.0;
    }
    const double v = p[j];
    s += v;
    q += v * v;
    n += 1.0;
    if (ce) {
      sg += static_cast<double>(eg[j]);
      sb += static_cast<double>(eb[j]);
    }
  }
  return ok;
}

// Splits [0, units) into a fixed number of parts (independent of scheduling) and runs
// fn(part, begin, end) on the thread pool.
template <typename Fn>
void for_each_part(int64_t units, int64_t parts, const Fn& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part)
      fn(part, units * part / parts, units * (part + 1) / parts);
  });
}

// Scratch the accumulate pass may allocate for private tables, all workers together. Beyond it
// fewer workers share a plane, down to one, which sums into the output in place and needs no
// scratch at all.
constexpr int64_t kScratchBytes = int64_t(32) << 20;

// Accumulates the voxels [v0, v1) of one row into `table` (the row's (C or 1) x K x 3 entries).
// A row is one (b, c) plane, or for softmax one batch element with all its channels. Ids are
// checked against `bound` (the caller's max_label + 1); softmax's derived channel-0 labels (0/1)
// against K. Returns false on an id outside the range.
template <typename scalar_t, typename label_t, typename acc_t>
bool accumulate_span(const scalar_t* x, const label_t* lab, int64_t row, int64_t v0, int64_t v1,
                     int64_t C, int64_t V, int64_t K, int64_t bound, bool softmax, bool squared,
                     const LossParams& prm, acc_t* p, double* table) {
  uint8_t derived[kBlock];
  acc_t eg[kBlock], eb[kBlock];
  bool ok = true;
  for (int64_t v = v0; v < v1;) {
    const int64_t m = std::min(kBlock, v1 - v);
    if (!softmax) {
      const int64_t u = row * V + v;
      activate_block(x + u, m, prm.activation, p);
      if (prm.with_ce) {
        bce_block(x + u, p, lab + u, m, prm, eg, eb);
        ok &= accumulate_block(p, lab + u, m, bound, squared, table, kNumStatsCE, eg, eb);
      } else {
        ok &= accumulate_block(p, lab + u, m, bound, squared, table);
      }
    } else {
      const int64_t b = row;
      softmax_block(x + b * C * V + v, V, C, m, p);
      for (int64_t j = 0; j < m; ++j) derived[j] = 1;
      for (int64_t c = 1; c < C; ++c) {
        const label_t* lc = lab + (b * C + c) * V + v;
        for (int64_t j = 0; j < m; ++j) derived[j] &= (lc[j] == 0);
        ok &= accumulate_block(p + c * kBlock, lc, m, bound, squared, table + c * K * kNumStats);
      }
      // Channel 0 is the background class: its target is "no instance in any other channel".
      ok &= accumulate_block(p, derived, m, K, squared, table);
    }
    v += m;
  }
  return ok;
}

// Writes every entry of a per-row table (rows x row_entries doubles at `out`), the row driver of
// every accumulate pass (blob and component-wise): span(row, v0, v1, p, table) sums the voxels
// [v0, v1) of a row into `table` (zeroed here) with `p` a scratch of `buf` acc_t, and returns
// false on an id outside the range. Many rows: each worker owns whole rows and accumulates into
// them in place (no scratch). Few, large rows: each row is split into a fixed number of parts
// with private tables, merged in part order. Either way the order of the additions does not
// depend on scheduling, so results are the same bits run to run for a given number of threads;
// the scratch is bounded by kScratchBytes whatever the table size is.
template <typename acc_t, typename Span>
bool accumulate_rows(int64_t rows, int64_t V, int64_t row_entries, int64_t buf, double* out,
                     const Span& span) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::atomic<bool> bad{false};

  // Part 0 of a split row sums into the output in place; parts 1.. need a private table each.
  int64_t parts = std::min<int64_t>(threads, V / kGrain);
  parts = std::min<int64_t>(parts, 1 + kScratchBytes / (row_entries * int64_t(sizeof(double))));
  if (rows >= threads || parts <= 1) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / V), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> p(buf);
      bool ok = true;
      for (int64_t r = r0; r < r1; ++r) {
        double* table = out + r * row_entries;
        std::fill(table, table + row_entries, 0.0);
        ok &= span(r, int64_t(0), V, p.data(), table);
      }
      if (!ok) bad = true;
    });
    return !bad.load();
  }
  std::vector<double> scratch((parts - 1) * row_entries);
  for (int64_t r = 0; r < rows; ++r) {
    double* dst = out + r * row_entries;
    for_each_part(V, parts, [&](int64_t part, int64_t v0, int64_t v1) {
      std::vector<acc_t> p(buf);
      double* table = part == 0 ? dst : scratch.data() + (part - 1) * row_entries;
      std::fill(table, table + row_entries, 0.0);
      if (!span(r, v0, v1, p.data(), table)) bad = true;
    });
    for (int64_t part = 1; part < parts; ++part) {
      const double* t = scratch.data() + (part - 1) * row_entries;
      for (int64_t i = 0; i < row_entries; ++i) dst[i] += t[i];
    }
  }
  return !bad.load();
}

// Writes every entry of stats (rows x (C or 1) x K x 3, or 5 with the BCE sums): the blob pass.
template <typename scalar_t, typename label_t>
bool accumulate_typed(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                      int64_t K, int64_t bound, at::Tensor& stats) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const label_t* lab = labels.data_ptr<label_t>();
  const bool softmax = prm.activation == kSoftmax;
  const bool squared = uses_pow(prm);
  const int64_t rows = softmax ? B : B * C;
  const int64_t row_entries = (softmax ? C : 1) * K * num_stats(prm);
  const int64_t buf = (softmax ? C : 1) * kBlock;
  return accumulate_rows<acc_t>(
      rows, V, row_entries, buf, stats.data_ptr<double>(),
      [&](int64_t r, int64_t v0, int64_t v1, acc_t* p, double* table) {
        return accumulate_span(x, lab, r, v0, v1, C, V, K, bound, softmax, squared, prm, p, table);
      });
}

// One label's gradient coefficients: a, b of the Dice part; c, d of the BCE part (Dice+CE).
template <typename T>
struct VoxelCoef {
  T a, b, c, d;
};

template <bool CE, typename T>
inline VoxelCoef<T> coef_at(const double* e) {
  return VoxelCoef<T>{T(e[0]), T(e[1]), CE ? T(e[2]) : T(0), CE ? T(e[3]) : T(0)};
}

// dL/dx of one sigmoid / none voxel: (a + b dpow(p)) act', and for Dice+CE
// + d dBCE/dp act' + c (p - y), y = [l > 0].
template <bool CE, typename T>
inline T voxel_grad(T p, VoxelCoef<T> e, bool target, bool squared, int32_t activation) {
  const T act = elementwise_act_grad(p, activation);
  if (!CE) return grad_wrt_p(p, e.a, e.b, squared) * act;
  return (grad_wrt_p(p, e.a, e.b, squared) + e.d * bce_prob_grad(p, target)) * act +
         e.c * (p - (target ? T(1) : T(0)));
}

// The gradient (before grad_out) of m sigmoid / none voxels of one plane; row: the plane's
// coefficient table, kNumCoef (CE: kNumCoefCE) per label. An id outside it clears ok and gives 0.
template <bool CE, typename scalar_t, typename label_t, typename acc_t>
inline void elementwise_backward_block(const scalar_t* x, const label_t* l, int64_t m,
                                       const double* row, int64_t K, const LossParams& prm,
                                       acc_t* p, acc_t* gp, bool& ok) {
  constexpr int nc = CE ? kNumCoefCE : kNumCoef;
  const bool squared = prm.squared_pred;
  activate_block(x, m, prm.activation, p);
  if (block_is_uniform(l, m) && !out_of_range(int64_t(l[0]), K)) {
    const VoxelCoef<acc_t> e = coef_at<CE, acc_t>(row + int64_t(l[0]) * nc);
    const bool t = l[0] != 0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) gp[j] = voxel_grad<CE>(p[j], e, t, squared, prm.activation);
    return;
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t k = int64_t(l[j]);
    if (out_of_range(k, K)) {
      ok = false;
      gp[j] = 0;
      continue;
    }
    gp[j] = voxel_grad<CE>(p[j], coef_at<CE, acc_t>(row + k * nc), k != 0, squared, prm.activation);
  }
}

// The row-block driver of every backward pass: units = rows x V voxels visited in blocks of at
// most kBlock within one row, in parallel chunks of kGrain; block(u, row, v, m, p, gp, ok)
// writes the gradient of voxels [u, u + m) (row `row`, offset v), with p and gp scratches of
// `buf` acc_t, and clears ok on an id outside the coefficient table.
template <typename acc_t, typename Block>
bool backward_blocks(int64_t units, int64_t V, int64_t buf, const Block& block) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, units, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(buf), gp(buf);
    bool ok = true;
    for (int64_t u = begin; u < end;) {
      const int64_t rowi = u / V, v = u % V;
      const int64_t m = std::min({kBlock, V - v, end - u});
      block(u, rowi, v, m, p.data(), gp.data(), ok);
      u += m;
    }
    if (!ok) bad = true;
  });
  return !bad.load();
}

template <typename scalar_t, typename label_t>
bool backward_typed(double grad_out, const at::Tensor& input, const at::Tensor& labels,
                    const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const int64_t K = coef.size(2);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const label_t* lab = labels.data_ptr<label_t>();
  const double* cf = coef.data_ptr<double>();
  scalar_t* gx = grad_input.data_ptr<scalar_t>();
  const bool softmax = prm.activation == kSoftmax;
  const bool squared = prm.squared_pred;
  const acc_t go = static_cast<acc_t>(grad_out);
  const int64_t units = (softmax ? B : B * C) * V;
  const int64_t buf = (softmax ? C : 1) * kBlock;
  return backward_blocks<acc_t>(units, V, buf, [&](int64_t u, int64_t rowi, int64_t v, int64_t m,
                                                   acc_t* p, acc_t* gp, bool& ok) {
      if (!softmax) {
        if (prm.with_ce) {
          elementwise_backward_block<true>(x + u, lab + u, m, cf + rowi * K * kNumCoefCE, K, prm,
                                           p, gp, ok);
        } else {
          elementwise_backward_block<false>(x + u, lab + u, m, cf + rowi * K * kNumCoef, K, prm,
                                            p, gp, ok);
        }
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) gx[u + j] = static_cast<scalar_t>(go * gp[j]);
      } else {
        const int64_t b = rowi;
        softmax_block(x + b * C * V + v, V, C, m, p);
        acc_t dot[kBlock];
        uint8_t derived[kBlock];
        for (int64_t j = 0; j < m; ++j) {
          dot[j] = 0;
          derived[j] = 1;
        }
        for (int64_t c = 1; c <= C; ++c) {
          // channels 1..C-1 first, channel 0 (derived labels) last
          const int64_t ch = c == C ? 0 : c;
          const double* row = cf + (b * C + ch) * K * kNumCoef;
          const label_t* lc = lab + (b * C + ch) * V + v;
          for (int64_t j = 0; j < m; ++j) {
            const int64_t k = ch == 0 ? int64_t(derived[j]) : int64_t(lc[j]);
            if (ch != 0) derived[j] &= (lc[j] == 0);
            acc_t g = 0;
            if (out_of_range(k, K)) {
              ok = false;
            } else {
              g = grad_wrt_p(p[ch * kBlock + j], acc_t(row[k * kNumCoef]),
                             acc_t(row[k * kNumCoef + 1]), squared);
            }
            gp[ch * kBlock + j] = g;
            dot[j] += g * p[ch * kBlock + j];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* g = gx + (b * C + c) * V + v;
#pragma omp simd
          for (int64_t j = 0; j < m; ++j)
            g[j] = static_cast<scalar_t>(go * p[c * kBlock + j] * (gp[c * kBlock + j] - dot[j]));
        }
      }
  });
}
