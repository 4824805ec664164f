"""The reports of both MQAR setups: verdicts on the paper's claims, the Markdown and the plot.

The second setup (experiments/mqar.py, results mqar_<tag>): `verdict`, `markdown`, `plot` over
rows of (model, width, T). The authors' setup (experiments/mqar_authors.py, results
mqar_authors_<tag>): `summarise` (a cell at its best lr), `verdicts`, `authors_markdown`,
`authors_plot`, and `merge`/`finish` of the cells of several calls.
"""

from __future__ import annotations

import math
from typing import Any

from experiments import common
from experiments.mqar_models import state_size

# The second setup's models.
MODELS = ("gsa", "gla", "retnet", "abc", "attention")
LABELS = {"gsa": "GSA", "gla": "GLA", "retnet": "RetNet", "abc": "ABC",
          "attention": "Transformer++"}

# The authors' setup.
AUTHORS_MODELS = ("gsa", "gla", "retnet", "attention")
AUTHORS_LABELS = {"gsa": "GSA", "gla": "GLA", "retnet": "RetNet", "attention": "Attention"}
GSA_LRS = [1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]   # the authors' grid for GSA
# their baselines' runs (attention, GLA, RetNet; shared/PAPER.md §4): np.logspace(-4, -2, 4)
BASELINE_LRS = [1e-4, 4.64e-4, 2.15e-3, 1e-2]
# a tried lr within this relative distance of a grid point counts as that point (2e-3 ~ 2.15e-3)
LR_MATCH = 0.1
STOP_ACCURACY = 0.99                            # Zoology's early stop (valid accuracy >)
# A run whose training loss never fell this far below ln(V/2) (the uniform guess over the
# values) "never left the plateau": reported as such, not as an accuracy.
PLATEAU_MARGIN = 0.25
# A pair of cells whose best mean accuracies both stay under this learned nothing worth
# ordering (1-2% is the plateau's exit, not recall): the claim is not testable there.
LEARNED_ACCURACY = 0.05
# the gap between two cells' seed ranges that orders them (accuracy, 0.5 points)
SEPARATION = 0.005
# seeds per cell the setup asks for (issue 21: at least 2); a cell with fewer is cut
MIN_SEEDS = 2
OUTCOME_WORDS = {"win": "ok", "tie": "tie", "fail": "FAILS"}



# ------------------------------------------------------------------ second setup
def verdict(rows: list[dict]) -> dict[str, Any]:
    """Per (T, width) with GSA, GLA and RetNet: does GSA's accuracy exceed both?

    margin = acc(GSA) − max(acc(GLA), acc(RetNet)). A margin within the noise of the held-out
    set is a tie: |margin| ≤ max(0.5 points, 2 standard errors of the difference of two
    accuracies measured on n queries, sqrt(a(1−a)/n + b(1−b)/n)). Holds: no loss and at least
    one win; inconclusive: only ties."""
    cells = []
    by_key = {(r["seq_len"], r["width"], r["model"]): r for r in rows}
    for seq_len, width in sorted({(r["seq_len"], r["width"]) for r in rows}):
        got = {m: by_key.get((seq_len, width, m)) for m in ("gsa", "gla", "retnet")}
        if any(r is None for r in got.values()):
            continue
        a = got["gsa"]["accuracy"]
        b = max(got["gla"]["accuracy"], got["retnet"]["accuracy"])
        n = got["gsa"]["test_queries"]
        tie = max(0.005, 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / n))
        margin = a - b
        outcome = "win" if margin > tie else ("tie" if margin >= -tie else "loss")
        cells.append({"seq_len": seq_len, "width": width, "margin": margin, "tie_within": tie,
                      "outcome": outcome})
    wins = sum(c["outcome"] == "win" for c in cells)
    losses = sum(c["outcome"] == "loss" for c in cells)
    ties = len(cells) - wins - losses
    summary = (None if not cells else "does not hold" if losses else
               "holds" if wins else "inconclusive")
    return {"cells": cells, "wins": wins, "ties": ties, "losses": losses,
            "holds": (losses == 0 and wins > 0) if cells else None, "summary": summary}


