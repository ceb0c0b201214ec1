// CPU kernel bodies of the component-wise (Voronoi) losses (ops/cc_ops.h). Included by
// cc_loss_kernel.cpp twice, like kernels_impl.h (baseline ISA and AVX2 + FMA), after it in the
// same namespace: the activation, BCE, block and row drivers are the blob kernels' own
// (activate_block, softmax_block, bce_block, block_is_uniform, accumulate_rows,
// backward_blocks). No include guard on purpose.
//
// Per region k (the table index) the accumulate pass sums I = sum p t, P = sum p^q, T = sum t,
// N = count and, with CE, E = sum BCE(p, t), t = [instance id != 0]. Blocks of one region (the
// common case: regions are large and spatially coherent) are summed in one vectorised step;
// mixed blocks aggregate runs. With check_ids it also verifies that every instance voxel's region
// is its own instance id (false otherwise, like an out-of-range id).

// Adds one block to the row table (ns columns per region). lab: region indices, tgt: instance
// ids (same type). Returns false on an index outside [0, K) or (check) a mismatched id.
template <typename label_t, typename acc_t>
inline bool cc_accumulate_block(const acc_t* p, const label_t* lab, const label_t* tgt, int64_t m,
                                int64_t K, bool squared, bool check, double* row, int64_t ns,
                                const acc_t* e) {
  if (block_is_uniform(lab, m)) {
    const label_t l0 = lab[0];
    const int64_t k = static_cast<int64_t>(l0);
    if (out_of_range(k, K)) return false;
    acc_t si = 0, q = 0, nt = 0;
    int bad = 0;
    if (squared) {
#pragma omp simd reduction(+ : si, q, nt) reduction(| : bad)
      for (int64_t j = 0; j < m; ++j) {
        const bool t = tgt[j] != 0;
        si += t ? p[j] : acc_t(0);
        q += p[j] * p[j];
        nt += t ? acc_t(1) : acc_t(0);
        bad |= int(t && tgt[j] != l0);
      }
    } else {
#pragma omp simd reduction(+ : si, q, nt) reduction(| : bad)
      for (int64_t j = 0; j < m; ++j) {
        const bool t = tgt[j] != 0;
        si += t ? p[j] : acc_t(0);
        q += p[j];
        nt += t ? acc_t(1) : acc_t(0);
        bad |= int(t && tgt[j] != l0);
      }
    }
    if (check && bad) return false;
    double* r = row + k * ns;
    r[cc::kColI] += static_cast<double>(si);
    r[cc::kColP] += static_cast<double>(q);
    r[cc::kColT] += static_cast<double>(nt);  // at most 64: exact in float
    r[cc::kColN] += double(m);
    if (e != nullptr) {
      acc_t se = 0;
#pragma omp simd reduction(+ : se)
      for (int64_t j = 0; j < m; ++j) se += e[j];
      r[cc::kColE] += static_cast<double>(se);
    }
    return true;
  }
  // Mixed block: aggregate runs of equal regions, flush on change (in double).
  int64_t cur = static_cast<int64_t>(lab[0]);
  double si = 0.0, q = 0.0, nt = 0.0, n = 0.0, se = 0.0;
  bool ok = true;
  for (int64_t j = 0; j <= m; ++j) {
    const int64_t k = j < m ? static_cast<int64_t>(lab[j]) : -1;
    if (j == m || k != cur) {
      if (out_of_range(cur, K)) {
        ok = false;
      } else {
        double* r = row + cur * ns;
        r[cc::kColI] += si;
        r[cc::kColP] += q;
        r[cc::kColT] += nt;
        r[cc::kColN] += n;
        if (e != nullptr) r[cc::kColE] += se;
      }
      if (j == m) break;
      cur = k;
      si = q = nt = n = se = 0.0;
    }
    const bool t = tgt[j] != 0;
    if (check && t && tgt[j] != lab[j]) ok = false;
    const double v = p[j];
    si += t ? v : 0.0;
    q += squared ? v * v : v;
    nt += t ? 1.0 : 0.0;
    n += 1.0;
    if (e != nullptr) se += static_cast<double>(e[j]);
  }
  return ok;
}

