"""Summary statistics, the terminal table and the plots of a benchmark run.

``summarize`` is pure: it reads only the records, so its figures can be checked
against hand-computed ones.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from msn.evaluate import repeated_line_share


def _stats(recs: list[dict], ar_recs: list[dict]) -> dict:
    wall = sum(r["wall_time"] for r in recs)
    tokens = sum(r["new_tokens"] for r in recs)
    ar_wall = sum(r["wall_time"] for r in ar_recs)
    ar_rate = sum(r["new_tokens"] for r in ar_recs) / ar_wall if ar_wall > 0 else 0.0
    steps = sum(r["steps"] for r in recs)
    accepted = sum(sum(r["accept_lengths"]) for r in recs if r["accept_lengths"] is not None)
    histogram = Counter(a for r in recs if r["accept_lengths"] is not None for a in r["accept_lengths"])
    has_lengths = all(r["accept_lengths"] is not None for r in recs)
    forwards = sum(r["forwards"] for r in recs)
    return {
        # Throughput over ar's on the same prompts: the ratio of wall times when the tokens
        # are the same (greedy); also right when sampled outputs differ in length.
        "speedup": tokens / wall / ar_rate if wall > 0 and ar_rate > 0 else 0.0,
        # Tokens per decoding step after prefill (Spec-Bench's "mean accepted tokens").
        "mean_accepted_tokens": accepted / steps if has_lengths and steps else None,
        # Tokens per forward pass, prefill included: comparable with transformers' generate().
        "tokens_per_forward": tokens / forwards if forwards else 0.0,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        # Share of generations identical to ar's (greedy; or sampling with the same seed).
        "match_rate": None if any(r["match"] is None for r in recs) else sum(r["match"] for r in recs) / len(recs),
        "histogram": {str(k): histogram[k] for k in sorted(histogram)} if has_lengths else None,
        # Share of the answers' lines that repeat an earlier line of the same answer: drafts verify
        # loops cheaply, so a high share means the tokens per step overstate the decoder.
        "repeated_lines": repeated_line_share([t for r in recs for c in r.get("choices", [])[:1] for t in c["turns"]]),
        "steps": steps,
        "new_tokens": tokens,
        "wall_time": wall,
        "samples": len(recs),
    }


def summarize(records: list[dict], methods: list[str]) -> dict:
    """Per method: overall and per-category speedup over ``ar`` (tokens/s over ``ar``'s on
    the same prompts: the ratio of total wall times when outputs are equal), mean
    accepted tokens, tokens/s, match rate with ``ar`` and the acceptance-length histogram."""
    out = {}
    categories = list(dict.fromkeys(r["category"] for r in records))
    ar = [r for r in records if r["method"] == "ar"]
    for m in methods:
        recs = [r for r in records if r["method"] == m]
        if not recs:
            continue
        entry = {"overall": _stats(recs, ar), "categories": {}}
        for c in categories:
            rc = [r for r in recs if r["category"] == c]
            if rc:
                entry["categories"][c] = _stats(rc, [r for r in ar if r["category"] == c])
        out[m] = entry
    return out


def table(methods_summary: dict) -> str:
    """A plain-text table: one row per method, overall then per category speedups."""
    methods = list(methods_summary)
    cats = list(next(iter(methods_summary.values()))["categories"]) if methods else []
    name = max([11, *(len(m) + 1 for m in methods)])
    width = {c: max(8, len(c)) for c in cats}      # whole category names, never cut
    head = f"{'method':<{name}}{'speedup':>8}{'accepted':>9}{'tok/fwd':>8}{'tok/s':>8}{'match':>7}{'repeat':>7}  " + \
        "  ".join(f"{c:>{width[c]}}" for c in cats)
    lines = [head, "-" * len(head)]
    for m in methods:
        o = methods_summary[m]["overall"]
        acc = f"{o['mean_accepted_tokens']:.2f}" if o["mean_accepted_tokens"] is not None else "-"
        cells = "  ".join(f"{methods_summary[m]['categories'].get(c, {}).get('speedup', 0):>{width[c] - 1}.2f}x"
                          for c in cats)
        match = f"{o['match_rate']:.2f}" if o["match_rate"] is not None else "-"
        repeat = "-" if o.get("repeated_lines") is None else f"{o['repeated_lines']:.0%}"
        lines.append(f"{m:<{name}}{o['speedup']:>7.2f}x{acc:>9}{o['tokens_per_forward']:>8.2f}{o['tokens_per_s']:>8.1f}"
                     f"{match:>7}{repeat:>7}  {cells}")
    lines.append("(speedup over ar per category on the right; accepted = mean accepted tokens per step; repeat = "
                 "share of answer lines repeating an earlier line of the same answer, which drafts verify cheaply)")
    return "\n".join(lines)


def plots(methods_summary: dict, out: Path) -> list[Path]:
    """speedup.png (per category per method) and acceptance.png (histograms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods_summary if m != "ar"]
    cats = list(next(iter(methods_summary.values()))["categories"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cats)), 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [methods_summary[m]["categories"].get(c, {}).get("speedup", 0) if c != "overall"
                else methods_summary[m]["overall"]["speedup"] for c in cats]
        ax.bar([j + i * width for j in range(len(cats))], vals, width, label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speedup over ar")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "speedup.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    hist_methods = [m for m in methods if methods_summary[m]["overall"]["histogram"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(hist_methods), 1)
    for i, m in enumerate(hist_methods):
        h = methods_summary[m]["overall"]["histogram"]
        total = sum(h.values())
        ax.bar([int(k) + i * width for k in h], [v / total for v in h.values()], width, label=m)
    ax.set_xlabel("tokens accepted in a step")
    ax.set_ylabel("fraction of steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "acceptance.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
