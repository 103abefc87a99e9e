"""Typed configuration of every stage, loaded from `params.yaml` (the DVC params file).

`params.yaml` is the one place where defaults live: one section per stage, plus the shared
`teacher` and `prompts` sections. Other params files (`params/imagenet-*.yaml`) are overlays that
hold only what differs from it (`extends: ../params.yaml`, merged by `read_params`). Each
stage's config is a frozen dataclass; a field whose type is itself a config dataclass is read
from the top-level section of the same name. Unknown or missing keys are errors, so a typo
never silently falls back to a default.
The CLI builds its options from these dataclasses (`field_help`), so the option list, the
YAML keys and the types are defined once, here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import atomic
from pipeline.errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


def opt(help: str, choices: tuple[str, ...] | None = None, low: float = 0, high: float | None = None,
        open_low: bool = False, open_high: bool = False) -> Any:
    """A config field: its help text (shown by `--help`), optionally its allowed values, and for
    numbers (and each number of a tuple) the range [low, high] (`open_low`/`open_high`: bound
    excluded). Every number is at least 0 unless `low` says otherwise."""
    return field(metadata={"help": help, "choices": choices, "range": (low, high, open_low, open_high)})


def check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    """A number (or each number of a tuple) outside the field's range: a one-line PipelineError."""
    low, high, open_low, open_high = f.metadata.get("range", (0, None, False, False))
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        too_low = number <= low if open_low else number < low
        too_high = high is not None and (number >= high if open_high else number > high)
        if too_low or too_high or number != number:  # NaN is out of every range
            bounds = f"{'>' if open_low else '>='} {low:g}"
            if high is not None:
                bounds += f" and {'<' if open_high else '<='} {high:g}"
            raise PipelineError(f"{where}: {number!r} is out of range; it must be {bounds}")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


# Measured by `bench` on the 2-core CPU: workers=0 precompute 0.91 of the bare teacher's speed,
# 1 worker 0.85, 2 workers 0.83 (worker processes preempt the model's threads).
WORKERS_HELP = ("DataLoader worker processes decoding images; 0 decodes in the main process, which is "
                "fastest when the model runs on the CPU (workers would compete with its threads); "
                "use 8-16 with a GPU")

@dataclass(frozen=True)
class TeacherConfig:
    model: str = opt("open_clip model name (e.g. ViT-B-32); empty when `config` names a JSON file")
    pretrained: str = opt("open_clip pretrained tag (e.g. openai); empty for none")
    checkpoint: str = opt("local checkpoint file (.safetensors/.pt/.bin); empty for none")
    config: str = opt("JSON model config of a custom open_clip model; empty for a built-in model")


@dataclass(frozen=True)
class PromptsConfig:
    set: str = opt("prompt set: plain (templates x names) or cpa (names with context)",
                   choices=("plain", "cpa"))
    plain_templates: str = opt("file of templates with {name}, one per line")
    cpa_templates: str = opt("file of templates with {name} and {context}, one per line")
    anchors: str = opt("class: one anchor per class (mean of its prompts); prompt: one per prompt",
                       choices=("class", "prompt"))


@dataclass(frozen=True)
class ShardsConfig:
    source: str = opt("where images come from", choices=("demo", "folder"))
    out: str = opt("output directory for train-*.tar, val-*.tar, classes.json, manifest.json")
    root: str = opt("folder source: image folder <root>/<class>/<image>")
    val_root: str = opt("folder source: separate validation folder (empty: split --val-fraction)")
    val_labels: str = opt("folder source: labels of a flat --val-root such as ImageNet's val folder: "
                          "LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt "
                          "with meta.mat beside it (empty: --val-root has class folders)")
    val_fraction: float = opt("folder source: share of each class held out for val", high=1, open_high=True)
    max_side: int = opt("folder source: store images resized so their longer side is at most this many pixels "
                        "(once, Lanczos, JPEG quality 90): every later decode costs less (bench measures it); "
                        "0: as they are")
    max_per_shard: int = opt("samples per shard", low=1)
    train: int = opt("demo source: training images", low=1)
    val: int = opt("demo source: validation images", low=1)
    shifted: int = opt("demo source: images of a shifted val split, the world in another style (outlines "
                       "on unseen backgrounds; probe measures every model on it); 0: none")
    seed: int = opt("demo source: seed of the demo world")
    image_size: int = opt("demo source: image side in pixels", low=8)
    caption_noise: float = opt("demo source: share of train captions replaced by another image's caption "
                               "(web-like noise, seeded)", high=1)
    world: str = opt("demo source: easy (the demo: a near-certain teacher) or hard (twin colours and shapes, "
                     "distractors, partial captions: a teacher as unsure as a real CLIP)", choices=("easy", "hard"))
    workers: int = opt("processes that render/encode images")


