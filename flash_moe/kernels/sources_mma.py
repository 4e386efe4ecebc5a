"""Algorithm text of the kernels on the matrix units (v6: gate/up; with MD, down too), for Metal
and CUDA.

Why: the scalar kernels (v2) spend 3 instructions on every weight element at best (mask,
subtract, fused multiply-add) and 4.6 as compiled; on a GPU whose memory outruns its scalar
issue rate (the H200) that, not the bytes, bounds a batch-1 matvec. Here the products run on
the matrix units: CUDA's ``mma.sync`` (16x16 by 16x8, bfloat16 in, float32 accumulation) and
Metal's 8x8 simdgroup matrices (four of them make the same product), behind ``FM_MMA`` and the
``FM_MMA_*`` layout macros of each target's prelude.

The weights are not dequantized to values: a 2- or 4-bit field is OR-ed into the mantissa of
the bfloat16 128.0, giving exactly 128 + q * 2^(BITS*f) (f: the field's place in the
mantissa). One mask-and-or makes two such values, a pair of fields 16 bits apart in a word,
which is one register of the A fragment. The matching x values are pre-scaled by 2^-(BITS*f)
and the 128 * sum(x) that the products carry is taken off once per group, with the scale and
bias: row += s * (C - 128 * sum(x')) + b * sum(x). The logical k order inside a tile is free
(any order of a dot product's terms), so each lane's A registers come from its own 16-byte
load, and x is staged as B fragments in the order that matches.

The B columns carry (piece of x, group): x is split into bfloat16 pieces (1 for a bfloat16 x,
2 for float16, 3 for float32: exact), and a column takes one group of the block, so the group's
scale applies to the column after the product. CS = 2 puts the used columns on even n only,
spreading the per-group work over more lanes.
"""

import textwrap

from .sources_prefetch import DOWN_L2_HINTS, GATE_UP_ROWS, HINT_ROWS

# Shapes shared by the gate/up kernel and its x staging (template ints BITS, GS, D, P, CS).
MMA_CONSTANTS = r"""
  constexpr int PACK = 32 / BITS;     // fields per uint32 word
  constexpr int HP = PACK / 2;        // field pairs per word: fields p and p + HP (16 bits apart)
  constexpr int F = 7 / BITS;         // fields a bfloat16 mantissa holds in place
  constexpr int EPL = 4 * PACK;       // elements of a lane's 16-byte chunk
  constexpr int BLK = 4 * EPL;        // elements of a row per block: the chunks of 4 lanes
  constexpr int NB = D / BLK;         // blocks per row
  constexpr int TPB = PACK;           // 16-wide k tiles per block
  constexpr int NG = BLK / GS;        // scale groups per block
  constexpr int NU = P * NG;          // used B columns
  constexpr int SLOTS = fm_b_slots(NU, CS);
  constexpr int GPR = D / GS;
  constexpr int ENT = (D / 16) * SLOTS;  // staged B entries (uint2)
  constexpr int BS16 = (ENT + 1) / 2;    // 16-byte units of the B entries
  constexpr int XS16 = (2 * GPR * P + 3) / 4;  // and of xsums
"""

# Which of the 8 B columns this lane's C holds that are used (CS, NU), and their (group, piece);
# unused ones take group 0, which keeps their loads in bounds. Shared by gate/up and down.
MMA_COLUMNS = r"""  constexpr int NC = (CS == 1) ? 2 : 1;  // used columns one lane can hold (FC, FC + 1)
  bool cused[NC];
  int cgrp[NC];
  int cpiece[NC];
  for (int c = 0; c < NC; ++c) {
    const int nn = fc + c;
    cused[c] = nn % CS == 0 && nn / CS < NU;
    cgrp[c] = cused[c] ? (nn / CS) % NG : 0;
    cpiece[c] = cused[c] ? (nn / CS) / NG : 0;
  }
"""

