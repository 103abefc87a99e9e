"""The student as a small CLIP: its image embedding with the teacher's text tower.

The student is trained into the teacher's embedding space, so with the teacher's text tower it
classifies any set of class names and retrieves images by text, as CLIP does. `SmallCLIP` has
the interface CLIP evaluation code expects (open_clip's, CLIP_benchmark's): `encode_image`
on preprocessed image batches, `encode_text` on token ids, a `tokenizer` and a `preprocess`
transform; it works for every teacher the project builds (open_clip models and MS-CLIP).

    clip = SmallCLIP.from_files("data/models/student.pt", teacher_config)
    images = torch.stack([clip.preprocess(Image.open(p)) for p in paths])
    image = clip.encode_image(images, normalize=True)
    text = clip.encode_text(clip.tokenizer(["a photo of a crane, a kind of bird"]), normalize=True)
    probabilities = (100 * image @ text.T).softmax(dim=-1)

`SmallCLIP.from_teacher` wraps the teacher's own image tower the same way, so evaluation code
runs both models through one interface. Everything runs in float32 (no autocast), so the
figures do not depend on the machine's bf16 support.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import TeacherConfig
from pipeline.student import Student, load_student
from pipeline.teacher import Teacher, load_teacher
from pipeline.views import eval_view, normalize_pixels


class EvalView:
    """PIL image -> (3, S, S) float32 in [0, 1]: the evaluation view (`eval_view`: shorter side
    resized bicubic, centre crop), what probe and predict give the student. The model normalises."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).contiguous()
        return eval_view(pixels, self.size).float() / 255

    def __repr__(self) -> str:
        return f"EvalView(size={self.size})"


class SmallCLIP(torch.nn.Module):
    """An image encoder (the student, or the teacher's image tower) with the teacher's text tower."""

    def __init__(self, image_encoder: torch.nn.Module, image_size: int, teacher: Teacher) -> None:
        super().__init__()
        self.image_encoder = image_encoder.eval()
        self.image_size = image_size
        self.text_model = teacher.model.eval()
        self.tokenizer = teacher.tokenizer
        self.preprocess = EvalView(image_size)
        self.embed_dim = teacher.embed_dim

    @classmethod
    def from_files(cls, student: str | Path, teacher: TeacherConfig, device: str = "cpu") -> SmallCLIP:
        """The student checkpoint `student` with the teacher of `teacher` (its text tower)."""
        model, checkpoint = load_student(student)
        return cls(model, int(checkpoint["image_size"]), load_teacher(teacher, device, precision="fp32")).to(device)

    @classmethod
    def from_teacher(cls, teacher: Teacher) -> SmallCLIP:
        """The teacher itself through the same interface (its image tower at its resolution)."""
        return cls(TeacherImageTower(teacher), teacher.image_size, teacher)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] or uint8 (as `preprocess` gives) -> (B, D) float32 embeddings
        (the student's are unit-norm whatever `normalize` says: it is trained on the sphere)."""
        features = self.image_encoder(images).float()
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (the `tokenizer`'s) -> (N, D) float32 teacher text embeddings."""
        features = self.text_model.encode_text(tokens.to(self.device)).float()
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True)


class TeacherImageTower(torch.nn.Module):
    """The teacher's image tower on [0, 1] pixels (its own mean and std), float32."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.model = teacher.model
        self.register_buffer("mean", torch.tensor(teacher.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(teacher.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(normalize_pixels(pixels.to(self.mean.device), self.mean, self.std))


def describe(model: SmallCLIP) -> dict[str, Any]:
    """Sizes worth printing: parameters of the image encoder and of the text tower."""
    return {"image_parameters": sum(p.numel() for p in model.image_encoder.parameters()),
            "image_size": model.image_size, "embed_dim": model.embed_dim,
            "student": isinstance(model.image_encoder, Student)}
