"""The Triton sources of wanalpha.models.kernels (imported only where Triton is installed): one program per row
(or block of rows / elements), arithmetic in float32, 64-bit offsets (a decoder activation exceeds 2^31 elements)."""

import triton
import triton.language as tl

# ruff: noqa: N803 - Triton's compile-time constants are upper case


@triton.jit(do_not_specialize=["rows", "tail_start"])  # sizes: one compiled kernel for every length
def rms_norm_rows(
    x_ptr,
    gamma_ptr,
    b_ptr,
    y_ptr,
    tail_ptr,
    r_ptr,
    s_ptr,
    rows,
    tail_start,
    scale,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SILU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SUM: tl.constexpr,
):
    # BLOCK_M rows of C contiguous channels per program; 64-bit offsets (a decoder activation exceeds 2^31). x +
    # b[channel] first, rounded once to x's dtype (the bits of the bias pass, add_row_bias, before the norm; b is
    # zeros where there is no bias to add: x exactly, and one compiled form, so one order of the norm's sum, for both).
    # RESIDUAL: then + r (rows as x's), rounded once more (add_row_bias's residual), that sum also stored into s (SUM).
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    col = tl.arange(0, BLOCK_C)[None, :]
    mask = (row < rows) & (col < C)
    x = tl.load(x_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=col < C, other=0.0).to(tl.float32)
    x = (x + b).to(x_ptr.dtype.element_ty).to(tl.float32)
    if RESIDUAL:
        x = (x + tl.load(r_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if SUM:
            tl.store(s_ptr + row * C + col, x, mask=mask)
        x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
    gamma = tl.load(gamma_ptr + col, mask=col < C, other=0.0).to(tl.float32)
    y = x / tl.maximum(norm, 1e-12) * scale * gamma  # F.normalize(x) · √C · gamma, in float32
    if SILU:
        y = y * tl.sigmoid(y)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * C + col, y, mask=mask)
    # rows from tail_start on also into tail (a causal convolution's cached frames; tail_start = rows: none)
    tl.store(tail_ptr + (row - tail_start) * C + col, y, mask=mask & (row >= tail_start))


@triton.jit
def rounded(v, CODE: tl.constexpr):
    # v (float32 or float64) rounded to the dtype of CODE and back to float32, as an eager cast then .float().
    if CODE == 1:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        v = v.to(tl.float16).to(tl.float32)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit(do_not_specialize=["tokens"])  # sizes: one compiled kernel for every length
def layer_norm_rows(
    x_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    tokens,
    eps,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    X_ROUND: tl.constexpr,
):
    # One row (token) per program: float32 LayerNorm [· w + b], cast to x's dtype (upstream's type_as), then
    # [· (1 + scale) + shift of the row's sample, in float32]; stored in y's dtype.
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_C)
    mask = col < C
    x = tl.load(x_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / C
    y = centred * tl.rsqrt(var + eps)
    if AFFINE:
        y = y * tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
    y = rounded(y, X_ROUND)
    if MODULATE:
        sample = row // tokens
        scale = tl.load(scale_ptr + sample * C + col, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + sample * C + col, mask=mask, other=0.0)
        y = y * (1.0 + scale) + shift
    tl.store(y_ptr + row * C + col, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tokens", "rot_rows"])  # sizes: one compiled kernel for every length
def rms_norm_rope_rows(
    x_ptr,
    w_ptr,
    rot_ptr,
    y_ptr,
    tokens,
    rot_rows,
    eps,
    C: tl.constexpr,
    HALF_HEAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_F64: tl.constexpr,
    X_ROUND: tl.constexpr,
    W_ROUND: tl.constexpr,
):
    # One row (token) of C = heads · head_dim values per program, as C/2 adjacent pairs: x · rsqrt(mean(x²) + eps)
    # in float32, cast to x's dtype, times w (cast to the promoted dtype), then, for rows under rot_rows, each
    # pair rotated by the row's (cos, sin) (float32 or float64 math, the result float32): stored in y's dtype.
    row = tl.program_id(0).to(tl.int64)
    pair = tl.arange(0, BLOCK_P)
    mask = pair < C // 2
    even = tl.load(x_ptr + row * C + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + row * C + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / C + eps)
    w_even = tl.load(w_ptr + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptr + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    even = rounded(rounded(even * r, X_ROUND) * w_even, W_ROUND)
    odd = rounded(rounded(odd * r, X_ROUND) * w_odd, W_ROUND)
    if ROPE:
        token = row % tokens
        at = rot_ptr + (token * HALF_HEAD + pair % HALF_HEAD) * 2
        inside = mask & (token + 0 * pair < rot_rows)  # the row is one of the rotated ones
        cos = tl.load(at, mask=inside, other=1.0)
        sin = tl.load(at + 1, mask=inside, other=0.0)
        if ROPE_F64:
            e, o = even.to(tl.float64), odd.to(tl.float64)
        else:
            e, o = even, odd
        even = (e * cos - o * sin).to(tl.float32)
        odd = (e * sin + o * cos).to(tl.float32)
    tl.store(y_ptr + row * C + 2 * pair, even.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + row * C + 2 * pair + 1, odd.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tokens"])  # sizes: one compiled kernel for every length
def residual_rows(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    tokens,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    X_ROUND: tl.constexpr,
    GATE: tl.constexpr,
):
    # BLOCK channels of one row (token) per program: out = x + (y · gate of the row's sample, in float32 [GATE], cast
    # to x's dtype), in x's dtype. The grid is (rows, channel blocks): the sample is one division per program (a
    # division per element by the runtime token count, as the first flat form did, held it to a fifth of the bandwidth).
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < C
    x = tl.load(x_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
    if GATE:
        y = y * tl.load(gate_ptr + (row // tokens) * C + col, mask=mask, other=0.0).to(tl.float32)
    out = x + rounded(y, X_ROUND)
    tl.store(out_ptr + row * C + col, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "tokens"])  # sizes: one compiled kernel for every length
def add_row_bias(
    x_ptr,
    b_ptr,
    r_ptr,
    rows,
    tokens,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    # In place, a BLOCK_R × BLOCK_C tile of a (rows, C) x per program: x + b[the row's sample (PER_SAMPLE: row //
    # tokens; else 0), channel], the sum in float32 rounded once to x's dtype (as PyTorch's x.add_(b)); with RESIDUAL
    # then + r (a (rows, C) tensor of x's dtype), rounded once more (as a second PyTorch add).
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (row < rows) & (col < C)
    x = tl.load(x_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
    if PER_SAMPLE:
        b = tl.load(b_ptr + (row // tokens) * C + col, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.load(b_ptr + col, mask=col < C, other=0.0).to(tl.float32)
    y = (x + b).to(x_ptr.dtype.element_ty)
    if RESIDUAL:
        y = (y.to(tl.float32) + tl.load(r_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty
        )
    tl.store(x_ptr + row * C + col, y, mask=mask)


@triton.jit(do_not_specialize=["rows", "height", "width"])  # sizes: one compiled kernel for every length
def phase_rows(
    y_ptr,
    b_ptr,
    out_ptr,
    rows,
    height,
    width,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BIAS: tl.constexpr,
):
    # A BLOCK_R × BLOCK_C tile of the (N·2H·2W, C) rows of a channels-last ×2 upsampled convolution's output per
    # program, gathered from its four phases: out[n, 2i+a, 2j+b, c] = y[n, i+a, j+b, (2a+b)·C + c] (y: (N, H+1, W+1,
    # 4C) rows), + bias[c] with BIAS, the sum in float32 rounded once to out's dtype (as PyTorch's add of the bias).
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (row < rows) & (col < C)
    ow = row % (2 * width)
    oh = (row // (2 * width)) % (2 * height)
    n = row // (4 * height * width)
    a = oh % 2
    b = ow % 2
    pixel = (n * (height + 1) + oh // 2 + a) * (width + 1) + ow // 2 + b
    v = tl.load(y_ptr + pixel * (4 * C) + (2 * a + b) * C + col, mask=mask, other=0.0)
    if BIAS:
        v = (v.to(tl.float32) + tl.load(b_ptr + col, mask=col < C, other=0.0).to(tl.float32)).to(
            out_ptr.dtype.element_ty
        )
    tl.store(out_ptr + row * C + col, v, mask=mask)


@triton.jit
def _exact_dot(a, b, UPCAST: tl.constexpr):
    # a · b in float32 from bf16 / fp16 operands (exact products, float32 sums); UPCAST: as float32 operands (Triton's
    # interpreter multiplies bf16 operands as their integer bits), the same products
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit(do_not_specialize=["height", "width"])  # sizes: one compiled kernel for every frame size
def conv3_few_outputs(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    height,
    width,
    CIN: tl.constexpr,
    COUT: tl.constexpr,
    N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # A 3 × 3 × 3 convolution with few outputs (COUT ≤ N, the weight's rows zero-padded to N) of a channels-last
    # (T + 2, H, W, CIN) x whose first two frames are the causal ones: out (T, H, W, COUT), spatial zero padding 1.
    # A program: output frame t (input frames t, t + 1, t + 2), ROWS output rows of BLOCK_W columns. It walks the
    # input rows from the one above its first output row to the one below its last, each read once a frame and column
    # shift, and adds each into the three output rows that read it (kernel rows 0, 1, 2: output rows r + 1, r, r - 1),
    # three accumulators rolled down a row at a time; an output row is stored once its last input row is in.
    # w: (27, CIN, N) rows, tap (kt · 3 + kh) · 3 + kw. float32 sums of exact products (+ bias), rounded once to out's
    # dtype.
    pid_r = tl.program_id(1)
    row_blocks = tl.cdiv(height, ROWS)
    t = (pid_r // row_blocks).to(tl.int64)
    h0 = (pid_r % row_blocks) * ROWS
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.arange(0, BLOCK_K)
    n = tl.arange(0, N)
    above = tl.zeros((BLOCK_W, N), tl.float32)  # output row r - 1
    here = tl.zeros((BLOCK_W, N), tl.float32)  # output row r
    below = tl.zeros((BLOCK_W, N), tl.float32)  # output row r + 1
    for r in range(h0 - 1, h0 + ROWS + 1):
        rr = tl.zeros((BLOCK_W,), tl.int32) + r  # the row, per column: masks of one shape
        row_ok = (rr >= 0) & (rr < height)
        for step in range(9 * tl.cdiv(CIN, BLOCK_K)):  # (frame, column shift) × channel block: a loop, not unrolled
            c0 = (step % tl.cdiv(CIN, BLOCK_K)) * BLOCK_K
            shift = step // tl.cdiv(CIN, BLOCK_K)
            kt = shift // 3
            kw = shift % 3
            col = w + (kw - 1)
            pixel = ((t + kt) * height + r) * width + col
            ok = row_ok & (col >= 0) & (col < width)
            kin = (c0 + k) < CIN
            xt = tl.load(x_ptr + pixel[:, None] * CIN + (c0 + k)[None, :], mask=ok[:, None] & kin[None, :], other=0.0)
            tap = (kt * 3) * 3 + kw  # kernel row 0; rows 1 and 2 are 3 and 6 taps on
            wk = (tap * CIN + c0 + k) * N
            w0 = tl.load(w_ptr + wk[:, None] + n[None, :], mask=kin[:, None], other=0.0)
            w1 = tl.load(w_ptr + (wk + 3 * CIN * N)[:, None] + n[None, :], mask=kin[:, None], other=0.0)
            w2 = tl.load(w_ptr + (wk + 6 * CIN * N)[:, None] + n[None, :], mask=kin[:, None], other=0.0)
            below += _exact_dot(xt, w0, UPCAST)
            here += _exact_dot(xt, w1, UPCAST)
            above += _exact_dot(xt, w2, UPCAST)
        o = r - 1  # complete: its rows o - 1, o, o + 1 are in
        v = above
        if BIAS:
            v += tl.load(b_ptr + n, mask=n < COUT, other=0.0).to(tl.float32)[None, :]
        out = (t * height + o) * width + w
        keep = (rr - 1 >= h0) & (rr - 1 < height) & (w < width)
        tl.store(
            out_ptr + out[:, None] * COUT + n[None, :],
            v.to(out_ptr.dtype.element_ty),
            mask=keep[:, None] & (n < COUT)[None, :],
        )
        above = here
        here = below
        below = tl.zeros((BLOCK_W, N), tl.float32)


@triton.jit
def _max_nan(a, b):  # a maximum that keeps NaN, as torch.amax
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["rows"])  # sizes: one compiled kernel for every length
def fp8_quantize_rows(x_ptr, q_ptr, scale_ptr, rows, fp8_max, reciprocal, tiny, C: tl.constexpr, BLOCK: tl.constexpr):
    # One row of C values per program, read twice in BLOCK-wide pieces (the second pass from L2): its scale
    # max(max|x| · reciprocal, tiny) (float32, stored), then q = clamp(x / scale, ±fp8_max) rounded to nearest-even
    # float8_e4m3fn, the division correctly rounded (as PyTorch's): the eager per-token quantisation, bit for bit.
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        col = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + col, mask=col < C, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    scale = tl.maximum(tl.reduce(amax, 0, _max_nan) * reciprocal, tiny, propagate_nan=tl.PropagateNan.ALL)
    tl.store(scale_ptr + row, scale)
    for start in range(0, C, BLOCK):
        col = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + col, mask=col < C, other=0.0).to(tl.float32)
        q = tl.clamp(tl.div_rn(x, scale), -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
        tl.store(q_ptr + row * C + col, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=col < C)


@triton.jit
def fp8_dequantize_scaled(
    q_ptr, s_ptr, c_ptr, out_ptr, n, C: tl.constexpr, BLOCK: tl.constexpr, W_ROUND: tl.constexpr, HAS_C: tl.constexpr
):
    # BLOCK elements of a (rows, C) float8 weight per program: w = q · s_row rounded to the weight's dtype (W_ROUND),
    # then (HAS_C) w · c_row in float32, stored in out's dtype: the eager dequantise-then-scale, one pass.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // C
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = rounded(q * tl.load(s_ptr + row, mask=mask, other=1.0), W_ROUND)
    if HAS_C:
        w = w * tl.load(c_ptr + row, mask=mask, other=1.0)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["length"])
def head_stats(
    x_ptr,
    sum_ptr,
    min_ptr,
    max_ptr,
    length,
    H: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Over ROWS tokens of one head of one sample of a contiguous (B, L, H, D) x, in BLOCK_L-row tiles: the float32
    # column sums, minima and maxima (D each), stored at [sample, chunk, head] of (B, chunks, H, D) buffers.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    col = tl.arange(0, D)[None, :]
    total = tl.zeros([D], dtype=tl.float32)
    low = tl.full([D], float("inf"), dtype=tl.float32)
    high = tl.full([D], float("-inf"), dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_L):
        row = chunk * ROWS + start + tl.arange(0, BLOCK_L)[:, None]
        mask = row < length
        x = tl.load(x_ptr + ((b * length + row) * H + h) * D + col, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(x, axis=0)
        low = tl.minimum(low, tl.min(tl.where(mask, x, float("inf")), axis=0), propagate_nan=tl.PropagateNan.ALL)
        high = tl.maximum(high, tl.max(tl.where(mask, x, float("-inf")), axis=0), propagate_nan=tl.PropagateNan.ALL)
    out = ((b * tl.num_programs(1) + chunk) * H + h) * D + tl.arange(0, D)
    tl.store(sum_ptr + out, total)
    tl.store(min_ptr + out, low)
    tl.store(max_ptr + out, high)


@triton.jit(do_not_specialize=["length"])
def head_quantize(
    x_ptr,
    mean_ptr,
    scale_ptr,
    q_ptr,
    length,
    fp8_max,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CENTER: tl.constexpr,
):
    # BLOCK_L tokens of one head of one sample: q = clamp((x − mean[b, h]) / scale[b, h], ±fp8_max) (CENTER; else
    # x / scale), the subtraction and the correctly rounded division in float32, rounded to nearest-even float8.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    row = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]
    col = tl.arange(0, D)[None, :]
    mask = row < length
    offs = ((b * length + row) * H + h) * D + col
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        x = x - tl.load(mean_ptr + (b * H + h) * D + col)
    q = tl.clamp(tl.div_rn(x, tl.load(scale_ptr + b * H + h)), -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
