"""The `gsa-jax` command: train, eval, generate, prepare, convert, export.

    gsa-jax train --config configs/tiny.yaml [--set optim.lr=1e-3 --set run_dir=runs/x ...]
                  [--init-from ckpt/converted]
    gsa-jax eval --run-dir runs/tiny [--step 600] [--batches all]
    gsa-jax generate --run-dir runs/tiny --prompt "def " [--max-new-tokens 200 --temperature 0.8]
    gsa-jax prepare --input a.txt b.jsonl --output data/train.bin [--val-output data/val.bin
                    --val-fraction 0.01] [--tokenizer tokenizer.json]
    gsa-jax convert --hf mistral-7b/ --mixer gsa --output ckpt/mistral-gsa
                    [--set model.num_slots=64 ...]   (or --run-dir runs/transformer;
                    --hf also reads flash-linear-attention GSA/GLA models, e.g. gsa-2.7B-100B/)
    gsa-jax export --run-dir runs/gsa-340m --output fla/gsa-340m [--dtype bfloat16]

Bad config values, malformed YAML, missing or unreadable files and checkpoints, impossible
meshes, a run directory held by another trainer and a diverged run end with one line
`gsa-jax: error: ...` and exit status 2 (--traceback shows the Python traceback instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Optional, Sequence

from gsa_jax.config import Config, SampleConfig, load_config
from gsa_jax.errors import RunError


def _config_args(p: argparse.ArgumentParser, run_dir_source: bool) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    if run_dir_source:
        p.add_argument("--run-dir", help="a training run's directory (uses its config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")


def _load(args, from_run_dir: bool) -> Config:
    path = args.config
    overrides = list(args.overrides)
    if from_run_dir and getattr(args, "run_dir", None):
        if path is None:
            path = pathlib.Path(args.run_dir) / "config.yaml"
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} not found: is {args.run_dir!r} a "
                                        f"training run directory?")
        overrides.append(f"run_dir={args.run_dir}")
    if from_run_dir and path is None:
        raise ValueError("give --run-dir (a training run) or --config")
    return load_config(path, overrides)


def _batches(text: str) -> Optional[int]:
    """'all' -> None (every batch), else a positive int."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model")
    _config_args(p, run_dir_source=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed lines")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of this params checkpoint (gsa-jax convert "
                        "output) with a fresh optimizer at step 0; ignored when the run "
                        "directory already has checkpoints (the run resumes)")

    p = sub.add_parser("eval", help="validation loss / perplexity of a checkpoint")
    _config_args(p, run_dir_source=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--batches", default="all", type=_batches,
                   help="validation batches to score, or 'all' (default)")

    p = sub.add_parser("generate", help="sample from a checkpoint")
    _config_args(p, run_dir_source=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="tokenize text/jsonl files into token files")
    p.add_argument("--input", nargs="+", required=True, help=".txt (one document each) or "
                   ".jsonl / .jsonl.gz / .jsonl.zst (one document per line) files")
    p.add_argument("--output", required=True, help="training token file (.bin or .npy)")
    p.add_argument("--val-output", help="validation token file")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of documents for validation (by hash)")
    p.add_argument("--tokenizer", default="bytes",
                   help="Hugging Face tokenizers JSON file, or 'bytes' (default)")
    p.add_argument("--bos-id", type=int, help="document separator id (default: the "
                   "tokenizer's end-of-text token)")
    p.add_argument("--text-field", default="text", help="field of the .jsonl records")
    p.add_argument("--workers", type=int, help="processes tokenizing input files in parallel "
                   "(default: one per CPU, at most one per file)")

    p = sub.add_parser("convert", help="convert a pretrained Transformer (Hugging Face "
                       "Llama/Mistral, or a gsa-jax run) into GSA/GLA/RetNet weights (T2R)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face Llama/Mistral or "
                        "flash-linear-attention GSA/GLA checkpoint directory (config.json + "
                        "*.safetensors)")
    source.add_argument("--run-dir", help="a gsa-jax training run (its latest checkpoint)")
    p.add_argument("--step", type=int, help="with --run-dir: checkpoint step (default: latest)")
    p.add_argument("--mixer", help="target token mixer: gsa | gla | retnet | attention "
                   "(default: gsa; an fla checkpoint's own mixer for fla directories)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="model.KEY=VALUE", help="target model field, e.g. --set "
                   "model.num_slots=32 (repeatable)")
    p.add_argument("--output", required=True, help="new directory for the params checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation of the new parameters")
    p.add_argument("--unit-norm-scale", action="store_true",
                   help="start GSA's output-norm scale at 1 (as from scratch) instead of the "
                        "attention's value scale (see gsa_jax.convert)")
    p.add_argument("--ignore-sliding-window", action="store_true",
                   help="keep attention layers of a sliding-window (Mistral) checkpoint as "
                        "full attention (exact on sequences up to the window)")

    p = sub.add_parser("export", help="write a GSA/GLA run's checkpoint as a "
                       "flash-linear-attention model directory (config.json + safetensors)")
    p.add_argument("--run-dir", required=True, help="a gsa-jax training run")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--output", required=True, help="new directory for the fla model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored tensors (default float32)")
    p.add_argument("--max-shard-gb", type=float,
                   help="split the weights into safetensors files of at most this size")
    return parser


