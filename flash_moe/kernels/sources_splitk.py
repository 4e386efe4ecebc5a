"""Algorithm text of the split-K expert kernel (v4), for Metal and CUDA.

One launch computes the whole expert MLP of a decode step with no dependency between
threadgroups: threadgroup (token n, slot j, chunk c) computes C rows of gate and up of expert
``inds[n, j]``, keeps silu(g) * u * route for them in threadgroup memory, and multiplies that
C-long slice of h by the matching C columns of the down projection. The k * I / C partial
down products of a token are added into its output with atomic adds. v2's second kernel has
to wait for every gate/up row; here the down rows of a chunk stream as soon as that chunk's
h is known, and the GPU sees the whole step's weights as one wave of independent work.

The price: floating-point atomics make the output's last bits depend on the order the
threadgroups finish in (not bit-reproducible from run to run), and the output is a float32
accumulator that must start at zero (the launch asks MLX to fill it). A fused residual and
shared-expert combine would still need a cast back to the model's dtype, so the combine stays
its own kernel, which casts on the way (``launch.plan_expert_mlp``).
"""

from .sources import GATE_UP_ACC, PROJ_CONSTANTS
from .sources_prefetch import GATE_UP_ITEM_LOADS, GATE_UP_ITEM_LOOP, STAGE_X4, X_STEP

# Where a split-K threadgroup works: (token n, slot j) = pair, expert e, its chunk of C expert rows
# from i0; in down, LPRD lanes share a row (lane sld holds one EPL chunk of the row's C columns).
SPLIT_K_PLACE = r"""  constexpr int LPRD = C / EPL;
  constexpr int SUBD = 32 / LPRD;
  constexpr int WPRD = I / PACK;
  constexpr int GPRD = I / GS;
  constexpr int NC = I / C;
  const int subd = fm_lane / LPRD;
  const int sld = fm_lane % LPRD;
  const int pair = fm_tg / NC;
  const int n = pair / K;
  const int i0 = (fm_tg % NC) * C;
  const int64_t e = int64_t(inds[pair]);
  const float route = static_cast<float>(scores[pair]);
"""

# This lane's chunk of h (lanes sld of LPRD per down row), pre-scaled for the dequantization,
# and its plain sum (for the biases); after the barrier that completes hs.
H_SLICE = r"""  float hv[EPL];
  float hsm = 0.0f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const float v = hs[sld * EPL + i];
    hsm += v;
    hv[i] = v * fm_pos_scale<BITS>(i);
  }
"""

EXPERT_MLP_SK = r"""
  // fm_expert_mlp_sk: y[n] += sum over (slot j, chunk c) of
  //   Wd[e][:, c*C:(c+1)*C] (route[n,j] * silu(Wg[e][c rows] x) * (Wu[e][c rows] x)),  e = inds[n,j].
  // Template ints: BITS, GS, D (hidden: gate/up's input dim, down's rows), I (expert dim), K,
  // C (expert rows per threadgroup), W (warps), R (gate/up rows per item and lane group),
  // RD (down rows per lane group per iteration). y: [N, D] float32, zeroed before the launch.
""" + PROJ_CONSTANTS + r"""  // gate/up's (input dim D)
  constexpr int E4 = EPL / 4;
  constexpr int ITEMS = C / (R * SUB);               // gate/up items per threadgroup
""" + SPLIT_K_PLACE + r"""  constexpr int DIT = D / (W * RD * SUBD);           // down iterations per warp

  FM_SHARED float4 xs[D / 4];     // this token's x', lane-major
  FM_SHARED float xsum[D / EPL];  // plain sum of every lane chunk of x (for the biases)
  FM_SHARED float hs[C];          // route * silu(g) * u for this chunk's rows

#define FM_ITEM_ROW(item, r) (((item) * R + (r)) * SUB + sub)  // of this chunk's C rows
#define FM_WEIGHT_ROW(pr) (e * I + i0 + (pr))
#define FM_STORE_H(pr, v) hs[pr] = route * (v)
#define FM_HINT_AHEAD(next)
  constexpr int DB = 1;
""" + GATE_UP_ITEM_LOADS + r"""
  uint4 nq[RD];
  ST ns[RD];
  ST nb[RD];
#define FM_LOAD_DOWN(iter)                                                 \
  for (int r = 0; r < RD; ++r) {                                           \
    const int row = (((iter) * W + fm_warp) * RD + r) * SUBD + subd;       \
    const int64_t wrow = e * D + row;                                      \
    const int c = i0 + sld * EPL;                                          \
    nq[r] = *((const FM_DEVICE uint4*)(wd + wrow * WPRD + c / PACK));      \
    ns[r] = sd[wrow * GPRD + c / GS];                                      \
    nb[r] = bd[wrow * GPRD + c / GS];                                      \
  }

  int item = fm_warp;  // this warp's next gate/up item
  if (item < ITEMS) {  // the first loads fly while x is staged
    FM_LOAD_ITEM(item)
  }
  FM_LOAD_DOWN(0)  // independent of h: in flight during the whole gate/up phase
""" + STAGE_X4 + r"""  FM_BARRIER();

""" + GATE_UP_ITEM_LOOP + r"""#undef FM_ITEM_ROW
#undef FM_WEIGHT_ROW
#undef FM_STORE_H
#undef FM_HINT_AHEAD
  FM_BARRIER();

""" + H_SLICE + r"""  for (int it = 0; it < DIT; ++it) {
    uint4 cq[RD];
    ST cs[RD];
    ST cb[RD];
#pragma unroll
    for (int r = 0; r < RD; ++r) {
      cq[r] = nq[r];
      cs[r] = ns[r];
      cb[r] = nb[r];
    }
    if (it + 1 < DIT) {
      FM_LOAD_DOWN(it + 1)
    }
#pragma unroll
    for (int r = 0; r < RD; ++r) {
      float d = static_cast<float>(cs[r]) * fm_dot_chunk<BITS>(cq[r], hv) + static_cast<float>(cb[r]) * hsm;
      d = fm_lane_sum<LPRD>(d);
      if (sld == 0) {
        FM_ATOMIC_ADD(y + int64_t(n) * D + ((it * W + fm_warp) * RD + r) * SUBD + subd, d);
      }
    }
  }
#undef FM_LOAD_DOWN
"""

