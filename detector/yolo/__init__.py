"""The Ultralytics adapter: the only package that imports ultralytics.

Importing it prepares the hermetic runtime first (offline, private settings,
local font; see detector.runtime) and replaces Ultralytics' AMP self-check, whose
original downloads weights. Modules:

- hermetic: Ultralytics patched for offline use (its AMP check without the download) and
  read-only datasets (label caches go to the tool's folder); imported here, first
- checks: model specs, training keys, versions, device facts
- recording: the recording trainer, train/resume, out-of-memory as a typed error
- callbacks: what the trainer's callbacks copy into the record (iterations, epochs, run state)
- gradstats: the gradient noise scale measured during training (feeds detector.gradnoise)
- checkpoints: last.pt/best.pt written atomically, read defensively
- final: the final validation of best.pt on its own, for a resume after the last epoch
- probe: measured GPU memory per candidate batch (CUDA only)
- memory: predicted GPU memory without a GPU, built on three modules:
  fakerun (the trainer's steps on fake tensors), tracking (storage counting, emulated
  CUDA autocast, planned data-dependent answers) and allocator (PyTorch's caching
  allocator replayed, pure Python)
- loader: Albumentations steps and the training loader (fast or Ultralytics'), as the trainer builds it
- fastload/: detector's training loader, Ultralytics' augmentation at a lower cost
  (geometry, pipeline, dataset)
- inference: load, export, raw forward passes and predict
- validate: Ultralytics' validation of a .pt on a dataset (`detector val`)
"""

from detector import runtime

runtime.prepare()  # before ultralytics is imported: offline, private settings, local font

from detector.yolo import hermetic  # noqa: E402,F401  (patches Ultralytics on import)