# A register of field pair pp of a lane's 16-byte chunk q (fields pp % HP and + HP, 16 bits apart,
# each OR-ed into the mantissa of the bfloat16 128.0: one mask-and-or), and tile j's B fragment b
# of block bk from the staged bs. Shared by gate/up and down.
MMA_A_REG = (r"""FM_AND_OR(fm_word((q), (pp) / HP) >> (BITS * F * (((pp) % HP) / F)), """
             r"""(MASK << (BITS * (((pp) % HP) % F))) * 0x10001u, 0x43004300u)""")
MMA_B_FRAGMENT = r"""        uint32_t b[2] = {0u, 0u};
        if (slot >= 0) {
          const uint2 bv = bs[(bk * TPB + j) * SLOTS + slot];
          b[0] = bv.x;
          b[1] = bv.y;
        }
"""

# For used column c of block bk: the group's sum of its piece of x (xp) and 128 * the sum of its B
# values (xb, what the products carry). Shared by gate/up and down (indented to each).
MMA_GROUP_XSUMS = r"""const int at = 2 * ((bk * NG + cgrp[c]) * P + cpiece[c]);
const float xp = xsums[at];
const float xb = 128.0f * xsums[at + 1];
"""

# The B entry (two uint32: four bfloat16 values) that a 4-code int4 of xmap names, with FM_X(el)
# the float x element el (codes: element << 4 | piece << 2 | field place f, or -1 for a zero).
B_ENTRY = r"""
      const int codes[4] = {code4.x, code4.y, code4.z, code4.w};
      uint32_t hv[4];
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int code = codes[v];
        float val = 0.0f;
        if (code >= 0) {
          val = fm_bf16_piece(FM_X(code >> 4), (code >> 2) & 3) * (1.0f / float(1u << (BITS * (code & 3))));
        }
        hv[v] = fm_bf16_bits(val);
      }
      const uint32_t ent_lo = hv[0] | (hv[1] << 16);
      const uint32_t ent_hi = hv[2] | (hv[3] << 16);
"""

# xsums of combo c = (group c / P, piece c % P), by one warp: the sum of the piece over the group
# and the sum of its pre-scaled values (what the B columns hold), in plain and scaled.
XSUM_COMBO = r"""
    const int g = c / P;
    float plain = 0.0f;
    float scaled = 0.0f;
    for (int i = fm_lane; i < GS; i += 32) {
      const int el = g * GS + i;
      const float v = fm_bf16_piece(FM_X(el), c % P);
      plain += v;
      scaled += v * (1.0f / float(1u << (BITS * (((el % PACK) % HP) % F))));
    }
    plain = fm_lane_sum<32>(plain);
    scaled = fm_lane_sum<32>(scaled);
"""

# x staged for v6's gate/up once per token (the FM_XB variant of the kernel copies it instead of
# staging x in every threadgroup): the B entries, then xsums, in the layout of the kernel's
# threadgroup memory. With FM_FROM_H, h staged the same way for the down kernel on the matrix
# units, one (token, slot) pair per "token".
STAGE_X_MMA = r"""
  // fm_stage_x_mma: xb[n] = [B entries, BS16 x 16 bytes][xsums, XS16 x 16 bytes] of token n.
  // Template ints: BITS, GS, D, P, CS (as the gate/up kernel's), W (warps), TPT (threadgroups
  // per token). Input xmap as the gate/up kernel's.
""" + MMA_CONSTANTS + r"""
  const int n = fm_tg / TPT;
  const int part = fm_tg % TPT;
  FM_DEVICE uint32_t* out = xb + int64_t(n) * 4 * (BS16 + XS16);
#if FM_FROM_H  // x: h of (token, slot) pair n as gate/up writes it for v2's down (lane-major, pre-scaled)
  constexpr int LPR_H = (D / EPL < 32) ? D / EPL : 32;
#define FM_X(el) (static_cast<float>(x[n * D + fm_lane_major4<EPL, LPR_H>(el)]) * fm_pos_unscale<BITS>((el) % EPL))
#else
#define FM_X(el) static_cast<float>(x[n * D + (el)])
#endif
  for (int e = part * W * 32 + fm_tid; e < ENT; e += TPT * W * 32) {
    const int4 code4 = ((const FM_DEVICE int4*)xmap)[e];
""" + B_ENTRY + r"""    out[2 * e] = ent_lo;
    out[2 * e + 1] = ent_hi;
  }
  for (int c = part * W + fm_warp; c < GPR * P; c += TPT * W) {  // (warp-uniform: lane sums)
""" + XSUM_COMBO + r"""    if (fm_lane == 0) {
      out[4 * BS16 + 2 * c] = FM_AS_UINT(plain);
      out[4 * BS16 + 2 * c + 1] = FM_AS_UINT(scaled);
    }
  }
#undef FM_X
"""

