"""Triton kernels for the GPU path, each beside a plain-torch reference that defines what it computes.

- paged_attention: one decode step of attention straight out of the KvPool's paged layout; on CUDA, decode
  attention for steps of one token per sequence (common/model/decode_attention.py).
- quant_matmul: fused dequantise-and-multiply for int8 (per-channel) and int4 (group-wise) weights; on
  CUDA, those weight formats' matmul (common/model/quant_int8.py, quant_int4.py).

Their callers import them only where they serve (CUDA), so CPU serving never loads triton. On CPU the serving
path uses torch; these kernels run there only under `TRITON_INTERPRET=1` (tests), which triton reads when a
kernel is defined, i.e. when its module is first imported.
"""
