"""Weight memory of the default model per format, as a tier holds it (`--cpu-weight-layout dual`): the bytes
its tensors hold (common.model.weights.stored_weight_bytes, what the tier logs at start) and the growth of
this process's anonymous resident memory, which adds what the allocator keeps from building the copies.
One child process per format, so each starts from the same empty heap.

    .venv/bin/python scripts/micro/weight_memory.py [FORMAT ...]      (default: fp32 fp16)
"""
import subprocess
import sys


def anonymous_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


def child(weights: str) -> None:
    from micro_setup import MODEL_DIR

    from common.model.weights import load_model, stored_weight_bytes
    before = anonymous_rss_mib()
    model = load_model(MODEL_DIR, weights)
    model.add_blocked_copies()
    print(f"{weights:>6}: weights held {stored_weight_bytes(model)['total'] / 2**20:6.1f} MiB, "
          f"anonymous resident memory +{anonymous_rss_mib() - before:6.1f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        from micro_setup import print_machine
        print_machine()
        for name in sys.argv[1:] or ["fp32", "fp16"]:
            subprocess.run([sys.executable, __file__, "--child", name], check=True)
