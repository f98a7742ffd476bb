"""Pictures for materializations and MLflow runs (PNG bytes, drawn off-screen)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def bar_chart(values: dict[str, float], title: str, xlabel: str = "") -> bytes:
    """A horizontal bar chart, largest bar on top, as PNG bytes."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * max(len(items), 3) + 1.2), dpi=100)
    labels, heights = [k for k, _ in items], [v for _, v in items]
    bars = ax.barh(labels, heights, color="#c2410c")
    ax.bar_label(bars, padding=3, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def loss_curve(history: list[dict], evals: list[dict], title: str) -> bytes:
    """Training loss per step, validation loss at each evaluation, as PNG bytes."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, color="#c2410c", label="train loss")
    if evals:
        ax.plot(
            [e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="#1d4ed8", label="validation loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def gguf_comparison(results: dict) -> bytes:
    """Size, generation speed and prompt speed of each GGUF file, side by side, as PNG bytes."""
    kinds = list(results)
    panels = [
        ("size (MB)", [results[k]["size_bytes"] / 2**20 for k in kinds]),
        (f"tg{results[kinds[0]]['tg_tokens']} (tokens/s)", [results[k]["tg_tokens_per_s"]["median"] for k in kinds]),
        (f"pp{results[kinds[0]]['pp_tokens']} (tokens/s)", [results[k]["pp_tokens_per_s"]["median"] for k in kinds]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.2), dpi=100)
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(kinds, values, color=["#1d4ed8", "#c2410c", "#15803d"][: len(kinds)])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title)
        ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def metric_panels(
    table: dict[str, dict[str, float]], title: str, lower_is_better=frozenset(), chance: dict[str, float] | None = None
) -> bytes:
    """One small bar panel per metric (metric -> model -> value), models in the same colours
    throughout, so each stage's gain or loss on every task reads at a glance; a dashed line
    where a metric has a chance level."""
    models = list(dict.fromkeys(m for values in table.values() for m in values))
    colours = dict(zip(models, ["#94a3b8", "#1d4ed8", "#c2410c", "#15803d", "#7c3aed"], strict=False))
    cols = min(3, max(len(table), 1))
    rows = -(-max(len(table), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows + 0.4), dpi=100, squeeze=False)
    for ax, (metric, values) in zip(axes.flat, table.items(), strict=False):
        bars = ax.bar(list(values), list(values.values()), color=[colours[m] for m in values])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        if chance and metric in chance:
            ax.axhline(chance[metric], color="black", lw=0.8, ls="--", label="chance")
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(f"{metric} ({'lower' if metric in lower_is_better else 'higher'} is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(table) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _png(fig)


def optimisation_history(trials: list[dict], objective: str, floor: float) -> bytes:
    """An Optuna study's history: each finished trial's score (hollow where it missed the
    tokens/s floor), pruned trials at their score when stopped, and the best feasible score so far,
    as PNG bytes."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    ok = [t for t in done if t["tokens_per_s"] >= floor]
    slow = [t for t in done if t["tokens_per_s"] < floor]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    ax.plot([t["number"] for t in ok], [t["value"] for t in ok], "o", color="#1d4ed8", label="trial")
    if slow:
        ax.plot([t["number"] for t in slow], [t["value"] for t in slow], "o", mfc="none", color="#1d4ed8",
                label=f"under {floor:g} tokens/s")  # fmt: skip
    if pruned:
        ax.plot([t["number"] for t in pruned], [t["value"] or 0 for t in pruned], "x", color="#94a3b8",
                label="pruned (score when stopped)")  # fmt: skip
    best, xs, ys = None, [], []
    for t in sorted(ok, key=lambda t: t["number"]):
        best = t["value"] if best is None else max(best, t["value"])
        xs.append(t["number"])
        ys.append(best)
    if xs and trials:  # carry the best on to the last trial
        xs.append(max(t["number"] for t in trials))
        ys.append(ys[-1])
    ax.step(xs, ys, where="post", color="#c2410c", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
