"""Compiled (numba) kernels for decoding on the CPU: the decoder's forward of a few tokens (one
sequence's, or several sequences' packed rows) and the MEDUSA draft heads.

Why compiled: a one-token forward of the shipped voice is ~25 matrix-vector products and ~300
small vector operations. Through numpy each operation costs 2-4 µs of call overhead, ~1.2 ms of a
3 ms step; here the whole forward is one call, and what is left is reading the weights.

Layouts: every matrix is (out, in), torch's `nn.Linear.weight` layout, so that a product is a dot of
each weight row with each input row (`matmul_into`): the weight row is read once for every input row,
which makes a few rows (a speculative tree, a draft) cost little more than one.

fastmath without `nnan`/`ninf`: sums may be reordered and products fused (float rounding only);
masked attention scores are never -inf, they are skipped.
"""

from __future__ import annotations

import math

import numba
import numpy as np

FAST = {"nsz", "arcp", "contract", "reassoc"}
jit = numba.njit(fastmath=FAST, cache=True, nogil=True)


def stacked(weights) -> np.ndarray:
    """torch tensors of one shape (per layer, per head) -> one contiguous float32 array (N, ...):
    the kernels' copy of a model's weights."""
    return np.ascontiguousarray(np.stack([w.detach().numpy() for w in weights]))


@jit
def matmul_into(x, w, y):
    """x (T, K) @ w (N, K).T -> y (T, N). Rows go four at a time, each weight row loaded once for
    the four (four vector accumulators); the remainder one by one."""
    T, K = x.shape
    N = w.shape[0]
    t4 = T - T % 4
    for n in range(N):
        wn = w[n]
        for t in range(0, t4, 4):
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                wk = wn[k]
                a0 += x0[k] * wk
                a1 += x1[k] * wk
                a2 += x2[k] * wk
                a3 += x3[k] * wk
            y[t, n], y[t + 1, n], y[t + 2, n], y[t + 3, n] = a0, a1, a2, a3
        for t in range(t4, T):
            xt = x[t]
            acc = np.float32(0.0)
            for k in range(K):
                acc += xt[k] * wn[k]
            y[t, n] = acc