# v5: v4's threadgroups and sums, with each warp's weight bytes staged through a ring of P
# stages in threadgroup memory by asynchronous copies. v4 keeps one item in flight per warp in
# registers (a threadgroup's time is then a chain of ~50 memory round trips); here P - 1 stages
# are in flight and hold no registers. On CUDA the copies are cp.async; Metal has no
# equivalent, so there they are plain copies (correct, no overlap: Macs keep v4).
#
# A warp's stages, in order: its gate/up items (weights: each lane copies the 16-byte chunks it
# will itself use; scales and biases of the item's rows: whole rows, copied by the warp
# together, so the warp syncs before reading them), then its down iterations (each lane copies
# its weight chunk and the 4-byte words holding its rows' scale and bias).
# Threadgroup memory (one block, dynamic on CUDA): x', the chunk sums of x, h, then the rings.
EXPERT_MLP_SKA = r"""
  // fm_expert_mlp_ska: v4's result (see fm_expert_mlp_sk) with asynchronously staged weights.
  // Template ints: as v4, plus P (ring stages per warp). Needs LPR == 32 (SUB == 1) and
  // rows of scales that are whole 16-byte chunks (GPR * sizeof(ST) % 16 == 0).
""" + PROJ_CONSTANTS + r"""
  constexpr int E4 = EPL / 4;
  constexpr int ITEMS = C / R;                       // gate/up items per threadgroup (SUB == 1)
  constexpr int NG = ITEMS / W;                      // gate/up stages per warp
""" + SPLIT_K_PLACE + r"""  constexpr int ND = D / (W * RD * SUBD);            // down stages per warp
  constexpr int NT = NG + ND;
  constexpr int SZ = int(sizeof(ST));
  constexpr int G16 = GPR * SZ / 16;                 // 16-byte chunks of one row's scales
  constexpr int WQ16 = R * NSTEP * 2 * 32;           // gate/up weights of an item, whole warp
  constexpr int SC16 = 4 * R * G16;                  // ... its rows' scales and biases (sg bg su bu)
  constexpr int DN16 = RD * 32 + RD * 2 * 32 / 4;    // down stage: weights, then scale/bias words
  constexpr int SLOT16 = (WQ16 + SC16 > DN16) ? WQ16 + SC16 : DN16;
  constexpr int HEAD16 = D / 4 + (D / EPL + C + 3) / 4;  // x', chunk sums, h

  FM_RING(uint4, fm_smem, HEAD16 + W * P * SLOT16);
  FM_TG float4* xs = (FM_TG float4*)fm_smem;
  FM_TG float* xsum = (FM_TG float*)(fm_smem + D / 4);
  FM_TG float* hs = xsum + D / EPL;
  FM_TG uint4* ring = fm_smem + HEAD16 + fm_warp * (P * SLOT16);

#define FM_ISSUE(t)                                                                         \
  {                                                                                         \
    FM_TG uint4* slot = ring + ((t) % P) * SLOT16;                                          \
    if ((t) < NG) {                                                                         \
      const int item = fm_warp + (t) * W;                                                   \
      for (int r = 0; r < R; ++r) {                                                         \
        const int64_t wrow = e * I + i0 + item * R + r;                                     \
        for (int s = 0; s < NSTEP; ++s) {                                                   \
          const int64_t wo = wrow * WPR + (s * STEP + sl * EPL) / PACK;                     \
          FM_CP_ASYNC16(slot + ((r * NSTEP + s) * 2) * 32 + fm_lane, (const FM_DEVICE uint4*)(wg + wo));     \
          FM_CP_ASYNC16(slot + ((r * NSTEP + s) * 2 + 1) * 32 + fm_lane, (const FM_DEVICE uint4*)(wu + wo)); \
        }                                                                                   \
      }                                                                                     \
      for (int q = fm_lane; q < SC16; q += 32) {                                            \
        const int m = q / (R * G16);                                                        \
        const int64_t wrow = e * I + i0 + item * R + (q / G16) % R;                         \
        const FM_DEVICE ST* src = m == 0 ? sg : m == 1 ? bg : m == 2 ? su : bu;             \
        FM_CP_ASYNC16(slot + WQ16 + q, (const FM_DEVICE uint4*)(src + wrow * GPR) + q % G16); \
      }                                                                                     \
    } else if ((t) < NT) {                                                                  \
      const int it = (t) - NG;                                                              \
      for (int r = 0; r < RD; ++r) {                                                        \
        const int64_t wrow = e * D + ((it * W + fm_warp) * RD + r) * SUBD + subd;           \
        const int c = i0 + sld * EPL;                                                       \
        const int64_t so = (wrow * GPRD + c / GS) * SZ / 4;                                 \
        FM_CP_ASYNC16(slot + r * 32 + fm_lane, (const FM_DEVICE uint4*)(wd + wrow * WPRD + c / PACK)); \
        FM_CP_ASYNC4((FM_TG uint32_t*)(slot + RD * 32) + (2 * r) * 32 + fm_lane,            \
                     (const FM_DEVICE uint32_t*)sd + so);                                   \
        FM_CP_ASYNC4((FM_TG uint32_t*)(slot + RD * 32) + (2 * r + 1) * 32 + fm_lane,        \
                     (const FM_DEVICE uint32_t*)bd + so);                                   \
      }                                                                                     \
    }                                                                                       \
    FM_CP_COMMIT();                                                                         \
  }

  for (int t = 0; t < P - 1; ++t) {  // the first stages fly while x is staged
    FM_ISSUE(t)
  }
""" + STAGE_X4 + r"""  FM_BARRIER();

  for (int t = 0; t < NG; ++t) {
    FM_WARP_SYNC();  // every lane is done with the slot that stage t + P - 1 reuses
    FM_ISSUE(t + P - 1)
    FM_CP_WAIT(P - 1);  // all but the P - 1 newest stages have landed: stage t has
    FM_WARP_SYNC();     // ... for the whole warp (the scales were copied by other lanes)
    const FM_TG uint4* slot = ring + (t % P) * SLOT16;
    const FM_TG ST* scl = (const FM_TG ST*)(slot + WQ16);
    const int item = fm_warp + t * W;
""" + GATE_UP_ACC + r"""#pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
""" + X_STEP + r"""      const int gi = (s * STEP + sl * EPL) / GS;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 qg = slot[((r * NSTEP + s) * 2) * 32 + fm_lane];
        const uint4 qu = slot[((r * NSTEP + s) * 2 + 1) * 32 + fm_lane];
        ag[r] += static_cast<float>(scl[(0 * R + r) * GPR + gi]) * fm_dot_chunk<BITS>(qg, xv) +
            static_cast<float>(scl[(1 * R + r) * GPR + gi]) * xsm;
        au[r] += static_cast<float>(scl[(2 * R + r) * GPR + gi]) * fm_dot_chunk<BITS>(qu, xv) +
            static_cast<float>(scl[(3 * R + r) * GPR + gi]) * xsm;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float gsum = fm_lane_sum<LPR>(ag[r]);
      const float usum = fm_lane_sum<LPR>(au[r]);
      if (sl == 0) {
        hs[item * R + r] = route * (gsum * fm_sigmoid(gsum) * usum);
      }
    }
  }
  FM_BARRIER();

""" + H_SLICE + r"""  const int half = ((i0 + sld * EPL) / GS * SZ % 4) / SZ;  // which ST of the copied word is ours
  for (int t = NG; t < NT; ++t) {
    FM_WARP_SYNC();
    FM_ISSUE(t + P - 1)
    FM_CP_WAIT(P - 1);
    const FM_TG uint4* slot = ring + (t % P) * SLOT16;
    const FM_TG uint32_t* words = (const FM_TG uint32_t*)(slot + RD * 32);
    const int it = t - NG;
#pragma unroll
    for (int r = 0; r < RD; ++r) {
      const float sc = static_cast<float>(((const FM_TG ST*)(words + (2 * r) * 32 + fm_lane))[half]);
      const float bi = static_cast<float>(((const FM_TG ST*)(words + (2 * r + 1) * 32 + fm_lane))[half]);
      float d = sc * fm_dot_chunk<BITS>(slot[r * 32 + fm_lane], hv) + bi * hsm;
      d = fm_lane_sum<LPRD>(d);
      if (sld == 0) {
        FM_ATOMIC_ADD(y + int64_t(n) * D + ((it * W + fm_warp) * RD + r) * SUBD + subd, d);
      }
    }
  }
#undef FM_ISSUE
"""
