"""The algorithm text of the custom kernels, written once for Metal and CUDA.

Here: the shared helpers, the v1 projection kernels (the fallback), the weighted combine and
the gated delta step; the prefetching v2 projection kernels (the default) are in
``sources_prefetch.py``.

Each text is the *body* of an ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``; the
per-target parts (thread indices, SIMD/warp shuffles, threadgroup memory, barriers,
address spaces, bit casts) are the ``FM_*`` macros and ``fm_*`` variables that
``codegen.py`` defines for each target. Shapes are compile-time template integers, so
loops unroll and every shape gets its own specialised kernel.

Vocabulary used below:
  lane    one of the 32 threads of a SIMD-group (Metal) / warp (CUDA);
  EPL     elements one lane dequantizes from one 16-byte load (4 uint32 words);
  LPR     lanes that share one matrix row (32, or fewer when a row is short);
  SUB     rows a warp works on side by side (32 / LPR);
  x'      a vector pre-scaled for the "mask in place" dequantization (see HELPERS).
"""

# Helpers shared by the kernels (placed in the kernel header, before the function).
HELPERS = r"""
// ---- flash-moe shared helpers (same text for Metal and CUDA) ----

// q * 2^(BITS*p) for the element whose BITS-wide field sits at bit BITS*p (< 16) of w.
// The masked field is OR-ed into the mantissa of the float 2^23 and 2^23 is subtracted,
// both exact: one bitwise op and one add instead of a shift and a (slow) int->float
// conversion. The caller pre-scales the matching x by 2^-(BITS*p), so that
// (q * 2^(BITS*p)) * (x * 2^-(BITS*p)) == q * x.
FM_INLINE float fm_field(uint32_t w, uint32_t mask) {
  return FM_AS_FLOAT(FM_AND_OR(w, mask, 0x4B000000u)) - 8388608.0f;
}

// 2^-(BITS*p) for element i of a lane chunk: p is its field position inside its
// 16-bit half-word (words are split into halves so that every field sits below bit 16).
template <int BITS>
FM_INLINE float fm_pos_scale(int i) {
  const int half_elems = 16 / BITS;
  const int p = i % half_elems;
  return 1.0f / float(1u << (BITS * p));
}

template <int BITS>
FM_INLINE float fm_pos_unscale(int i) {
  const int half_elems = 16 / BITS;
  return float(1u << (BITS * (i % half_elems)));
}

// sum_i q_i * x'_i over the 4 words of one 16-byte load (EPL = 128 / BITS elements).
template <int BITS>
FM_INLINE float fm_dot_chunk(uint4 w4, FM_THREAD const float* xv) {
  const int pack = 32 / BITS;
  const int half_elems = pack / 2;
  const uint32_t m = (1u << BITS) - 1u;
  const uint32_t ws[4] = {w4.x, w4.y, w4.z, w4.w};
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t v = (h == 0) ? ws[k] : (ws[k] >> 16);
#pragma unroll
      for (int p = 0; p < half_elems; ++p) {
        acc += fm_field(v, m << (BITS * p)) * xv[k * pack + h * half_elems + p];
      }
    }
  }
  return acc;
}

// ---- half-precision products (HP 1 and 2): two weights an instruction ----
// A lane chunk's x is staged as pairs of halves, x * c * 2^-o, c = 2^k a power of two chosen per
// chunk so that no half sum can overflow, o the bit offset of the element's field (below). Pair
// j = word k, field p holds the elements of field p in the word's low and high 16-bit halves.
// HP 1: the masked field alone is a subnormal half, q * 2^(o - 24) exactly (AND, HFMA2); the
// products sum to sum(q x) * c * 2^-24. HP 2: the field OR-ed into 1024.0 minus (1024 + OFF) *
// 2^o is (q - OFF) * 2^o exactly, OFF = 2^(BITS-1) (AND-OR, an HFMA2 against 1.0 that subtracts,
// HFMA2): centred weights keep the half sums small, 2.4-4x more accurate than HP 1
// (benchmarks/KERNELS_NOTES.md, Run 16).
// A field of a 16-bit half sits below bit 10 (the half's mantissa) directly, or after a shift of
// the word by fm_hp_shift bits; o is its offset there.
template <int BITS>
FM_INLINE constexpr int fm_hp_shift() {
  return BITS * (10 / BITS);
}

template <int BITS>
FM_INLINE constexpr int fm_hp_offset(int p) {
  return (BITS * p + BITS <= 10) ? BITS * p : BITS * p - fm_hp_shift<BITS>();
}

// 2^-o for field p (what the staged x carries beside c).
template <int BITS>
FM_INLINE float fm_hp_pos_scale(int p) {
  return 1.0f / float(1u << fm_hp_offset<BITS>(p));
}

// The exponent k of c: the chunk's largest |x| * c lies in [2^(T-1), 2^T), T = 15 for HP 1 (the
// products stay tiny), 15 - (BITS - 1) - log2(64 / BITS) for HP 2 (a half sum of 64 / BITS
// products of |q - OFF| <= 2^(BITS-1) stays below 2^15); clamped so that c and 1 / c stay finite.
template <int BITS, int HP>
FM_INLINE int fm_hp_exponent(float absmax) {
  const int l = (BITS == 8) ? 3 : (BITS == 4) ? 4 : 5;  // log2(64 / BITS)
  const int top = (HP == 1) ? 15 : 15 - (BITS - 1) - l;
  const int e = int((FM_AS_UINT(absmax) >> 23) & 0xFFu) - 127;  // floor(log2(absmax)), -127 for 0
  const int k = top - 1 - e;
  const int lo = (HP == 1) ? -103 : -126, hi = (HP == 1) ? 127 : 126;
  return k < lo ? lo : (k > hi ? hi : k);
}

FM_INLINE float fm_pow2(int k) {  // 2^k for -126 <= k <= 127
  return FM_AS_FLOAT(uint32_t(k + 127) << 23);
}

// What the chunk's half sum is multiplied by: HP 1 2^24 / c, HP 2 1 / c.
template <int HP>
FM_INLINE float fm_hp_unscale(int k) {
  return fm_pow2((HP == 1 ? 24 : 0) - k);
}

// sum over one 16-byte load of (q - OFF) * x * c * 2^-24 (HP 1: OFF 0) or (q - OFF) * x * c (HP 2),
// in half precision, xw the EPL / 2 staged pairs.
template <int BITS, int HP>
FM_INLINE float fm_dot_chunk_hp(uint4 w4, FM_THREAD const uint32_t* xw) {
  constexpr int half_elems = 16 / BITS;
  constexpr int S = fm_hp_shift<BITS>();
  const uint32_t m = ((1u << BITS) - 1u) * 0x10001u;  // a field's mask in both halves
  const uint32_t ws[4] = {w4.x, w4.y, w4.z, w4.w};
  FM_H2 acc = FM_H2_BITS(0u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t shifted = ws[k] >> S;
#pragma unroll
    for (int p = 0; p < half_elems; ++p) {
      const int o = fm_hp_offset<BITS>(p);
      const uint32_t v = (BITS * p + BITS <= 10) ? ws[k] : shifted;
      FM_H2 wq;
      if (HP == 1) {
        wq = FM_H2_BITS(v & (m << o));
      } else {  // (1024 + q 2^o) - (1024 + OFF 2^o), both halves; the half 1024.0 is 0x6400
        const uint32_t base = 0x64006400u + ((1u << (BITS - 1 + o)) * 0x10001u);
        wq = FM_H2_FMA(FM_H2_BITS(FM_AND_OR(v, m << o, 0x64006400u)), FM_H2_BITS(0x3C003C00u),
                       FM_H2_BITS(base ^ 0x80008000u));
      }
      acc = FM_H2_FMA(wq, FM_H2_BITS(xw[k * half_elems + p]), acc);
    }
  }
  return fm_h2_sum(acc);
}

// Butterfly sum over groups of LPR adjacent lanes (every lane of the warp must call it).
template <int LPR>
FM_INLINE float fm_lane_sum(float v) {
#pragma unroll
  for (int m = LPR / 2; m > 0; m >>= 1) {
    v += FM_SHFL_XOR(v, m);
  }
  return v;
}

// Two rows' butterfly sums at once over groups of LPR (>= 2) lanes, sl the lane's place in its
// group: the first step swaps halves so that the lower half goes on with row a and the upper with
// row b; the result is row a's sum on lane 0 of the group, row b's on lane LPR / 2.
template <int LPR>
FM_INLINE float fm_lane_sum_pair(float a, float b, int sl) {
  const bool upper = (sl & (LPR / 2)) != 0;
  float v = (upper ? b : a) + FM_SHFL_XOR(upper ? a : b, LPR / 2);
#pragma unroll
  for (int m = LPR / 4; m > 0; m >>= 1) {
    v += FM_SHFL_XOR(v, m);
  }
  return v;
}

FM_INLINE float fm_sigmoid(float v) {
  return 1.0f / (1.0f + FM_EXP(-v));
}

// Position of element el of a D-long vector in the "lane-major" layout that the
// projection kernels read: [step][i][lane], so that lane l of a warp reading element i
// of its chunk touches consecutive words (conflict-free in threadgroup memory,
// coalesced in device memory).
template <int EPL, int LPR>
FM_INLINE int fm_lane_major(int el) {
  const int step = el / (EPL * LPR);
  const int r = el % (EPL * LPR);
  return (step * EPL + (r % EPL)) * LPR + r / EPL;
}

// The same with float4 slots, [step][i / 4][lane][4], for 16-byte reads (prefetching kernels).
template <int EPL, int LPR>
FM_INLINE int fm_lane_major4(int el) {
  const int step = el / (EPL * LPR);
  const int r = el % (EPL * LPR);
  const int i = r % EPL;
  return ((step * (EPL / 4) + i / 4) * LPR + r / EPL) * 4 + i % 4;
}

// ---- matrix-unit helpers (v6; the FM_MMA_* layout macros come from the target prelude) ----

// 32-bit word i of a 16-byte load.
FM_INLINE uint32_t fm_word(uint4 w, int i) {
  return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// float -> bfloat16 bits, rounded to nearest even (finite values).
FM_INLINE uint32_t fm_bf16_bits(float v) {
  const uint32_t u = FM_AS_UINT(v);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// Piece `piece` of v split into bfloat16 values: v == piece 0 + piece 1 + piece 2 exactly for a
// float32 v (each piece takes the next 8 significant bits); a bfloat16 v is its piece 0.
FM_INLINE float fm_bf16_piece(float v, int piece) {
  float rest = v;
  float p = 0.0f;
  for (int i = 0; i <= piece; ++i) {
    p = FM_AS_FLOAT(fm_bf16_bits(rest) << 16);
    rest -= p;
  }
  return p;
}

// Whether lane l's B fragment holds a used column (columns n = CS * u, u < NU).
FM_INLINE constexpr bool fm_b_used(int l, int NU, int CS) {
  bool used = false;
  for (int v = 0; v < 4; ++v) {
    const int n = FM_MMA_BN(l, v);
    used = used || (n % CS == 0 && n / CS < NU);
  }
  return used;
}

// B fragments are staged only for the lanes that have a used column: their count, and a
// lane's slot among them (-1: its B is zero).
FM_INLINE constexpr int fm_b_slots(int NU, int CS) {
  int s = 0;
  for (int l = 0; l < 32; ++l) {
    s += fm_b_used(l, NU, CS) ? 1 : 0;
  }
  return s;
}

FM_INLINE constexpr int fm_b_slot(int l, int NU, int CS) {
  int s = 0;
  for (int m = 0; m < l; ++m) {
    s += fm_b_used(m, NU, CS) ? 1 : 0;
  }
  return fm_b_used(l, NU, CS) ? s : -1;
}

"""

