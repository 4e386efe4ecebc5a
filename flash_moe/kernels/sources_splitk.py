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

from .sources import PROJ_CONSTANTS
from .sources_prefetch import GATE_UP_ITEM_LOADS, GATE_UP_ITEM_LOOP, STAGE_X4

EXPERT_MLP_SK = r"""
  // fm_expert_mlp_sk: y[n] += sum over (slot j, chunk c) of
  //   Wd[e][:, c*C:(c+1)*C] (route[n,j] * silu(Wg[e][c rows] x) * (Wu[e][c rows] x)),  e = inds[n,j].
  // Template ints: BITS, GS, D (hidden: gate/up's input dim, down's rows), I (expert dim), K,
  // C (expert rows per threadgroup), W (warps), R (gate/up rows per item and lane group),
  // RD (down rows per lane group per iteration). y: [N, D] float32, zeroed before the launch.
""" + PROJ_CONSTANTS + r"""  // gate/up's (input dim D)
  constexpr int E4 = EPL / 4;
  constexpr int ITEMS = C / (R * SUB);               // gate/up items per threadgroup
  // down: the C-element slice of each of its D rows, LPRD lanes per row (one chunk each)
  constexpr int LPRD = C / EPL;
  constexpr int SUBD = 32 / LPRD;
  constexpr int WPRD = I / PACK;
  constexpr int GPRD = I / GS;
  constexpr int DIT = D / (W * RD * SUBD);           // down iterations per warp
  constexpr int NC = I / C;
  const int subd = fm_lane / LPRD;
  const int sld = fm_lane % LPRD;
  const int pair = fm_tg / NC;
  const int n = pair / K;
  const int i0 = (fm_tg % NC) * C;
  const int64_t e = int64_t(inds[pair]);
  const float route = static_cast<float>(scores[pair]);

  FM_SHARED float4 xs[D / 4];     // this token's x', lane-major
  FM_SHARED float xsum[D / EPL];  // plain sum of every lane chunk of x (for the biases)
  FM_SHARED float hs[C];          // route * silu(g) * u for this chunk's rows

#define FM_ITEM_ROW(item, r) (((item) * R + (r)) * SUB + sub)  // of this chunk's C rows
#define FM_WEIGHT_ROW(pr) (e * I + i0 + (pr))
#define FM_STORE_H(pr, v) hs[pr] = route * (v)
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
  FM_BARRIER();

  // this lane's chunk of h, pre-scaled for the dequantization, and its plain sum (biases)
  float hv[EPL];
  float hsm = 0.0f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const float v = hs[sld * EPL + i];
    hsm += v;
    hv[i] = v * fm_pos_scale<BITS>(i);
  }
  for (int it = 0; it < DIT; ++it) {
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