@jit
def rms_norm_into(x, w, eps, y):
    """x (T, D) -> y (T, D) = x / sqrt(mean(x²) + eps) * w (D,)."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for d in range(D):
            ss += x[t, d] * x[t, d]
        scale = np.float32(1.0 / math.sqrt(ss / D + eps))
        for d in range(D):
            y[t, d] = x[t, d] * scale * w[d]


@jit
def exp_nonpositive(a, bits):
    """a (S,) <= 0 -> exp(a) in place; bits (>= S,) int32 scratch. Vectorisable, unlike the libm
    call: exp(a) = 2^k e^r with k = round(a log2 e) and |r| <= ln(2) / 2 (Cody-Waite); 2^k by writing the float's
    exponent bits, e^r by its Taylor polynomial of degree 7 (truncation < 6e-9 relative, below
    float32 rounding)."""
    two = bits.view(np.float32)
    for i in range(a.shape[0]):
        x = max(a[i], np.float32(-87.0))
        k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))  # log2(e)
        r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)  # ln 2, hi + lo
        p = np.float32(1 / 5040) + r * np.float32(1 / 40320)
        p = np.float32(1 / 720) + r * p
        p = np.float32(1 / 120) + r * p
        p = np.float32(1 / 24) + r * p
        p = np.float32(1 / 6) + r * p
        p = np.float32(1 / 2) + r * p
        p = np.float32(1.0) + r * p
        p = np.float32(1.0) + r * p
        bits[i] = (np.int32(k) + 127) << 23
        a[i] = p * two[i]


@jit
def softmax_row(row, visible, bits):
    """row (S,) of scores -> probabilities in place. visible (>= S,) uint8 says which positions
    count (0: probability 0); empty: all do."""
    S = row.shape[0]
    masked = visible.shape[0] > 0
    low = np.float32(-3.0e38)
    if masked:
        for s in range(S):
            if visible[s] == 0:
                row[s] = low
    m = low
    for s in range(S):
        m = max(m, row[s])
    for s in range(S):
        row[s] -= m
    exp_nonpositive(row, bits)
    if masked:
        for s in range(S):
            if visible[s] == 0:
                row[s] = 0.0
    total = np.float32(0.0)
    for s in range(S):
        total += row[s]
    inv = np.float32(1.0) / total
    for s in range(S):
        row[s] *= inv


@jit
def silu_(x, bits):
    """x (T, N) -> silu(x) = x sigmoid(x) in place, with exp(-|x|) so that the exponent is never
    positive (`exp_nonpositive`); bits (>= N,) int32 scratch."""
    T, N = x.shape
    e = np.empty(N, np.float32)
    for t in range(T):
        for j in range(N):
            e[j] = -abs(x[t, j])
        exp_nonpositive(e, bits)
        for j in range(N):
            sig = np.float32(1.0) / (np.float32(1.0) + e[j])
            if x[t, j] < 0:
                sig = e[j] * sig
            x[t, j] *= sig


@jit
def silu_mul_into(gate_up, bits, out):
    """gate_up (T, 2 I) -> out (T, I) = silu(gate) * up."""
    inter = out.shape[1]
    out[:] = gate_up[:, :inter]
    silu_(out, bits)
    out *= gate_up[:, inter:]


@jit
def draft_heads(hidden, w_block, b_block, w_out, out):
    """MEDUSA heads (`models.heads`): hidden (B, D) -> out (K, B, V), head k's logits
    w_out[k] (h + silu(w_block[k] h + b_block[k])). w_block (K, D, D), b_block (K, D), w_out (K, V, D)."""
    K, D = b_block.shape
    B = hidden.shape[0]
    y = np.empty((B, D), np.float32)
    bits = np.empty(D, np.int32)
    for k in range(K):
        matmul_into(hidden, w_block[k], y)
        y += b_block[k]
        silu_(y, bits)
        y += hidden
        matmul_into(y, w_out[k], out[k])


@jit
def attention_into(qkv, keys, values, visible, n_heads, n_kv, span, bits, out):
    """qkv (T, (H + 2 Hkv) hd) rotated; keys, values (Hkv, max_len, hd) of this layer and sequence,
    the block's own entries already written; visible (T, >= span) uint8, or (1, 0): every position
    < span -> out (T, H hd).
    Per kv head, its G T query rows: scores = Q K.T as one `matmul_into`, softmax, then P V."""
    T = qkv.shape[0]
    hd = keys.shape[2]
    G = n_heads // n_kv
    masked = visible.shape[1] > 0
    scale = np.float32(1.0 / math.sqrt(hd))
    q = np.empty((G * T, hd), np.float32)  # rows t G + g
    o = np.empty((G * T, hd), np.float32)
    scores = np.empty((G * T, span), np.float32)
    for kh in range(n_kv):
        for t in range(T):
            for g in range(G):
                for d in range(hd):
                    q[t * G + g, d] = qkv[t, (kh * G + g) * hd + d] * scale
        matmul_into(q, keys[kh, :span], scores)
        for r in range(G * T):
            softmax_row(scores[r], visible[r // G] if masked else visible[0], bits)
        o[:] = 0.0
        vc = values[kh]
        for s in range(span):
            vs = vc[s]
            for r in range(G * T):
                p = scores[r, s]
                for d in range(hd):
                    o[r, d] += p * vs[d]
        for t in range(T):
            for g in range(G):
                for d in range(hd):
                    out[t, (kh * G + g) * hd + d] = o[t * G + g, d]


@jit
def rotary_(qkv, cos, sin, n_rot, hd):
    """The first n_rot heads of qkv (T, heads hd) in place: x cos + roll(x, hd/2) sin, with sin
    signed as `models.llama.Rotary`'s table. cos, sin (T, hd)."""
    T = qkv.shape[0]
    half = hd // 2
    tmp = np.empty(hd, np.float32)
    for t in range(T):
        for h in range(n_rot):
            base = h * hd
            for d in range(hd):
                tmp[d] = qkv[t, base + d]
            for d in range(half):
                qkv[t, base + d] = tmp[d] * cos[t, d] + tmp[d + half] * sin[t, d]
            for d in range(half, hd):
                qkv[t, base + d] = tmp[d] * cos[t, d] + tmp[d - half] * sin[t, d]


