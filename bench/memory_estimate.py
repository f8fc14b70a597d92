"""How close the memory check's estimate comes to what a critic really takes on its device.

A Qwen3-VL critic of the released critics' shape (36 layers, hidden size 4096, MLP 12288, 8 key-value
heads; the vision tower at transformers' defaults) is built with random weights (nothing downloaded)
directly on the device, in the dtype the server would pick there. The memory its weights take is
measured beside the estimate's; then one batched call of `--tokens` tokens per row, for each batch size,
gives the peak beside the estimate's `weights + batch x tokens x cache per token + runtime`.

    python bench/memory_estimate.py --device cuda                 # the 8B shape, bfloat16
    python bench/memory_estimate.py --device cpu --layers 2        # a rehearsal on a small CPU box

It needs only torch and transformers (and Pillow), so it runs on a bare GPU box as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.checkpoints.memory import GB, RUNTIME_BYTES, Need, kv_per_token, parameters
from server.engines.base import MemoryPlan

TEXT_8B = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def config(layers: int) -> object:
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config={**TEXT_8B, "num_hidden_layers": layers})


def _allocated(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)  # the resident size after the call: a lower bound of its peak


def guess_at(need: Need, batch: int) -> int:
    """The estimate of a full batch of `batch` typical calls, less the runtime margin the measurement lacks."""
    return dataclasses.replace(need, plan=dataclasses.replace(need.plan, batch=batch)).at_batch - RUNTIME_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=TEXT_8B["num_hidden_layers"], help="language-model layers")
    parser.add_argument("--tokens", type=int, default=3000, help="tokens per call (a typical judge call: ~3,000)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes to measure")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    cfg = config(args.layers)
    started = time.monotonic()
    plan = MemoryPlan(args.device, dtype, 1)
    need = Need("edit", "qwen3-vl-8b-shape", parameters(cfg), plan, kv_per_token(cfg, dtype), typical_call=args.tokens)
    print(f"estimate: {need.parameters / 1e9:.3f} B parameters, {need.weights / GB:.2f} GB of weights in {dtype}, "
          f"{need.kv_per_token / 1e3:.1f} KB of cache per token ({time.monotonic() - started:.1f} s)")  # fmt: skip
    before = _allocated(args.device)
    started = time.monotonic()
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    weights = _allocated(args.device) - before
    built = sum(p.numel() for p in model.parameters())
    took = time.monotonic() - started
    print(f"measured: {built / 1e9:.3f} B parameters, {weights / GB:.2f} GB after building ({took:.1f} s); "
          f"estimate/measured weights = {need.weights / weights:.3f}")  # fmt: skip
    if args.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(args.device)
        outside = total - free - torch.cuda.memory_allocated(args.device)
        print(f"held beside the tensors (CUDA context, allocator cache): {outside / GB:.2f} GB "
              f"(the estimate's runtime margin: {RUNTIME_BYTES / GB:.1f} GB)")  # fmt: skip
    print("| batch | tokens/call | estimated, without the runtime margin (GB) | measured peak (GB) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in (int(b) for b in args.batches.split(",")):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
        ids = torch.randint(0, TEXT_8B["vocab_size"], (batch, args.tokens), device=args.device)
        try:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        except torch.OutOfMemoryError:
            print(f"| {batch} | {args.tokens} | {guess_at(need, batch) / GB:.1f} | out of memory | - |")
            break
        peak = _peak(args.device) - before  # the runtime's own memory is not in it: compared without the margin
        guess = guess_at(need, batch)
        print(f"| {batch} | {args.tokens} | {guess / GB:.1f} | {peak / GB:.1f} | {guess / peak:.2f} |", flush=True)
        del ids


if __name__ == "__main__":
    main()
