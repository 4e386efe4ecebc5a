"""Algorithm text of the prefetching projection kernels (v2), for Metal and CUDA.

Same vocabulary and helpers as ``sources.py`` (the v1 kernels). Differences: persistent-style
threadgroups (gate/up stages x once per threadgroup and walks many rows; down keeps each
expert's h in registers for every row of its threadgroup), float4 lane-major layouts, and
register double-buffering so a warp's next rows are in flight while it computes. The default:
faster than v1 on the H100 in every measured case (benchmarks/KERNELS_NOTES.md).
"""

from .sources import GATE_UP_ACC, PROJ_CONSTANTS, STAGE_XSUM

# Step s of this lane's x' (EPL values from the staged xs) and the plain sum of that chunk.
X_STEP = r"""      float xv[EPL];
#pragma unroll
      for (int i4 = 0; i4 < E4; ++i4) {
        const float4 v = xs[(s * E4 + i4) * LPR + sl];
        xv[4 * i4] = v.x;
        xv[4 * i4 + 1] = v.y;
        xv[4 * i4 + 2] = v.z;
        xv[4 * i4 + 3] = v.w;
      }
      const float xsm = xsum[s * LPR + sl];
"""

# The gate/up part shared by v2 and the split-K v4: each warp walks its items (R rows of gate
# and of up per lane group), loading the next item while it computes the current one (DB = 1;
# with DB = 0 it loads each item when it gets to it, in half the registers). The kernel defines,
# before these fragments: ITEMS (items of this threadgroup), DB, FM_ITEM_ROW(item, r) (the expert
# row index pr of row slot r), FM_WEIGHT_ROW(pr) (its row in the stacked weights), FM_STORE_H(pr,
# v) (where silu(g) * u of row pr goes), FM_HINT_AHEAD(item) (L2 hints once the warp's next item
# is known; may be empty) and the int ``item`` (the warp's first).
GATE_UP_ITEM_LOADS = r"""
  uint4 ng[R][NSTEP];
  uint4 nu[R][NSTEP];
  ST nsg[R][NSTEP];
  ST nbg[R][NSTEP];
  ST nsu[R][NSTEP];
  ST nbu[R][NSTEP];
#define FM_LOAD_ITEM(item)                                                 \
  for (int r = 0; r < R; ++r) {                                            \
    const int pr = FM_ITEM_ROW(item, r);                                   \
    const int64_t wrow = FM_WEIGHT_ROW(pr);                                \
    for (int s = 0; s < NSTEP; ++s) {                                      \
      const int c = s * STEP + sl * EPL;                                   \
      const int64_t wo = wrow * WPR + c / PACK;                            \
      const int64_t so = wrow * GPR + c / GS;                              \
      ng[r][s] = *((const FM_DEVICE uint4*)(wg + wo));                     \
      nu[r][s] = *((const FM_DEVICE uint4*)(wu + wo));                     \
      nsg[r][s] = sg[so];                                                  \
      nbg[r][s] = bg[so];                                                  \
      nsu[r][s] = su[so];                                                  \
      nbu[r][s] = bu[so];                                                  \
    }                                                                      \
  }
"""

# x' (this token's x, pre-scaled, float4 lane-major) and the chunk sums, staged by the whole
# threadgroup into xs[D / 4] and xsum[D / EPL].
STAGE_X4 = r"""  for (int t = fm_tid; t < D / 4; t += W * 32) {
    const int step = t / (E4 * LPR);
    const int i = ((t % (E4 * LPR)) / LPR) * 4;
    const int at = n * D + step * STEP + (t % LPR) * EPL + i;
    float4 v;
    v.x = static_cast<float>(x[at]) * fm_pos_scale<BITS>(i);
    v.y = static_cast<float>(x[at + 1]) * fm_pos_scale<BITS>(i + 1);
    v.z = static_cast<float>(x[at + 2]) * fm_pos_scale<BITS>(i + 2);
    v.w = static_cast<float>(x[at + 3]) * fm_pos_scale<BITS>(i + 3);
    xs[t] = v;
  }
""" + STAGE_XSUM

