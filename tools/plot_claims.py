"""The papers' claims as measured: a table (claim, setting, measured, holds or not) and a plot.

Reads ``tools/results/claims.json`` (the figures of ``tools/results/claims.md``, each measured by
``tools/bench_claims.py``), prints the table as Markdown and draws ``claims.png`` beside it: one
panel per claim and setting, each arm's mean with its standard deviation over seeds (the method's
arm, listed first, green where the claim holds and red where it does not).

    python tools/plot_claims.py                       # table on stdout, tools/results/claims.png
    python tools/plot_claims.py --out /tmp/claims.png
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap

from tabulate import tabulate

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["claims"]


def measured(arm: dict) -> str:
    return f"{arm['name']} {arm['mean']:.3f} ± {arm['std']:.3f}" if arm["mean"] < 2 else \
        f"{arm['name']} {arm['mean']:.1f} ± {arm['std']:.1f}"


def table(claims: list[dict]) -> str:
    """The claim table in Markdown: one row per claim and setting."""
    rows = []
    for c in claims:
        verdict = "holds" if c["holds"] else "does not hold"
        if c.get("verdict"):
            verdict += f" ({c['verdict']})"
        n = c["arms"][0]["n"]
        rows.append([c["method"], c["claim"], c["setting"], f"{c['metric']}, {n} seeds: " +
                     "; ".join(measured(a) for a in c["arms"]), verdict])
    return tabulate(rows, headers=["method", "claim", "setting", "measured (mean ± std)", "verdict"],
                    tablefmt="github")


def plot(claims: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = -(-len(claims) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.5 * rows), squeeze=False)
    for ax, c in zip(axes.flat, claims):
        names = [a["name"] for a in c["arms"]][::-1]
        means = [a["mean"] for a in c["arms"]][::-1]
        stds = [a["std"] for a in c["arms"]][::-1]
        colors = ["tab:gray"] * (len(names) - 1) + ["tab:green" if c["holds"] else "tab:red"]
        ax.barh(names, means, xerr=stds, color=colors, capsize=3)
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        if high <= 1.05:   # accuracies: zoom on the range that separates the arms
            pad = max(0.01, 0.15 * (high - low))
            ax.set_xlim(max(0.0, low - pad), min(1.0, high + pad))
        setting = textwrap.fill(c["setting"], 70)
        ax.set_title(f"{c['method']}: {'holds' if c['holds'] else 'does not hold'}\n{setting}", fontsize=8)
        ax.set_xlabel(c["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(claims):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", default=os.path.join(HERE, "claims.json"))
    p.add_argument("--out", default=os.path.join(HERE, "claims.png"))
    args = p.parse_args(argv)
    claims = load(args.claims)
    print(table(claims))
    plot(claims, args.out)


if __name__ == "__main__":
    main()
