"""Runs every kernel check compiled on CUDA (no interpreter); started in a fresh process by
test_kernels_gpu.py so that no interpreter setting of another test module applies. Exits non-zero on a
mismatch."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))  # for kernel_checks
os.environ.pop("TRITON_INTERPRET", None)

import kernel_checks  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    kernel_checks.check_paged_attention("cuda", torch.float32)
    kernel_checks.check_paged_attention("cuda", torch.float16)
    kernel_checks.check_paged_attention("cuda", torch.float32, num_heads=9, num_kv_heads=3, head_dim=64,
                                        block_size=16, context_lens=(1, 17, 300, 64), num_blocks=40)
    for kv_dtype in (torch.int8, torch.float8_e4m3fn):
        kernel_checks.check_paged_attention_quantised("cuda", kv_dtype, num_heads=9, num_kv_heads=3, head_dim=64,
                                                      block_size=16, context_lens=(1, 17, 300), num_blocks=40)
    kernel_checks.check_int8_matmul("cuda", torch.float16)
    kernel_checks.check_int8_matmul("cuda", torch.float16, m=33, n=960, k=576)
    kernel_checks.check_int4_matmul("cuda", torch.float16)
    kernel_checks.check_int4_matmul("cuda", torch.float16, m=33, n=960, k=576, group_size=128)
    kernel_checks.check_int4_matmul("cuda", torch.float16, m=1, n=576, k=1536, group_size=32)
    for cache_dtype, page_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16), (torch.int8, torch.int8)):
        kernel_checks.check_kv_pages("cuda", cache_dtype, page_dtype)
    print("all kernel checks passed on", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
