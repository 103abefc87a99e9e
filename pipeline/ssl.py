"""Vision-only self-supervised baselines of the probe table: SimCLR and BYOL, with lightly's
losses, heads and momentum utilities (`lightly` on PyPI), trained by the same loop as distill.

What BeamCLIP's headline claim compares the CSM student with: a backbone that learned from
the same unlabelled images, without the teacher. To make the comparison a matter of the
objective only, a baseline here trains the student's backbone (same architecture, resolution,
optimiser, schedule, batch of images, epochs: the same images seen the same number of times)
on two views of every image per step, the views the cache stores for the teacher (replayed
like distill's: crops and flips, so no view is one the student could not have seen). A step
therefore runs the backbone on twice the images of a distill step.

- SimCLR (Chen et al. 2020): `SimCLRProjectionHead` (Linear-BN-ReLU-Linear-BN) and
  `NTXentLoss` between the two views of each image, the batch's other views the negatives.
- BYOL (Grill et al. 2020): `BYOLProjectionHead` and `BYOLPredictionHead` on the online
  network, a momentum copy of backbone and projection as the target (`update_momentum`, the
  momentum raised from `momentum` to 1 on lightly's `cosine_schedule`), and the symmetric
  `NegativeCosineSimilarity` of prediction and target.

The checkpoint a baseline writes is a Student (backbone + projection head, the head named
`simclr` or `byol`): probe loads it like the supervised reference and probes its backbone.
The training-time extras (BYOL's predictor and momentum copy) live only in the run directory.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.student import Student, build_student

METHODS = ("simclr", "byol")


def lightly_modules():
    """lightly's modules, imported on first use (an optional dependency: the `ssl` extra)."""
    try:
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules import BYOLPredictionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.scheduler import cosine_schedule
    except ImportError as err:
        raise PipelineError(f"the SSL baselines need lightly ({err}); pip install -e '.[ssl]'") from None
    return {"NTXentLoss": NTXentLoss, "NegativeCosineSimilarity": NegativeCosineSimilarity,
            "BYOLPredictionHead": BYOLPredictionHead, "deactivate_requires_grad": deactivate_requires_grad,
            "update_momentum": update_momentum, "cosine_schedule": cosine_schedule}


class SelfSupervised(nn.Module):
    """What an SSL run trains: the Student (backbone + the method's projection head) and, for
    BYOL, the predictor and the momentum target (backbone + projection, no gradients).

    `forward` takes both views of a batch stacked ([first views; second views]) and returns
    SimCLR's projections, or BYOL's predictions and targets side by side (columns).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.method = spec["head"]
        if self.method not in METHODS:
            raise PipelineError(f"SSL method {self.method}: expected one of {', '.join(METHODS)}")
        self.student = build_student(spec)
        if self.method == "byol":
            lightly = lightly_modules()
            dim = int(spec["out_dim"])
            self.prediction = lightly["BYOLPredictionHead"](dim, int(spec["head_hidden"]), dim)
            self.target = copy.deepcopy(self.student)
            lightly["deactivate_requires_grad"](self.target)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        projected = self.student(pixels)
        if self.method == "simclr":
            return projected
        with torch.no_grad():
            target = self.target(pixels)
        return torch.cat([self.prediction(projected), target.detach()], dim=1)

    def after_step(self, step: int, total_steps: int, start_momentum: float) -> None:
        """BYOL: the target moves toward the online network, momentum `start_momentum` -> 1."""
        if self.method == "byol":
            lightly = lightly_modules()
            momentum = lightly["cosine_schedule"](step, total_steps, start_momentum, 1.0)
            lightly["update_momentum"](self.student, self.target, momentum)


def halves(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second views' rows of a stacked batch's output."""
    n = output.shape[0] // 2
    return output[:n], output[n:]


def simclr_loss(temperature: float):
    """NT-Xent between the two views of each image, and the share of views whose most similar
    other view (of the 2B - 1) is their partner (`pair_top1`)."""
    criterion = lightly_modules()["NTXentLoss"](temperature=temperature)

    def loss(output: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        first, second = halves(output)
        with torch.no_grad():
            z = nn.functional.normalize(output.detach(), dim=1)
            similarity = z @ z.T
            similarity.fill_diagonal_(-2.0)
            n = first.shape[0]
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(output.device)
            pair_top1 = (similarity.argmax(dim=1) == partner).float().mean()
        return {"loss": criterion(first, second), "pair_top1": pair_top1}

    return loss


def byol_loss():
    """The symmetric negative cosine similarity of each view's prediction and the other view's
    target, and the mean cosine itself (`cosine`, 1 at a perfect match)."""
    criterion = lightly_modules()["NegativeCosineSimilarity"]()

    def loss(output: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        first, second = halves(output)
        dim = output.shape[1] // 2
        (p1, z1), (p2, z2) = (first[:, :dim], first[:, dim:]), (second[:, :dim], second[:, dim:])
        value = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
        return {"loss": value, "cosine": -value.detach()}

    return loss


def student_of(model: nn.Module) -> Student:
    """The Student inside an SSL training module (what the baseline's checkpoint holds)."""
    return model.student if isinstance(model, SelfSupervised) else model