# gate/up projection fused with SwiGLU on the matrix units.
GATE_UP_MMA = r"""
  // fm_gate_up_mma: h[pair] = silu(Wg x) * (Wu x) for pair = (token n, slot j), expert inds[pair],
  // as fm_gate_up_pf writes it. Template ints: BITS (2 or 4), GS, D (hidden), I (rows), K, W
  // (warps), S (warps that split a row's blocks), G (threadgroups per token), PD (blocks each
  // warp has in flight), P (bfloat16 pieces of x), CS (column stride of the used B columns),
  // RBM (rounds whose row sums are added after one barrier), PF (L2 hints, below); input xmap
  // (FM_XB 0: the threadgroup stages x itself) or xb (FM_XB 1: fm_stage_x_mma's, copied); with
  // FM_DOWN_HINT, DH and inputs wd, sd, bd: L2 hints of down's rows as v2's (DOWN_L2_HINTS), by
  // rounds.
  // An item is 16 rows of one expert (one A tile tall); the W / S items of a round are worked on
  // by S warps each, every warp taking NB / S blocks of the row and loading PD blocks ahead
  // (across items).
""" + MMA_CONSTANTS + r"""  constexpr int NBS = NB / S;         // blocks per warp and item
  constexpr int WPR = D / PACK;
  constexpr int NI = K * I / 16;      // items per token
  constexpr int RUN = (NI + G - 1) / G;
  constexpr int WR = W / S;           // items per round
  constexpr int ROUNDS = (RUN + WR - 1) / WR;
  constexpr int RB = (ROUNDS < RBM) ? ROUNDS : RBM;  // rounds whose row sums wait for one barrier
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int n = fm_tg / G;
  const int it0 = (fm_tg % G) * RUN;
  const int ITEMS = (NI - it0 < RUN) ? NI - it0 : RUN;
  const int ks = fm_warp % S;         // blocks [ks * NBS, (ks + 1) * NBS) of each item's rows
  const int fr = FM_MMA_FR(fm_lane);  // A rows fr and fr + 8
  const int fc = FM_MMA_FC(fm_lane);  // A column pairs fc, fc + 8; C columns fc, fc + 1
  const int qt = fc / 2;              // the chunk of a block this lane loads

  // Threadgroup memory (dynamic on CUDA: it can exceed 48 KiB; launch.py sizes it the same way),
  // in 16-byte units: bs, x as B fragments [tile][slot]; xsums [group][piece], the sum of the
  // piece and of its B values; scratch, x as floats while it is staged, then the row sums
  // [round of the batch][warp][gate, up][row]; lane_slot, each lane's B slot (-1: its B is zero).
  constexpr int SCR = (D > RB * W * 2 * 16) ? D : RB * W * 2 * 16;
  FM_RING(uint4, fm_smem, BS16 + XS16 + SCR / 4 + 8);
  FM_TG uint2* bs = (FM_TG uint2*)fm_smem;
  FM_TG float* xsums = (FM_TG float*)(fm_smem + BS16);
  FM_TG float* scratch = (FM_TG float*)(fm_smem + BS16 + XS16);
  FM_TG int* lane_slot = (FM_TG int*)(fm_smem + BS16 + XS16 + SCR / 4);
  if (fm_tid < 32) {
    lane_slot[fm_tid] = fm_b_slot(fm_tid, NU, CS);
  }

""" + MMA_COLUMNS + r"""
""" + GATE_UP_ROWS + r"""  uint4 qw[PD][4];         // ring: [gate row fr, gate row fr + 8, up fr, up fr + 8]
  ST qs[PD][NC][2][4];     // ring: [column][row][sg, bg, su, bu]
#define FM_MMA_LOAD(item, b, s)                                            \
  {                                                                        \
    const int pr = (it0 + (item)) * 16 + fr;                               \
    const int bk = ks * NBS + (b);                                         \
    for (int r = 0; r < 2; ++r) {                                          \
      const int64_t wrow = FM_WEIGHT_ROW(pr + 8 * r);                      \
      const int64_t wo = wrow * WPR + (bk * BLK + qt * EPL) / PACK;        \
      qw[s][r] = *((const FM_DEVICE uint4*)(wg + wo));                     \
      qw[s][2 + r] = *((const FM_DEVICE uint4*)(wu + wo));                 \
      for (int c = 0; c < NC; ++c) {                                       \
        const int64_t so = wrow * GPR + bk * NG + cgrp[c];                 \
        qs[s][c][r][0] = sg[so];                                           \
        qs[s][c][r][1] = bg[so];                                           \
        qs[s][c][r][2] = su[so];                                           \
        qs[s][c][r][3] = bu[so];                                           \
      }                                                                    \
    }                                                                      \
  }

  // L2 hints (PF): 0 none; 1-15 the item PF rounds ahead of each warp's (by its first k-split's
  // warp); 16 the threadgroup's whole run at the start. An item is 16 rows of one expert: one
  // contiguous range in each of the six arrays.
""" + HINT_ROWS + r"""#define FM_HINT_ARRAY(it, a) FM_HINT_ROWS((a), FM_WEIGHT_ROW((it0 + (it)) * 16), 16)
#define FM_HINT_AHEAD(it)                                        \
  if (PF > 0 && PF < 16 && ks == 0 && fm_lane < 6 && (it) < ITEMS) { \
    FM_HINT_ARRAY((it), fm_lane);                                \
  }
  if (PF == 16) {
    for (int q = fm_tid; q < 6 * ITEMS; q += W * 32) {
      FM_HINT_ARRAY(q / 6, q % 6);
    }
  }

#define FM_DH_STEPS ((ITEMS + WR - 1) / WR)  // rounds, the same for every warp
""" + DOWN_L2_HINTS + r"""
  int item = fm_warp / S;  // this warp's item in the current round
  for (int r = 1; r < PF && PF < 16; ++r) {
    FM_HINT_AHEAD(item + r * WR)
  }
  if (item < ITEMS) {      // the first blocks fly while x is staged
#pragma unroll
    for (int i = 0; i < PD; ++i) {
      FM_MMA_LOAD(item, i, i)
    }
  }

#if FM_XB
  {  // x staged once per token by fm_stage_x_mma: a straight copy, all loads issued first
    constexpr int CPT = (BS16 + XS16 + W * 32 - 1) / (W * 32);
    uint4 cp[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int t = fm_tid + i * W * 32;
      if (t < BS16 + XS16) {
        cp[i] = ((const FM_DEVICE uint4*)xb)[n * (BS16 + XS16) + t];
      }
    }
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int t = fm_tid + i * W * 32;
      if (t < BS16 + XS16) {
        fm_smem[t] = cp[i];
      }
    }
  }
#else
  // Staging, with every global load of a thread issued before any is waited for (each would
  // otherwise cost a memory latency): x into scratch, xmap into registers.
  constexpr int XPT = (D + W * 32 - 1) / (W * 32);
  constexpr int EPT = (ENT + W * 32 - 1) / (W * 32);
  float xr[XPT];
#pragma unroll
  for (int i = 0; i < XPT; ++i) {
    const int t = fm_tid + i * W * 32;
    xr[i] = t < D ? static_cast<float>(x[n * D + t]) : 0.0f;
  }
  int4 cr[EPT];
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    const int e = fm_tid + i * W * 32;
    cr[i] = ((const FM_DEVICE int4*)xmap)[e < ENT ? e : 0];
  }
#pragma unroll
  for (int i = 0; i < XPT; ++i) {
    const int t = fm_tid + i * W * 32;
    if (t < D) {
      scratch[t] = xr[i];
    }
  }
  FM_BARRIER();
#define FM_X(el) scratch[(el)]
#pragma unroll
  for (int i = 0; i < EPT; ++i) {  // x as B fragments: [tile][slot]
    const int e = fm_tid + i * W * 32;
    const int4 code4 = cr[i];
""" + B_ENTRY + r"""    if (e < ENT) {
      uint2 ent;
      ent.x = ent_lo;
      ent.y = ent_hi;
      bs[e] = ent;
    }
  }
  for (int c = fm_warp; c < GPR * P; c += W) {  // (warp-uniform: lane sums)
""" + XSUM_COMBO + r"""    if (fm_lane == 0) {
      xsums[2 * c] = plain;
      xsums[2 * c + 1] = scaled;
    }
  }
#undef FM_X
#endif
  FM_BARRIER();
  const int slot = lane_slot[fm_lane];

  for (int round = 0, base = 0; base < ITEMS; ++round, base += WR) {  // uniform across the threadgroup
    const int next = item + WR;
    FM_HINT_AHEAD(item + PF * WR)
    FM_DOWN_HINT_STEP();
    float accg[2] = {0.0f, 0.0f};
    float accu[2] = {0.0f, 0.0f};
    if (item < ITEMS) {  // uniform across the warp
      for (int b0 = 0; b0 < NBS; b0 += PD) {
#pragma unroll
        for (int i = 0; i < PD; ++i) {
          const int bk = ks * NBS + b0 + i;
          float cg[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          float cu[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int j = 0; j < TPB; ++j) {
            uint32_t ag[4];
            uint32_t au[4];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {  // pair 2j + hh: columns fc (+ 8 for hh = 1)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
#define FM_A(q, pp) """ + MMA_A_REG + r"""
                ag[2 * hh + r] = FM_A(qw[i][r], 2 * j + hh);
                au[2 * hh + r] = FM_A(qw[i][2 + r], 2 * j + hh);
#undef FM_A
              }
            }
""" + MMA_B_FRAGMENT + r"""            FM_MMA(cg, ag, b);
            FM_MMA(cu, au, b);
          }
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            if (cused[c]) {
""" + textwrap.indent(MMA_GROUP_XSUMS, " " * 14) + r"""#pragma unroll
              for (int r = 0; r < 2; ++r) {
                accg[r] += static_cast<float>(qs[i][c][r][0]) * (cg[2 * r + c] - xb) +
                    static_cast<float>(qs[i][c][r][1]) * xp;
                accu[r] += static_cast<float>(qs[i][c][r][2]) * (cu[2 * r + c] - xb) +
                    static_cast<float>(qs[i][c][r][3]) * xp;
              }
            }
          }
          const int nb = b0 + i + PD;  // refill this ring slot
          if (nb < NBS) {
            FM_MMA_LOAD(item, nb, i)
          } else if (next < ITEMS) {
            FM_MMA_LOAD(next, nb - NBS, i)
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a row: their column sums
      accg[r] += FM_SHFL_XOR(accg[r], FM_MMA_XOR0);
      accg[r] += FM_SHFL_XOR(accg[r], FM_MMA_XOR1);
      accu[r] += FM_SHFL_XOR(accu[r], FM_MMA_XOR0);
      accu[r] += FM_SHFL_XOR(accu[r], FM_MMA_XOR1);
      if (fc == 0) {
        scratch[(((round % RB) * W + fm_warp) * 2) * 16 + fr + 8 * r] = accg[r];
        scratch[(((round % RB) * W + fm_warp) * 2 + 1) * 16 + fr + 8 * r] = accu[r];
      }
    }
    if (round % RB == RB - 1 || base + WR >= ITEMS) {  // the batch's rows: add the S k-splits
      FM_BARRIER();
      const int first = round - round % RB;
      for (int t = fm_tid; t < (round % RB + 1) * WR * 16; t += W * 32) {
        const int rr = t / (WR * 16);
        const int wi = (t / 16) % WR;
        const int it = (first + rr) * WR + wi;
        if (it < ITEMS) {
          float g = 0.0f;
          float u = 0.0f;
          for (int q = 0; q < S; ++q) {
            g += scratch[((rr * W + wi * S + q) * 2) * 16 + t % 16];
            u += scratch[((rr * W + wi * S + q) * 2 + 1) * 16 + t % 16];
          }
          FM_STORE_H((it0 + it) * 16 + t % 16, g * fm_sigmoid(g) * u);
        }
      }
      FM_BARRIER();
    }
    item = next;
  }
  FM_DOWN_HINT_LAST();
#undef FM_MMA_LOAD
#undef FM_HINT_DOWN
#undef FM_DOWN_HINT_STEP
#undef FM_DOWN_HINT_LAST
#undef FM_DH_STEPS
#undef FM_HINT_ROWS
#undef FM_HINT_ARRAY
#undef FM_HINT_AHEAD
#undef FM_WEIGHT_ROW
#undef FM_STORE_H
"""