@dataclass(frozen=True)
class DemoTeacherConfig:
    shards: str = opt("demo shards: their val split measures zero-shot accuracy")
    config: str = opt("JSON model config of the teacher (open_clip's, or MS-CLIP's with \"arch\": \"ms-clip\")")
    arch: str = opt("two-tower: open_clip's CLIP (separate image and text towers); ms-clip: one shared "
                    "transformer (MS-CLIP); must be the config file's", choices=("two-tower", "ms-clip"))
    objective: str = opt("clip: the contrastive loss; psd: progressive self-distillation (soft targets from "
                         "the model itself, a reconstruction)", choices=("clip", "psd"))
    psd_rho: float = opt("psd: share of each batch's rows given soft targets", high=1)
    psd_alpha_max: float = opt("psd: weight of the model's own distribution in the soft targets, at the "
                               "end of the ramp", high=1)
    psd_ramp: float = opt("psd: share of the training steps over which alpha ramps up from 0 to "
                          "psd_alpha_max", high=1, open_low=True)
    out: str = opt("weights file to write (.safetensors)")
    init: str = opt("weights to start from (empty: random initialisation)")
    steps: int = opt("training steps", low=1)
    batch_size: int = opt("image-caption pairs per step", low=2)
    lr: float = opt("peak learning rate (AdamW, cosine with warm-up)", open_low=True)
    warmup_steps: int = opt("linear warm-up steps")
    weight_decay: float = opt("AdamW weight decay")
    crop_scale: tuple[float, float] = opt("random resized crop of every training image: area range",
                                          high=1, open_low=True)
    crop_ratio: tuple[float, float] = opt("random resized crop of every training image: aspect ratio range",
                                          open_low=True)
    seed: int = opt("seed of the training stream (distinct from the shards' seed)")
    caption_noise: float = opt("share of the training captions replaced by another image's caption "
                               "(web-like noise, seeded; demo_world.noisy_caption)", high=1)
    train_images: int = opt("distinct training images (with their captions) the stream cycles through, a "
                            "finite dataset seen for steps x batch_size / train_images epochs; 0: a freshly "
                            "rendered image every time (an endless stream)")
    workers: int = opt("DataLoader workers rendering training images")
    threads: int = opt("torch CPU threads (0: torch's default)")
    eval_every: int = opt("measure zero-shot accuracy on the val shards every N steps (0: at the end)")
    prompts: PromptsConfig = opt("prompt templates (both plain and cpa anchors are measured)")


PRECISION_CHOICES = ("bf16", "fp16", "tf32", "fp32")  # pipeline.precision.CHOICES
PRECISION_HELP = ("bf16: mixed precision, bf16 where the device has it natively (CUDA 8.0+, CPUs with AVX512-BF16 "
                  "or AMX), fp16 with loss scaling on older GPUs, fp32 on other CPUs; fp16: fp16 on CUDA; "
                  "tf32: float32 with TF32 matmuls and convolutions on CUDA 8.0+; fp32: full precision, TF32 "
                  "off (docs/performance.md)")


@dataclass(frozen=True)
class PrecomputeConfig:
    shards: str = opt("shard directory (reads its train-*.tar)")
    out: str = opt("HDF5 cache file to write")
    views: int = opt("augmented views per training image", low=1)
    crop_scale: tuple[float, float] = opt("random resized crop: area range as fractions", high=1, open_low=True)
    crop_ratio: tuple[float, float] = opt("random resized crop: aspect-ratio range", open_low=True)
    flip: bool = opt("random horizontal flip")
    seed: int = opt("seed of the view parameters")
    topk: int = opt("0: store all anchor similarities; k>0: store only the top-k")
    store_embeddings: bool = opt("also store the teacher image embedding of every view")
    decode: str = opt("cpu: the DataLoader workers decode the JPEGs and cut the views; device: the workers only "
                      "read the encoded images and sample the view parameters, and the teacher's device decodes "
                      "each batch (nvjpeg on a GPU) and cuts the views there (on the CPU: the same cache as cpu)",
                      choices=("cpu", "device"))
    batch_size: int = opt("views per teacher forward", low=1)
    workers: int = opt(WORKERS_HELP)
    device: str = opt("auto, cpu or cuda")
    precision: str = opt(PRECISION_HELP, choices=PRECISION_CHOICES)
    metrics: str = opt("metrics JSON file to write")
    teacher: TeacherConfig = opt("the teacher")
    prompts: PromptsConfig = opt("the prompt set")