// Accumulates the voxels [v0, v1) of one row (a (b, c) plane, or for softmax a batch element with
// its C channels) into `table`.
template <typename scalar_t, typename label_t, typename acc_t>
bool cc_accumulate_span(const scalar_t* x, const label_t* lab, const label_t* tgt, int64_t row,
                        int64_t v0, int64_t v1, int64_t C, int64_t V, int64_t K, int64_t bound,
                        bool check, const LossParams& prm, acc_t* p, double* table) {
  const bool softmax = prm.activation == kSoftmax;
  const bool squared = uses_pow(prm);
  const int64_t ns = cc::num_stats(prm);
  uint8_t derived[kBlock];
  acc_t eg[kBlock], eb[kBlock];
  bool ok = true;
  for (int64_t v = v0; v < v1;) {
    const int64_t m = std::min(kBlock, v1 - v);
    if (!softmax) {
      const int64_t u = row * V + v;
      activate_block(x + u, m, prm.activation, p);
      if (prm.with_ce) {
        // one BCE form (cc::make_cc_params sets masking so that eb is a copy of eg)
        bce_block(x + u, p, tgt + u, m, prm, eg, eb);
        ok &= cc_accumulate_block(p, lab + u, tgt + u, m, bound, squared, check, table, ns,
                                  static_cast<const acc_t*>(eg));
      } else {
        ok &= cc_accumulate_block(p, lab + u, tgt + u, m, bound, squared, check, table, ns,
                                  static_cast<const acc_t*>(nullptr));
      }
    } else {
      const int64_t b = row;
      softmax_block(x + b * C * V + v, V, C, m, p);
      for (int64_t j = 0; j < m; ++j) derived[j] = 1;
      for (int64_t c = 1; c < C; ++c) {
        const int64_t off = (b * C + c) * V + v;
        for (int64_t j = 0; j < m; ++j) derived[j] &= (tgt[off + j] == 0);
        ok &= cc_accumulate_block(p + c * kBlock, lab + off, tgt + off, m, bound, squared, check,
                                  table + c * K * ns, ns, static_cast<const acc_t*>(nullptr));
      }
      // Channel 0, the background class: region = target = "no instance in channels 1..C-1".
      ok &= cc_accumulate_block(p, derived, derived, m, K, squared, true, table, ns,
                                static_cast<const acc_t*>(nullptr));
    }
    v += m;
  }
  return ok;
}

template <typename scalar_t, typename label_t>
bool cc_accumulate_typed(const at::Tensor& input, const at::Tensor& labels,
                         const at::Tensor& targets, const LossParams& prm, int64_t K,
                         int64_t bound, bool check, at::Tensor& stats) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const label_t* lab = labels.data_ptr<label_t>();
  const label_t* tgt = targets.data_ptr<label_t>();
  const bool softmax = prm.activation == kSoftmax;
  const int64_t rows = softmax ? B : B * C;
  const int64_t row_entries = (softmax ? C : 1) * K * cc::num_stats(prm);
  const int64_t buf = (softmax ? C : 1) * kBlock;
  return accumulate_rows<acc_t>(
      rows, V, row_entries, buf, stats.data_ptr<double>(),
      [&](int64_t r, int64_t v0, int64_t v1, acc_t* p, double* table) {
        return cc_accumulate_span(x, lab, tgt, r, v0, v1, C, V, K, bound, check, prm, p, table);
      });
}

// dL/dx of one sigmoid / none voxel from its region's coefficients (a, b[, e]) and target t:
// (a t + b dpow(p)) act' (+ the BCE part: e (p - t) for sigmoid, e dBCE/dp for "none").
template <bool CE, typename T>
inline T cc_voxel_grad(T p, const double* e, bool t, bool squared, int32_t activation) {
  const bool logits = activation == kSigmoid;
  const T ce = CE ? T(e[2]) : T(0);
  const VoxelCoef<T> c{t ? T(e[0]) : T(0), T(e[1]), logits ? ce : T(0), logits ? T(0) : ce};
  return voxel_grad<CE>(p, c, t, squared, activation);
}

