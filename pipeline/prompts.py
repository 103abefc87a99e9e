"""Prompt sets, context-based prompt augmentation (CPA) and the CSM anchors.

- `plain`: every template x every class name ("a photo of a {name}.").
- `cpa`: every CPA template x every context of the class ("a photo of a {name}, a type of
  {context}."): the context disambiguates names that mean several things (the bird and
  the machine called "crane") and, for the demo world, spreads each class over its
  nuisance attributes. A class without contexts falls back to the plain templates.
- Anchors: `class` mode gives one anchor per class, the mean of its prompt embeddings
  re-normalised; `prompt` mode keeps every prompt as its own anchor.
The digest of a prompt set (strings, their classes, the anchor mode) is recorded in the cache
and checked by stage two, beside the teacher's identity.

Encoding a prompt set is the one slow step before precompute's first view (ImageNet's CPA set
is tens of thousands of prompts: most of an hour on a CPU): `encode_prompts` shows its
progress and keeps the embeddings in a store beside the cache (`prompt-embeddings/`), keyed by
the teacher's content identity and the strings, so a second run with the same teacher and
prompts reads them back instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import atomic
from pipeline.config import PromptsConfig
from pipeline.errors import PipelineError, reason
from pipeline.progress import Progress
from pipeline.shards import ClassInfo
from pipeline.teacher import content_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    prompt_classes: tuple[int, ...]  # class index of every prompt
    num_classes: int
    anchors: str  # "class" or "prompt"

    @property
    def num_anchors(self) -> int:
        return self.num_classes if self.anchors == "class" else len(self.prompts)

    def anchor_classes(self) -> torch.Tensor:
        """The class of every anchor (K,)."""
        if self.anchors == "class":
            return torch.arange(self.num_classes)
        return torch.tensor(self.prompt_classes)


def read_templates(path: str | Path, fields: Sequence[str], option: str) -> list[str]:
    """Templates from a file, one per line ('#' comments and blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: template file not found (option {option})")
    templates = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for name in fields:
            if "{" + name + "}" not in line:
                raise PipelineError(f"{path}:{number}: template lacks {{{name}}}: {line!r}")
        try:
            line.format(**{name: "x" for name in fields})
        except (KeyError, IndexError, ValueError) as err:
            raise PipelineError(f"{path}:{number}: bad template {line!r} ({err})") from None
        templates.append(line)
    if not templates:
        raise PipelineError(f"{path}: no templates in file (option {option})")
    return templates


def build_prompt_set(classes: Sequence[ClassInfo], config: PromptsConfig) -> PromptSet:
    """All prompt strings of the configured set, grouped by class in class order."""
    plain = read_templates(config.plain_templates, ["name"], "--prompts-plain-templates")
    cpa = (read_templates(config.cpa_templates, ["name", "context"], "--prompts-cpa-templates")
           if config.set == "cpa" else [])
    prompts: list[str] = []
    prompt_classes: list[int] = []
    for cls in classes:
        if config.set == "cpa" and cls.contexts:
            strings = [t.format(name=cls.name, context=c) for c in cls.contexts for t in cpa]
        else:
            strings = [t.format(name=cls.name) for t in plain]
        prompts.extend(strings)
        prompt_classes.extend([cls.index] * len(strings))
    return PromptSet(tuple(prompts), tuple(prompt_classes), len(classes), config.anchors)


def prompt_set_digest(prompt_set: PromptSet) -> str:
    """sha256 over the prompt strings, their classes and the anchor mode. The teacher is checked
    on its own (`TeacherCache.require`), by content, so that a renamed weights file still fits."""
    payload = json.dumps(
        {"prompts": prompt_set.prompts, "classes": prompt_set.prompt_classes, "anchors": prompt_set.anchors},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


STORE_DIR = "prompt-embeddings"


def prompt_store(cache_path: str | Path) -> Path:
    """The directory beside a cache file where encoded prompt sets are kept."""
    return Path(cache_path).parent / STORE_DIR


def encode_prompts(teacher, prompts: Sequence[str], store: Path | None, what: str = "prompts") -> torch.Tensor:
    """The teacher's (P, D) unit-norm text embeddings of `prompts`, on the CPU.

    Read from `store` when an earlier run encoded the same strings with the same teacher
    (`teacher.content_identity`: weights, architecture, preprocessing, precision, open_clip release);
    otherwise encoded with a progress bar (or periodic log lines) and saved there atomically.
    """
    prompts = list(prompts)
    key = hashlib.sha256(json.dumps([content_identity(teacher.identity), prompts],
                                    ensure_ascii=False).encode()).hexdigest()[:24]
    path = store / f"{key}.npy" if store is not None else None
    if path is not None and path.is_file():
        started = time.perf_counter()
        try:
            embeddings = np.load(path)
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); encoding the prompts again", path, err)
        else:
            if embeddings.shape[0] == len(prompts):
                log.info("%s: %d prompt embeddings read from %s in %.2f s (same teacher and strings)", what,
                         len(prompts), path, time.perf_counter() - started)
                return torch.from_numpy(embeddings)
    log.info("%s: encoding %d prompts with the teacher", what, len(prompts))
    with Progress(len(prompts), what, "prompt") as progress:
        embeddings = teacher.encode_text(prompts, progress=progress).cpu()
    if path is not None:
        keep(path, embeddings)
    return embeddings


def keep(path: Path, embeddings: torch.Tensor) -> None:
    """Save encoded prompts in the store (atomically); a store that cannot be written (a full disk)
    only costs the next run the encoding: a warning, not a failure of the stage."""
    buffer = io.BytesIO()
    np.save(buffer, embeddings.numpy().astype(np.float32))
    try:
        atomic.write_bytes(path, buffer.getbuffer())
    except (OSError, PipelineError) as err:
        log.warning("%s: prompt embeddings not kept (%s); the next run encodes them again", path, reason(err))


def class_anchors(encode_text, classes: Sequence[ClassInfo], config: PromptsConfig, prompt_set: str) -> torch.Tensor:
    """Per-class anchors (C, D) of `prompt_set` ("plain" or "cpa") with a text encoder.

    The zero-shot classifier of a teacher for either prompt set, whatever set a cache holds.
    """
    prompts = build_prompt_set(classes, replace(config, set=prompt_set, anchors="class"))
    embeddings = encode_text(list(prompts.prompts))
    return anchor_embeddings(embeddings, torch.tensor(prompts.prompt_classes), prompts.num_classes,
                             "class")


def anchor_embeddings(
    prompt_embeddings: torch.Tensor, prompt_classes: torch.Tensor, num_classes: int, mode: str
) -> torch.Tensor:
    """The CSM anchors (K, D), unit norm.

    class: anchor k = normalise(mean of the unit-norm embeddings of class k's prompts);
    prompt: every prompt embedding is an anchor.
    """
    prompt_embeddings = F.normalize(prompt_embeddings.float(), dim=-1)
    if mode == "prompt":
        return prompt_embeddings
    sums = torch.zeros(num_classes, prompt_embeddings.shape[1])
    sums.index_add_(0, prompt_classes.long(), prompt_embeddings)
    counts = torch.bincount(prompt_classes.long(), minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()[:5]
        raise PipelineError(f"prompt set: class(es) {missing} have no prompts")
    return F.normalize(sums / counts[:, None], dim=-1)
