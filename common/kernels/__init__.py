"""Triton kernels for the GPU path, each beside a plain-torch reference that defines what it computes.

- paged_attention: one decode step of attention straight out of the KvPool's paged layout.
- quant_matmul: fused dequantise-and-multiply for int8 (per-channel) and int4 (group-wise) weights.
- kv_pages: gather a sequence's KV slots into contiguous pages for transfer, and scatter them back.

On CPU the serving path uses torch; these kernels run there only under `TRITON_INTERPRET=1` (tests), which
triton reads when a kernel is defined, i.e. when its module is first imported.
"""
