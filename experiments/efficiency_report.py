"""The page and the figure of an experiments/efficiency.py record (the paper's Figure 4): the
markdown tables of the train and decode rows, the three panels (throughput, memory, latency),
and writing them beside the JSON. They read only the record, so that --plot-only redraws a
report from its JSON.
"""

from __future__ import annotations

import os

from experiments import common

GIB = common.GIB
NAME = "efficiency"


def markdown(record: dict) -> str:
    c = record["config"]
    train = [r for r in record["rows"] if r["part"] == "train"]
    decode = [r for r in record["rows"] if r["part"] == "decode"]
    note = lambda r: "" if r.get("status") == "ok" else (  # noqa: E731
        f"{r.get('status')}: {r.get('reason', '')[:140]}".replace("|", "/").replace("\n", " "))
    lines = [f"# Efficiency ({record['tag']}): the paper's Figure 4 at size {c['size']}", "",
             f"(a, b) one train step (forward + backward + AdamW), {c['tokens']} tokens per "
             f"batch, compute {c['dtype']}, f32 parameters; median of {c['repeats']} steps after "
             f"{c['warmup']} warm-up. Peak = the device's peak bytes in use in the case's own "
             f"process (GPU only); compiled = XLA's footprint of the step.", ""]
    lines.append(common.markdown_table(
        ["T", "B", "model", "form", "step ms", "tokens/s", "peak GiB", "compiled GiB", "note"],
        [[r["T"], r.get("B", "-"), r["model"], r.get("form", "-") + (
            f" ({r['recompute']})" if r.get("recompute") else ""),
          common.fmt(r.get("step_ms"), 1), common.fmt(r.get("tokens_per_s"), 0),
          common.fmt_gib(r.get("peak_bytes")), common.fmt_gib(r.get("compiled_bytes")),
          note(r)] for r in train],
        align="rrllrrrrl"))
    lines += ["", f"(c) greedy generation, batch 1, after a {c['prefix']}-token prompt "
                  f"({c['decode_dtype']} weights); latency = the whole `generate` call (prefill + "
                  f"N steps), median of {c['decode_repeats']}; cache = the decode state's bytes.",
              ""]
    lines.append(common.markdown_table(
        ["model", "N", "latency ms", "ms/token", "prefill ms", "cache MiB", "peak GiB", "note"],
        [[r["model"], r["N"], common.fmt(r.get("latency_ms"), 1),
          common.fmt(r.get("ms_per_token"), 2), common.fmt(r.get("prefill_ms"), 1),
          common.fmt(None if r.get("cache_bytes") is None else r["cache_bytes"] / 2 ** 20, 3),
          common.fmt_gib(r.get("peak_bytes_so_far")), note(r)] for r in decode], align="lrrrrrrl"))
    lines += common.notes_lines(record)
    return "\n".join(lines) + "\n"


def figure(record: dict, out_base: str | None = None):
    """The three panels of Figure 4 (and, given out_base, each panel as its own PNG)."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [r for r in record["rows"] if r.get("status") == "ok"]
    models = list(dict.fromkeys(r["model"] for r in record["rows"]))  # the record's order
    panels = [("throughput", "train", "T", "tokens_per_s", 1e-3,
               "training throughput (K tokens/s)"),
              ("memory", "train", "T", None, 1 / GIB,
               "training memory (GiB; XLA footprint where no device peak)"),
              ("latency", "decode", "N", "latency_ms", 1e-3, "generation latency (s)")]
    # A train-only or decode-only report draws only its own panels (no empty axes).
    parts = {r["part"] for r in record["rows"]} or {"train", "decode"}
    panels = [p for p in panels if p[1] in parts]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    for ax_all, (name, part, x, y, scale, label) in zip(axes, panels):
        targets = [ax_all]
        single = None
        if out_base:
            single = plt.figure(figsize=(5.2, 4.2))
            targets.append(single.gca())
        for model in models:
            mine = sorted((r for r in rows if r["part"] == part and r["model"] == model),
                          key=lambda r: r[x])
            if y is None:  # device peak where reported, else XLA's compiled footprint
                points = [(r[x], r.get("peak_bytes") or r.get("compiled_bytes")) for r in mine]
            else:
                points = [(r[x], r.get(y)) for r in mine]
            points = [(a, b * scale) for a, b in points if b is not None]
            if points:
                for ax in targets:
                    ax.plot(*zip(*points), marker="o", label=model)
        for ax in targets:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T" if x == "T" else
                          f"generated tokens N (after {record['config']['prefix']})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
        if single is not None:
            single.savefig(f"{out_base}_{name}.png", dpi=120, bbox_inches="tight")
            plt.close(single)
    fig.suptitle(f"efficiency ({record['tag']}, size {record['config']['size']})")
    fig.tight_layout()
    return fig


def write(record: dict, out_dir: str, plots: bool) -> dict:
    """efficiency_<tag>.json/.md, and with `plots` the figure and its panels' PNGs."""
    fig = figure(record, os.path.join(out_dir, f"{NAME}_{record['tag']}")) if plots else None
    paths = common.write_results(record["tag"], NAME, record, markdown(record), fig,
                                 out_dir=out_dir, command=record["command"])
    if fig is not None:
        common.pyplot().close(fig)
    return paths