# Shapes common to the two projection kernels, for an input dimension D (template int).
PROJ_CONSTANTS = r"""
  constexpr int PACK = 32 / BITS;                    // elements per uint32 word
  constexpr int EPL = 4 * PACK;                      // elements per lane per 16-byte load
  constexpr int LPR = (D / EPL < 32) ? D / EPL : 32; // lanes per row
  constexpr int SUB = 32 / LPR;                      // rows side by side in a warp
  constexpr int STEP = LPR * EPL;                    // elements of a row per warp step
  constexpr int NSTEP = D / STEP;
  constexpr int WPR = D / PACK;                      // words per row
  constexpr int GPR = D / GS;                        // groups per row
  const int sub = fm_lane / LPR;
  const int sl = fm_lane % LPR;
"""

# The plain sum of every lane chunk of the token's x (multiplies the biases), by all threads of
# the threadgroup into xsum[D / EPL]; both gate/up kernels stage it.
STAGE_XSUM = r"""  for (int c = fm_tid; c < D / EPL; c += W * 32) {
    float sum = 0.0f;
    for (int i = 0; i < EPL; ++i) {
      sum += static_cast<float>(x[n * D + c * EPL + i]);
    }
    xsum[c] = sum;  // chunk c is lane c % LPR's chunk of step c / LPR
  }
"""

