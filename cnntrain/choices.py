"""Every fixed set of values an option accepts, in one place.

Config validation, the transforms, the caches, the commands' ``--format`` checks and the CLI's
help texts all read these tuples, so a new choice is added once and every message and help
line lists it. This module imports nothing, so the CLI can use it without loading torch.
"""

from __future__ import annotations

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("step", "multistep", "cosine", "none")
#: Extra training augmentations (``--aug``); ``none`` alone means no random augmentation at all.
AUGMENTATIONS = ("trivialaugment", "randaugment", "erasing", "none")
#: Decoded-image cache (``--cache``); see cnntrain.data.imagecache.
CACHE_MODES = ("auto", "ram", "disk", "none")
LR_SCALES = ("none", "linear")
#: How training draws its images each epoch (``--sampler``): every image once, or classes equally often.
SAMPLERS = ("shuffle", "balanced")
#: ``--class-weights`` besides a YAML/JSON file of class name -> weight.
CLASS_WEIGHT_MODES = ("none", "auto")

EXPORT_FORMATS = ("onnx", "torchscript")
#: ``--format`` of the commands that print results.
PREDICT_FORMATS = ("table", "json", "csv")
EVAL_FORMATS = ("table", "json", "csv")
BENCH_FORMATS = ("table", "json", "csv")
MODELS_FORMATS = ("table", "json", "csv")
LR_FIND_FORMATS = ("table", "json")
EVAL_SPLITS = ("val", "train", "all")
