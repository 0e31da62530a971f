"""Fused dequantise-and-multiply for weight-only quantised linears: y = x @ dequant(W)^T.

int8, per output channel:  W[n, k] = q[n, k] * scale[n],                  q int8 (N, K).
int4, group-wise along K:  W[n, k] = q[n, k] * scale[n, g] + min[n, g],    g = k // group_size,
  q in [0, 15], two per byte, "half-split": byte j of a row holds k = j (low nibble) and k = j + K/2 (high
  nibble), so unpacking is two contiguous halves. The last group may be shorter when group_size does not
  divide K (576 = 4 * 128 + 64 on the default model).
The weight tile is dequantised in registers and never written out; accumulation is float32.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, M, N, K,
                        stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0)  # (BLOCK_N, BLOCK_K) int8
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _int4_matmul_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, min_ptr, M, N, HALF_K, GROUP_SIZE,
                        stride_xm, stride_wn, stride_sn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for j0 in range(0, HALF_K, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)  # byte index; k = js (low nibble) and js + HALF_K (high nibble)
        w_mask = (cols[:, None] < N) & (js[None, :] < HALF_K)
        x_mask = (rows[:, None] < M) & (js[None, :] < HALF_K)
        packed = tl.load(w_ptr + cols[:, None] * stride_wn + js[None, :], mask=w_mask, other=0)  # (BLOCK_N, BLOCK_K)
        for half in tl.static_range(2):
            ks = js + half * HALF_K
            q = ((packed >> (4 * half)) & 15).to(tl.float32)
            at = cols[:, None] * stride_sn + (ks // GROUP_SIZE)[None, :]
            w = q * tl.load(scale_ptr + at, mask=w_mask, other=0.0).to(tl.float32) \
                + tl.load(min_ptr + at, mask=w_mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=x_mask, other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(m, block_m), triton.cdiv(n, block_n)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, block_m: int = 16,
                block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x (M, K) float; qweight (N, K) int8; scales (N,). Returns (M, N) in x's dtype."""
    x = x.contiguous()
    (m, k), n = x.shape, qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _int8_matmul_kernel[_grid(m, n, block_m, block_n)](
        out, x, qweight.contiguous(), scales.contiguous(), m, n, k, x.stride(0), k, out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                *, block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x (M, K) float; packed (N, K/2) uint8 half-split; scales, mins (N, ceil(K / group_size)).
    Returns (M, N) in x's dtype."""
    x = x.contiguous()
    (m, k), (n, half_k) = x.shape, packed.shape
    if k != 2 * half_k:
        raise ValueError(f"x has {k} features but the packed weight holds {2 * half_k}")
    scales, mins = scales.contiguous(), mins.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _int4_matmul_kernel[_grid(m, n, block_m, block_n)](
        out, x, packed.contiguous(), scales, mins, m, n, half_k, group_size, x.stride(0), half_k,
        scales.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    weight = qweight.float() * scales.float()[:, None]  # (N, K)
    return (x.float() @ weight.T).to(x.dtype)


def int4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    codes = torch.cat([packed & 15, packed >> 4], dim=1).float()  # (N, K): low nibbles are k < K/2
    group = torch.arange(codes.shape[1], device=codes.device) // group_size  # (K,)
    weight = codes * scales.float()[:, group] + mins.float()[:, group]
    return (x.float() @ weight.T).to(x.dtype)