# HP (half-precision products): x staged as pairs of halves (fm_dot_chunk_hp), one thread a lane
# chunk: its plain sum into xsum, its scale exponent's unscale into xun, its EPL / 2 pairs into
# xh (uint4 lane-major, [step][pairs / 4][lane]).
STAGE_XH = r"""  for (int c = fm_tid; c < D / EPL; c += W * 32) {
    constexpr int HE = PACK / 2;  // elements of a word's 16-bit half
    float sum = 0.0f;
    float amax = 0.0f;
    for (int i = 0; i < EPL; ++i) {
      const float v = static_cast<float>(x[n * D + c * EPL + i]);
      const float a = v < 0.0f ? -v : v;
      sum += v;
      amax = a > amax ? a : amax;
    }
    xsum[c] = sum;
    const int kx = fm_hp_exponent<BITS, HP>(amax);
    xun[c] = fm_hp_unscale<HP>(kx);
    const float cx = fm_pow2(kx);
    for (int j4 = 0; j4 < EPL / 8; ++j4) {
      uint32_t u[4];
      for (int t = 0; t < 4; ++t) {
        const int j = j4 * 4 + t;  // word j / HE, field j % HE
        const int e0 = c * EPL + (j / HE) * PACK + j % HE;
        const float sc = cx * fm_hp_pos_scale<BITS>(j % HE);
        u[t] = fm_h2_pack(static_cast<float>(x[n * D + e0]) * sc, static_cast<float>(x[n * D + e0 + HE]) * sc);
      }
      uint4 v;
      v.x = u[0];
      v.y = u[1];
      v.z = u[2];
      v.w = u[3];
      xh[((c / LPR) * (EPL / 8) + j4) * LPR + c % LPR] = v;
    }
  }
"""

# Where a gate/up kernel reads row pr of a token's K*I rows (its row in the stacked weights) and
# writes that row's silu(g) * u: h, lane-major and pre-scaled for the down kernel (same BITS).
# Shared by v2 and v6; needs n, K, I, EPL, BITS.
GATE_UP_ROWS = r"""  constexpr int LPR_H = (I / EPL < 32) ? I / EPL : 32;
#define FM_WEIGHT_ROW(pr) (int64_t(inds[n * K + (pr) / I]) * I + (pr) % I)
#define FM_STORE_H(pr, v)                                                              \
  h[int64_t(n * K + (pr) / I) * I + fm_lane_major4<EPL, LPR_H>((pr) % I)] =            \
      (v) * fm_pos_scale<BITS>(((pr) % I) % EPL)
"""

# FM_HINT_ROWS(a, wrow, rows): an L2 hint of rows [wrow, wrow + rows) of gate/up array a (0-5:
# wg, wu, sg, bg, su, bu); needs WPR, GPR, ST. Shared by v2 and v6.
HINT_ROWS = r"""#define FM_HINT_ROWS(a, wrow, rows)                                              \
  switch (a) {                                                                   \
    case 0: FM_PREFETCH_L2(wg + (wrow) * WPR, (rows) * WPR * 4); break;          \
    case 1: FM_PREFETCH_L2(wu + (wrow) * WPR, (rows) * WPR * 4); break;          \
    case 2: FM_PREFETCH_L2(sg + (wrow) * GPR, (rows) * GPR * sizeof(ST)); break; \
    case 3: FM_PREFETCH_L2(bg + (wrow) * GPR, (rows) * GPR * sizeof(ST)); break; \
    case 4: FM_PREFETCH_L2(su + (wrow) * GPR, (rows) * GPR * sizeof(ST)); break; \
    case 5: FM_PREFETCH_L2(bu + (wrow) * GPR, (rows) * GPR * sizeof(ST)); break; \
    default: break;                                                              \
  }
"""