@dataclass(frozen=True)
class TrainConfig:
    """What distill and the supervised reference share: model, data path, optimisation."""

    shards: str = opt("shard directory (reads its train-*.tar)")
    cache: str = opt("teacher cache (HDF5) written by precompute: views and targets")
    arch: str = opt("backbone: a torchvision classification model name (resnet18), or timm/NAME for timm's "
                    "model NAME (timm/mobilenetv3_small_100; names: timm.list_models())")
    head: str = opt("projection head: linear; mlp (Linear-BN-ReLU-Linear, --head-hidden wide); clip-mlp "
                    "(open_clip's timm 'mlp' projection, Linear-GELU-Linear 2 x the embedding dim wide; "
                    "ignores --head-hidden)", choices=("linear", "mlp", "clip-mlp"))
    head_hidden: int = opt("hidden width of the mlp head", low=1)
    image_size: int = opt("student input resolution", low=8)
    epochs: int = opt("training epochs", low=1)
    batch_size: int = opt("images per step", low=2)
    optimizer: str = opt("optimiser", choices=("adamw", "sgd"))
    lr: float = opt("peak learning rate", open_low=True)
    weight_decay: float = opt("weight decay")
    momentum: float = opt("SGD momentum", high=1, open_high=True)
    warmup_epochs: float = opt("linear warm-up length in epochs before the cosine decay")
    seed: int = opt("seed of initialisation, view choice and batch order")
    workers: int = opt(WORKERS_HELP)
    prefetch: int = opt("batches each DataLoader worker keeps ready in shared memory (the budget is logged "
                        "at start: workers x prefetch x batch)", low=1)
    mix_shards: int = opt("shards each worker reads at a time and shuffles together: batches mix their "
                          "images; a worker holds their encoded bytes in memory", low=1)
    device: str = opt("auto, cpu or cuda")
    decode: str = opt("cpu: the DataLoader workers decode the JPEGs and cut the views; device: the workers only "
                      "read the encoded images and view parameters, and the training device decodes each batch "
                      "(nvjpeg on a GPU) and cuts the views there (on the CPU: the same pixels as cpu)",
                      choices=("cpu", "device"))
    precision: str = opt(PRECISION_HELP + " (bf16 on a CPU with AMX: ResNet-18 at 64 px trains 1.8x faster)",
                         choices=PRECISION_CHOICES)
    checkpoint_every: int = opt("also checkpoint every N steps (0: only at each epoch end)")
    sync_every: int = opt("read the loss back from the device every N steps, for the progress line and the "
                          "finite check (each read waits for the GPU to finish its queue)", low=1)
    collective_timeout: float = opt("minutes a training step waits for the other torchrun processes before "
                                    "the job fails (a rank stuck on a dead file system read)", open_low=True)
    compile: bool = opt("torch.compile the student (a one-off compile time; faster steps on GPU)")
    deterministic: bool = opt("deterministic CUDA kernels (torch.use_deterministic_algorithms, cuBLAS's "
                              "fixed workspace, no cuDNN autotuning): runs repeat bit for bit on the same "
                              "GPU, slower; CPU runs are deterministic without it")


@dataclass(frozen=True)
class DistillConfig:
    out: str = opt("student checkpoint to write")
    run_dir: str = opt("directory for resumable training checkpoints")
    tau_teacher: float = opt("teacher temperature: p_T = softmax(s_T / tau_teacher)", open_low=True)
    tau_student: float = opt("student temperature: p_S = softmax(cos(z_S, a) / tau_student)", open_low=True)
    loss: str = opt("csm: KL over the anchors; embedding: 1 - cos(student, teacher image embedding), "
                    "needs a cache made with --store-embeddings; both: their sum",
                    choices=("csm", "embedding", "both"))
    embedding_weight: float = opt("weight of the embedding term when --loss both")
    metrics: str = opt("metrics JSON file to write")
    plot: str = opt("per-epoch CSV to write")
    train: TrainConfig = opt("training settings")
    teacher: TeacherConfig = opt("the teacher the cache must come from")
    prompts: PromptsConfig = opt("the prompt set the cache must hold")


@dataclass(frozen=True)
class SupervisedConfig:
    out: str = opt("supervised reference checkpoint to write")
    run_dir: str = opt("directory for resumable training checkpoints")
    metrics: str = opt("metrics JSON file to write")
    plot: str = opt("per-epoch CSV to write")
    train: TrainConfig = opt("training settings (shared with distill)")


