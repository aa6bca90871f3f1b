"""fxprune against Torch-Pruning in alternating fresh processes: the speed figure least
disturbed by a noisy machine.

Each pair runs ``tools/zoo.py``'s two timing workers one after the other, each in a new
process with one torch thread: fxprune's ``analyze`` + L2 scores + ``make_plan`` +
``rewrite``, and Torch-Pruning's ``MetaPruner`` build + ``step`` at the same ratio, each
timed first thing in the process (*cold*) and again (*warm*). A pair's two runs see the
same machine load, so the speed-up is taken per pair; the table gives the median over
pairs (and the per-pair range), and the median times.

    python tools/bench_pairs.py                          # resnet50, 7 pairs
    python tools/bench_pairs.py --models resnet50,densenet121 --pairs 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from tabulate import tabulate
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
ZOO = os.path.join(HERE, "zoo.py")


def timed(tool: str, model: str) -> dict:
    """One worker run of ``tools/zoo.py`` in a fresh process; its row."""
    out = subprocess.run([sys.executable, ZOO, "--worker", tool, model], capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("ZOO-ROW "):
            return json.loads(line[len("ZOO-ROW "):])
    raise RuntimeError(f"{tool} on {model} printed no row: {out.stderr[-500:]}")


def pair(model: str) -> dict:
    ours = timed("fxprune-timing", model)
    theirs = timed("torch-pruning", model)
    if "cold_s" not in theirs or "total_s" not in theirs:
        raise RuntimeError(f"Torch-Pruning did not prune {model}: {theirs.get('error') or theirs.get('cold_error')}")
    return {"ours_cold": ours["cold_s"], "ours_warm": ours["warm_s"],
            "theirs_cold": theirs["cold_s"], "theirs_warm": theirs["total_s"]}


def summary(model: str, runs: list[dict]) -> list:
    row = [model, len(runs)]
    for run in ("cold", "warm"):
        ours = [r[f"ours_{run}"] for r in runs]
        theirs = [r[f"theirs_{run}"] for r in runs]
        ratios = sorted(t / o for t, o in zip(theirs, ours))
        row += [f"{statistics.median(ours):.3f}", f"{statistics.median(theirs):.3f}",
                f"**{statistics.median(ratios):.2f}×** ({ratios[0]:.2f}–{ratios[-1]:.2f})"]
    return row


def publish(text: str, path: str) -> None:
    """Print a results table and write it to ``path`` (folders made as needed)."""
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results", "pairs.md"))
    args = p.parse_args(argv)
    models = args.models.split(",")
    runs = {m: [] for m in models}
    with tqdm(total=len(models) * args.pairs, desc="pairs", file=sys.stderr) as bar:
        for _ in range(args.pairs):  # models interleaved too: a slow spell touches all of them
            for m in models:
                runs[m].append(pair(m))
                bar.update()
    head = ["model", "pairs", "fxprune cold s", "TP cold s", "speed-up cold (range)",
            "fxprune warm s", "TP warm s", "speed-up warm (range)"]
    text = tabulate([summary(m, runs[m]) for m in models], headers=head, tablefmt="github")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    note = ("\n\nMedians over alternating fresh-process pairs (fxprune, then Torch-Pruning), one torch thread, "
            "ratio 0.5, L2; speed-up = Torch-Pruning's time / fxprune's, per pair. "
            f"`python tools/bench_pairs.py --models {args.models} --pairs {args.pairs}` at commit {commit.strip()}.\n")
    publish(text + note, args.out)


if __name__ == "__main__":
    main()