# L2 hints of the gate/up kernels (template int PF): 0 none; 1-15 each warp keeps the rows of its
# PF next items on their way to L2 (one hint per array and item, from lanes 0-5); 16 (PF_RUN) the
# threadgroup hints its whole run at the start (one hint per array and expert it touches). A hint
# holds no registers while the bytes are in flight and changes no result; FM_PREFETCH_L2 is a bulk
# L2 prefetch on CUDA sm_90 and nothing where the target has none (Metal). An item is R * SUB
# consecutive rows of one expert, so each array's part of it is one contiguous range. Needs
# FM_WEIGHT_ROW (as the item loads) and it0 (the threadgroup's first item).
GATE_UP_L2_HINTS = r"""  constexpr int PF_RUN = 16;
""" + HINT_ROWS + r"""#define FM_HINT_ITEM(it, a) FM_HINT_ROWS((a), FM_WEIGHT_ROW((it0 + (it)) * R * SUB), R * SUB)
#define FM_HINT_AHEAD(next)                                                \
  {                                                                        \
    if (PF > 0 && PF < PF_RUN && fm_lane < 6 && (next) + PF * W < ITEMS) { \
      FM_HINT_ITEM((next) + PF * W, fm_lane);                              \
    }                                                                      \
    FM_DOWN_HINT_STEP();                                                   \
  }
  if (PF > 0 && PF < PF_RUN) {  // this warp's next PF items (its first is being loaded directly)
    for (int q = fm_lane; q < 6 * PF; q += 32) {
      const int it = fm_warp + (1 + q / 6) * W;
      if (it < ITEMS) {
        FM_HINT_ITEM(it, q % 6);
      }
    }
  } else if (PF == PF_RUN) {  // the threadgroup's whole run: rows [r0, r1) of the token's K * I
    const int r0 = it0 * R * SUB;
    const int r1 = (it0 + ITEMS) * R * SUB;
    const int e0 = r0 / I;
    for (int q = fm_tid; q < 6 * ((r1 - 1) / I - e0 + 1); q += W * 32) {
      const int e = e0 + q / 6;  // slot of the token's experts
      const int a = (e * I > r0) ? e * I : r0;
      const int b = ((e + 1) * I < r1) ? (e + 1) * I : r1;
      FM_HINT_ROWS(q % 6, FM_WEIGHT_ROW(a), b - a);
    }
  }
"""

# L2 hints of the down projection's rows, given by the gate/up kernel (define FM_DOWN_HINT, template
# int DH, inputs wd, sd, bd): down runs next and reads D rows of each of the token's K experts. The
# rows are cut into G * W slices, one per warp of the token's threadgroups; a warp hints its slice
# (weights, scales and biases of each expert: 3K ranges) once it has done (DH - 1) / 8 of its items
# (DH 1: first thing in its loop, 9: after its last item). Down's bytes then come from DRAM while
# gate/up leaves bandwidth unused, and down finds them in L2; nothing on targets without hints.
# Needs n, G, W, K, D, I, BITS, GS, inds, ITEMS; FM_DOWN_HINT_STEP() once per item (v6: per round,
# with FM_DH_STEPS the warp's rounds), FM_DOWN_HINT_LAST after the loop.
DOWN_L2_HINTS = r"""#if FM_DOWN_HINT
#ifndef FM_DH_STEPS
#define FM_DH_STEPS ((ITEMS > fm_warp) ? (ITEMS - fm_warp + W - 1) / W : 0)  // this warp's items
#endif
  const int dh_items = FM_DH_STEPS;
  const int dh_at = dh_items * (DH - 1) / 8;
  int dh_done = 0;
#define FM_HINT_DOWN()                                                                          \
  {                                                                                             \
    constexpr int DWPR = I * BITS / 32;                                                         \
    constexpr int DGPR = I / GS;                                                                \
    const int slice = (fm_tg % G) * W + fm_warp;                                                \
    const int o0 = int(int64_t(slice) * D / (G * W));                                           \
    const int o1 = int(int64_t(slice + 1) * D / (G * W));                                       \
    for (int q = fm_lane; q < 3 * K && o1 > o0; q += 32) {                                      \
      const int64_t drow = int64_t(inds[n * K + q / 3]) * D + o0;                               \
      if (q % 3 == 0) {                                                                         \
        FM_PREFETCH_L2(wd + drow * DWPR, int64_t(o1 - o0) * DWPR * 4);                          \
      } else {                                                                                  \
        FM_PREFETCH_L2((q % 3 == 1 ? sd : bd) + drow * DGPR, int64_t(o1 - o0) * DGPR * sizeof(sd[0])); \
      }                                                                                         \
    }                                                                                           \
  }
#define FM_DOWN_HINT_STEP() \
  if (dh_done++ == dh_at) FM_HINT_DOWN()
#define FM_DOWN_HINT_LAST() \
  if (dh_done <= dh_at) FM_HINT_DOWN()
#else
#define FM_DOWN_HINT_STEP()
#define FM_DOWN_HINT_LAST()
#endif
"""

