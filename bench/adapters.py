"""What a LoKr or LoHa adds to a training step, against a LoRA of the same rank, on full-size layers.

    python -m bench.adapters                      # Flux-dev's two linear shapes, on the GPU if any
    python -m bench.adapters --tokens 1024 --repeat 5

peft's LoKr and LoHa layers build their whole delta weight (out x in) on every forward and multiply
the input by it: a second full-size matmul beside the base's, where a LoRA adds two thin ones. This
times forward + backward of one frozen ``nn.Linear`` with each adapter (bf16 autocast on a GPU, fp32
on a CPU), in one process, and prints each adapter's time as a ratio to the LoRA's. The client's
estimate (client/pricing.py, ADAPTER_FACTOR) takes the ratio on the shapes that dominate a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# Flux-dev's linears at full size: attention projections (3072 -> 3072) and the MLP's (3072 -> 12288)
# peft's own layers (which build the delta weight), and the same with train/lycoris.py's factored forward
KINDS = ("lora", "lokr peft", "lokr factored", "loha peft", "loha factored")
SHAPES = {"attention 3072x3072": (3072, 3072), "mlp 3072x12288": (3072, 12288)}


def _layer(kind: str, shape: tuple[int, int], rank: int, device: torch.device) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    from train.lycoris import factored_forward, training_config

    model = torch.nn.Sequential(torch.nn.Linear(*shape)).to(device)
    model.requires_grad_(False)
    if kind == "lora":
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], init_lora_weights="gaussian")
    else:
        config = training_config(kind.split()[0], rank, rank, 16, ["0"])
    model = inject_adapter_in_model(config, model)
    if kind.endswith("factored"):
        factored_forward(model)
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in ("lora_", "lokr_", "hada_")))
    return model


def time_step(model: torch.nn.Module, x: torch.Tensor, repeat: int) -> float:
    cuda = x.is_cuda
    times = []
    for _ in range(repeat + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            model(x).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first is warm-up


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="LoKr and LoHa against LoRA on full-size Flux layers")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, {args.tokens} tokens, rank {args.rank}, LoKr factor 16; median of {args.repeat}")
    for label, shape in SHAPES.items():
        x = torch.randn(args.tokens, shape[0], device=device, requires_grad=True)
        times = {k: time_step(_layer(k, shape, args.rank, device), x, args.repeat) for k in KINDS}
        ratios = ", ".join(f"{k} {times[k] / times['lora']:.2f}x" for k in KINDS[1:])
        print(f"{label}: lora {times['lora'] * 1000:.1f} ms/step; {ratios}")


if __name__ == "__main__":
    main()
