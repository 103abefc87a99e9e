"""csm-distill: distil a CLIP ViT into a small image model by cross-modal similarity matching.

`pipeline` is the library (teacher loading, CPA prompts, views, the HDF5 cache, the student,
losses, shard reading/writing, the demo world); `stages` composes it into the pipeline stages.
"""

__version__ = "0.1.0"