# The R gate and R up partial sums of a lane, zeroed (every gate/up kernel).
GATE_UP_ACC = r"""    float ag[R];
    float au[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      ag[r] = 0.0f;
      au[r] = 0.0f;
    }
"""

# ---- Projection kernels (v1, measured on the H100): one (token, expert) row block per
# threadgroup for gate/up; warps split the experts of a row block for down.

# gate/up projection fused with SwiGLU, one (token, expert) pair per threadgroup row block.
GATE_UP = r"""
  // fm_gate_up: h[pair] = silu(Wg x) * (Wu x) for pair = (token n, slot j), expert inds[pair].
  // Template ints: BITS, GS, D (= hidden, the input dim), I (rows), K, R (row slots per
  // warp), W (warps per threadgroup). Output h: [N*K, I] float32, lane-major and
  // pre-scaled for the down kernel (which reads it with the same BITS).
""" + PROJ_CONSTANTS + r"""
  constexpr int ROWS_TG = W * R * SUB;
  constexpr int RB = I / ROWS_TG;
  constexpr int LPR_H = (I / EPL < 32) ? I / EPL : 32;

  const int pair = fm_tg / RB;
  const int rb = fm_tg % RB;
  const int n = pair / K;
  const int e = int(inds[pair]);

  // Stage x' (this token's x, pre-scaled per field position) in threadgroup memory,
  // lane-major, and the plain sum of each lane chunk (the bias term needs sum(x)).
  FM_SHARED float xs[D];
  FM_SHARED float xsum[D / EPL];
  for (int t = fm_tid; t < D; t += W * 32) {
    const int step = t / STEP;
    const int i = (t % STEP) / LPR;
    const int lane = t % LPR;
    const float v = static_cast<float>(x[n * D + step * STEP + lane * EPL + i]);
    xs[t] = v * fm_pos_scale<BITS>(i);
  }
""" + STAGE_XSUM + r"""  FM_BARRIER();

  const int64_t wbase = int64_t(e) * I;
""" + GATE_UP_ACC + r"""#pragma unroll
  for (int s = 0; s < NSTEP; ++s) {
    const int c = s * STEP + sl * EPL;  // first element of this lane's chunk
    const int grp = c / GS;
    float xv[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      xv[i] = xs[(s * EPL + i) * LPR + sl];
    }
    const float xsm = xsum[s * LPR + sl];
    uint4 qg[R];
    uint4 qu[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // issue every load of the step before using any
      const int row = ((rb * W + fm_warp) * R + r) * SUB + sub;
      const int64_t wrow = (wbase + row) * WPR + c / PACK;
      qg[r] = *((const FM_DEVICE uint4*)(wg + wrow));
      qu[r] = *((const FM_DEVICE uint4*)(wu + wrow));
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = ((rb * W + fm_warp) * R + r) * SUB + sub;
      const int64_t srow = (wbase + row) * GPR + grp;
      ag[r] += static_cast<float>(sg[srow]) * fm_dot_chunk<BITS>(qg[r], xv) +
          static_cast<float>(bg[srow]) * xsm;
      au[r] += static_cast<float>(su[srow]) * fm_dot_chunk<BITS>(qu[r], xv) +
          static_cast<float>(bu[srow]) * xsm;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float gsum = fm_lane_sum<LPR>(ag[r]);
    const float usum = fm_lane_sum<LPR>(au[r]);
    if (sl == 0) {
      const int row = ((rb * W + fm_warp) * R + r) * SUB + sub;
      const float hv = gsum * fm_sigmoid(gsum) * usum;
      const int at = fm_lane_major<EPL, LPR_H>(row);
      h[int64_t(pair) * I + at] = hv * fm_pos_scale<BITS>(row % EPL);
    }
  }
"""