# The float step of the item loop: dequantize and sum in float (every version).
FLOAT_STEP = X_STEP + r"""#pragma unroll
      for (int r = 0; r < R; ++r) {
        ag[r] += static_cast<float>(csg[r][s]) * fm_dot_chunk<BITS>(cg[r][s], xv) +
            static_cast<float>(cbg[r][s]) * xsm;
        au[r] += static_cast<float>(csu[r][s]) * fm_dot_chunk<BITS>(cu[r][s], xv) +
            static_cast<float>(cbu[r][s]) * xsm;
      }
"""

# The half-precision step (HP 1 or 2; x staged by STAGE_XH): a chunk's half sum times the
# group's scale and the chunk's unscale; HP 2's centred weights give back OFF * sum(x) via the bias.
HP_STEP = r"""      uint32_t xw[EPL / 2];
#pragma unroll
      for (int j4 = 0; j4 < EPL / 8; ++j4) {
        const uint4 v = xh[(s * (EPL / 8) + j4) * LPR + sl];
        xw[4 * j4] = v.x;
        xw[4 * j4 + 1] = v.y;
        xw[4 * j4 + 2] = v.z;
        xw[4 * j4 + 3] = v.w;
      }
      const float xsm = xsum[s * LPR + sl];
      const float xu = xun[s * LPR + sl];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float gs = static_cast<float>(csg[r][s]);
        const float us = static_cast<float>(csu[r][s]);
        ag[r] += (gs * xu) * fm_dot_chunk_hp<BITS, HP>(cg[r][s], xw) + (static_cast<float>(cbg[r][s]) + HP_OFF * gs) * xsm;
        au[r] += (us * xu) * fm_dot_chunk_hp<BITS, HP>(cu[r][s], xw) + (static_cast<float>(cbu[r][s]) + HP_OFF * us) * xsm;
      }
"""


def gate_up_item_loop(step: str) -> str:
    """The gate/up part shared by v2 and the split-K v4 (see GATE_UP_ITEM_LOADS), with ``step``
    the text that adds step s of the R rows to ag and au."""
    return r"""
  while (item < ITEMS) {  // uniform across the warp
    if (!DB) {  // no double buffer: this item's loads, waited for here
      FM_LOAD_ITEM(item)
    }
    uint4 cg[R][NSTEP];
    uint4 cu[R][NSTEP];
    ST csg[R][NSTEP];
    ST cbg[R][NSTEP];
    ST csu[R][NSTEP];
    ST cbu[R][NSTEP];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int s = 0; s < NSTEP; ++s) {
        cg[r][s] = ng[r][s];
        cu[r][s] = nu[r][s];
        csg[r][s] = nsg[r][s];
        cbg[r][s] = nbg[r][s];
        csu[r][s] = nsu[r][s];
        cbu[r][s] = nbu[r][s];
      }
    }
    const int cur = item;
    item += W;
    if (DB && item < ITEMS) {
      FM_LOAD_ITEM(item)
    }
    FM_HINT_AHEAD(item);
""" + GATE_UP_ACC + r"""#pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
""" + step + r"""    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float gsum = fm_lane_sum<LPR>(ag[r]);
      const float usum = fm_lane_sum<LPR>(au[r]);
      if (sl == 0) {
        const int pr = FM_ITEM_ROW(cur, r);
        FM_STORE_H(pr, gsum * fm_sigmoid(gsum) * usum);
      }
    }
  }
#undef FM_LOAD_ITEM
"""


