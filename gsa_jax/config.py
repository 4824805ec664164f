"""The one top-level config of a run: model, data, optim, mesh, checkpoint, logging, eval and
sample sections plus a few run-wide fields. Built from YAML files and `--set key=value`
overrides; `to_dict()` is plain data (YAML/JSON-ready) and `from_dict(to_dict())` round-trips.

YAML layout (every section and field optional; defaults below):

    run_dir: runs/tiny
    steps: 600
    model: {preset: gsa-tiny, vocab_size: 264}     # a preset name plus field overrides
                                                    # (no preset: overrides of the default)
    data: {source: stdlib, seq_len: 256, batch_size: 16}
    optim: {lr: 3.0e-3, warmup_steps: 50}
    mesh: {data: -1, fsdp: 1, tensor: 1}
    checkpoint: {every: 200, keep: 2}
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional, Sequence

import yaml

from gsa_jax import checks
from gsa_jax.checkpoint import CheckpointConfig
from gsa_jax.data.datasets import DataConfig
from gsa_jax.generation import check_sampling
from gsa_jax.models.config import ModelConfig, get_preset, remat_policy_name
from gsa_jax.optim import OptimConfig
from gsa_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 10              # train metrics (and the progress bar) every N steps
    progress: bool = True        # tqdm progress bar (process 0)
    jsonl: bool = True           # append metrics to <run_dir>/metrics.jsonl
    tensorboard: bool = True     # also TensorBoard event files, if tensorboardX is installed
    # [first, last]: a jax.profiler trace of train steps first..last (numbered as logged, from
    # 1) in <run_dir>/profile; an int n: step n alone; null: no trace
    profile_steps: Optional[list] = None

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"logging: every must be a positive int, got {self.every!r}")
        steps = self.profile_steps
        if isinstance(steps, int) and not isinstance(steps, bool):
            steps = [steps, steps]
        if steps is not None:
            if (not isinstance(steps, (list, tuple)) or len(steps) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
                    or not 1 <= steps[0] <= steps[1]):
                raise ValueError(f"logging: profile_steps must be [first, last] with 1 <= first "
                                 f"<= last (e.g. [10, 12]), a step number or null, got "
                                 f"{self.profile_steps!r}")
            object.__setattr__(self, "profile_steps", list(steps))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 500             # validation loss every N steps (0: only at the end)
    batches: Optional[int] = 20  # batches per evaluation (None: the whole validation set)
    batch_size: Optional[int] = None  # default: data.batch_size

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"eval: every must be an int >= 0, got {self.every!r}")
        if self.batches is not None and (not isinstance(self.batches, int) or self.batches < 1):
            raise ValueError(f"eval: batches must be a positive int or null, got "
                             f"{self.batches!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"eval: batch_size must be a positive int or null, got "
                             f"{self.batch_size!r}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """A sample generated at the end of training (max_new_tokens 0: none)."""
    prompt: str = "def "
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                       min_new_tokens=0, where="sample: ")
        if not isinstance(self.seed, int):
            raise ValueError(f"sample: seed must be an int, got {self.seed!r}")


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "eval": EvalConfig,
            "sample": SampleConfig}


def default_model() -> ModelConfig:
    """gsa-tiny with room for the byte tokenizer (257 ids, rounded up to a multiple of 8)."""
    return get_preset("gsa-tiny", vocab_size=264)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=default_model)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    sample: SampleConfig = SampleConfig()
    run_dir: str = "runs/default"   # checkpoints, config.yaml, metrics.jsonl
    steps: int = 1000               # optimizer steps in total (the schedule's length)
    seed: int = 0                   # parameter initialisation

    def __post_init__(self):
        checks.check_positive_int("config", "steps", self.steps, numpy_ints=False)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["model"] = self.model.to_dict()
        out.update(run_dir=self.run_dir, steps=self.steps, seed=self.seed)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        values = dict(values or {})
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - top)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known: {sorted(top)}")
        kwargs: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            if name in values:
                kwargs[name] = build_dataclass(section, values.pop(name), name)
        if "model" in values:
            kwargs["model"] = build_model_config(values.pop("model"))
        for name in ("run_dir", "steps", "seed"):
            if name in values:
                kwargs[name] = _coerce(name, _field_type(cls, name), values.pop(name))
        return cls(**kwargs)


def build_model_config(values: Any) -> ModelConfig:
    """`{preset: name, field: value, ...}`: the preset with those fields replaced. Without a
    preset the fields replace those of the default model (`default_model()`), so `--set
    model.num_layers=4` on a config without a model section changes only the depth."""
    if isinstance(values, str):
        return get_preset(values)
    if not isinstance(values, dict):
        raise ValueError(f"model: expected a mapping or a preset name, got {values!r}")
    values = dict(values)
    preset = values.pop("preset", None)
    _check_keys(ModelConfig, values, "model")
    if "remat" in values:  # true/false of configs written before the named policies
        values["remat"] = remat_policy_name(values["remat"])
    values = {k: _coerce(f"model.{k}", _field_type(ModelConfig, k), v) for k, v in values.items()}
    if preset is not None:
        return get_preset(preset, **values)
    return default_model().replace(**values)


def build_dataclass(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    _check_keys(cls, values, where)
    return cls(**{k: _coerce(f"{where}.{k}", _field_type(cls, k), v) for k, v in values.items()})


def _check_keys(cls, values: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _field_type(cls, name: str) -> str:
    return str(next(f.type for f in dataclasses.fields(cls) if f.name == name))


def _coerce(where: str, type_name: str, value: Any) -> Any:
    """YAML reads `1e-3` as a string and `2` as an int: convert to the field's declared type."""
    type_name = type_name.replace("typing.", "")
    optional = type_name.startswith("Optional[")
    base = type_name[len("Optional["):-1] if optional else type_name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} may not be null")
    try:
        if base == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if base == "int" and isinstance(value, str):
            return int(value)
        if base == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if base == "bool" and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    except ValueError:
        raise ValueError(f"{where}: cannot read {value!r} as {base}") from None
    if base in ("float", "int", "bool", "str"):
        expected = {"float": (float,), "int": (int,), "bool": (bool,), "str": (str,)}[base]
        if not isinstance(value, expected) or (base == "int" and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {base}, got {value!r}")
    return value


# ------------------------------------------------------------------ YAML and overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001). The value is read as YAML."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value (e.g. optim.lr=1e-3), got {item!r}")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"--set: bad key {key!r}")
    if not raw.strip():
        return keys, None
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {item}: the value is not valid YAML ({_yaml_problem(err)})"
                         ) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here' from a YAML error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    values = dict(values)
    for item in overrides:
        keys, value = parse_override(item)
        node = values
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"--set {item}: {key!r} is not a section")
            node[key] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return values


def load_yaml(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}"
                         ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r}: expected a mapping at the top level")
    return values


def load_config(path: Optional[str | pathlib.Path] = None,
                overrides: Sequence[str] = ()) -> Config:
    """The config of a YAML file (or the defaults) with `--set` overrides applied."""
    values = load_yaml(path) if path else {}
    return Config.from_dict(apply_overrides(values, overrides))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