def markdown(record: dict) -> str:
    rows, cfg = record["rows"], record["config"]
    mix = ", ".join(f"({c['seq_len']}, {c['num_kv_pairs']}) {100 * c['share']:.0f}%"
                    for c in cfg["train_mix"])
    lrs = ", ".join(f"{lr:g}" for lr in cfg["lr"])
    lines = [f"# MQAR, second setup (ours, not the authors'): accuracy vs model width "
             f"({record['tag']})", "",
             f"Zoology's multi-query associative recall, V = {cfg['vocab_size']}, power law "
             f"α = {cfg['power_a']}, random filler = {cfg['random_non_queries']}; 2-layer "
             f"models (short convolution on q/k/v: linear mixers {not cfg['no_short_conv']}, "
             f"Transformer++ {bool(cfg.get('attention_conv'))}; kernels initialised as "
             f"{cfg.get('conv_init', 'model')}). "
             f"Trained on a mixture of (T, P) tasks (share of the training tokens): {mix}, "
             f"packed into rows of {cfg['train_row_len']} tokens; {cfg['steps']} steps x "
             f"{cfg['batch_size']} rows per lr of {lrs} (warmup {cfg['warmup_frac']:.0%}, "
             f"cosine to x{cfg['min_lr_ratio']}), weight decay {cfg['weight_decay']}, "
             f"{cfg['dtype']} compute. One training run per model, width and lr, tested on "
             f"every (T, P) below: accuracy = share of held-out queries "
             f"({cfg['test_examples']} sequences per T) whose argmax is the bound value, after "
             f"the last step, at the lr that is best for that test set (every lr's and the "
             f"best over evaluations in the JSON).", ""]
    v = record["verdict"]
    if v["holds"] is None:
        lines.append("**Claim (GSA beats GLA and RetNet at equal width):** not testable here "
                     "(needs gsa, gla and retnet at the same widths).")
    else:
        cells = ", ".join(f"T={c['seq_len']} D={c['width']}: {c['outcome']} "
                          f"({100 * c['margin']:+.1f} pts)" for c in v["cells"])
        word = v["summary"].upper()
        lines.append(f"**Claim (GSA beats GLA and RetNet at equal width): {word}** in this run: "
                     f"GSA wins {v['wins']}, ties {v['ties']} (within the held-out noise: "
                     f"max(0.5 points, 2 standard errors)), loses {v['losses']} of "
                     f"{len(v['cells'])} (T, width) cells. {cells}.")
    for seq_len in sorted({r["seq_len"] for r in rows}):
        sub = [r for r in rows if r["seq_len"] == seq_len]
        widths = sorted({r["width"] for r in sub})
        kv = sub[0]["num_kv_pairs"]
        lines += ["", f"## T = {seq_len}, {kv} key-value pairs", ""]
        table = []
        for m in [m for m in MODELS if any(r["model"] == m for r in sub)]:
            acc = {r["width"]: r["accuracy"] for r in sub if r["model"] == m}
            table.append([LABELS[m]] + [common.fmt(100 * acc[w], 1) if w in acc else "-"
                                        for w in widths])
        lines.append(common.markdown_table(["model"] + [f"D={w}" for w in widths], table))
        if len(cfg["lr"]) > 1:
            chosen = "; ".join(
                f"{LABELS[m]} " + ", ".join(f"{r['lr']:g}" for r in sorted(
                    (r for r in sub if r["model"] == m), key=lambda r: r["width"]))
                for m in MODELS if any(r["model"] == m for r in sub))
            lines += ["", f"Best lr per model (by width): {chosen}."]
    # The rows of one training run (one per test set) share its times.
    runs = {(r["model"], r["width"], r["compile_s"], r["train_s"]) for r in rows}
    compile_s = sum(r[2] for r in runs)
    train_s = sum(r[3] for r in runs)
    lines += ["", f"Accuracy in %. {len(runs)} runs: {train_s:.0f} s of training and "
                  f"{compile_s:.0f} s of init + compile (in worker threads, overlapping the "
                  f"training) summed over runs; per run in the JSON. Wall time of the last "
                  f"command: {record.get('elapsed_s', 0):.0f} s."]
    lines += common.notes_lines(record)
    return "\n".join(lines)