GATE_UP_ITEM_LOOP = gate_up_item_loop(FLOAT_STEP)

# gate/up projection fused with SwiGLU.
GATE_UP_PF = r"""
  // fm_gate_up_pf: h[pair] = silu(Wg x) * (Wu x) for pair = (token n, slot j), expert inds[pair].
  // Template ints: BITS, GS, D (= hidden, the input dim), I (rows), K, R (rows per item and
  // lane group), W (warps per threadgroup), G (threadgroups per token), DB (1: double-buffered
  // items), PF (L2 hints, see GATE_UP_L2_HINTS), HP (0 float products, 1 or 2 half-precision
  // products, see fm_dot_chunk_hp), DH (with FM_DOWN_HINT: L2 hints of down's
  // rows, see DOWN_L2_HINTS). The K*I rows of a
  // token are cut into items of R*SUB rows; threadgroup g of token n takes a contiguous run
  // of RUN items (G need not divide them: the last run may be shorter), its warps take every
  // W-th one. x' is staged once per threadgroup; each warp loads its next item while it
  // computes the current one.
  // Output h: [N*K, I] float32, lane-major and pre-scaled for the down kernel (same BITS).
""" + PROJ_CONSTANTS + r"""
  constexpr int E4 = EPL / 4;
  constexpr int NI = K * I / (R * SUB);  // items per token
  constexpr int RUN = (NI + G - 1) / G;  // items per threadgroup (fewer in the last ones)
  const int n = fm_tg / G;
  const int it0 = (fm_tg % G) * RUN;
  const int ITEMS = (NI - it0 < RUN) ? NI - it0 : RUN;  // this threadgroup's items

  constexpr float HP_OFF = (HP == 2) ? float(1 << (BITS - 1)) : 0.0f;  // HP 2's weight centre
  FM_SHARED float4 xs[HP ? 1 : D / 4];  // this token's x', lane-major (float products)
  FM_SHARED uint4 xh[HP ? D / 8 : 1];   // x as pairs of halves, lane-major (HP)
  FM_SHARED float xun[HP ? D / EPL : 1];  // each lane chunk's unscale (HP)
  FM_SHARED float xsum[D / EPL];  // plain sum of every lane chunk of x (for the biases)
#define FM_ITEM_ROW(item, r) (((it0 + (item)) * R + (r)) * SUB + sub)  // of the token's K*I rows
""" + GATE_UP_ROWS + GATE_UP_ITEM_LOADS + r"""
  int item = fm_warp;  // this warp's next item, counted inside the threadgroup
  if (DB && item < ITEMS) {  // the first loads fly while x is staged
    FM_LOAD_ITEM(item)
  }
""" + DOWN_L2_HINTS + GATE_UP_L2_HINTS + r"""  if (HP) {
""" + STAGE_XH + r"""  } else {
""" + STAGE_X4 + r"""  }
  FM_BARRIER();
""" + gate_up_item_loop("      if (HP) {\n" + HP_STEP + "      } else {\n" + FLOAT_STEP + "      }\n") + r"""  FM_DOWN_HINT_LAST();
#undef FM_ITEM_ROW
#undef FM_WEIGHT_ROW
#undef FM_STORE_H
#undef FM_HINT_ROWS
#undef FM_HINT_ITEM
#undef FM_HINT_AHEAD
#undef FM_HINT_DOWN
#undef FM_DOWN_HINT_STEP
#undef FM_DOWN_HINT_LAST
#undef FM_DH_STEPS
"""