# down projection with routing weights and the k-way sum (optionally the whole combine).
DOWN = r"""
  // fm_down: y[n] = sum_j scores[n,j] * (Wd_{inds[n,j]} h[n,j])  (+ combine if FM_COMBINE).
  // Template ints: BITS, GS, D (= expert dim, the input dim), O (= hidden, rows), K,
  // R (row slots per warp), W (warps per threadgroup; the warps split the K experts and
  // share the rows, then add their partial sums through threadgroup memory).
""" + PROJ_CONSTANTS + r"""
  constexpr int ROWS_TG = R * SUB;
  constexpr int RB = O / ROWS_TG;
  FM_SHARED float part[W * ROWS_TG];  // per-warp partial sums of the rows
  const int n = fm_tg / RB;
  const int rb = fm_tg % RB;

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = 0.0f;
  }
  for (int j = fm_warp; j < K; j += W) {
    const int pair = n * K + j;
    const int64_t wbase = int64_t(inds[pair]) * O;
    const float route = static_cast<float>(scores[pair]);
    float dr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      dr[r] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
      const int c = s * STEP + sl * EPL;
      const int grp = c / GS;
      uint4 q[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = (rb * R + r) * SUB + sub;
        q[r] = *((const FM_DEVICE uint4*)(wd + (wbase + row) * WPR + c / PACK));
      }
      float xv[EPL];
      float xsm = 0.0f;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        xv[i] = h[int64_t(pair) * D + (s * EPL + i) * LPR + sl];
        xsm += xv[i] * fm_pos_unscale<BITS>(i);  // exact: a power of two
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = (rb * R + r) * SUB + sub;
        const int64_t srow = (wbase + row) * GPR + grp;
        dr[r] += static_cast<float>(sd[srow]) * fm_dot_chunk<BITS>(q[r], xv) +
            static_cast<float>(bd[srow]) * xsm;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] += route * dr[r];
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float v = fm_lane_sum<LPR>(acc[r]);
    if (sl == 0) {
      part[fm_warp * ROWS_TG + r * SUB + sub] = v;
    }
  }
  FM_BARRIER();
  // ROWS_TG can exceed the W*32 threads (short rows, few experts): each thread sums a stride.
  for (int t_row = fm_tid; t_row < ROWS_TG; t_row += W * 32) {
    float t = 0.0f;
    for (int w = 0; w < W; ++w) {
      t += part[w * ROWS_TG + t_row];
    }
    const int64_t at = int64_t(n) * O + rb * ROWS_TG + t_row;
#if FM_COMBINE
    t = static_cast<float>(residual[at]) +
        (t + fm_sigmoid(static_cast<float>(shared_gate[n])) * static_cast<float>(shared_out[at]));
#endif
    y[at] = static_cast<OutT>(t);
  }
"""

