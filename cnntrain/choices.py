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
#: ``--aug-preset``: values of the augmentation options (``transforms.Augment``) that suit a kind of
#: data. Options given beside a preset, or in a recipe, override its values one by one.
AUG_PRESETS: dict[str, dict[str, float | tuple[float, float]]] = {
    # photos of things (flowers, pets, food): a mirror is the same class, objects fill the frame
    "photo": {"hflip": 0.5, "vflip": 0.0, "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "rotate": 0.0,
              "color_jitter": 0.0},
    # digits, letters, documents, arrows, road signs: a mirror is another class; keep most of the image
    "no-mirror": {"hflip": 0.0, "vflip": 0.0, "crop_scale": (0.6, 1.0), "crop_ratio": (0.9, 1.1), "rotate": 10.0,
                  "color_jitter": 0.2},
    # fine-tuning on very few images: gentle changes that keep the object whole
    "light": {"hflip": 0.5, "vflip": 0.0, "crop_scale": (0.5, 1.0), "crop_ratio": (0.9, 1.1), "rotate": 0.0,
              "color_jitter": 0.1},
}
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
#: ``cnntrain models --source``: whose architectures to list (timm needs ``cnntrain[timm]``).
MODEL_SOURCES = ("torchvision", "cnntrain", "timm")
LR_FIND_FORMATS = ("table", "json")
EXPLAIN_FORMATS = ("text", "json")
CHECK_DATA_FORMATS = ("table", "json")
EVAL_SPLITS = ("val", "train", "all")
