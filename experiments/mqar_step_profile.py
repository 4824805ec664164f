"""Step time of the MQAR authors' harness (mqar_authors_train.py) on a GPU: the vmapped chunk of
DIAG_S steps timed four times per (model, impl) case at D = 64 (1 lr x 2 seeds, bfloat16), then
one chunk profiled (jax.profiler, perfetto trace) and its device time summed per op.

    DIAG_CASES="gla:auto gsa:auto" OUT=/tmp/out python experiments/mqar_step_profile.py

Found with it (results/logs/mqar_step_profile_h200_*.txt): 645 ms of a 660 ms GSA step was one
`input_scatter_fusion`, the embedding gradient's bfloat16 scatter-add on the filler token; with
gsa_jax.layers.Embed (float32 scatter-add) the same chunk runs at 10.3 ms per step.
DIAG_SMOKE=1 runs it at the harness's --smoke sizes (CPU).

Kernel launch parameters for the cells' small heads (the kernels' defaults were tuned at
K = V = 128; MQAR's GSA has K = M = V = D/4): a case `model:impl:NAME` traces with the Tuning
changes DIAG_TUNINGS[NAME] (a JSON object of names to pallas_kernels.gla.Tuning changes), and
its first chunk's losses are compared with the first case of the same model (same init, same
data: they differ by float rounding only). DIAG_WIDTH (64), DIAG_LRS ("1e-3") and DIAG_SEEDS (2)
set the cell; DIAG_TRACE=0 skips the profiles. E.g. a cell's 4 runs at D = 128:

    DIAG_WIDTH=128 DIAG_LRS="2e-3 5e-3" DIAG_TRACE=0 \
    DIAG_TUNINGS='{"p4": {"warps_par": 4}, "p4s2": {"warps_par": 4, "warps_seq": 2}}' \
    DIAG_CASES="gsa:auto gsa:auto:p4 gsa:auto:p4s2 gsa:chunk" OUT=$OUT \
    python experiments/mqar_step_profile.py

The best tuning then applies to a whole cell through $GSA_PALLAS_TUNING (read at import)."""
import collections
import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import mqar_authors as ma  # noqa: E402
from experiments.mqar_authors_train import make_data, prepare_cell  # noqa: E402
from pallas_kernels import gla as kernels  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
S = int(os.environ.get("DIAG_S", "20"))
cases = [(c.split(":") + [""])[:3] for c in
         os.environ.get("DIAG_CASES", "gla:auto gla:chunk gsa:auto attention:auto").split()]
TUNINGS = json.loads(os.environ.get("DIAG_TUNINGS", "{}"))
missing = sorted({name for _, _, name in cases if name and name not in TUNINGS})
if missing:
    sys.exit(f"DIAG_CASES name tunings that DIAG_TUNINGS does not define: {missing}")
TRACE = os.environ.get("DIAG_TRACE", "1") != "0"
print(jax.devices(), flush=True)

def parse(impl):
    return ma.parse_args(["--widths", os.environ.get("DIAG_WIDTH", "64"),
                          "--lr", *os.environ.get("DIAG_LRS", "1e-3").split(),
                          "--seeds", os.environ.get("DIAG_SEEDS", "2"), "--eval-every", str(S),
                          "--dtype", "bfloat16", "--impl", impl, "--tag", "diag"]
                         + (["--smoke"] if os.environ.get("DIAG_SMOKE") else []))

t0 = time.perf_counter()
args = parse("auto")
data = make_data(args)
jax.block_until_ready(data)
print(f"data {time.perf_counter() - t0:.1f} s", flush=True)

def summarize_trace(d, label):
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        print("no trace files", os.listdir(d)); return
    ev = json.load(gzip.open(files[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pname = {}
    for e in ev:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = e["args"]["name"]
    agg = collections.defaultdict(lambda: [0.0, 0])
    byproc = collections.defaultdict(float)
    for e in ev:
        if e.get("ph") == "X" and "dur" in e:
            p = pname.get(e["pid"], str(e["pid"]))
            agg[(p, e["name"][:90])][0] += e["dur"]; agg[(p, e["name"][:90])][1] += 1
            byproc[p] += e["dur"]
    print(f"--- trace {label}: {files[0]}")
    for p, v in sorted(byproc.items(), key=lambda x: -x[1])[:10]:
        print(f"  proc {p[:60]:60s} {v/1e3:10.1f} ms")
    for (p, n), (dur, cnt) in sorted(agg.items(), key=lambda x: -x[1][0])[:45]:
        print(f"  {dur/1e3:10.2f} ms {cnt:7d}x  [{p[:25]}] {n}")

def run_chunk(prep, params, opt, frozen, step0):
    """One compiled chunk from step0 (cosine horizon 50000 steps)."""
    return prep["compiled"](params, opt, frozen, prep["lr_R"], prep["keys"], jnp.int32(step0),
                            jnp.int32(50000), data["train"], data["test"])


results = {}
first_loss = {}   # model -> the first chunk's losses of its first case
for model, impl, name in cases:
    label = ":".join(x for x in (model, impl, name) if x)
    a = parse(impl)
    t = time.perf_counter()
    with kernels.tuning(**TUNINGS.get(name, {})):   # traced (compiled) inside
        prep = prepare_cell(model, a.widths[0], a, (data["train"], data["test"]))
    print(f"{label} compile {time.perf_counter() - t:.1f} s", flush=True)
    params, opt = prep["params"], prep["opt_state"]
    R = len(prep["lrs"])
    frozen = jnp.zeros((R,), bool)
    times = []
    for i in range(4):
        t = time.perf_counter()
        params, opt, loss, acc = run_chunk(prep, params, opt, frozen, i * S)
        loss = np.asarray(loss)
        times.append(time.perf_counter() - t)
        if i == 0:
            ref = first_loss.setdefault(model, loss)
            drift = float(np.max(np.abs(loss - ref) / np.abs(ref)))
    print(f"{label} chunk times (S={S}): " + " ".join(f"{x:.3f}" for x in times)
          + f"  -> {min(times[1:]) / S * 1e3:.2f} ms/step incl eval; loss {loss}; first "
          f"chunk's loss vs {model}'s first case: max rel diff {drift:.1e}", flush=True)
    results[label] = {"chunk_s": times, "ms_per_step": min(times[1:]) / S * 1e3,
                      "tuning": TUNINGS.get(name, {}), "first_loss_rel_diff": drift}
    if TRACE:
        d = os.path.join(OUT, f"trace_{label.replace(':', '_')}")
        with jax.profiler.trace(d, create_perfetto_trace=True):
            params, opt, loss, acc = run_chunk(prep, params, opt, frozen, 4 * S)
            np.asarray(loss)
        try:
            summarize_trace(d, label)
        except Exception as e:
            print("trace parse failed", repr(e))
    del prep, params, opt
json.dump(results, open(os.path.join(OUT, "diag.json"), "w"))