def width_axis(ax, widths, xlabel: str) -> None:
    """The x axis of both setups' plots (model width, log2, a tick per width) and the y range of
    an accuracy in %."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel(xlabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def plot(record: dict):
    plt = common.pyplot()
    rows = record["rows"]
    if plt is None or not rows:
        return None
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.2 * len(seq_lens), 3.6),
                             squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens):
        sub = [r for r in rows if r["seq_len"] == seq_len]
        for m in MODELS:
            pts = sorted((r["width"], 100 * r["accuracy"]) for r in sub if r["model"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[m])
        width_axis(ax, sorted({r["width"] for r in sub}), "model width")
        ax.set_title(f"T = {seq_len}, {sub[0]['num_kv_pairs']} KV pairs")
    axes[0][0].set_ylabel("MQAR accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ authors' setup
def summarise(cell: dict, vocab_size: int) -> dict[str, Any]:
    """The cell at its best lr (highest mean final accuracy over seeds; ties: lower mean final
    loss): mean/min/max accuracy over seeds, and whether every run of that lr stayed on the
    plateau (its lowest training loss above ln(V/2) − PLATEAU_MARGIN)."""
    plateau_loss = math.log(vocab_size / 2)
    by_lr = []
    for lr in cell["lrs"]:
        runs = [r for r in cell["runs"] if r["lr"] == lr and r["curve"]]
        if not runs:
            continue
        acc = [r["curve"][-1]["accuracy"] for r in runs]
        loss = [r["curve"][-1]["loss"] for r in runs]
        flat = [min(p["loss"] for p in r["curve"]) > plateau_loss - PLATEAU_MARGIN for r in runs]
        by_lr.append({"lr": lr, "mean": sum(acc) / len(acc), "min": min(acc), "max": max(acc),
                      "final_loss": sum(loss) / len(loss), "plateau": all(flat),
                      "plateau_runs": sum(flat), "n": len(acc)})
    if not by_lr:
        return {"lr": None, "mean": None, "min": None, "max": None, "plateau": None, "by_lr": []}
    best = max(by_lr, key=lambda b: (b["mean"], -b["final_loss"]))
    return {**best, "by_lr": by_lr}


def verdicts(cells: list[dict], vocab_size: int) -> list[dict[str, Any]]:
    """The paper's claims per width, at each model's best lr: GSA ≥ GLA, GSA ≥ RetNet, and GSA,
    GLA, RetNet each ≤ attention. With two seeds a mean says little, so `a ≥ b` is judged on
    the seeds' ranges: "win" where every run of a beats every run of b by SEPARATION or more,
    "fail" where every run of a is below every run of b by that much, "tie" where the ranges
    overlap (the seeds cannot order them; a tie does not contradict a ≥ claim). A width where
    both stay under LEARNED_ACCURACY is not tested (near-chance numbers order nothing). For
    the attention claim the width's worst comparison stands (fail, then tie, then win; the
    smallest margin among equals)."""
    at = {(c["model"], c["width"]): summarise(c, vocab_size) for c in cells}
    cell_at = {(c["model"], c["width"]): c for c in cells}
    widths = sorted({c["width"] for c in cells})

    def geq(a, b, width):
        x, y = at.get((a, width)), at.get((b, width))
        if not x or not y or x["mean"] is None or y["mean"] is None:
            return None
        if max(x["mean"], y["mean"]) < LEARNED_ACCURACY:
            return None
        outcome = ("win" if x["min"] >= y["max"] + SEPARATION else
                   "fail" if x["max"] <= y["min"] - SEPARATION else "tie")
        # the side whose cut, once run, could overturn the outcome by doing better: the loser
        # of a win or a fail, both sides of a tie (more lrs can only raise a cell's best mean)
        behind = {"win": [b], "fail": [a], "tie": [a, b]}[outcome]
        return {"width": width, "margin": x["mean"] - y["mean"], "outcome": outcome,
                "vs": b if a == "attention" else a,
                "open": [o for o in (open_cell(cell_at[(m, width)]) for m in behind) if o]}

    rank = {"fail": 0, "tie": 1, "win": 2}
    claims = [("GSA ≥ GLA", [geq("gsa", "gla", w) for w in widths]),
              ("GSA ≥ RetNet", [geq("gsa", "retnet", w) for w in widths]),
              ("GSA, GLA, RetNet ≤ attention",
               [min((c for c in (geq("attention", m, w) for m in ("gsa", "gla", "retnet"))
                     if c), key=lambda c: (rank[c["outcome"]], c["margin"]), default=None)
                for w in widths])]
    out = []
    for claim, per_width in claims:
        tested = [c for c in per_width if c is not None]
        at_d = lambda kind: ", ".join(str(c["width"]) for c in tested  # noqa: E731
                                      if c["outcome"] == kind)
        if not tested:
            summary = "not testable"
        elif at_d("fail"):
            summary = f"does not hold (D = {at_d('fail')})" + (
                f"; seeds overlap at D = {at_d('tie')}" if at_d("tie") else "")
        elif not at_d("tie"):
            summary = "holds"
        elif at_d("win"):
            summary = f"holds at D = {at_d('win')}; seeds overlap at D = {at_d('tie')}"
        else:
            summary = f"not separated (seeds overlap at D = {at_d('tie')})"
        out.append({"claim": claim, "summary": summary, "cells": tested})
    return out


def open_cell(cell: dict) -> dict | None:
    """What a cell did less of than the authors, so that its best accuracy may still rise: the
    points of its model's lr grid it has not tried, epochs short of 64 without every run
    early-stopped, and lrs that ran fewer seeds than the cell's others. None for a cell trained
    as the authors did."""
    untried = untried_lrs(cell["model"], cell["lrs"])
    short = short_parts(cell)
    thin = thin_lrs(cell)
    if not untried and not short and not thin:
        return None
    # a cell trained in parts names its short parts' lrs: the others ran all 64 epochs
    return {"model": cell["model"], "untried_lrs": untried,
            "thin_lrs": [(lr, len(seeds), len(cell_seeds(cell))) for lr, seeds in thin],
            "grid_lrs": len(authors_lrs(cell["model"])),
            "epochs_done": min(p["epochs_done"] for p in short) if short else None,
            "short_lrs": ([lr for p in short for lr in p["lrs"]]
                          if short and cell.get("parts") else None)}


def fmt_open(o: dict) -> str:
    """'GSA 4 of 6 grid lrs untried' and/or '57 of 64 epochs' ('lr 0.001 at 43 of 64 epochs'
    for a short part of a cell trained in parts) and/or 'lr 0.005 at 1 of 2 seeds' (an lr whose
    other seeds' parts have not run)."""
    parts = ([f"{len(o['untried_lrs'])} of {o['grid_lrs']} grid lrs untried"]
             if o["untried_lrs"] else [])
    if o["epochs_done"] is not None:
        at = f"lr {fmt_lrs(o['short_lrs'])} at " if o.get("short_lrs") else ""
        parts.append(f"{at}{o['epochs_done']:g} of 64 epochs")
    parts += [f"lr {lr:g} at {n} of {of} seeds" for lr, n, of in o.get("thin_lrs", [])]
    return f"{AUTHORS_LABELS[o['model']]} " + ", ".join(parts)


def fmt_cell(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    if s["plateau"]:
        return "plateau"
    spread = f" ({100 * s['min']:.1f}–{100 * s['max']:.1f})" if s["n"] > 1 else ""
    return f"{100 * s['mean']:.1f}{spread}"


def authors_markdown(record: dict) -> str:
    cfg, cells = record["config"], record["cells"]
    V = cfg["vocab_size"]
    widths = sorted({c["width"] for c in cells})
    lines = [f"# MQAR, the authors' setup: accuracy vs model width ({record['tag']})", "",
             f"The GSA authors' MQAR recipe (their Zoology fork, shared/PAPER.md §4; "
             f"`experiments/mqar_authors.py`): T = {cfg['seq_len']}, {cfg['kv_pairs']} "
             f"key-value pairs, V = {V}, α = {cfg['power_a']}, filler 0; "
             f"{cfg['train_examples']} training / {cfg['test_examples']} held-out sequences; "
             f"{cfg['num_layers']} blocks without MLP (pre-LayerNorm, tied embeddings, embedding "
             f"dropout {cfg['embed_dropout']}, positions for attention only); batch "
             f"{cfg['batch_size']}, AdamW (wd {cfg['weight_decay']}), cosine to 0 over the "
             f"epoch cap, early stop at {STOP_ACCURACY:.0%} held-out accuracy; {cfg['dtype']} "
             f"compute. Accuracy in % at the best lr per cell: mean over seeds (min–max); "
             f"'plateau': every run at that lr kept its training loss above ln(V/2) − "
             f"{PLATEAU_MARGIN} = {math.log(V / 2) - PLATEAU_MARGIN:.2f} (never left the "
             f"uniform guess), not an accuracy.", ""]
    for v in record["verdicts"]:
        detail = "; ".join(
            f"D={c['width']}: "
            + (f"attention − {AUTHORS_LABELS[c['vs']]} " if v["claim"].endswith("attention")
               else "")
            + f"{100 * c['margin']:+.1f} pts ({OUTCOME_WORDS[c['outcome']]}"
            + ("; open: " + "; ".join(fmt_open(o) for o in c["open"]) if c.get("open") else "")
            + ")"
            for c in v["cells"])
        lines.append(f"- **{v['claim']}: {v['summary'].upper()}**" +
                     (f" — {detail}." if detail else "."))
    lines += ["", f"(Per width, at each model's best lr: ok where every seed's run of the "
                  f"claimed-better model beats every run of the other by ≥ "
                  f"{100 * SEPARATION:.1f} pts, FAILS where every run is below every run of "
                  f"the other by that much, tie where the seeds' ranges overlap; the margin is "
                  f"the difference of the means; the attention claim shows the model that "
                  f"comes closest to contradicting it; a width where both stay under "
                  f"{100 * LEARNED_ACCURACY:.0f}% is not tested; 'open' names a cell on the "
                  f"side that more of the authors' lr grid or epochs could still lift, so the "
                  f"outcome is provisional there.)", ""]
    summaries = {(c["model"], c["width"]): summarise(c, V) for c in cells}
    unfinished = {(c["model"], c["width"]): why for c in cells if (why := provisional(c))}
    rows = []
    for m in [m for m in AUTHORS_MODELS if any(c["model"] == m for c in cells)]:
        rows.append([AUTHORS_LABELS[m]] + [
            fmt_cell(summaries[(m, w)]) + (" ‡" if (m, w) in unfinished else "")
            if (m, w) in summaries else "-" for w in widths])
    lines.append(common.markdown_table(["model"] + [f"D={w}" for w in widths], rows))
    if unfinished:
        lines += ["", "‡ unfinished, the value may still move: " + "; ".join(
            f"{AUTHORS_LABELS[m]} D={w} ({why})" for (m, w), why in unfinished.items()) + "."]
    lines += ["", "State per layer (floats per sequence; attention: its KV cache at T):", ""]
    lines.append(common.markdown_table(
        ["model"] + [f"D={w}" for w in widths],
        [[AUTHORS_LABELS[m]] + [f"{state_size(m, w, cfg['seq_len']):,}" for w in widths]
         for m in AUTHORS_MODELS if any(c["model"] == m for c in cells)]))
    lines += ["", "Per cell: best lr, lrs tried, seeds, epochs done of the cap and why the cell "
                  "stopped, training time, step time (the runs still training, together: "
                  "early-stopped runs are left out of later steps), tokens/s and the GPU "
                  "(timings compare only within one GPU):", ""]
    table = []
    for c in sorted(cells, key=lambda c: (AUTHORS_MODELS.index(c["model"]), c["width"])):
        s = summaries[(c["model"], c["width"])]
        table.append([AUTHORS_LABELS[c["model"]], c["width"],
                      "-" if s["lr"] is None else f"{s['lr']:g}",
                      fmt_lrs(c["lrs"]), c["seeds"],
                      " ; ".join(f"{p['epochs_done']:g} / "
                                 f"{p.get('schedule_epochs', c['max_epochs']):g}"
                                 f" / {c['max_epochs']}" for p in cell_parts(c)),
                      " ; ".join(p["stop_reason"] for p in cell_parts(c)),
                      f"{c['train_s']:.0f}",
                      " ; ".join(common.fmt(p["step_s"], 4) for p in cell_parts(c))
                      + masked_mark(c),
                      " ; ".join("-" if not p["tokens_per_s"] else
                                 f"{p['tokens_per_s'] / 1e6:.2f}M" for p in cell_parts(c)),
                      " ; ".join(chunk_drift(p.get("chunk_seconds")) for p in cell_parts(c)),
                      ", ".join(trained_on(c)) or "-"])
    lines.append(common.markdown_table(
        ["model", "D", "best lr", "lrs", "seeds", "epochs done / cosine / cap", "stopped by",
         "train s", "s/step", "tokens/s", "s per chunk: first / last / max", "trained on"],
        table))
    split = [f"{AUTHORS_LABELS[c['model']]} D={c['width']}: " + " ; ".join(
        fmt_part(p, c) for p in cell_parts(c))
        for c in cells if c.get("parts")]
    if split:
        lines += ["", "Cells trained in parts (their lrs or seeds split over processes; each run "
                      "depends on its own lr and seed only): " + ", ".join(split) + ". Their "
                      "epochs, stop reasons, s/step, tokens/s and chunk times are per part, in "
                      "that order, separated by ';'."]
    gpus = list(dict.fromkeys(d for c in cells for d in trained_on(c)))
    if len(gpus) > 1:
        lines += ["", f"The cells were trained on more than one GPU ({', '.join(gpus)}; column "
                      "'trained on'): the machine line at the end is the first merged report's. "
                      "Accuracies compare across them; times only within one GPU."]
    if any(masked_mark(c) for c in cells):
        lines += ["", f"{MASKED_MARK.strip()} this cell's early-stopped runs stayed in its later "
                      "steps, masked (cells trained before 2026-12-06, or with "
                      "--no-compact-stopped): its s/step and tokens/s count every run."]
    tuned = [f"{AUTHORS_LABELS[c['model']]} D={c['width']} {c['kernel_tuning']}"
             for c in cells if c.get("kernel_tuning")]
    if tuned:
        lines += ["", "Kernel launch parameters other than the defaults ($GSA_PALLAS_TUNING; "
                      "speed only): " + "; ".join(tuned) + "."]
    cut = cuts(record)
    if cut:
        lines += ["", "**Cut relative to the authors:** " + " ".join(cut)]
    lines += common.notes_lines(record)
    return "\n".join(lines)


def trained_on(cell: dict) -> list[str]:
    """The GPUs that trained a cell, short ('H200'); none for cells that predate the record."""
    return [d.removeprefix("NVIDIA ") for d in cell.get("devices", [])]


MASKED_MARK = " †"


def masked_mark(cell: dict) -> str:
    """MASKED_MARK where a cell's stopped runs were computed (masked) in its later steps, so its
    step time counts them: cells from before stopped runs were left out lack the key."""
    stopped = any(r.get("stopped_epoch") is not None for r in cell.get("runs", []))
    return MASKED_MARK if stopped and not cell.get("stopped_runs_left_out", False) else ""


def authors_lrs(model: str) -> list[float]:
    """The lr grid the authors swept for `model` (GSA's own; the baselines' shared one)."""
    return GSA_LRS if model == "gsa" else BASELINE_LRS


def untried_lrs(model: str, lrs) -> list[float]:
    """The points of the authors' lr grid for `model` that no lr in `lrs` matches (within
    LR_MATCH relative)."""
    return [x for x in authors_lrs(model)
            if not any(abs(lr - x) <= LR_MATCH * x for lr in lrs)]


def fmt_lrs(lrs) -> str:
    """'0.001 0.002': a list of lrs as the report writes it."""
    return " ".join(f"{lr:g}" for lr in lrs)


def short_parts(cell: dict) -> list[dict]:
    """The parts of a cell (cell_parts: the cell itself when trained whole) that stopped before
    the authors' 64 epochs with some run short of 99%. A joined cell's own epochs_done is its
    furthest part's, so a paused part next to a finished one is found only per part."""
    return [p for p in cell_parts(cell)
            if p["stop_reason"] != "all runs early-stopped" and p["epochs_done"] < 64]


def short_of_epochs(cell: dict) -> bool:
    """A cell with a part that stopped before the authors' 64 epochs with some run short of
    99%."""
    return bool(short_parts(cell))


def cuts(record: dict) -> list[str]:
    """What this run did less of than the authors (64 epochs, their lr grid, early stop)."""
    out = []
    cells = record["cells"]
    short = [(c, parts) for c in cells if (parts := short_parts(c))]
    if short:
        out.append(f"{len(short)} of {len(cells)} cells trained fewer than the authors' 64 "
                   "epochs without every run reaching 99% (" + ", ".join(
                       f"{AUTHORS_LABELS[c['model']]} D={c['width']}"
                       + (f" (lr {fmt_part(p, c)})" if c.get("parts") else "")
                       + f": {p['epochs_done']:g} epochs, {p['stop_reason']}"
                       for c, parts in short for p in parts) + ").")
    thin = [f"{AUTHORS_LABELS[c['model']]} D={c['width']} lr {lr:g} ({fmt_seeds(seeds)} of "
            f"{' '.join(map(str, cell_seeds(c)))})" for c in cells for lr, seeds in thin_lrs(c)]
    if thin:
        out.append("Lrs that ran fewer seeds than their cell's others (parts by seed still to "
                   "run; their mean and range are over the seeds that ran): "
                   + ", ".join(thin) + ".")
    few = [f"{AUTHORS_LABELS[c['model']]} D={c['width']} ({fmt_seeds(cell_seeds(c))})"
           for c in cells if len(cell_seeds(c)) < MIN_SEEDS]
    if few:
        out.append(f"Cells with fewer than {MIN_SEEDS} seeds (their other seeds' parts still to "
                   "run; a range of one run, so their verdicts rest on one seed): "
                   + ", ".join(few) + ".")
    if any(c.get("schedule_epochs", c["max_epochs"]) < 64 for c in cells):
        out.append("The cosine schedule runs to 0 over the epoch cap or, with a time budget, "
                   "over the epochs that fit it (column 'cosine'), so a cut run anneals sooner "
                   "than the authors' 64-epoch schedule.")
    untried = {id(c): untried_lrs(c["model"], c["lrs"]) for c in cells}
    for grid, whose in ((GSA_LRS, "GSA grid"),
                        (BASELINE_LRS, "baseline grid (np.logspace(-4, -2, 4))")):
        fewer = [f"{AUTHORS_LABELS[c['model']]} D={c['width']} (ran {fmt_lrs(c['lrs'])}; untried "
                 f"{fmt_lrs(untried[id(c)])})" for c in cells
                 if authors_lrs(c["model"]) is grid and untried[id(c)]]
        if fewer:
            out.append(f"lr grid smaller than the authors' {whose} {{"
                       + ", ".join(f"{x:g}" for x in grid) + "}: " + ", ".join(fewer) + ".")
    return out


def provisional(cell: dict) -> str:
    """What a cell still lacks for its point to be final ('22/64 epochs, 1 seed'), or '': a
    part paused before its cap (it resumes), or fewer than MIN_SEEDS seeds. A cell that ran
    to a cap below the authors' 64 epochs is finished as configured (the cut list says so)."""
    paused = [p for p in cell_parts(cell) if p["stop_reason"].startswith("paused")]
    out = ([f"{min(p['epochs_done'] for p in paused):g}/{cell['max_epochs']} epochs"]
           if paused else [])
    seeds = len(cell_seeds(cell))
    if seeds < MIN_SEEDS:
        out.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    return ", ".join(out)


def authors_plot(record: dict):
    plt = common.pyplot()
    cells = record["cells"]
    if plt is None or not cells:
        return None
    V = record["config"]["vocab_size"]
    widths = sorted({c["width"] for c in cells})
    # Left: accuracy vs width. Then one panel per width: every run's held-out accuracy per
    # evaluation, where a plateau and its sudden end (the phase change) can be seen.
    fig, axes = plt.subplots(1, 1 + len(widths), figsize=(5.2 + 3.2 * len(widths), 3.8),
                             squeeze=False)
    ax = axes[0][0]
    colors = {}
    for m in AUTHORS_MODELS:
        pts = sorted(((c["width"], summarise(c, V), c) for c in cells if c["model"] == m),
                     key=lambda p: p[0])
        pts = [(w, s, c) for w, s, c in pts if s["mean"] is not None]
        if not pts:
            continue
        w = [p[0] for p in pts]
        mean = [100 * p[1]["mean"] for p in pts]
        lo = [100 * (p[1]["mean"] - p[1]["min"]) for p in pts]
        hi = [100 * (p[1]["max"] - p[1]["mean"]) for p in pts]
        line = ax.errorbar(w, mean, yerr=[lo, hi], marker="o", capsize=3,
                           label=AUTHORS_LABELS[m])
        colors[m] = line[0].get_color()
        for x, (_, s, c) in zip(w, pts):
            if s["plateau"]:
                ax.annotate("plateau", (x, 100 * s["mean"]), fontsize=6,
                            color=line[0].get_color(), textcoords="offset points",
                            xytext=(0, 5), ha="center")
            unfinished = provisional(c)
            if unfinished:   # a hollow marker: the point may still move
                # colour given, so the model colours' cycle does not advance
                ax.plot([x], [100 * s["mean"]], marker="o", mfc="white",
                        color=line[0].get_color(), ls="none", zorder=3)
                ax.annotate(unfinished, (x, 100 * s["mean"]), fontsize=6,
                            color=line[0].get_color(), textcoords="offset points",
                            xytext=(0, -11), ha="center")
    width_axis(ax, widths, "model width D")
    ax.set_ylabel("MQAR accuracy (%), mean and min–max over seeds")
    ax.set_title(f"T = {record['config']['seq_len']}, {record['config']['kv_pairs']} KV pairs "
                 "(authors' setup)", fontsize=9)
    ax.legend(fontsize=8)
    # one line style per lr of a panel, told by a legend (a title listing them ran into the
    # next panel's); the two grids together have 8 points (GSA's 6, the baselines' 4, 2 shared)
    styles = ["-", "--", ":", "-.", (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
              (0, (6, 2, 1, 2, 1, 2))]
    for panel, width in zip(axes[0][1:], widths):
        here = [c for c in cells if c["width"] == width]
        lrs = sorted({r["lr"] for c in here for r in c["runs"]})
        for c in here:
            for r in c["runs"]:
                pts = r["curve"]
                panel.plot([p["epoch"] for p in pts], [100 * p["accuracy"] for p in pts],
                           color=colors.get(c["model"]), lw=1, alpha=0.8,
                           ls=styles[lrs.index(r["lr"]) % len(styles)])
        panel.legend([plt.Line2D([], [], color="0.3", lw=1, ls=styles[i % len(styles)])
                      for i in range(len(lrs))], [f"lr {x:g}" for x in lrs], fontsize=6,
                     loc="center right", framealpha=0.8)
        panel.set_title(f"D = {width}, every run (colour: model)", fontsize=8)
        panel.set_xlabel("epoch")
        panel.set_ylim(-2, 102)
        panel.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# A cell's fields that belong to one training process (one part of a cell split by lr or seed)
PART_KEYS = ("lrs", "seed_ids", "epochs_done", "steps_done", "schedule_epochs", "stop_reason",
             "cell_seconds", "calls", "devices", "kernel_tuning", "stopped_runs_left_out",
             "compile_s", "train_s", "step_s", "chunk_seconds", "tokens_per_s")


def cell_parts(cell: dict) -> list[dict]:
    """The parts a cell was trained in: one per process that trained some of its (lr, seed)
    runs (a cell trained whole is one part), each with its seed_ids."""
    parts = cell.get("parts") or [{k: cell[k] for k in PART_KEYS if k in cell}]
    return [{**p, "seed_ids": part_seeds(p, cell)} for p in parts]


def part_seeds(part: dict, cell: dict) -> list[int]:
    """The seeds a part trained: its seed_ids, or for records from before parts by seed (which
    joined parts of one seed count only) seeds 0 .. the cell's seeds - 1."""
    return part.get("seed_ids") or cell.get("seed_ids") or list(range(cell["seeds"]))


def part_runs(part: dict) -> set[tuple[float, int]]:
    """The (lr, seed) runs of a part (cell_parts')."""
    return {(lr, seed) for lr in part["lrs"] for seed in part["seed_ids"]}


def fmt_part(part: dict, cell: dict) -> str:
    """A part as the report names it: its lrs, and its seeds where it trained only some of the
    cell's ('0.005 (seed 1)')."""
    if part["seed_ids"] == cell_seeds(cell):
        return fmt_lrs(part["lrs"])
    return f"{fmt_lrs(part['lrs'])} ({fmt_seeds(part['seed_ids'])})"


def fmt_seeds(seeds) -> str:
    """'seed 1', 'seeds 0 1'."""
    return f"seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}"


def cell_seeds(cell: dict) -> list[int]:
    """Every seed some run of the cell trained."""
    return sorted({r["seed"] for r in cell["runs"]}) or part_seeds({}, cell)


def thin_lrs(cell: dict) -> list[tuple[float, list[int]]]:
    """(lr, its seeds) for each lr of the cell that ran fewer seeds than the cell's others (a
    cell joined from parts by seed whose other parts have not run yet)."""
    every = cell_seeds(cell)
    by_lr = {lr: sorted({r["seed"] for r in cell["runs"] if r["lr"] == lr}) for lr in cell["lrs"]}
    return [(lr, seeds) for lr, seeds in by_lr.items() if seeds != every]


def join_cell(old: dict, new: dict) -> dict:
    """`new` with the parts of `old` whose (lr, seed) runs it does not touch: a cell trained in
    parts (its lrs or seeds split over processes or sessions, e.g. `--lr 5e-3` now and `--lr
    2e-3` later, or `--seeds 1 --first-seed 1` beside `--seeds 1`; every run depends on its own
    (lr, seed) only, so the split changes no run) is one cell in the report. A part that shares
    a run with `new` is redone by it and dropped; parts of another epoch cap are other cells
    (`new` replaces them)."""
    redone = {run for p in cell_parts(new) for run in part_runs(p)}
    kept = [p for p in cell_parts(old) if not part_runs(p) & redone]
    if not kept or old["max_epochs"] != new["max_epochs"]:
        return new
    parts = kept + cell_parts(new)
    lrs = sorted({lr for p in parts for lr in p["lrs"]})
    runs = sorted([r for r in old["runs"] if (r["lr"], r["seed"]) not in redone] + new["runs"],
                  key=lambda r: (r["seed"], lrs.index(r["lr"])))   # seed-major, as run_grid
    seeds = sorted({r["seed"] for r in runs})
    total = lambda k: round(sum(p[k] or 0 for p in parts), 2)   # noqa: E731
    return {**new, "lrs": lrs, "seeds": len(seeds), "seed_ids": seeds, "runs": runs,
            "parts": parts,
            "epochs_done": max(p["epochs_done"] for p in parts),
            "steps_done": max(p["steps_done"] for p in parts),
            "schedule_epochs": max(p.get("schedule_epochs", new["max_epochs"]) for p in parts),
            "stop_reason": "; ".join(dict.fromkeys(p["stop_reason"] for p in parts)),
            "calls": sum(p.get("calls", 1) for p in parts),
            "devices": list(dict.fromkeys(d for p in parts for d in p.get("devices", []))),
            "kernel_tuning": next((p["kernel_tuning"] for p in parts
                                   if p.get("kernel_tuning")), {}),
            "stopped_runs_left_out": all(p.get("stopped_runs_left_out") for p in parts),
            "compile_s": total("compile_s"), "train_s": total("train_s"),
            # per part: parts may run different numbers of runs, on different GPUs
            "step_s": None, "tokens_per_s": None, "chunk_seconds": None}


def merge(previous: dict, record: dict) -> dict:
    """`record` with the cells of `previous` that it does not redo (same (model, width)); a
    cell of `record` that trained other lrs of a cell of `previous` joins it (join_cell). The
    task settings must match. Commands are kept once each, in first-seen order (reports of
    side-by-side calls each carry the history they were merged onto)."""
    diff = common.merge_mismatch(previous["config"], record["config"])
    if diff:
        raise ValueError(f"--merge: the existing results were run with other settings "
                         f"(old, new): {diff}")
    # cells trained before they recorded their GPU were trained on their report's machine
    kind = previous.get("environment", {}).get("device_kind")
    old = {(c["model"], c["width"]): c if "devices" in c or kind is None
           else {**c, "devices": [kind]} for c in previous["cells"]}
    cells = [join_cell(old[(c["model"], c["width"])], c) if (c["model"], c["width"]) in old
             else c for c in record["cells"]]
    redo = {(c["model"], c["width"]) for c in record["cells"]}
    return {**record, "cells": [c for key, c in old.items() if key not in redo] + cells,
            "commands": list(dict.fromkeys(previous.get("commands", [])
                                           + record.get("commands", []))),
            "notes": record.get("notes") or previous.get("notes")}


def chunk_drift(times) -> str:
    """'first / last / max' seconds of a cell's training chunks (the same compiled program each
    time: a spread is the machine's or the data's doing, not the harness's); '-' when the cell
    predates the record. The first chunk of each call is left in: compiles are timed apart."""
    if not times:
        return "-"
    return f"{times[0]:.1f} / {times[-1]:.1f} / {max(times):.1f}"


def finish(record: dict) -> dict:
    record["cells"].sort(key=lambda c: (AUTHORS_MODELS.index(c["model"]), c["width"]))
    for c in record["cells"]:
        c["summary"] = summarise(c, record["config"]["vocab_size"])
    record["verdicts"] = verdicts(record["cells"], record["config"]["vocab_size"])
    return record

