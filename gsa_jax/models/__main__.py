"""`python -m gsa_jax.models`: the presets and their parameter counts (shapes only, no memory)."""

from gsa_jax.models.config import presets
from gsa_jax.models.lm import count_params


def main() -> None:
    print(f"{'preset':28s} {'mixer':12s} {'D':>5s} {'L':>3s} {'params':>15s}")
    for name, cfg in presets.items():
        mixer = cfg.mixer + (f"+attn{list(cfg.attn_layers)}" if cfg.attn_layers else "")
        print(f"{name:28s} {mixer:12s} {cfg.hidden_size:5d} {cfg.num_layers:3d} "
              f"{count_params(cfg):15,d}")


if __name__ == "__main__":
    main()