DOWN_PF = r"""
  // fm_down_pf: y[n] = sum_j scores[n,j] * (Wd_{inds[n,j]} h[n,j])  (+ combine if FM_COMBINE).
  // Template ints: BITS, GS, D (= expert dim, the input dim), O (= hidden, rows), K (warps:
  // warp j takes expert j), R (rows per iteration and lane group), RPT (rows per
  // threadgroup), PF (nonzero: each warp first hints its RPT rows into L2), HP (as gate/up's:
  // 0 float products, 1 or 2 half-precision products). Each warp keeps its
  // h' in registers for all RPT rows, loads its next rows
  // while it computes the current ones, and leaves route * dot in threadgroup memory; the
  // K partial sums of a row are added after one barrier.
""" + PROJ_CONSTANTS + r"""
  constexpr int E4 = EPL / 4;
  constexpr int G = O / RPT;           // threadgroups per token
  constexpr int NIT = RPT / (R * SUB);
  FM_SHARED float part[K * RPT];
  const int n = fm_tg / G;
  const int row0 = (fm_tg % G) * RPT;
  const int pair = n * K + fm_warp;
  const int64_t wbase = int64_t(inds[pair]) * O;
  const float route = static_cast<float>(scores[pair]);

  // Two sets of R rows in registers, used in turn: one is loaded while the other is computed.
  uint4 q0[R][NSTEP], q1[R][NSTEP];
  ST s0[R][NSTEP], s1[R][NSTEP];
  ST b0[R][NSTEP], b1[R][NSTEP];
  // This lane's first word, scale and bias (row row0 + sub of its expert); rows and steps are
  // constant offsets from them, so the loads need no 64-bit address arithmetic.
  const FM_DEVICE uint32_t* lane_w = wd + (wbase + row0 + sub) * WPR + sl * EPL / PACK;
  const FM_DEVICE ST* lane_s = sd + (wbase + row0 + sub) * GPR + sl * EPL / GS;
  const FM_DEVICE ST* lane_b = bd + (wbase + row0 + sub) * GPR + sl * EPL / GS;
#define FM_LOAD_ROWS(q, sc, bi, iter)                                      \
  for (int r = 0; r < R; ++r) {                                            \
    const int dr = ((iter) * R + r) * SUB;                                 \
    for (int s = 0; s < NSTEP; ++s) {                                      \
      q[r][s] = *((const FM_DEVICE uint4*)(lane_w + dr * WPR + s * STEP / PACK)); \
      sc[r][s] = lane_s[dr * GPR + s * STEP / GS];                         \
      bi[r][s] = lane_b[dr * GPR + s * STEP / GS];                         \
    }                                                                      \
  }
// Row r's dot with h over step s: in float, or in half precision (HP; h as pairs of halves).
#define FM_ROW_STEP(q, sc, bi, r, s)                                                            \
  (HP ? (static_cast<float>(sc[r][s]) * xu[s]) * fm_dot_chunk_hp<BITS, HP>(q[r][s], xw[s]) +   \
            (static_cast<float>(bi[r][s]) + HP_OFF * static_cast<float>(sc[r][s])) * xsm[s]     \
      : static_cast<float>(sc[r][s]) * fm_dot_chunk<BITS>(q[r][s], xv[s]) +                       \
            static_cast<float>(bi[r][s]) * xsm[s])
// The R rows of iteration iter: dot products, then the lane sums. Rows go in pairs, one
// butterfly for both (lane 0 of the lane group gets the first row, lane LPR / 2 the second); a
// row left over (odd R, or LPR 1) is summed alone.
#define FM_ROWS(q, sc, bi, iter)                                                         \
  {                                                                                      \
    float d[R];                                                                          \
    for (int r = 0; r < R; ++r) {                                                        \
      d[r] = 0.0f;                                                                       \
      for (int s = 0; s < NSTEP; ++s) {                                                  \
        d[r] += FM_ROW_STEP(q, sc, bi, r, s);                                            \
      }                                                                                  \
    }                                                                                    \
    for (int r = 0; r < R; r += 2) {                                                     \
      if (r + 1 < R && LPR > 1) {                                                        \
        const float v = fm_lane_sum_pair<LPR>(d[r], d[r + 1], sl);                       \
        if (sl % (LPR / 2) == 0) {                                                       \
          part[fm_warp * RPT + ((iter) * R + r + (sl != 0)) * SUB + sub] = route * v;    \
        }                                                                                \
      } else {                                                                           \
        for (int u = r; u < r + 2 && u < R; ++u) {                                       \
          const float v = fm_lane_sum<LPR>(d[u]);                                        \
          if (sl == 0) {                                                                 \
            part[fm_warp * RPT + ((iter) * R + u) * SUB + sub] = route * v;              \
          }                                                                              \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
  }

  if (PF != 0 && fm_lane < 3) {  // L2 hint: this warp's RPT rows (weights, scales, biases)
    const int64_t wrow = wbase + row0;
    if (fm_lane == 0) {
      FM_PREFETCH_L2(wd + wrow * WPR, RPT * WPR * 4);
    } else {
      FM_PREFETCH_L2((fm_lane == 1 ? sd : bd) + wrow * GPR, RPT * GPR * sizeof(ST));
    }
  }
  FM_LOAD_ROWS(q0, s0, b0, 0)
  float xv[NSTEP][EPL];  // this warp's h', kept for every row
  float xsm[NSTEP];
#pragma unroll
  for (int s = 0; s < NSTEP; ++s) {
    xsm[s] = 0.0f;
#pragma unroll
    for (int i4 = 0; i4 < E4; ++i4) {
      const float4 v = ((const FM_DEVICE float4*)(h + int64_t(pair) * D))[(s * E4 + i4) * LPR + sl];
      xv[s][4 * i4] = v.x;
      xv[s][4 * i4 + 1] = v.y;
      xv[s][4 * i4 + 2] = v.z;
      xv[s][4 * i4 + 3] = v.w;
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      xsm[s] += xv[s][i] * fm_pos_unscale<BITS>(i);  // exact: powers of two
    }
  }
  // HP: the lane's h as pairs of halves (as gate/up stages x, STAGE_XH), once for every row.
  constexpr float HP_OFF = (HP == 2) ? float(1 << (BITS - 1)) : 0.0f;
  constexpr int HE = PACK / 2;
  uint32_t xw[NSTEP][EPL / 2];
  float xu[NSTEP];
  if (HP) {
#pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const float v = xv[s][i] * fm_pos_unscale<BITS>(i);
        const float a = v < 0.0f ? -v : v;
        amax = a > amax ? a : amax;
      }
      const int kx = fm_hp_exponent<BITS, HP>(amax);
      xu[s] = fm_hp_unscale<HP>(kx);
      const float cx = fm_pow2(kx);
#pragma unroll
      for (int j = 0; j < EPL / 2; ++j) {
        const int e0 = (j / HE) * PACK + j % HE;  // word j / HE, field j % HE
        const float sc = cx * fm_hp_pos_scale<BITS>(j % HE);  // (h first: c may be near float's top)
        xw[s][j] = fm_h2_pack(xv[s][e0] * fm_pos_unscale<BITS>(e0) * sc, xv[s][e0 + HE] * fm_pos_unscale<BITS>(e0) * sc);
      }
    }
  }

  for (int it = 0; it < NIT; it += 2) {
    if (it + 1 < NIT) {
      FM_LOAD_ROWS(q1, s1, b1, it + 1)
    }
    FM_ROWS(q0, s0, b0, it)
    if (it + 2 < NIT) {
      FM_LOAD_ROWS(q0, s0, b0, it + 2)
    }
    if (it + 1 < NIT) {
      FM_ROWS(q1, s1, b1, it + 1)
    }
  }
#undef FM_ROWS
#undef FM_ROW_STEP
#undef FM_LOAD_ROWS
  FM_BARRIER();
  for (int t = fm_tid; t < RPT; t += K * 32) {
    float v = 0.0f;
    for (int w = 0; w < K; ++w) {
      v += part[w * RPT + t];
    }
    const int64_t at = int64_t(n) * O + row0 + t;
#if FM_COMBINE
    v = static_cast<float>(residual[at]) +
        (v + fm_sigmoid(static_cast<float>(shared_gate[n])) * static_cast<float>(shared_out[at]));
#endif
    y[at] = static_cast<OutT>(v);
  }
"""