@dataclass(frozen=True)
class SslConfig:
    method: str = opt("simclr: NT-Xent between the two views (lightly's NTXentLoss, SimCLR projection head); "
                      "byol: prediction vs a momentum target (lightly's BYOL heads)", choices=("simclr", "byol"))
    projection_dim: int = opt("output width of the projection head", low=1)
    projection_hidden: int = opt("hidden width of the projection (and BYOL's prediction) head", low=1)
    temperature: float = opt("SimCLR: NT-Xent temperature", open_low=True)
    target_momentum: float = opt("BYOL: the target's momentum at the first step, raised to 1 by the last (cosine)",
                          high=1)
    out: str = opt("baseline checkpoint to write (a student: backbone + projection head)")
    run_dir: str = opt("directory for resumable training checkpoints")
    metrics: str = opt("metrics JSON file to write")
    plot: str = opt("per-epoch CSV to write")
    train: TrainConfig = opt("training settings (shared with distill)")


@dataclass(frozen=True)
class ProbeConfig:
    shards: str = opt("shard directory (train-*.tar to fit, val-*.tar to evaluate)")
    cache: str = opt("teacher cache: teacher identity and anchors")
    student: str = opt("distilled student checkpoint")
    supervised: str = opt("supervised reference checkpoint (empty: skip)")
    baselines: str = opt("more backbones to probe, NAME=CHECKPOINT comma-separated (the SSL baselines: "
                         "simclr=data/models/simclr.pt); empty: none")
    out: str = opt("metrics JSON file to write")
    plots: str = opt("directory for probe.png and distill.png")
    distill_csv: str = opt("per-epoch CSV of distill, drawn as a curve")
    holdout_fraction: float = opt("share of train held out to choose the regularisation", high=1, open_low=True,
                                  open_high=True)
    batch_size: int = opt("images per feature-extraction batch", low=1)
    workers: int = opt(WORKERS_HELP)
    device: str = opt("auto, cpu or cuda")
    precision: str = opt(PRECISION_HELP + " (bf16 on a CPU with AMX: the students' features 2.3x faster)",
                         choices=PRECISION_CHOICES)
    seed: int = opt("seed of the hold-out split")
    max_train_images: int = opt("fit the probes on at most this many train images (0: all)")
    teacher: TeacherConfig = opt("the teacher (must be the one the cache records)")
    prompts: PromptsConfig = opt("templates of the teacher's plain and CPA zero-shot")


@dataclass(frozen=True)
class BenchConfig:
    random_teacher: bool = opt("allow a teacher model without weights (speed only, e.g. ViT-B-32)")
    steps: int = opt("timed steps per measurement (after warm-up)", low=1)
    warmup_steps: int = opt("untimed steps before each measurement")
    topk: int = opt("k of the top-k cache size measurement", low=1)
    views: int = opt("views per image in the precompute measurement", low=1)
    precompute_shards: int = opt("train shards that the precompute measurement runs over", low=1)
    measure_rss: bool = opt("measure peak RSS with the cache at 1x and 8x (two extra short runs)")
    data_path_images: int = opt("ImageNet-sized JPEGs (500 x 375, quality 90) the data-path measurement makes and "
                                "times per core, without a model (0: skip it)")
    data_path_size: int = opt("resolution of the data-path measurement's views (ImageNet: 224)", low=8)
    data_path_max_sides: str = opt("also time the data path on JPEGs pre-sized to these longer sides, as "
                                   "`shards --max-side` stores them: comma-separated (empty: none)")
    json: str = opt("JSON file to write (empty: none)")
    train: TrainConfig = opt("the training settings measured (shards, cache, student, resolution, batch, "
                             "optimiser, workers, device, precision): the train section")
    teacher: TeacherConfig = opt("the teacher")
    prompts: PromptsConfig = opt("the prompt set")


STAGE_CONFIGS: dict[str, type] = {
    "shards": ShardsConfig,
    "demo_teacher": DemoTeacherConfig,
    "precompute": PrecomputeConfig,
    "distill": DistillConfig,
    "supervised": SupervisedConfig,
    "ssl": SslConfig,
    "probe": ProbeConfig,
    "bench": BenchConfig,
}
NESTED_SECTIONS: dict[str, type] = {
    "teacher": TeacherConfig,
    "prompts": PromptsConfig,
    "train": TrainConfig,
}


