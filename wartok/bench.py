"""Benchmark: `python -m wartok.bench [--tokenizer small --prior small --json bench.json]`.

Every row is measured side by side in this one process, on the same inputs, after warm-up,
and reported as the median of repeated timings, so two commits (or two machines) compare by
their JSON files. Rows: the stage-C tokenizer step of each method (two_stage, joint, wartok at
refresh_every 1, 4, 8 or those --refresh-every names, timed over whole refresh cycles, and with
a sub-batch for its AR passes) with its ratio to two_stage, wartok's extra cost split into the
two AR forward passes and one tracker refresh, the prior train step, sampling with and
without the KV cache and with the static cache (a CUDA graph on GPUs, the same static-shape
code eagerly on CPUs), Inception feature extraction, with `--compile` the compiled steps, and
with `--scaling` the step times against codebook size K, sequence length T and batch size.
Training rows also report their FLOPs per call and the achieved TFLOP/s (counted with
torch.utils.flop_counter) and, on a GPU whose bf16 dense peak is known (or --peak-tflops), the
model FLOPs utilisation (MFU). Peak memory is the CUDA allocator's peak on GPUs and the
process's peak RSS on CPUs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from wartok.config import OptimConfig
from wartok.models import (CONV_TOKENIZER_PRESETS, GPT, GPT_PRESETS, ConvTokenizer, conv_tokenizer_config, generate,
                           gpt_config)
from wartok.optim import build_optimizer
from wartok.method import build_prior_term
from wartok.runtime import autocast, configure_backends, maybe_compile, resolve_device
from wartok.stages import StageContext, tokenizer_step_fn
from wartok.tvc import TVCConfig
from wartok.validate import ConfigError
from wartok.weights import resolve_inception_weights
from wartok.wgf import teacher_forced_logits


@dataclass
class Row:
    name: str
    unit: str           # what `rate` counts per second
    median_s: float     # median seconds per call (per image for the Inception row)
    rate: float         # units per second
    peak_mem_mb: float
    ratio: Optional[float] = None  # median time / the two_stage tokenizer step's (method rows)
    gflop: Optional[float] = None   # counted FLOPs per call, in 1e9 (training rows)
    tflops: Optional[float] = None  # achieved TFLOP/s of the counted FLOPs (training rows)
    mfu: Optional[float] = None     # tflops / the device's bf16 dense peak, where known


# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets (SXM parts)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def count_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of fn (forward and backward matmuls/convs/attention), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the whole process's peak so far, so rows only grow
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, unit: str, per_call: float, fn: Callable[[], None], device: torch.device,
            warmup: int, repeats: int, flops: bool = False) -> Row:
    """Median wall time of fn() over `repeats` calls after `warmup` calls; with flops=True
    also the achieved TFLOP/s, counted on the first warm-up call (its time is never used, and
    the counter still runs every kernel, so it warms up as well; with warmup=0 it is one extra
    call before the timed ones)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counted = count_flops(fn) if flops else None
    for _ in range(warmup - 1 if flops else warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row = Row(name, unit, median, per_call / median, _peak_mem_mb(device))
    if counted is not None:
        row.gflop = counted / 1e9
        row.tflops = row.gflop / median / 1e3
    return row


def measure_cycle(name: str, every: int, step: Callable[[], None], device: torch.device,
                  warmup: int, repeats: int) -> Row:
    """Per-step time and FLOPs of a step whose cost repeats every `every` calls (a tracker
    refresh every n-th step), timed over whole cycles: the median of single steps would be a
    step without the refresh whenever fewer than half of the steps refresh."""
    def cycle() -> None:
        for _ in range(every):
            step()
    row = measure(name, "steps/s", every, cycle, device, math.ceil(warmup / every),
                  max(3, math.ceil(repeats / every)), flops=True)
    row.median_s /= every  # rate (steps/s) and TFLOP/s are per cycle already, hence per step
    row.gflop /= every
    return row


def synthetic_batches(batch: int, device: torch.device, num_classes: int = 10, image_size: int = 32) -> Iterator:
    """One fixed batch of images in [-1, 1] with labels, forever (timings, not numbers)."""
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    labels = torch.arange(batch, device=device) % num_classes
    while True:
        yield images, labels


def tokenizer_setup(size: str, prior_size: str, device: torch.device) -> tuple[ConvTokenizer, GPT]:
    tokenizer = ConvTokenizer(conv_tokenizer_config(size)).to(device).train()
    target = GPT(gpt_config(prior_size, tokenizer.codebook_size, tokenizer.num_tokens)).to(device)
    return tokenizer, target


def method_step(method: str, tokenizer: ConvTokenizer, target: GPT, batch: int, device: torch.device,
                precision: str, refresh_every: int = 1, sub_batch: int = 0,
                compile: bool = False) -> Callable[[], None]:
    """One full stage-C step of `method` (forward, backward, optimizer, AR upkeep), as the
    pipeline runs it: the same step function and the same prior-term objects."""
    tokenizer = maybe_compile(copy.deepcopy(tokenizer), compile)
    tvc = TVCConfig()
    prior_cfg = dataclasses.replace(tvc.prior, sub_batch=sub_batch,
                                    tracker=dataclasses.replace(tvc.prior.tracker, refresh_every=refresh_every))
    tvc = dataclasses.replace(tvc, prior=prior_cfg)
    term = build_prior_term(method, target, prior_cfg, seed=0, precision=precision)
    ctx = StageContext(device=device, precision=precision, log=None)
    step_fn = tokenizer_step_fn(tokenizer, synthetic_batches(batch, device, image_size=tokenizer.config.image_size),
                                tvc, ctx, term)
    groups = [] if term is None else term.param_groups()
    optimizer = build_optimizer(tokenizer.parameters(), OptimConfig(), groups)
    counter = [0]

    def step() -> None:
        loss, _ = step_fn(counter[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if term is not None:
            term.after_step(counter[0])
        counter[0] += 1
    return step


def wgf_parts(tokenizer: ConvTokenizer, target: GPT, batch: int, device: torch.device,
              precision: str) -> dict[str, Callable[[], None]]:
    """wartok's extra cost, part by part: the two teacher-forced AR passes, one tracker refresh."""
    term = build_prior_term("wartok", target, TVCConfig().prior, seed=0, precision=precision)
    tokens = torch.randint(tokenizer.codebook_size, (batch, tokenizer.num_tokens), device=device)

    def forwards() -> None:
        with autocast(device, precision):
            teacher_forced_logits(term.models.tracker, tokens)
            teacher_forced_logits(term.models.target, tokens)

    def refresh() -> None:
        term._last = (tokens, None)
        term.after_step(0)  # refresh_every=1: one refresh of refresh_steps=1
    return {"wartok: the two AR forward passes": forwards, "wartok: one tracker refresh": refresh}


def prior_step(size: str, vocab: int, length: int, batch: int, device: torch.device,
               precision: str, compile: bool = False) -> Callable[[], None]:
    prior = maybe_compile(GPT(gpt_config(size, vocab, length)).to(device).train(), compile)
    optimizer = build_optimizer(prior.parameters(), OptimConfig(lr=1e-3))
    tokens = torch.randint(vocab, (batch, length), device=device)

    def step() -> None:
        with autocast(device, precision):
            _, loss = prior(tokens, targets=tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sampler(size: str, vocab: int, length: int, num: int, device: torch.device, kv: bool,
            graph: bool = False) -> Callable[[], None]:
    prior = GPT(gpt_config(size, vocab, length)).to(device).eval()
    return lambda: generate(prior, num, use_kv_cache=kv, cuda_graph=graph, generator=None, device=device)


def method_rows(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Tokenizer step time per method, side by side; ratios to two_stage are filled in later."""
    tokenizer, target = tokenizer_setup(args.tokenizer, args.prior, device)
    w, r, B = args.warmup, args.repeats, args.batch
    tag = f"({args.tokenizer} tok, gpt_{args.prior}, B={B})"
    rows = [measure(f"stage C step two_stage {tag}", "steps/s", 1,
                    method_step("two_stage", tokenizer, target, B, device, args.precision), device, w, r, flops=True),
            measure(f"stage C step joint {tag}", "steps/s", 1,
                    method_step("joint", tokenizer, target, B, device, args.precision), device, w, r, flops=True)]
    for every in args.refresh_every:
        rows.append(measure_cycle(f"stage C step wartok refresh_every={every} {tag}", every,
                                  method_step("wartok", tokenizer, target, B, device, args.precision, every),
                                  device, w, r))
    if args.compile:
        for method in ("two_stage", "wartok"):
            rows.append(measure(f"stage C step {method} compiled {tag}", "steps/s", 1,
                                method_step(method, tokenizer, target, B, device, args.precision, compile=True),
                                device, w + 2, r))
    if args.sub_batch:
        rows.append(measure(f"stage C step wartok sub_batch={args.sub_batch} {tag}", "steps/s", 1,
                            method_step("wartok", tokenizer, target, B, device, args.precision, 1, args.sub_batch),
                            device, w, r))
    for name, fn in wgf_parts(tokenizer, target, B, device, args.precision).items():
        rows.append(measure(f"{name} {tag}", "calls/s", 1, fn, device, w, r, flops=True))
    base = rows[0].median_s
    for row in rows:
        row.ratio = row.median_s / base
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    device = resolve_device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    # the presets: `small` on CPUs, `base` (GPT-B scale prior) on GPUs
    args.tokenizer = args.tokenizer or ("base" if device.type == "cuda" else "small")
    args.prior = args.prior or ("base" if device.type == "cuda" else "small")
    tok_cfg = conv_tokenizer_config(args.tokenizer)
    vocab, length = tok_cfg.quantizer.codebook_size, (tok_cfg.image_size // tok_cfg.downsample) ** 2
    w, r = args.warmup, args.repeats
    rows = method_rows(args, device)
    prior_tag = f"(gpt_{args.prior}, B={args.prior_batch}, T={length})"
    rows.append(measure(f"prior train step {prior_tag}", "steps/s", 1,
                        prior_step(args.prior, vocab, length, args.prior_batch, device, args.precision), device, w, r,
                        flops=True))
    if args.compile:
        rows.append(measure(f"prior train step compiled {prior_tag}", "steps/s", 1,
                            prior_step(args.prior, vocab, length, args.prior_batch, device, args.precision, True),
                            device, w + 2, r))
    graph_label = "CUDA graph" if device.type == "cuda" else "eager on CPU"
    for kv, graph, label in ((True, False, "with KV cache"), (False, False, "without KV cache"),
                             (True, True, f"static KV cache, {graph_label}")):
        rows.append(measure(f"sampling {label} (gpt_{args.prior}, N={args.samples}, T={length})",
                            "tokens/s", args.samples * length,
                            sampler(args.prior, vocab, length, args.samples, device, kv, graph), device,
                            max(1, w // 2), max(1, r // 2)))
    if args.fid_images:
        rows.append(fid_row(args.fid_images, device))
    if args.scaling:
        rows.extend(scaling_rows(args, device))
    peak = args.peak_tflops or device_peak_tflops(device)
    for row in rows:  # MFU against the bf16 peak means something only for bf16 runs
        if row.tflops is not None and peak and args.precision == "bf16":
            row.mfu = row.tflops / peak
    return rows


def scaling_rows(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """How step time grows with the codebook size K, the sequence length T and the batch size B:
    the prior train step over T and K, wartok's stage-C step over K and B (two_stage beside it)."""
    w, r, rows = max(1, args.warmup - 1), max(3, args.repeats // 2), []
    for length in (16, 64, 256):
        rows.append(measure(f"scaling T: prior train step T={length} (gpt_{args.prior}, K=1024, B=32)", "steps/s", 1,
                            prior_step(args.prior, 1024, length, 32, device, args.precision), device, w, r))
    for vocab in (256, 1024, 4096, 16384):
        rows.append(measure(f"scaling K: prior train step K={vocab} (gpt_{args.prior}, T=64, B=32)", "steps/s", 1,
                            prior_step(args.prior, vocab, 64, 32, device, args.precision), device, w, r))
    base = conv_tokenizer_config(args.tokenizer)
    for vocab in (128, 512, 2048):
        cfg = dataclasses.replace(base, quantizer=dataclasses.replace(base.quantizer, codebook_size=vocab))
        tokenizer = ConvTokenizer(cfg).to(device).train()
        target = GPT(gpt_config(args.prior, vocab, tokenizer.num_tokens)).to(device)
        rows.append(measure(f"scaling K: stage C step wartok K={vocab} ({args.tokenizer} tok, B=32)", "steps/s", 1,
                            method_step("wartok", tokenizer, target, 32, device, args.precision), device, w, r))
    tokenizer, target = tokenizer_setup(args.tokenizer, args.prior, device)
    for batch in (16, 32, 64):
        for method in ("two_stage", "wartok"):
            rows.append(measure(f"scaling B: stage C step {method} B={batch} ({args.tokenizer} tok)", "steps/s", 1,
                                method_step(method, tokenizer, target, batch, device, args.precision), device, w, r))
    return rows


def fid_row(images: int, device: torch.device) -> Row:
    """Inception feature extraction (the FID/KID features) on `images` 32x32 images, batched."""
    from wartok.metrics import extraction_rate

    rate = extraction_rate(device, n=images, batch_size=min(images, 64))
    return Row(f"Inception feature extraction (inception-v3-compat, N={images})", "images/s", 1.0 / rate, rate,
               _peak_mem_mb(device))


def format_table(rows: list[Row]) -> str:
    header = (f"{'benchmark':<72} {'median ms':>10} {'x two_stage':>11} {'rate':>10} {'unit':<9} "
              f"{'peak MB':>8} {'GFLOP':>7} {'TFLOP/s':>8} {'MFU':>6}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        gflop = "" if row.gflop is None else f"{row.gflop:.1f}"
        tflops = "" if row.tflops is None else f"{row.tflops:.3f}"
        mfu = "" if row.mfu is None else f"{row.mfu:.1%}"
        lines.append(f"{row.name:<72} {row.median_s * 1e3:>10.1f} {ratio:>11} {row.rate:>10.1f} {row.unit:<9} "
                     f"{row.peak_mem_mb:>8.0f} {gflop:>7} {tflops:>8} {mfu:>6}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "gpu": gpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wartok.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, choices=list(CONV_TOKENIZER_PRESETS),
                        help="conv tokenizer preset (default: small on CPUs, base on GPUs; base_f16 is "
                             "the ImageNet-256 recipe's)")
    parser.add_argument("--prior", default=None, choices=list(GPT_PRESETS),
                        help="GPT preset (default: small on CPUs, base on GPUs)")
    parser.add_argument("--batch", type=int, default=64, help="tokenizer batch size")
    parser.add_argument("--prior-batch", type=int, default=128)
    parser.add_argument("--refresh-every", type=int, nargs="+", default=[1, 4, 8],
                        help="the tracker refresh rates of wartok's step rows, each timed over whole cycles "
                             "(the tracker_refresh sweep covers 1 2 4 8 16)")
    parser.add_argument("--sub-batch", type=int, default=16, help="also time wartok with its AR passes on N images (0: skip)")
    parser.add_argument("--fid-images", type=int, default=128, help="images for the Inception row (0: skip)")
    parser.add_argument("--samples", type=int, default=16, help="sequences sampled per call")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scaling", action="store_true", help="add step time against K, T and batch size")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd step rows (first call compiles)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bf16 dense peak for MFU (default: known NVIDIA parts)")
    parser.add_argument("--json", default=None, help="also write the table here as JSON")
    args = parser.parse_args(argv)
    for name, minimum in (("batch", 1), ("prior_batch", 1), ("samples", 1), ("repeats", 1), ("warmup", 0),
                          ("sub_batch", 0), ("fid_images", 0)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; it must be >= {minimum}")
    if min(args.refresh_every) < 1:
        parser.error(f"--refresh-every={' '.join(map(str, args.refresh_every))} is not allowed; each must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops={args.peak_tflops} is not allowed; it must be > 0")
    if args.fid_images:  # the Inception row comes last: a missing file must not cost the other rows
        try:
            resolve_inception_weights()
        except ConfigError as e:
            parser.error(f"{e}; or skip the Inception row with --fid-images 0")
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
