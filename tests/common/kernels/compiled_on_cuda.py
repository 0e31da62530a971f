"""Runs every kernel check compiled on CUDA (no interpreter); started in a fresh process by
test_kernels_gpu.py so that no interpreter setting of another test module applies. Exits non-zero on a
mismatch. With a model directory as its argument, also runs that model's decode steps through the paged
kernel, the path CUDA serves one-token steps with."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))  # for kernel_checks
os.environ.pop("TRITON_INTERPRET", None)

import kernel_checks  # noqa: E402
import torch  # noqa: E402

from common.kv.pool import KvPool  # noqa: E402
from common.model.llama import LlamaModel  # noqa: E402
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk  # noqa: E402


def check_model_decode(model_dir: Path) -> None:
    """One-token steps through the kernel against the padded-groups torch path on the same pool dtype: logits
    over a float32 pool, and attention over the very same stored K and V in every pool dtype. (Logits of
    stored dtypes narrower than float32 differ by more than rounding: each path computes the new token's K
    and V with its own float32 rounding, so a stored value near a rounding boundary lands on either side of it;
    measured under the interpreter, bfloat16 0.006, int8 0.04.)"""
    model = LlamaModel.load(model_dir, torch.float32, "cuda")
    c = model.config
    prompts = [list(range(100, 100 + n)) for n in (1, 16, 40)]  # the second's next token starts a new block
    tables = [[5, 0, 9], [3, 7, 1, 11], [2, 8, 4, 10, 6]]  # scattered, blocks reserved past each context
    items = [DecodeItem(42 + i, len(ids), table) for i, (ids, table) in enumerate(zip(prompts, tables))]
    q = torch.randn(len(items), c.num_heads, c.head_dim, generator=torch.Generator().manual_seed(0)).cuda()
    for kv_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        kv = KvPool(num_layers=c.num_layers, num_blocks=12, block_size=16, num_kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim, dtype=kv_dtype, device="cuda")
        runners = {path: ModelRunner(model, kv, attention=path) for path in ("paged-kernel", "groups")}
        assert ModelRunner(model, kv).attention == "paged-kernel"  # CUDA's default
        logits = {}
        for path, runner in runners.items():
            runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
            logits[path] = runner.run_decode(items)  # (3, vocab)
        if kv_dtype == torch.float32:
            torch.testing.assert_close(logits["paged-kernel"], logits["groups"], atol=1e-3, rtol=1e-3)
        for layer in (0, c.num_layers - 1):
            out = {path: model.decode_attention.for_batch(runner._decode_batch(items), kv)(layer, q)
                   for path, runner in runners.items()}
            torch.testing.assert_close(out["paged-kernel"], out["groups"], atol=1e-4, rtol=1e-4)


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
    if len(sys.argv) > 1:
        check_model_decode(Path(sys.argv[1]))
    print("all kernel checks passed on", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
