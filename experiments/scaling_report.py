"""The derived numbers, page and figure of an experiments/scaling.py report: scaling efficiency
against the 1-GPU run, the loss differences against the same-global-batch reference, the other
layouts and a resumed run's uninterrupted runs; the markdown tables (sweep, resume, fit), the
three rows of panels, and writing them beside the JSON. They read only the rows, so that
--plot-only redraws a report from its JSON.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from experiments import common, harness
from experiments.scaling_runs import LAYOUTS, row_key

NAME = "scaling"
# Max |loss difference| tolerated between layouts at the same global batch (bf16 compute).
# Judged on a CPU (2026-12-02; tiny config, 50 steps of 4 x 128 tokens per device, warm-up 10):
# fsdp over 4 simulated devices vs one device as 4 micro-batches: 9.5e-7 in float32 and 1.0e-3
# in bfloat16; the same run in bfloat16 vs float32: 0.0046 (fsdp 4, 1 device x 4 micro-batches)
# and 0.0099 (1 device, batch 4). A layout may differ from another by what bf16 rounding does
# to one run: twice the largest bf16-vs-f32 gap.
LOSS_TOL = 0.02


def max_loss_diff(curve: Sequence, reference: Sequence) -> Optional[float]:
    """Max |loss - reference loss| over the steps both curves have ([[step, loss], ...]);
    None without a common step, inf where either loss is not finite."""
    ref = {int(s): l for s, l in reference}
    diffs = []
    for step, loss in curve:
        if int(step) in ref:
            a, b = loss, ref[int(step)]
            ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
            diffs.append(abs(a - b) if ok else math.inf)
    return max(diffs) if diffs else None


def scaling_efficiency(tokens_per_s: Optional[float], n: int,
                       single_tokens_per_s: Optional[float]) -> Optional[float]:
    """tokens/s on n devices / (n x tokens/s on one), or None when either is missing."""
    if not tokens_per_s or not single_tokens_per_s or n < 1:
        return None
    return tokens_per_s / (n * single_tokens_per_s)


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row.get("status") == "ok"


def analyse(rows: list[dict], loss_tol: float = LOSS_TOL) -> dict[str, list[dict]]:
    """The derived numbers of a report: per sweep row its efficiency against the config's
    `single` row and its max loss difference against the `ref` row of its N; per resume row
    its differences against the uninterrupted runs of its two layouts."""
    def find(**keys):
        return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)

    scaling, losses, resume = [], [], []
    for r in rows:
        if r["kind"] != "sweep":
            continue
        single = find(kind="sweep", config=r["config"], layout="single", n=1)
        eff = scaling_efficiency(r.get("tokens_per_s"), r["n"],
                                 single.get("tokens_per_s") if _ok(single) else None)
        scaling.append({"config": r["config"], "layout": r["layout"], "n": r["n"],
                        "efficiency": eff if _ok(r) else None})
        if r["n"] > 1:
            ref = find(kind="ref", config=r["config"], n=1, accum=r["n"])
            diff = (max_loss_diff(r["loss_curve"], ref["loss_curve"])
                    if _ok(r) and _ok(ref) else None)
            # The other layouts at this N have the same global batch: free comparisons.
            others = [o for o in rows if o["kind"] == "sweep" and o["config"] == r["config"]
                      and o["n"] == r["n"] and o["layout"] != r["layout"] and _ok(o)]
            spread = [max_loss_diff(r["loss_curve"], o["loss_curve"]) for o in others
                      if _ok(r)]
            spread = [d for d in spread if d is not None]
            losses.append({"config": r["config"], "layout": r["layout"], "n": r["n"],
                           "global_batch": r.get("global_batch"), "max_abs_diff": diff,
                           "within_tol": None if diff is None else diff <= loss_tol,
                           "vs_layouts": max(spread) if spread else None})
    for r in rows:
        if r["kind"] != "resume" or r.get("phase") != "resumed":
            continue
        out = {"config": r["config"], "n": r["n"], "from": r["resume_from"], "to": r["layout"],
               "at": r["resume_at"]}
        for side, layout in (("vs_from", r["resume_from"]), ("vs_to", r["layout"])):
            base = find(kind="sweep", config=r["config"], layout=layout, n=r["n"])
            diff = (max_loss_diff(r["loss_curve"], base["loss_curve"])
                    if _ok(r) and _ok(base) else None)
            out[side] = diff
        out["within_tol"] = (None if out["vs_to"] is None else out["vs_to"] <= loss_tol)
        resume.append(out)
    return {"scaling": scaling, "loss": losses, "resume": resume}


def merge_rows(previous: list[dict], rows: list[dict]) -> list[dict]:
    """`previous` without the runs `rows` made again, then `rows`."""
    return harness.merge_rows(previous, rows, row_key)


def _reason(r: dict) -> str:
    if r.get("status") == "ok":
        return ""
    return f"{r.get('status')}: {r.get('reason', '')[:160]}".replace("|", "/").replace("\n", " ")


def markdown(record: dict) -> str:
    c, derived = record["config"], record["derived"]
    rows = record["rows"]
    eff = {(s["config"], s["layout"], s["n"]): s["efficiency"] for s in derived["scaling"]}
    dloss = {(s["config"], s["layout"], s["n"]): s["max_abs_diff"] for s in derived["loss"]}
    dlay = {(s["config"], s["layout"], s["n"]): s["vs_layouts"] for s in derived["loss"]}
    lines = [f"# Scaling ({record['tag']}): training over device meshes", "",
             f"{c['steps']} steps of {c['per_gpu_batch']} sequences x {c['seq_len']} tokens per "
             f"GPU (weak scaling), the embedded stdlib corpus, warm-up {c['warmup']} steps; "
             f"overrides {c['overrides'] or 'none'}. tokens/s and MFU: medians of the per-step "
             f"records (the compiling first step untimed). Efficiency = tokens/s on N / (N x "
             f"tokens/s on one GPU). Δloss vs 1 GPU = max |loss - loss of one GPU at the same "
             f"global batch (N x per-GPU batch as N micro-batches, the `ref` rows)| over the "
             f"steps both ran; Δloss vs layouts = the largest such difference against the other "
             f"layouts of the same N (same global batch); tolerance {c['loss_tol']} (bf16 "
             f"compute).", ""]
    sweep = [r for r in rows if r["kind"] in ("sweep", "ref")]
    lines.append(common.markdown_table(
        ["config", "layout", "N", "mesh (d,f,t)", "global batch", "tokens/s", "tokens/s/GPU",
         "MFU", "peak GiB/GPU", "efficiency", "Δloss vs 1 GPU", "Δloss vs layouts", "note"],
        [[r["config"], r["layout"] + (f" (ref, accum {r['accum']})" if r["kind"] == "ref"
                                      else ""), r["n"], "x".join(map(str, r["mesh"])),
          r.get("global_batch", "-"), common.fmt(r.get("tokens_per_s"), 0),
          common.fmt(r.get("tokens_per_s_per_device"), 0),
          "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
          common.fmt_gib(r.get("peak_bytes_max"), 1),
          "-" if eff.get((r["config"], r["layout"], r["n"])) is None or r["kind"] != "sweep"
          else f"{100 * eff[(r['config'], r['layout'], r['n'])]:.1f}%",
          common.fmt(dloss.get((r["config"], r["layout"], r["n"])) if r["kind"] == "sweep"
                     else None, 4),
          common.fmt(dlay.get((r["config"], r["layout"], r["n"])) if r["kind"] == "sweep"
                     else None, 4), _reason(r)] for r in sweep],
        align="llrrrrrrrrrrl"))
    resumed = derived["resume"]
    if resumed or any(r["kind"] == "resume" for r in rows):
        lines += ["", "## Resume under another layout", "",
                  "A run under `from` saved a checkpoint at step `at` and stopped; the run "
                  "directory resumed under `to`. Δloss over the steps after `at`, against the "
                  "uninterrupted runs of either layout.", ""]
        lines.append(common.markdown_table(
            ["config", "N", "from", "to", "at", "Δloss vs from", "Δloss vs to", "within tol"],
            [[x["config"], x["n"], x["from"], x["to"], x["at"], common.fmt(x["vs_from"], 4),
              common.fmt(x["vs_to"], 4), x["within_tol"]] for x in resumed]))
        for r in rows:
            if r["kind"] == "resume" and r.get("status") != "ok":
                lines.append(f"\n{r['phase']}: {_reason(r)}")
    fits = [r for r in rows if r["kind"] == "fit"]
    if fits:
        lines += ["", "## Fit check", "", f"Global batch {c.get('fit_batch')} sequences, "
                  f"{c.get('fit_steps')} steps.", ""]
        lines.append(common.markdown_table(
            ["config", "layout", "N", "mesh", "status", "peak GiB/GPU", "tokens/s/GPU", "MFU",
             "note"],
            [[r["config"], r["layout"], r["n"], "x".join(map(str, r["mesh"])), r["status"],
              common.fmt_gib(r.get("peak_bytes_max"), 1),
              common.fmt(r.get("tokens_per_s_per_device"), 0),
              "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", _reason(r)]
             for r in fits], align="llrllrrrl"))
    profiles = [r for r in rows if r.get("profile")]
    if profiles:
        lines += ["", "Profiles: " + "; ".join(f"{r['config']} {r['layout']} N={r['n']}: "
                                               f"`{r['profile']}`" for r in profiles)]
    lines += common.notes_lines(record)
    return "\n".join(lines) + "\n"


def figure(record: dict):
    """Per config: tokens/s per GPU vs N per layout; the loss curves at the largest N; their
    differences from the 1-GPU run at the same global batch."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [r for r in record["rows"] if r.get("status") == "ok"]
    configs = sorted({r["config"] for r in rows if r["kind"] in ("sweep", "ref")})
    if not configs:
        return None
    fig, axes = plt.subplots(3, len(configs), figsize=(5.5 * len(configs), 11), squeeze=False)
    for col, config in enumerate(configs):
        mine = [r for r in rows if r["config"] == config and r["kind"] == "sweep"]
        ax = axes[0][col]
        single = [r for r in mine if r["layout"] == "single"]
        for layout in LAYOUTS[1:]:
            pts = sorted((r["n"], r["tokens_per_s_per_device"]) for r in mine + single
                         if r["layout"] in (layout, "single") and r.get("tokens_per_s_per_device"))
            if len(pts) > 1 or any(r["layout"] == layout for r in mine):
                ax.plot(*zip(*pts), marker="o", label=layout)
        ax.set_xscale("log", base=2)
        ns = sorted({r["n"] for r in mine})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("GPUs N")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title(config)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
        ax = axes[1][col]
        n_max = max((r["n"] for r in mine), default=1)
        for r in [r for r in rows if r["config"] == config
                  and ((r["kind"] == "sweep" and r["n"] == n_max)
                       or (r["kind"] == "ref" and r["accum"] == n_max))]:
            if r["loss_curve"]:
                label = (f"{r['layout']} N={r['n']}" if r["kind"] == "sweep"
                         else f"1 GPU, accum {r['accum']}")
                ax.plot(*zip(*r["loss_curve"]), label=label, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (global batch of N={n_max})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
        # The differences against the 1-GPU reference: what "equal to bf16 noise" means.
        ax = axes[2][col]
        ref = next((r for r in rows if r["config"] == config and r["kind"] == "ref"
                    and r["accum"] == n_max), None)
        for r in [r for r in mine if r["n"] == n_max] if ref else []:
            base = {s: l for s, l in ref["loss_curve"]}
            pts = [(s, l - base[s]) for s, l in r["loss_curve"] if s in base]
            if pts:
                ax.plot(*zip(*pts), label=f"{r['layout']} N={r['n']}", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss - loss of 1 GPU (same global batch)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
    fig.suptitle(f"scaling ({record['tag']})")
    fig.tight_layout()
    return fig


def write(record: dict, out_dir: str, plots: bool) -> dict:
    """scaling_<tag>.json/.md, and with `plots` the figure's PNG."""
    fig = figure(record) if plots else None
    paths = common.write_results(record["tag"], NAME, record, markdown(record), fig,
                                 out_dir=out_dir, command=record["command"])
    if fig is not None:
        common.pyplot().close(fig)
    return paths