@jit
def decoder_layers(x, cos, sin, visible, keys, values, seq_rows, slots, starts,
                   w_in, w_qkv, w_o, w_post, w_gate_up, w_down, w_norm, eps, n_heads, n_kv):
    """x (R, D) embeddings of the new tokens of B sequences, packed, sequence after sequence
    -> final normed hidden states (R, D).

    seq_rows (B + 1,): sequence b's rows are [seq_rows[b], seq_rows[b + 1]); it lives in cache slot
    slots[b], its block is written at starts[b] onward, and it attends to its first
    starts[b] + (its rows) entries. cos, sin (R, hd): rotary rows of each token's position.
    visible (R, S) uint8: True where a row may attend (S >= every sequence's span), or (1, 0) when
    each row sees all of its own sequence's entries (one token per sequence).
    keys, values (L, slots, Hkv, max_len, hd): the persistent cache. Weights stacked over layers,
    (out, in): w_in, w_post (L, D), w_qkv (L, (H + 2 Hkv) hd, D), w_o (L, D, H hd),
    w_gate_up (L, 2 I, D), w_down (L, D, I). The matrix products take all R rows at once (each weight
    row read once); attention goes sequence by sequence."""
    R, D = x.shape
    B = len(slots)
    L = w_qkv.shape[0]
    hd = keys.shape[4]
    inter = w_down.shape[2]
    masked = visible.shape[1] > 0
    span_max = 0
    for b in range(B):
        span_max = max(span_max, starts[b] + seq_rows[b + 1] - seq_rows[b])
    h = np.empty((R, D), np.float32)
    qkv = np.empty((R, w_qkv.shape[1]), np.float32)
    attn = np.empty((R, n_heads * hd), np.float32)
    proj = np.empty((R, D), np.float32)
    gate_up = np.empty((R, 2 * inter), np.float32)
    act = np.empty((R, inter), np.float32)
    bits = np.empty(max(span_max, inter), np.int32)
    for i in range(L):
        rms_norm_into(x, w_in[i], eps, h)
        matmul_into(h, w_qkv[i], qkv)
        rotary_(qkv, cos, sin, n_heads + n_kv, hd)
        for b in range(B):
            r0, r1, slot, start = seq_rows[b], seq_rows[b + 1], slots[b], starts[b]
            for r in range(r0, r1):
                for kh in range(n_kv):
                    for d in range(hd):
                        keys[i, slot, kh, start + r - r0, d] = qkv[r, (n_heads + kh) * hd + d]
                        values[i, slot, kh, start + r - r0, d] = qkv[r, (n_heads + n_kv + kh) * hd + d]
            span = start + r1 - r0
            attention_into(qkv[r0:r1], keys[i, slot], values[i, slot],
                           visible[r0:r1] if masked else visible, n_heads, n_kv, span,
                           bits[:span], attn[r0:r1])
        matmul_into(attn, w_o[i], proj)
        x += proj
        rms_norm_into(x, w_post[i], eps, h)
        matmul_into(h, w_gate_up[i], gate_up)
        silu_mul_into(gate_up, bits[:inter], act)
        matmul_into(act, w_down[i], proj)
        x += proj
    out = np.empty((R, D), np.float32)
    rms_norm_into(x, w_norm, eps, out)
    return out