template <typename scalar_t, typename label_t>
bool cc_backward_typed(double grad_out, const at::Tensor& input, const at::Tensor& labels,
                       const at::Tensor& targets, const at::Tensor& coef, const LossParams& prm,
                       at::Tensor& grad_input) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = input.size(0), C = input.size(1), V = input.size(2);
  const int64_t K = coef.size(2);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const label_t* lab = labels.data_ptr<label_t>();
  const label_t* tgt = targets.data_ptr<label_t>();
  const double* cf = coef.data_ptr<double>();
  scalar_t* gx = grad_input.data_ptr<scalar_t>();
  const bool softmax = prm.activation == kSoftmax;
  const bool squared = prm.squared_pred;
  const int64_t nc = cc::num_coef(prm);
  const acc_t go = static_cast<acc_t>(grad_out);
  const int64_t units = (softmax ? B : B * C) * V;
  const int64_t buf = (softmax ? C : 1) * kBlock;
  return backward_blocks<acc_t>(units, V, buf, [&](int64_t u, int64_t rowi, int64_t v, int64_t m,
                                                   acc_t* p, acc_t* gp, bool& ok) {
    if (!softmax) {
      const double* row = cf + rowi * K * nc;
      const label_t* l = lab + u;
      const label_t* tg = tgt + u;
      activate_block(x + u, m, prm.activation, p);
      if (block_is_uniform(l, m) && !out_of_range(int64_t(l[0]), K)) {
        const double* e = row + int64_t(l[0]) * nc;
        if (prm.with_ce) {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j)
            gp[j] = cc_voxel_grad<true>(p[j], e, tg[j] != 0, squared, prm.activation);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j)
            gp[j] = cc_voxel_grad<false>(p[j], e, tg[j] != 0, squared, prm.activation);
        }
      } else {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t k = int64_t(l[j]);
          if (out_of_range(k, K)) {
            ok = false;
            gp[j] = 0;
            continue;
          }
          gp[j] = prm.with_ce
                      ? cc_voxel_grad<true>(p[j], row + k * nc, tg[j] != 0, squared, prm.activation)
                      : cc_voxel_grad<false>(p[j], row + k * nc, tg[j] != 0, squared,
                                             prm.activation);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) gx[u + j] = static_cast<scalar_t>(go * gp[j]);
      return;
    }
    // softmax (Dice only): dL/dp of each channel, then p_c (g_c - sum_j p_j g_j).
    const int64_t b = rowi;
    softmax_block(x + b * C * V + v, V, C, m, p);
    acc_t dot[kBlock];
    uint8_t derived[kBlock];
    for (int64_t j = 0; j < m; ++j) {
      dot[j] = 0;
      derived[j] = 1;
    }
    for (int64_t c = 1; c <= C; ++c) {
      // channels 1..C-1 first, channel 0 (derived regions and targets) last
      const int64_t ch = c == C ? 0 : c;
      const double* row = cf + (b * C + ch) * K * nc;
      const int64_t off = (b * C + ch) * V + v;
      for (int64_t j = 0; j < m; ++j) {
        const bool t = ch == 0 ? derived[j] != 0 : tgt[off + j] != 0;
        const int64_t k = ch == 0 ? int64_t(derived[j]) : int64_t(lab[off + j]);
        if (ch != 0) derived[j] &= (tgt[off + j] == 0);
        acc_t g = 0;
        if (out_of_range(k, K)) {
          ok = false;
        } else {
          g = grad_wrt_p(p[ch * kBlock + j], t ? acc_t(row[k * nc]) : acc_t(0),
                         acc_t(row[k * nc + 1]), squared);
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
  });
}