# The top-level key of an overlay params file: the path of its base (relative to the overlay).
EXTENDS = "extends"


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The sections of a params file, each a mapping of keys to values.

    A file with a top-level `extends: BASE` is an overlay: it holds only what differs from BASE (a
    path relative to the overlay, e.g. `../params.yaml`), and is read as BASE with the overlay's
    sections merged key by key (mappings merged, other values such as lists replaced whole). An
    overlay may only set keys its base has, so a typo or a renamed option is an error rather than a
    silent default; the base must be a complete params file, not an overlay itself.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"{path}: params file not found; run from the project root or pass --params FILE"
        )
    params = read_mapping(path)
    if EXTENDS not in params:
        return params
    overlay = {key: value for key, value in params.items() if key != EXTENDS}
    base_name = params[EXTENDS]
    if not isinstance(base_name, str) or not base_name:
        raise PipelineError(f"{path}: {EXTENDS}: expected the path of a params file (relative to this one), "
                            f"got {base_name!r}")
    base_path = Path(os.path.normpath(path.parent / base_name))
    if not base_path.is_file():
        raise PipelineError(f"{path}: {EXTENDS}: {base_path} not found (the path is relative to {path.parent})")
    base = read_mapping(base_path)
    if EXTENDS in base:
        raise PipelineError(f"{path}: its base {base_path} is an overlay too ({EXTENDS}: {base[EXTENDS]}); "
                            f"extend a complete params file such as params.yaml")
    return merge_overlay(base, overlay, f"{path}", f"{base_path}")


def read_mapping(path: Path) -> dict[str, Any]:
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level")
    return params


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any], source: str, base_source: str,
                  section: str = "") -> dict[str, Any]:
    """`base` with `overlay`'s values: mappings merged key by key, any other value replaced whole."""
    unknown = sorted(set(overlay) - set(base))
    if unknown:
        what, known = (f"key(s) {', '.join(unknown)} in section '{section}'", "keys") if section else \
            (f"section(s) {', '.join(unknown)}", "sections")
        raise PipelineError(f"{source}: unknown {what}, not in its base {base_source}; "
                            f"known {known}: {', '.join(sorted(base))}")
    merged = dict(base)
    for key, value in overlay.items():
        name = f"{section}.{key}" if section else key
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise PipelineError(f"{source}: '{name}' must be a mapping of the keys that differ from "
                                    f"{base_source}, got {value!r}")
            merged[key] = merge_overlay(base[key], value, source, base_source, name)
        else:
            merged[key] = value
    return merged


def config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The fields of a config dataclass with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML/CLI value to the field type, or raise a PipelineError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise PipelineError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise PipelineError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PipelineError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise PipelineError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise PipelineError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def load_section(cls: type, params: dict[str, Any], section: str, source: str) -> Any:
    """Build config `cls` from `params[section]`; nested configs come from their own sections."""
    raw = params.get(section)
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: section '{section}' is missing or not a mapping")
    fields_and_types = config_fields(cls)
    known = {f.name for f, tp in fields_and_types if not is_config(tp)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PipelineError(
            f"{source}: unknown key(s) {', '.join(unknown)} in section '{section}'; "
            f"known keys: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for f, tp in fields_and_types:
        if is_config(tp):
            values[f.name] = load_section(tp, params, f.name, source)
            continue
        where = f"{source}: {section}.{f.name}"
        if f.name not in raw:
            raise PipelineError(f"{where} is missing; add it to the '{section}' section")
        values[f.name] = coerce(raw[f.name], tp, where)
        check_choice(f, values[f.name], where)
        check_range(f, values[f.name], where)
    return cls(**values)


def check_choice(f: dataclasses.Field, value: Any, where: str) -> None:
    choices = field_choices(f)
    if choices and value not in choices:
        raise PipelineError(f"{where}: {value!r} is not one of {', '.join(choices)}")


def load_config(stage: str, params_path: str | Path = DEFAULT_PARAMS) -> Any:
    """The config of `stage` from the params file."""
    return load_section(STAGE_CONFIGS[stage], read_params(params_path), stage, str(params_path))


def override(config: Any, changes: dict[str, Any]) -> Any:
    """A copy of `config` with dotted-key `changes` applied, e.g. {"train.epochs": 2}.

    Values are checked against the field types, like values read from the params file.
    """
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    types_by_name = {f.name: (f, tp) for f, tp in config_fields(type(config))}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if head not in types_by_name:
            raise PipelineError(f"unknown option '{key}' for {type(config).__name__}")
        f, tp = types_by_name[head]
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = coerce(value, tp, f"option --{head.replace('_', '-')}")
            check_choice(f, direct[head], f"option --{head.replace('_', '-')}")
            check_range(f, direct[head], f"option --{head.replace('_', '-')}")
    for head, sub in nested.items():
        direct[head] = override(getattr(config, head), sub)
    return dataclasses.replace(config, **direct)


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def write_resolved(config: Any, path: str | Path) -> None:
    """Write the resolved config beside a stage's outputs (JSON, keys sorted)."""
    atomic.write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