def _convert(args) -> dict:
    from gsa_jax import convert
    from gsa_jax.config import parse_override
    overrides = {}
    for item in args.overrides:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] != "model":
            raise ValueError(f"convert --set takes model fields (model.KEY=VALUE), got {item!r}")
        overrides[keys[1]] = value
    if args.hf is not None:
        if args.step is not None:
            raise ValueError("--step goes with --run-dir, not --hf")
        target, params, meta = convert.convert_hf(
            args.hf, args.mixer, seed=args.seed, match_scale=not args.unit_norm_scale,
            ignore_sliding_window=args.ignore_sliding_window, **overrides)
    else:
        target, params, meta = convert.convert_run(args.run_dir, args.mixer, step=args.step,
                                                   seed=args.seed,
                                                   match_scale=not args.unit_norm_scale,
                                                   **overrides)
    output = convert.save_converted(args.output, params, target, meta)
    return {"output": str(output), "mixer": target.mixer, **{
        k: meta["conversion"][k] for k in ("reused_params", "new_params")},
            "model_yaml": str(output / "model.yaml"),
            "next": f"gsa-jax train --config CONFIG --init-from {output}  (CONFIG's model "
                    f"section as in {output / 'model.yaml'})"}


def _run(args) -> int:
    if args.command == "prepare":
        from gsa_jax.data.prepare import prepare
        result = prepare(args.input, args.output, tokenizer=args.tokenizer, bos_id=args.bos_id,
                         val_output=args.val_output, val_fraction=args.val_fraction,
                         text_field=args.text_field, workers=args.workers,
                         progress=True)
        print(json.dumps(result, indent=1))
        return 0
    if args.command == "convert":
        print(json.dumps(_convert(args), indent=1))
        return 0
    if args.command == "export":
        from gsa_jax.export import export_run
        shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
        print(json.dumps(export_run(args.run_dir, args.output, step=args.step, dtype=args.dtype,
                                    max_shard_bytes=shard), indent=1))
        return 0

    from gsa_jax import sharding
    sharding.maybe_initialize_distributed()
    if args.command == "train":
        from gsa_jax.train import train
        train(_load(args, from_run_dir=False), quiet=args.quiet, init_from=args.init_from)
        return 0
    if args.command == "generate":  # the sampling settings are checked before any loading
        from gsa_jax.generation import check_sampling
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       where="generate: ")
        sample = SampleConfig(prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    config = _load(args, from_run_dir=True)
    if args.command == "eval":
        from gsa_jax.evaluate import evaluate_checkpoint
        result = evaluate_checkpoint(config, args.step, args.batches,
                                     progress=sharding.is_main_process())
        if sharding.is_main_process():
            print(json.dumps(result))
        return 0
    # generate
    from gsa_jax import session as session_lib
    from gsa_jax.generation import sample_text
    # The tokenizer and the checkpoint's params only: no dataset, no optimizer state.
    session = session_lib.build(config, read_only=True, splits=())
    try:
        params, meta = session_lib.restore_params(session, args.step)
    finally:
        session.checkpointer.close()
    text = sample_text(session, params, sample)
    if sharding.is_main_process():
        print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.traceback:
        return _run(args)
    try:
        return _run(args)
    except (ValueError, OSError, ImportError, RunError) as err:
        # OSError: a path that is a file, a permission, a full disk; its message names the file.
        print(f"gsa-jax: error: {err}", file=sys.stderr)
        # A damaged checkpoint fails several of orbax's concurrent array reads; the first is
        # reported above, the others would follow at exit as asyncio's "Future exception was
        # never retrieved" logs (seen in CI, depending on timing) under the one-line error.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return 2


if __name__ == "__main__":
    sys.exit(main())