# down projection with the routing weights and the k-way sum on the matrix units: v6's product
# (one matrix instead of gate and up), with h staged per (token, slot) pair by fm_stage_x_mma.
DOWN_MMA = r"""
  // fm_down_mma: y[n] = sum_j scores[n,j] * (Wd_{inds[n,j]} h[n,j])  (+ combine if FM_COMBINE).
  // Template ints: BITS, GS, D (expert dim: the input one), O (hidden: the rows), K (warps: warp
  // j takes slot j), T (16-row tiles per threadgroup), PD (blocks each warp has in flight), P
  // (bfloat16 pieces of h), CS (column stride of the used B columns). Input hb: fm_stage_x_mma's
  // output for the N * K pairs ([B entries][xsums] each, BS16 + XS16 16-byte units).
  // Each warp copies its pair's staged h into threadgroup memory, walks (tile, block) with PD
  // blocks in flight, adds route * row sums into part after each tile, and the K sums of a row
  // are added after one barrier, in slot order (the same sum on every run).
""" + MMA_CONSTANTS + r"""  constexpr int WPR = D / PACK;
  constexpr int G = O / (16 * T);     // threadgroups per token
  constexpr int STEPS = T * NB;       // (tile, block) steps of a warp
  constexpr int STG = BS16 + XS16;    // a pair's staged h, 16-byte units
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int n = fm_tg / G;
  const int row0 = (fm_tg % G) * 16 * T;
  const int pair = n * K + fm_warp;
  const int64_t wbase = int64_t(inds[pair]) * O + row0;
  const float route = static_cast<float>(scores[pair]);
  const int fr = FM_MMA_FR(fm_lane);  // A rows fr and fr + 8
  const int fc = FM_MMA_FC(fm_lane);  // A column pairs fc, fc + 8; C columns fc, fc + 1
  const int qt = fc / 2;              // the chunk of a block this lane loads

  // Threadgroup memory (16-byte units): each warp's staged h; part, route * row sums [warp][row];
  // lane_slot, each lane's B slot (-1: its B is zero).
  FM_RING(uint4, fm_smem, K * STG + (K * 16 * T + 3) / 4 + 8);
  FM_TG uint2* bs = (FM_TG uint2*)(fm_smem + fm_warp * STG);
  FM_TG float* xsums = (FM_TG float*)(fm_smem + fm_warp * STG + BS16);
  FM_TG float* part = (FM_TG float*)(fm_smem + K * STG);
  FM_TG int* lane_slot = (FM_TG int*)(fm_smem + K * STG + (K * 16 * T + 3) / 4);
  if (fm_tid < 32) {
    lane_slot[fm_tid] = fm_b_slot(fm_tid, NU, CS);
  }
""" + MMA_COLUMNS + r"""
  uint4 qw[PD][2];       // ring: [row fr, row fr + 8] of a block
  ST qs[PD][NC][2][2];   // ring: [column][row][sd, bd]
#define FM_MMA_LOAD(q, s)                                                  \
  {                                                                        \
    const int bk = (q) % NB;                                               \
    for (int r = 0; r < 2; ++r) {                                          \
      const int64_t wrow = wbase + ((q) / NB) * 16 + fr + 8 * r;           \
      qw[s][r] = *((const FM_DEVICE uint4*)(wd + wrow * WPR + (bk * BLK + qt * EPL) / PACK)); \
      for (int c = 0; c < NC; ++c) {                                       \
        const int64_t so = wrow * GPR + bk * NG + cgrp[c];                 \
        qs[s][c][r][0] = sd[so];                                           \
        qs[s][c][r][1] = bd[so];                                           \
      }                                                                    \
    }                                                                      \
  }
#pragma unroll
  for (int i = 0; i < PD; ++i) {  // the first blocks fly while h is copied
    if (i < STEPS) {
      FM_MMA_LOAD(i, i)
    }
  }
  {  // this warp's staged h: a straight copy, all loads issued first
    constexpr int CPT = (STG + 31) / 32;
    uint4 cp[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int t = fm_lane + i * 32;
      if (t < STG) {
        cp[i] = ((const FM_DEVICE uint4*)hb)[int64_t(pair) * STG + t];
      }
    }
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int t = fm_lane + i * 32;
      if (t < STG) {
        fm_smem[fm_warp * STG + t] = cp[i];
      }
    }
  }
  FM_BARRIER();
  const int slot = lane_slot[fm_lane];

  float acc[2] = {0.0f, 0.0f};
  for (int q0 = 0; q0 < STEPS; q0 += PD) {  // (PD divides NB: a ring pass stays in one tile)
#pragma unroll
    for (int i = 0; i < PD; ++i) {
      const int q = q0 + i;
      const int bk = q % NB;
      float cm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < TPB; ++j) {
        uint32_t a[4];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {  // pair 2j + hh: columns fc (+ 8 for hh = 1)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
#define FM_A(q, pp) """ + MMA_A_REG + r"""
            a[2 * hh + r] = FM_A(qw[i][r], 2 * j + hh);
#undef FM_A
          }
        }
""" + MMA_B_FRAGMENT + r"""        FM_MMA(cm, a, b);
      }
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        if (cused[c]) {
""" + textwrap.indent(MMA_GROUP_XSUMS, " " * 10) + r"""#pragma unroll
          for (int r = 0; r < 2; ++r) {
            acc[r] += static_cast<float>(qs[i][c][r][0]) * (cm[2 * r + c] - xb) +
                static_cast<float>(qs[i][c][r][1]) * xp;
          }
        }
      }
      if (q + PD < STEPS) {  // refill this ring slot
        FM_MMA_LOAD(q + PD, i)
      }
      if (bk == NB - 1) {  // the tile's rows are done: the 4 lanes of a row add their columns
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc[r] += FM_SHFL_XOR(acc[r], FM_MMA_XOR0);
          acc[r] += FM_SHFL_XOR(acc[r], FM_MMA_XOR1);
          if (fc == 0) {
            part[fm_warp * 16 * T + (q / NB) * 16 + fr + 8 * r] = route * acc[r];
          }
          acc[r] = 0.0f;
        }
      }
    }
  }
#undef FM_MMA_LOAD
  FM_BARRIER();
  for (int t = fm_tid; t < 16 * T; t += K * 32) {
    float v = 0.0f;
    for (int w = 0; w < K; ++w) {
      v += part[w * 16 * T + t];
    }
    const int64_t at = int64_t(n) * O + row0 + t;
#if FM_COMBINE
    v = static_cast<float>(residual[at]) +
        (v + fm_sigmoid(static_cast<float>(shared_gate[n])) * static_cast<float>(shared_out[at]));
#endif
    y[at] = static_cast<OutT>(v);
  }
"""