# residual + expert_out + sigmoid(shared_gate) * shared_out, elementwise.
COMBINE = r"""
  // fm_combine: out = residual + (expert_out + sigmoid(shared_gate[m]) * shared_out).
  // Template ints: HD (row length), W (warps per threadgroup); params[0] = element count
  // (a run-time value, so prompt chunks of any length share one compiled kernel).
  const int64_t idx = int64_t(fm_tg) * (W * 32) + fm_tid;
  if (idx < int64_t(params[0])) {
    const float gate = fm_sigmoid(static_cast<float>(shared_gate[idx / HD]));
    const float v = static_cast<float>(residual[idx]) +
        (static_cast<float>(expert_out[idx]) + gate * static_cast<float>(shared_out[idx]));
    out[idx] = static_cast<OutT>(v);
  }
"""

# one decode step of the gated delta rule, one (b, hv, dv) state row per lane group.
GATED_DELTA = r"""
  // fm_gated_delta: per state row S[b,hv,dv,:] (length DK):
  //   S *= g;  S += k * beta * (v[dv] - S.k);  y[dv] = S.q
  // Template ints: B, HK, HV, DK, DV, R (rows per lane group), W (warps per threadgroup).
  constexpr int LPR = (DK / 4 < 32) ? DK / 4 : 32;  // lanes per row, 4 floats each
  constexpr int SUB = 32 / LPR;
  constexpr int NCH = DK / (4 * LPR);                // float4 chunks per lane
  constexpr int ROWS_TG = W * R * SUB;
  constexpr int NROWS = B * HV * DV;
  const int sub = fm_lane / LPR;
  const int sl = fm_lane % LPR;

  float4 st[R][NCH];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // issue every state load first
    const int row = fm_tg * ROWS_TG + (fm_warp * R + r) * SUB + sub;
    const int lrow = row < NROWS ? row : NROWS - 1;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      st[r][c] = ((const FM_DEVICE float4*)(state + int64_t(lrow) * DK))[sl + c * LPR];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = fm_tg * ROWS_TG + (fm_warp * R + r) * SUB + sub;
    const int lrow = row < NROWS ? row : NROWS - 1;
    const int bh = lrow / DV;  // b * HV + hv
    const int dv = lrow % DV;
    const int b = bh / HV;
    const int hk = (bh % HV) / (HV / HK);
    const int64_t kq = (int64_t(b) * HK + hk) * DK;
    const float gv = static_cast<float>(g[bh]);
    const float bv = static_cast<float>(beta[bh]);
    float kk[NCH][4];
    float kv = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d = (sl + c * LPR) * 4;
      kk[c][0] = static_cast<float>(k[kq + d]);
      kk[c][1] = static_cast<float>(k[kq + d + 1]);
      kk[c][2] = static_cast<float>(k[kq + d + 2]);
      kk[c][3] = static_cast<float>(k[kq + d + 3]);
      st[r][c].x *= gv;
      st[r][c].y *= gv;
      st[r][c].z *= gv;
      st[r][c].w *= gv;
      kv += st[r][c].x * kk[c][0] + st[r][c].y * kk[c][1] + st[r][c].z * kk[c][2] +
          st[r][c].w * kk[c][3];
    }
    kv = fm_lane_sum<LPR>(kv);
    const float delta = bv * (static_cast<float>(v[int64_t(bh) * DV + dv]) - kv);
    float out = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d = (sl + c * LPR) * 4;
      st[r][c].x += kk[c][0] * delta;
      st[r][c].y += kk[c][1] * delta;
      st[r][c].z += kk[c][2] * delta;
      st[r][c].w += kk[c][3] * delta;
      out += st[r][c].x * static_cast<float>(q[kq + d]) +
          st[r][c].y * static_cast<float>(q[kq + d + 1]) +
          st[r][c].z * static_cast<float>(q[kq + d + 2]) +
          st[r][c].w * static_cast<float>(q[kq + d + 3]);
    }
    out = fm_lane_sum<LPR>(out);
    if (row < NROWS) {
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        ((FM_DEVICE float4*)(state_out + int64_t(row) * DK))[sl + c * LPR] = st[r][c];
      }
      if (sl == 0) {
        y[int64_t(bh) * DV + dv] = static_cast<OutT>(out);
      }
    }
  }
"""
