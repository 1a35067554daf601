"""The Ultralytics adapter: the only package that imports ultralytics.

Importing it prepares the hermetic runtime first (offline, private settings,
local font; see detector.runtime) and replaces Ultralytics' AMP self-check, whose
original downloads weights. Modules:

- checks: model specs, training keys, versions, device facts
- trainer: the recording trainer, train/resume, out-of-memory as a typed error
- callbacks: what the trainer's callbacks copy into the record (iterations, epochs, run state)
- probe: measured GPU memory per candidate batch (CUDA only)
- memory: predicted GPU memory without a GPU (fakerun: the trainer's steps on fake tensors;
  tracking: storage counting, emulated CUDA autocast, planned data-dependent answers;
  allocator: PyTorch's caching allocator replayed, pure Python)
- loader: Albumentations steps and Ultralytics' training loader
- fastload: detector's training loader, Ultralytics' augmentation at a lower cost (issue 16)
- inference: load, export, raw forward passes and predict
"""

from detector import runtime

runtime.prepare()  # before ultralytics is imported: offline, private settings, local font

from detector.yolo import hermetic  # noqa: E402,F401  (patches Ultralytics on import)
