"""How long CURL's scoring takes on torchvision's resnet50, and how many forward passes it costs.

Runs :func:`fxprune.passes.curl.score` on a random proxy set (random weights: this is a
cost measurement, not an accuracy one) and prints the number of channels scored, the
forward-equivalents the masked runner spent (a full pass over the proxy set counts 1;
the naive method costs one per channel), and the wall time.

    python tools/curl_timing.py --samples 32 --size 224 --masks 16             # CPU
    python tools/curl_timing.py --samples 256 --size 224 --masks 8 --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import fxprune
from fxprune.passes import curl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--masks", type=int, default=8, help="masks per forward pass")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None, help="score only the first N prunable groups (a quick probe)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.samples, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    graph = fxprune.analyze(model, (x[:1],))
    t_an = time.perf_counter() - t0
    if args.groups is not None:  # keep the first N prunable groups only
        keep = {g.name for g in graph.prunable_groups()[:args.groups]}
        for g in graph.prunable_groups():
            if g.name not in keep:
                g.pinned = torch.ones_like(g.pinned)
    channels = sum(g.prunable for g in graph.prunable_groups())
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    scores = curl.score(graph, data=x, num_samples=args.samples, masks_per_forward=args.masks, device=args.device,
                        progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_sc = time.perf_counter() - t0
    fw = curl.score.last_forwards
    print(f"resnet50, proxy {args.samples} x {args.size}^2, device {args.device}, {args.masks} masks/pass")
    print(f"analysis {t_an:.2f} s; channels scored {channels} in {len(scores)} groups")
    print(f"forward-equivalents {fw:.0f} (naive: {channels}); {fw / channels:.3f} per channel")
    print(f"scoring time {t_sc:.1f} s; {t_sc / channels * 1000:.1f} ms per channel")
    if args.groups is None:  # the authors' setting: 1.11 G of 4.09 G MACs, the last stage's stream protected
        t0 = time.perf_counter()
        plan = curl.select(graph, scores, flops=0.27, protect=["layer4.0.conv3"])
        print(f"plan at 27 % FLOPs: {plan.removed} channels removed, selection {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
