"""Benchmark: `python -m wartok.bench [--tokenizer small --prior small --json bench.json]`.

Every row is measured side by side in this one process, on the same inputs, after warm-up,
and reported as the median of repeated timings, so two commits (or two machines) compare by
their JSON files. Rows: tokenizer train step, prior train step, sampling with and without the
KV cache. Peak memory is the CUDA allocator's peak on GPUs and the process's peak RSS on CPUs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from wartok.config import OptimConfig
from wartok.models import GPT, ConvTokenizer, conv_tokenizer_config, generate, gpt_config
from wartok.optim import build_optimizer
from wartok.runtime import autocast, configure_backends, resolve_device
from wartok.tvc import TVCConfig, likelihood_terms, posterior_terms, weigh


@dataclass
class Row:
    name: str
    unit: str           # what `rate` counts per second
    median_s: float     # median seconds per call
    rate: float         # units per second
    peak_mem_mb: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the whole process's peak so far, so rows only grow
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, unit: str, per_call: float, fn: Callable[[], None], device: torch.device,
            warmup: int, repeats: int) -> Row:
    """Median wall time of fn() over `repeats` calls after `warmup` calls."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Row(name, unit, median, per_call / median, _peak_mem_mb(device))


def tokenizer_step(size: str, batch: int, device: torch.device, precision: str) -> Callable[[], None]:
    tokenizer = ConvTokenizer(conv_tokenizer_config(size)).to(device).train()
    optimizer = build_optimizer(tokenizer.parameters(), OptimConfig(), device)
    tvc = TVCConfig()
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, precision):
            out = tokenizer(images)
        loss = weigh({**likelihood_terms(images, out.recon), **posterior_terms(out.quant)}, tvc)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def prior_step(size: str, vocab: int, length: int, batch: int, device: torch.device,
               precision: str) -> Callable[[], None]:
    prior = GPT(gpt_config(size, vocab, length)).to(device).train()
    optimizer = build_optimizer(prior.parameters(), OptimConfig(lr=1e-3), device)
    tokens = torch.randint(vocab, (batch, length), device=device)

    def step() -> None:
        with autocast(device, precision):
            _, loss = prior(tokens, targets=tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sampler(size: str, vocab: int, length: int, num: int, device: torch.device, kv: bool) -> Callable[[], None]:
    prior = GPT(gpt_config(size, vocab, length)).to(device).eval()
    return lambda: generate(prior, num, use_kv_cache=kv, generator=None, device=device)


def run(args: argparse.Namespace) -> list[Row]:
    device = resolve_device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    tok_cfg = conv_tokenizer_config(args.tokenizer)
    vocab, length = tok_cfg.quantizer.codebook_size, (tok_cfg.image_size // tok_cfg.downsample) ** 2
    w, r = args.warmup, args.repeats
    rows = [
        measure(f"tokenizer train step ({args.tokenizer}, B={args.batch})", "steps/s", 1,
                tokenizer_step(args.tokenizer, args.batch, device, args.precision), device, w, r),
        measure(f"prior train step (gpt_{args.prior}, B={args.prior_batch}, T={length})", "steps/s", 1,
                prior_step(args.prior, vocab, length, args.prior_batch, device, args.precision), device, w, r),
    ]
    for kv in (True, False):
        label = "with" if kv else "without"
        rows.append(measure(f"sampling {label} KV cache (gpt_{args.prior}, N={args.samples}, T={length})",
                            "tokens/s", args.samples * length,
                            sampler(args.prior, vocab, length, args.samples, device, kv), device,
                            max(1, w // 2), max(1, r // 2)))
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'benchmark':<58} {'median ms':>10} {'rate':>12} {'unit':<9} {'peak MB':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.name:<58} {row.median_s * 1e3:>10.1f} {row.rate:>12.1f} {row.unit:<9} {row.peak_mem_mb:>8.0f}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "gpu": gpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wartok.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--prior", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=64, help="tokenizer batch size")
    parser.add_argument("--prior-batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16, help="sequences sampled per call")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the table here as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "prior_batch", "samples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    if args.json:
        device = resolve_device(args.device)
        payload = {"args": vars(args), "environment": environment(device), "rows": [row.__dict__ for row in rows]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
