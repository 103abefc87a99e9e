"""The teacher: a frozen open_clip CLIP, whatever its weights' origin, with an identity.

Five sources (the `teacher` section of the params):
  (a) a built-in model name + pretrained tag (open_clip downloads the weights);
  (b) a built-in model name + a local checkpoint file in open_clip's layout;
  (c) a JSON model config (open_clip's model-config format) + a checkpoint file;
  (d) an OpenAI file: a TorchScript archive as OpenAI released them (what `clip.load` reads),
      a state dict that still holds the archive's `input_resolution`, or any state dict in
      OpenAI's layout given without a model name or config. The architecture is derived from
      the weights as OpenAI's own `build_model` does, so files of any size load;
  (e) MS-CLIP (`pipeline.msclip`, not an open_clip model): a built-in name (MS-CLIP-S-B-32,
      MS-CLIP-S-B-16) or a JSON config with "arch": "ms-clip", + a checkpoint file with exactly
      the released names, loaded strictly.

QuickGELU: OpenAI trained its CLIPs with QuickGELU, and open_clip 3.x no longer forces it for
the `openai` tag (it only warns), so the activation is decided here, not left to the release:
a tag gets what open_clip's pretrained config for that tag says (`openai`: QuickGELU); an
OpenAI file always gets QuickGELU, and a model name or config given with one must describe the
file's architecture exactly, activation included (ViT-B-32-quickgelu, not ViT-B-32). A file in
open_clip's layout whose name says "openai", given with a GELU model, is refused.

`resolve_teacher` settles all of that without building the model, so stage two can check a
cache against the params. The identity (`key=value` words) records what decides the teacher's
outputs, and only that is compared (`identity_difference`): the weights by content (their
file's sha256; for an open_clip tag also where open_clip downloads them from, which is what is
compared when the file is not on this machine), the resolved architecture (a digest of the
values that differ from open_clip's defaults, so a new release's added fields leave it alone)
with its activation spelled out, the preprocessing (a digest likewise) and, once a teacher is
built, the precision it actually ran at. File names, model spellings (`ViT-B-32` with the
`openai` tag is `ViT-B-32-quickgelu`) and the config file's name are recorded and shown, never
compared. The open_clip release is recorded; a different one is a warning, not a refusal
(`identity_warnings`): the same weights, architecture and preprocessing give the same outputs
up to rounding. Its `arch_kind` tells an open_clip CLIP (`two-tower`) from an MS-CLIP (`ms-clip`).

A teacher named by an open_clip tag is looked up in open_clip's download caches first; when it
is not there and the hub cannot be reached (or HF_HUB_OFFLINE is set), loading fails in
seconds with one line naming `--teacher-checkpoint`, before any download is attempted.

The wrapper stays in eval mode with gradients off, takes images in [0, 1] (or uint8) at its own
resolution and applies its own normalisation, and returns L2-normalised float32 embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import socket
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import open_clip.pretrained as open_clip_pretrained
import torch
import torch.nn.functional as F
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, set_model_preprocess_cfg
from open_clip.pretrained import get_pretrained_cfg, has_hf_hub, list_pretrained_tags_by_model
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from pipeline import precision as precision_mod
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError, reason
from pipeline.msclip import ARCH_KIND as MSCLIP_KIND
from pipeline.msclip import MSCLIP, MSCLIP_CONFIGS, MSCLIPConfig, shared_names
from pipeline.msclip import preprocess_cfg as msclip_preprocess_cfg
from pipeline.progress import Progress
from pipeline.shards import sha256_file
from pipeline.views import normalize_pixels

log = logging.getLogger(__name__)

# Entries of OpenAI's TorchScript archives that are not weights (OpenAI's build_model drops them).
OPENAI_ARCHIVE_ENTRIES = ("input_resolution", "context_length", "vocab_size")
TWO_TOWER_KIND = "two-tower"  # the arch_kind of every open_clip CLIP (MS-CLIP's is msclip.ARCH_KIND)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable cuda is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"option --device {name}: CUDA is not available here; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"option --device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """The autocast a forward runs under on `device` for `--precision` (pipeline.precision.choose):
    bf16 where native, fp16 on CUDA GPUs without native bf16, else none.

    Measured on this project's 2-core CPU (AVX512-BF16 and AMX): the demo ViT teacher's forward
    runs 2.2x faster in bf16 (embeddings within 3e-5 cosine of fp32); a ResNet-18 training step
    (channels_last, batch 128) 1.8x faster at 64 px (363 vs 204 img/s) and at par at 32 px.
    """
    return precision_mod.autocast(precision_mod.for_device(precision, device), device)


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision a forward really runs at on `device` (bf16, fp16, tf32 or fp32)."""
    return precision_mod.for_device(precision, device).name


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (zip with a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def existing(path: str, option: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise PipelineError(f"{path}: file not found (option {option})")
    return resolved


# --- OpenAI files --------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: TorchScript archive, safetensors or a torch pickle.

    Unwraps {'state_dict': ...} or {'model': ...} and DistributedDataParallel's 'module.' prefix.
    """
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():  # OpenAI ships TorchScript: its deprecation is not the user's to act on
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:  # zip-format pickles are memory-mapped: tensors are read when copied into the model
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: one line naming it
        raise PipelineError(
            f"{path}: not a readable checkpoint ({reason(err)}) (option --teacher-checkpoint)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: holds no state dict of tensors (option --teacher-checkpoint)")
    if state and next(iter(state)).startswith("module."):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def has_openai_layout(state: dict[str, torch.Tensor]) -> bool:
    """OpenAI's CLIP keys: text tower at the top level, a ViT (visual.proj) or ResNet (visual.attnpool)."""
    return (all(k in state for k in ("positional_embedding", "text_projection", "token_embedding.weight",
                                     "ln_final.weight"))
            and ("visual.proj" in state or "visual.attnpool.positional_embedding" in state))


def openai_model_config(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """open_clip's config of an OpenAI-layout state dict, derived as OpenAI's `build_model` does.

    Head widths are not stored in the weights; OpenAI's convention (64 per head, and a ResNet
    attention pool of width * 32 / 64 heads) is also open_clip's default. QuickGELU always:
    OpenAI's models were trained with it. (open_clip's `build_model_from_openai_state_dict`
    derives the same config but rounds the weights to fp16, which changes fp32 files.)
    """
    if any(k.startswith("visual.transformer.parallel_branch_v.") for k in state):
        raise PipelineError(f"{path}: an MS-CLIP state dict, not OpenAI's; name its architecture with "
                            f"--teacher-model ({' or '.join(MSCLIP_CONFIGS)}) or --teacher-config")
    if not has_openai_layout(state):
        raise PipelineError(
            f"{path}: not a CLIP state dict in OpenAI's layout (needs positional_embedding, "
            f"text_projection and visual.proj or visual.attnpool); name its architecture with "
            f"--teacher-model or --teacher-config"
        )
    if "visual.proj" in state:
        patch_size = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {
            "layers": len([k for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
            "width": state["visual.conv1.weight"].shape[0],
            "patch_size": patch_size,
            "image_size": patch_size * grid,
        }
    else:
        output_width = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {
            "layers": [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")})
                       for b in (1, 2, 3, 4)],
            "width": state["visual.layer1.0.conv1.weight"].shape[0],
            "patch_size": None,
            "image_size": output_width * 32,
        }
    width = state["ln_final.weight"].shape[0]
    text = {
        "context_length": state["positional_embedding"].shape[0],
        "vocab_size": state["token_embedding.weight"].shape[0],
        "width": width,
        "heads": width // 64,
        "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
    }
    return {"embed_dim": state["text_projection"].shape[1], "quick_gelu": True,
            "vision_cfg": vision, "text_cfg": text}


# --- resolving the params ------------------------------------------------------------------


def resolved_architecture(model_cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """A model config with every default filled in (open_clip's dataclasses), as plain JSON values.

    Two configs that build the same module resolve to equal dicts, whether a field was written
    out or left to its default; `quick_gelu` is always present.
    """
    resolved = copy.deepcopy(model_cfg)
    resolved["quick_gelu"] = bool(resolved.get("quick_gelu", False))
    try:
        resolved["vision_cfg"] = dataclasses.asdict(CLIPVisionCfg(**resolved.get("vision_cfg", {})))
        resolved["text_cfg"] = dataclasses.asdict(CLIPTextCfg(**resolved.get("text_cfg", {})))
    except TypeError as err:
        raise PipelineError(f"{source}: not an open_clip model config ({err})") from None
    return json.loads(json.dumps(resolved, sort_keys=True))


def flat_items(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items.update(flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def config_differences(named: dict[str, Any], derived: dict[str, Any]) -> list[str]:
    """'key: model X, file Y' for every field where two resolved configs differ."""
    a, b = flat_items(named), flat_items(derived)
    return [f"{key}: model {a.get(key)}, file {b.get(key)}" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key)]


def models_with_architecture(architecture: dict[str, Any]) -> list[str]:
    """open_clip's built-in model names whose config resolves to `architecture`."""
    names = []
    for name in open_clip.list_models():
        try:
            if resolved_architecture(open_clip.get_model_config(name), name) == architecture:
                names.append(name)
        except PipelineError:
            continue
    return names


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher settled from the params, before any model is built.

    `architecture` is the resolved model config (activation included), `preprocess` the input
    normalisation and size; with the weights and the open_clip release they decide every output.
    """
    name: str  # open_clip model name, the JSON config's stem, or "" (derived from an OpenAI file)
    model_config: dict[str, Any]  # what open_clip's CLIP takes (quick_gelu set as it is built)
    architecture: dict[str, Any]  # model_config resolved with every default
    preprocess: dict[str, Any]  # open_clip's preprocess config: size, mean, std, interpolation, ...
    source: str  # "tag", "checkpoint", "openai-file" or "random"
    labels: tuple[tuple[str, str], ...]  # identity fields of the params: names (model/config, tag/file) and weights
    checkpoint: Path | None = None  # the weights file: a checkpoint, or a tag's file in open_clip's download cache
    config_file: Path | None = None
    openai_state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def quick_gelu(self) -> bool:
        return bool(self.architecture["quick_gelu"])

    @property
    def arch_kind(self) -> str:
        return self.architecture.get("arch", TWO_TOWER_KIND)

    @property
    def digest(self) -> str:
        """The architecture's digest: its values that differ from open_clip's defaults."""
        return short_digest(canonical_architecture(self.architecture))

    @property
    def preprocess_digest(self) -> str:
        return short_digest(canonical_preprocess(self.preprocess))

    @property
    def identity(self) -> str:
        fields = [*self.labels, ("arch_kind", self.arch_kind), ("arch", self.digest),
                  ("preprocess", self.preprocess_digest), ("act", "quickgelu" if self.quick_gelu else "gelu"),
                  ("open_clip", open_clip.__version__)]
        return " ".join(f"{key}={value}" for key, value in fields)


def short_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def json_defaults(cls: type) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cls())))


def without_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def canonical_architecture(architecture: dict[str, Any]) -> dict[str, Any]:
    """An open_clip architecture without the tower fields at open_clip's defaults.

    The same module whether a field is written out or left to its default, and the same digest
    after an open_clip release adds a field (its default keeps the old behaviour). MS-CLIP's
    architecture is ours, kept whole.
    """
    if architecture.get("arch", TWO_TOWER_KIND) != TWO_TOWER_KIND:
        return architecture
    canonical = dict(architecture)
    for key, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if isinstance(canonical.get(key), dict):
            canonical[key] = without_defaults(canonical[key], json_defaults(cls))
    return canonical


def canonical_preprocess(preprocess: dict[str, Any]) -> dict[str, Any]:
    """A preprocess config without the values at open_clip's defaults (see `canonical_architecture`)."""
    return without_defaults(preprocess, json_defaults(PreprocessCfg))


def preprocess_config(architecture: dict[str, Any], overlay: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_clip's preprocess config (defaults: OpenAI's mean/std, bicubic, shortest side) at the model's size."""
    size = architecture["vision_cfg"]["image_size"]
    resolved = merge_preprocess_dict(PreprocessCfg(), {**(overlay or {}), "size": size})
    return json.loads(json.dumps(resolved))


def resolve_teacher(config: TeacherConfig) -> TeacherSpec:
    """Settle architecture, activation, preprocessing and weights of `config` without building it.

    Reads an OpenAI file's tensors (its architecture is in their shapes) and hashes checkpoint
    files; downloads nothing.
    """
    labels: list[tuple[str, str]] = []
    config_file = None
    if config.config:
        config_file = existing(config.config, "--teacher-config")
        try:
            named = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PipelineError(f"{config_file}: not a JSON model config ({err}) (option --teacher-config)") from None
        name = config_file.stem
        labels.append(("config", config_file.name))
    elif config.model:
        name = config.model
        if name in MSCLIP_CONFIGS:
            named = {"arch": MSCLIP_KIND, **dataclasses.asdict(MSCLIP_CONFIGS[name])}
        elif name in open_clip.list_models():
            named = open_clip.get_model_config(name)
        else:
            raise PipelineError(
                f"--teacher-model {name}: not an open_clip model (see open_clip.list_models()) "
                f"nor one of {', '.join(MSCLIP_CONFIGS)}"
            )
        labels.append(("model", name))
    elif config.checkpoint:
        name, named = "", None  # an OpenAI file: the architecture comes from its weights
    else:
        raise PipelineError(
            "teacher: set --teacher-model (an open_clip name) or --teacher-config (a JSON file)"
        )
    source_name = str(config_file) if config_file else f"--teacher-model {name}"
    kind = named.get("arch", TWO_TOWER_KIND) if isinstance(named, dict) else TWO_TOWER_KIND
    if kind == MSCLIP_KIND:
        return resolve_msclip(config, name, named, source_name, tuple(labels), config_file)
    if kind != TWO_TOWER_KIND:
        raise PipelineError(f"{source_name}: arch {kind!r} unknown (expected {MSCLIP_KIND}, or {TWO_TOWER_KIND} "
                            f"or none for an open_clip model config)")
    if isinstance(named, dict):  # "arch": "two-tower" names open_clip's CLIP; it is not one of its arguments
        named = {k: v for k, v in named.items() if k != "arch"}

    if config.checkpoint:
        checkpoint = existing(config.checkpoint, "--teacher-checkpoint")
        labels += [("checkpoint", checkpoint.name), ("weights_sha256", sha256_file(checkpoint))]
        state = read_state_dict(checkpoint)
        if is_openai_file(checkpoint, state, named):
            return resolve_openai_file(checkpoint, state, name, named, source_name, tuple(labels), config_file)
        architecture = resolved_architecture(named, source_name)
        if "openai" in checkpoint.name.lower() and not architecture["quick_gelu"]:
            fix = (f'set "quick_gelu": true in {config_file}' if config_file else
                   f"use --teacher-model {name}-quickgelu, or leave --teacher-model empty to take the "
                   f"architecture from the file")
            raise PipelineError(f"{checkpoint}: OpenAI CLIP weights were trained with QuickGELU; {fix}")
        return TeacherSpec(name, named, architecture, preprocess_config(architecture), "checkpoint",
                           tuple(labels), checkpoint=checkpoint, config_file=config_file)

    if config.pretrained:
        if config_file:
            raise PipelineError("teacher: --teacher-pretrained needs --teacher-model, not a config")
        tag = get_pretrained_cfg(name, config.pretrained)
        if not tag:
            known = ", ".join(list_pretrained_tags_by_model(name)) or "none"
            raise PipelineError(
                f"--teacher-pretrained {config.pretrained} for {name}: not an open_clip tag of this "
                f"model (known: {known}); for a local file use --teacher-checkpoint FILE"
            )
        # The tag's own activation, whatever this open_clip release does by default.
        model_config = {**named, "quick_gelu": bool(tag.get("quick_gelu", False))}
        architecture = resolved_architecture(model_config, source_name)
        labels += [("pretrained", config.pretrained), ("weights_source", tag_source(tag))]
        local = downloaded_tag_file(tag)
        if local is not None:  # the weights are on this machine: their content is the identity
            labels.append(("weights_sha256", sha256_file(local)))
        return TeacherSpec(name, model_config, architecture, preprocess_config(architecture, tag), "tag",
                           tuple(labels), checkpoint=local)

    architecture = resolved_architecture(named, source_name)
    return TeacherSpec(name, named, architecture, preprocess_config(architecture), "random", tuple(labels),
                       config_file=config_file)


# --- open_clip tags: the download caches, and failing fast without a hub --------------------


def tag_source(tag: dict[str, Any]) -> str:
    """Where open_clip gets a tag's weights: its Hugging Face hub file when it has one (open_clip
    prefers it), else its URL. Two tags with the same source are the same bytes."""
    if tag.get("file"):
        return f"file:{tag['file']}"
    if tag.get("hf_hub") and has_hf_hub():
        return f"hf-hub:{tag['hf_hub']}"
    return f"url:{tag.get('url', '')}"


def hub_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """(repo id, file names open_clip tries in order) of a tag's `hf_hub` entry."""
    model_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    alternatives = getattr(open_clip_pretrained, "_get_safe_alternatives", lambda name: ())
    safe = list(alternatives(filename)) if importlib.util.find_spec("safetensors") else []
    return model_id, [*safe, filename]


def downloaded_tag_file(tag: dict[str, Any]) -> Path | None:
    """The tag's weights file if open_clip's download caches hold it (no network is touched)."""
    source = tag_source(tag)
    if source.startswith("file:"):
        path = Path(tag["file"]).expanduser()
        return path if path.is_file() else None
    if source.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        model_id, names = hub_candidates(tag["hf_hub"])
        for name in names:
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(tag.get("url", ""))
    return path if tag.get("url") and path.is_file() else None


def hub_unreachable(source: str) -> str:
    """Why the download host of `source` cannot be used now ('' when it can): HF_HUB_OFFLINE, or
    no TCP connection within a few seconds. Checked before any download, so that an offline
    machine fails in seconds instead of in huggingface_hub's retries."""
    if source.startswith("hf-hub:"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        url = constants.ENDPOINT
    else:
        url = source.removeprefix("url:")
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_SECONDS).close()
    except OSError as err:
        return f"{host}:{port} cannot be reached ({err.strerror or err})"
    return ""


HUB_TIMEOUT_SECONDS = 5


def fetch_tag_weights(spec: TeacherSpec) -> TeacherSpec:
    """The spec with its tag's weights on this machine (downloaded by open_clip) and their sha256."""
    if spec.checkpoint is not None:
        return spec
    labels = dict(spec.labels)
    tag, source = labels["pretrained"], labels["weights_source"]
    why = hub_unreachable(source)
    if why:
        raise PipelineError(
            f"--teacher-pretrained {tag} for {spec.name}: its weights ({source}) are not in the local download "
            f"cache and {why}; on a machine without internet pass --teacher-checkpoint FILE (the weights copied "
            f"from a machine with internet: OpenAI's own .pt file, or the file open_clip downloaded there)"
        )
    try:
        path = Path(open_clip_pretrained.download_pretrained(get_pretrained_cfg(spec.name, tag)))
    except Exception as err:  # download errors: one line, whole
        raise PipelineError(f"--teacher-pretrained {tag} for {spec.name}: download failed ({reason(err)}); pass "
                            f"--teacher-checkpoint FILE, or try again") from None
    return dataclasses.replace(spec, checkpoint=path, labels=(*spec.labels, ("weights_sha256", sha256_file(path))))


def resolve_msclip(config: TeacherConfig, name: str, named: dict[str, Any], source_name: str,
                   labels: tuple[tuple[str, str], ...], config_file: Path | None) -> TeacherSpec:
    """Source (e): an MS-CLIP, always QuickGELU; weights only from a local file (no download tags)."""
    msclip_config = MSCLIPConfig.from_dict(named, source_name)
    architecture = {"arch": MSCLIP_KIND, "quick_gelu": True, **dataclasses.asdict(msclip_config)}
    architecture = json.loads(json.dumps(architecture, sort_keys=True))
    preprocess = msclip_preprocess_cfg(msclip_config, named.get("preprocess_cfg"))
    if not config.checkpoint:  # as for open_clip models, a checkpoint wins over a tag
        if config.pretrained:
            raise PipelineError(f"--teacher-pretrained {config.pretrained} for {name}: MS-CLIP has no download "
                                f"tags; pass the released file with --teacher-checkpoint FILE")
        return TeacherSpec(name, named, architecture, preprocess, "random", labels, config_file=config_file)
    checkpoint = existing(config.checkpoint, "--teacher-checkpoint")
    labels += (("checkpoint", checkpoint.name), ("weights_sha256", sha256_file(checkpoint)))
    return TeacherSpec(name, named, architecture, preprocess, "checkpoint", labels, checkpoint=checkpoint,
                       config_file=config_file)


def is_openai_file(checkpoint: Path, state: dict[str, torch.Tensor], named: dict[str, Any] | None) -> bool:
    """Whether a checkpoint holds OpenAI's weights, to be built with QuickGELU from its own shapes.

    Yes for a TorchScript archive (OpenAI's release format) and for a state dict that still holds
    the archive's `input_resolution`; yes for any state dict given without a model name or config
    (only OpenAI's convention derives an architecture from weights). A plain state dict in
    OpenAI's layout given with a model name is built as that model: its keys are also those of
    open_clip's own CLIP checkpoints (LAION's GELU ones too), so they cannot tell the origin.
    """
    return named is None or is_torchscript_archive(checkpoint) or (
        has_openai_layout(state) and "input_resolution" in state)


def resolve_openai_file(checkpoint: Path, state: dict[str, torch.Tensor], name: str, named: dict[str, Any] | None,
                        source_name: str, labels: tuple[tuple[str, str], ...], config_file: Path | None) -> TeacherSpec:
    """Source (d): the architecture from the weights; a named model or config must equal it."""
    model_config = openai_model_config(state, checkpoint)
    architecture = resolved_architecture(model_config, str(checkpoint))
    if named is not None:
        differences = config_differences(resolved_architecture(named, source_name), architecture)
        if differences:
            matches = models_with_architecture(architecture)
            advice = f"use --teacher-model {matches[0]}, or" if matches else ""
            raise PipelineError(
                f"{checkpoint}: OpenAI weights (QuickGELU, architecture taken from the file) do not fit "
                f"{source_name} ({'; '.join(differences[:3])}); {advice} leave --teacher-model and "
                f"--teacher-config empty to take the architecture from the file"
            )
    return TeacherSpec(name, model_config, architecture, preprocess_config(architecture), "openai-file",
                       labels, checkpoint=checkpoint, config_file=config_file, openai_state=state)


def teacher_identity(config: TeacherConfig) -> str:
    """The identity of the teacher the params name, computed without building the model.

    Stage two compares it with the cache's (`identity_difference`): it holds what decides the
    outputs (see `TeacherSpec.identity`) besides the names, which are never compared.
    """
    return resolve_teacher(config).identity


# Identity fields that decide the outputs, compared (the weights' by `weights_difference`); the
# names are shown only; `open_clip` (the release) is a warning (`identity_warnings`).
CONTENT_KEYS = ("arch_kind", "arch", "preprocess", "act")
NAME_KEYS = ("model", "config", "pretrained", "checkpoint")


def parse_identity(identity: str) -> dict[str, str]:
    """'key=value key=value' -> {key: value}; a word without '=' belongs to the previous value."""
    fields: dict[str, str] = {}
    last = None
    for word in identity.split(" "):
        key, sep, value = word.partition("=")
        if sep and key:
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += " " + word
    return fields


def shown(value: str | None) -> str:
    if value is None:
        return "(none)"
    return value[:12] + "..." if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


def weights_difference(a: dict[str, str], b: dict[str, str], sides: tuple[str, str]) -> str:
    """How the weights of two identities differ ('' when they are the same bytes, or the same
    download of the same tag when one side's file is not on this machine)."""
    x, y = sides
    if "weights" in a or "weights" in b:  # random weights
        return "" if a.get("weights") == b.get("weights") else \
            f"weights: {x} {a.get('weights', 'loaded')}, {y} {b.get('weights', 'loaded')}"
    if "weights_sha256" in a and "weights_sha256" in b:
        if a["weights_sha256"] == b["weights_sha256"]:
            return ""
        return f"weights sha256: {x} {shown(a['weights_sha256'])}, {y} {shown(b['weights_sha256'])}"
    if "weights_source" in a and "weights_source" in b:
        if a["weights_source"] == b["weights_source"]:
            return ""
        return f"weights: {x} {a['weights_source']}, {y} {b['weights_source']}"

    def where(fields: dict[str, str]) -> str:
        if "weights_sha256" in fields:
            return f"sha256 {shown(fields['weights_sha256'])}"
        return f"{fields.get('weights_source', 'unknown')}, not downloaded here"

    return f"weights: {x} {where(a)}, {y} {where(b)} (cannot be compared)"


def identity_difference(cache: str, params: str, sides: tuple[str, str] = ("cache", "params")) -> str:
    """One line saying how two teacher identities differ in what decides the outputs, e.g.
    'act: cache quickgelu, params gelu; weights sha256: cache 1f2e..., params 9ab0...' ('' when
    they are the same teacher). Names are never compared; precision only when both record it.
    `sides` names the two in the message."""
    a, b = parse_identity(cache), parse_identity(params)
    keys = list(CONTENT_KEYS) + (["precision"] if "precision" in a and "precision" in b else [])
    differences = [f"{key}: {sides[0]} {shown(a.get(key))}, {sides[1]} {shown(b.get(key))}"
                   for key in keys if a.get(key) != b.get(key)]
    weights = weights_difference(a, b, sides)
    return "; ".join(differences + ([weights] if weights else []))


def identity_warnings(cache: str, params: str) -> list[str]:
    """What differs between two identities without deciding the outputs, worth a warning: the
    open_clip release (outputs can differ in rounding; the cache is used as it is)."""
    a, b = parse_identity(cache), parse_identity(params)
    if a.get("open_clip") and b.get("open_clip") and a["open_clip"] != b["open_clip"]:
        return [f"made with open_clip {a['open_clip']}, this is {b['open_clip']}: the same weights, "
                f"architecture and preprocessing, so used as it is (a new release's outputs can differ "
                f"in rounding; re-run precompute to have them from this one)"]
    return []


def content_identity(identity: str) -> str:
    """The identity without its names: what the teacher's outputs depend on, the release included."""
    return " ".join(f"{k}={v}" for k, v in sorted(parse_identity(identity).items()) if k not in NAME_KEYS)


# --- building ------------------------------------------------------------------------------


class Teacher:
    """A frozen CLIP: `encode_image` on [0, 1] pixels, `encode_text` on strings."""

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str, device: torch.device,
                 precision: str = "bf16"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.precision = precision
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        preprocess = model.visual.preprocess_cfg
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(float(v) for v in preprocess["mean"])
        self.std = tuple(float(v) for v in preprocess["std"])
        self.embed_dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection")
                             and model.text_projection is not None else model.visual.output_dim)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 views (or floats in [0, 1]) at `image_size` -> (B, D) unit-norm float32."""
        pixels = normalize_pixels(pixels.to(self.device, non_blocking=True), self._mean, self._std)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256, progress: Progress | None = None) -> torch.Tensor:
        """Strings -> (N, D) unit-norm float32 (`progress` advanced by each batch's strings)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
            if progress is not None:
                progress.update(len(tokens))
        if not chunks:
            return torch.empty(0, self.embed_dim)
        return torch.cat(chunks)


def build_openai_model(spec: TeacherSpec) -> torch.nn.Module:
    """open_clip's CLIP from an OpenAI file's tensors, in fp32 whatever the file's dtype."""
    model = CLIP(**spec.model_config)
    state = {k: v for k, v in spec.openai_state.items() if k not in OPENAI_ARCHIVE_ENTRIES}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PipelineError(
            f"{spec.checkpoint}: OpenAI-layout weights that open_clip's CLIP cannot take "
            f"({reason(err)})"
        ) from None
    set_model_preprocess_cfg(model, spec.preprocess)
    return model


def load_msclip_weights(model: MSCLIP, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """A strict load that names the first missing, unexpected and misshapen keys in one line.

    The released files list each shared tensor under both its names; both must hold the same
    values, since the model keeps one tensor for them.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                if keys]
    if problems:
        raise PipelineError(f"{path}: does not fit model {name} ({'; '.join(problems)}) (option --teacher-checkpoint)")
    for group in shared_names(model):
        if not all(torch.equal(state[group[0]], state[other]) for other in group[1:]):
            raise PipelineError(f"{path}: {group[0]} and {group[1]} differ, but {name} shares one tensor "
                                f"between them; not an MS-CLIP-S checkpoint (option --teacher-checkpoint)")
    model.load_state_dict(state, strict=True)


def build_msclip_model(spec: TeacherSpec, allow_random: bool) -> tuple[torch.nn.Module, object]:
    """MS-CLIP (fp32, on CPU) and open_clip's CLIP tokenizer at its context length."""
    msclip_config = MSCLIPConfig.from_dict(spec.model_config, spec.name)
    if spec.source != "checkpoint" and not allow_random:
        raise PipelineError(f"teacher {spec.name}: no weights given; set --teacher-checkpoint FILE "
                            f"(MS-CLIP has no download tags)")
    model = MSCLIP(msclip_config)
    if spec.source == "checkpoint":
        load_msclip_weights(model, read_state_dict(spec.checkpoint), spec.checkpoint, spec.name)
    set_model_preprocess_cfg(model, spec.preprocess)
    return model, open_clip.SimpleTokenizer(context_length=msclip_config.context_length)


def build_model(config: TeacherConfig, allow_random: bool = False,
                spec: TeacherSpec | None = None) -> tuple[torch.nn.Module, object]:
    """The model (open_clip's CLIP, or MS-CLIP) and tokenizer for a teacher config (weights
    loaded, fp32, on CPU)."""
    spec = spec or resolve_teacher(config)
    if spec.arch_kind == MSCLIP_KIND:
        return build_msclip_model(spec, allow_random)
    if spec.config_file:
        open_clip.add_model_config(spec.config_file)  # registers the architecture under the file's stem
        open_clip.factory._MODEL_CONFIGS.get(spec.name, {}).pop("arch", None)  # ours, not a CLIP argument
    if spec.source == "openai-file":
        log.info("%s: OpenAI weights, built with QuickGELU (%s)", spec.checkpoint,
                 "TorchScript archive" if is_torchscript_archive(spec.checkpoint) else "state dict")
        model = build_openai_model(spec)
        tokenizer = open_clip.SimpleTokenizer(context_length=spec.model_config["text_cfg"]["context_length"])
        return model, tokenizer
    tokenizer = open_clip.get_tokenizer(spec.name)
    # force_quick_gelu sets True; the keyword sets False; either way the spec decides, not the release.
    activation = {"force_quick_gelu": spec.quick_gelu, "quick_gelu": spec.quick_gelu}
    if spec.source == "checkpoint":
        try:
            model = open_clip.create_model(spec.name, pretrained=str(spec.checkpoint), device="cpu", **activation)
        except RuntimeError as err:
            raise PipelineError(
                f"{spec.checkpoint}: does not fit model {spec.name} ({reason(err)})"
            ) from None
    elif spec.source == "tag":  # the tag's file, found in (or fetched into) open_clip's download cache
        spec = fetch_tag_weights(spec)
        try:
            model = open_clip.create_model(spec.name, pretrained=str(spec.checkpoint), device="cpu", **activation)
        except RuntimeError as err:
            raise PipelineError(f"{spec.checkpoint}: does not fit model {spec.name} "
                                f"({reason(err)}) (--teacher-pretrained {dict(spec.labels)['pretrained']})"
                                ) from None
        set_model_preprocess_cfg(model, spec.preprocess)  # a file carries no preprocessing; the tag's
    elif not allow_random:
        raise PipelineError(
            f"teacher {spec.name}: no weights given; set --teacher-pretrained or --teacher-checkpoint"
        )
    else:
        model = open_clip.create_model(spec.name, device="cpu", **activation)
    built = model.visual.preprocess_cfg
    assert [list(map(float, built[k])) for k in ("mean", "std")] == [spec.preprocess[k] for k in ("mean", "std")], \
        "the resolved preprocessing (in the identity) differs from open_clip's"
    return model, tokenizer


def load_teacher(config: TeacherConfig, device: str = "auto", allow_random: bool = False,
                 precision: str = "bf16") -> Teacher:
    """Build the frozen teacher of `config` on `device` ('auto': cuda when available)."""
    target = resolve_device(device)
    spec = resolve_teacher(config)
    if spec.source == "tag":
        spec = fetch_tag_weights(spec)  # before building: the identity records the downloaded file's sha256
    model, tokenizer = build_model(config, allow_random=allow_random, spec=spec)
    identity = spec.identity if spec.source != "random" else f"{spec.identity} weights=random"
    identity += f" precision={effective_precision(target, precision)}"
    teacher = Teacher(model, tokenizer, identity, target, precision)
    log.info("teacher %s: image %dpx, embedding %d, on %s", identity, teacher.image_size,
             teacher.embed_dim, target)
    return teacher
