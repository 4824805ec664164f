"""The page of an experiments/bench_kernels.py report: correctness, times and memory, one-step
decode, and the targets of the kernels (issue 16) and of the chunk form (issue 15), met or
missed, read off the report's rows.
"""

from __future__ import annotations


def markdown(report):
    lines = [f"# bench_kernels ({report['tag']})", "",
             f"{report['device']}, jax {report['jax']}, {report['date']}", "",
             f"Command: `{report['command']}`", "",
             *[f"Note: {n}\n" for n in report.get("notes", [])],
             *([f"Gates of the timed inputs: g = logsigmoid(x) / {report['gate_scale']:g} "
                f"(layer-like is 8; smaller is sharper: bench_gate_strength.py)\n"]
               if report.get("gate_scale", 8.0) != 8.0 else []),
             f"Measured copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s", "",
             "## Correctness (relative error vs the f32 chunk form)", "",
             "| impl | shape | dtype | gates | o | dq | dk | dv | ds | dg | finite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        head = (f"| {c.get('impl', 'pallas')} | {tuple(c['shape'])} | {c['dtype']} | "
                f"{c['gates']} | ")
        if "error" in c:
            lines.append(head + f"error: {c['error'][:80]} |")
            continue
        e = c["rel_err"]
        lines.append(head + " | ".join(
            f"{e[n]:.1e}" for n in "o dq dk dv ds dg".split()) + f" | {c['finite']} |")
    lines += ["", "## Time (ms, median) and memory (GiB) of forward+backward", "",
              "| B,T,H,K,M | impl | fwd | fwd+bwd | mem | fwd vs peer | fwd+bwd vs peer |",
              "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        shape = ",".join(str(v) for v in row["shape"].values())
        peer = row["results"].get("peer", {})
        for name, r in row["results"].items():
            if "error" in r:
                lines.append(f"| {shape} | {name} | error: {r['error'][:60]} | | | | |")
                continue
            mem = f"{r['mem_bytes'] / 2**30:.2f}" if r.get("mem_bytes") else "-"
            sp_f = sp_fb = "-"
            if "fwd_ms" in peer and name != "peer":
                sp_f = f"{peer['fwd_ms'] / r['fwd_ms']:.2f}x"
                sp_fb = f"{peer['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x"
            lines.append(f"| {shape} | {name} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{mem} | {sp_f} | {sp_fb} |")
        if row["memory_floor_fwd_ms"]:
            p = row["results"].get("pallas", {})
            ratio = (f" (pallas fwd = {p['fwd_ms'] / row['memory_floor_fwd_ms']:.1f}x floor)"
                     if "fwd_ms" in p else "")
            lines.append(f"| {shape} | memory floor of fwd | {row['memory_floor_fwd_ms']:.3f} "
                         f"| | | | {ratio} |")
    agreement = [(",".join(str(v) for v in row["shape"].values()), name, r)
                 for row in report["rows"] for name, r in row["results"].items()
                 if "rel_err_o_vs_pallas" in r or "rel_err_o_vs_peer" in r]
    if agreement:
        lines += ["", "## Outputs of the timed rows against each other (relative error of o; "
                  "of the five input gradients, the largest, for launch variants)",
                  "", "| B,T,H,K,M | row | vs pallas | grads vs pallas | vs peer |",
                  "|---|---|---|---|---|"]
        for shape, name, r in agreement:
            cells = [f"{r[k]:.1e}" if k in r else "-"
                     for k in ("rel_err_o_vs_pallas", "rel_err_grads_vs_pallas",
                               "rel_err_o_vs_peer")]
            lines.append(f"| {shape} | {name} | {' | '.join(cells)} |")
    if report.get("decode"):
        lines += ["", "## One-step decode (µs per token, jitted scan over tokens)", "",
                  "`gated_slot_attention_step` by XLA (`impl='xla'`) and by the fused decode "
                  "kernel (`impl='pallas'`, its outputs' relative error against XLA's), beside "
                  "a scan that only reads, decays and writes the state (what any decode kernel "
                  "must do) and the bandwidth floor of that read and write.", "",
                  "| B | H | K=V | M | GSA step (XLA) | GSA step (kernel) | kernel vs XLA "
                  "| state read+decay+write | bandwidth floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in report["decode"]:
            floor = f"{d['state_rw_floor_us']:.2f}" if d.get("state_rw_floor_us") else "-"
            kernel = (f"{d['pallas_step_us']:.1f} | {d['pallas_vs_xla_rel_err']:.1e}"
                      if "pallas_step_us" in d else "- | -")   # records from before the kernel
            lines.append(f"| {d['B']} | {d['H']} | {d['K']} | {d['M']} | {d['step_us']:.1f} | "
                         f"{kernel} | {d['state_touch_us']:.1f} | {floor} |")
    lines += ["", *target_lines(report["rows"])]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_lines(rows) -> list:
    """The kernels' targets (issue 16) and the chunk form's (issue 15), met or missed by how
    much, per measured shape."""
    lines = ["## Targets", "",
             "Kernels (issue 16): fwd >= 2x peer, fwd+bwd >= 2x peer, memory <= peer, fwd <= 3x "
             "memory floor, fwd+bwd faster than cuDNN attention at T >= 4096 and within 1.1x at "
             "T = 2048, per-token fwd+bwd at 1 x 65536 within 1.2x of 8 x 2048. Chunk form "
             "(issue 15): fwd and fwd+bwd within 2x of the kernels, memory within 2x, fwd no "
             "slower than its fwd+bwd.", ""]
    per_token = {}
    for row in rows:
        shape = ",".join(str(v) for v in row["shape"].values())
        res = row["results"]
        p, peer, attn, chunk = (res.get(n, {}) for n in ("pallas", "peer", "cudnn_attn", "chunk"))
        if "fwd_ms" not in p:
            continue
        sd = row["shape"]
        per_token[tuple(sd.get(k) for k in ("B", "T", "H", "K", "M", "docs"))] = (
            p["fwd_bwd_ms"] / (sd["B"] * sd["T"]))
        items = []
        if "fwd_ms" in peer:
            f, fb = peer["fwd_ms"] / p["fwd_ms"], peer["fwd_bwd_ms"] / p["fwd_bwd_ms"]
            items += [f"fwd {f:.2f}x peer ({_verdict(f >= 2)})",
                      f"fwd+bwd {fb:.2f}x peer ({_verdict(fb >= 2)})"]
            if p.get("mem_bytes") and peer.get("mem_bytes"):
                m = p["mem_bytes"] / peer["mem_bytes"]
                items.append(f"memory {m:.2f}x peer ({_verdict(m <= 1)})")
        else:
            items.append("peer not timed")
        if row.get("memory_floor_fwd_ms"):
            fl = p["fwd_ms"] / row["memory_floor_fwd_ms"]
            items.append(f"fwd {fl:.1f}x floor ({_verdict(fl <= 3)})")
        if "fwd_bwd_ms" in attn and sd["T"] >= 2048 and not sd.get("docs"):
            a = p["fwd_bwd_ms"] / attn["fwd_bwd_ms"]
            bound = 1.0 if sd["T"] >= 4096 else 1.1
            items.append(f"fwd+bwd {a:.2f}x cuDNN attention ({_verdict(a < bound)})")
        if "fwd_ms" in chunk:
            cf, cfb = chunk["fwd_ms"] / p["fwd_ms"], chunk["fwd_bwd_ms"] / p["fwd_bwd_ms"]
            items += [f"chunk fwd {cf:.2f}x kernels ({_verdict(cf <= 2)})",
                      f"chunk fwd+bwd {cfb:.2f}x ({_verdict(cfb <= 2)})"]
            if chunk.get("mem_bytes") and p.get("mem_bytes"):
                cm = chunk["mem_bytes"] / p["mem_bytes"]
                items.append(f"chunk memory {cm:.2f}x ({_verdict(cm <= 2)})")
            items.append("chunk fwd <= its fwd+bwd "
                         f"({_verdict(chunk['fwd_ms'] <= chunk['fwd_bwd_ms'])})")
        lines.append(f"- {shape}: " + "; ".join(items))
    # the same heads and sizes at both (8 x 2048 also runs at other H, K, M)
    long_ = per_token.get((1, 65536, 16, 128, 64, None))
    main_ = per_token.get((8, 2048, 16, 128, 64, None))
    if long_ and main_:
        r = long_ / main_
        lines.append(f"- per-token fwd+bwd at 1 x 65536 = {r:.2f}x that of 8 x 2048 "
                     f"({_verdict(r <= 1.2)})")
    return lines

