"""Fakes for what this machine lacks, injected from the tests only: a GPU that runs out of memory.

`small_gpu(monkeypatch, above=8, ...)` makes the recording trainer's training
passes over more than `above` images, and its validation passes over more than
`val_above` (default: above), raise PyTorch's real out-of-memory error, from a
chosen epoch and iteration on; the probe's steps fail the same way. The seams are
the trainer's own methods (preprocess_batch, validate) and the probe model's
steps, patched for one test, as Lightning's FailsAtBatchSizeBoringModel does.
"""

from __future__ import annotations

import torch

# What PyTorch 2.x raises when its caching allocator cannot serve a request on a full GPU.
REAL_OOM_TEXT = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 15.77 GiB of which "
                 "1.06 MiB is free. Including non-PyTorch memory, this process has 15.76 GiB memory in use. Of the "
                 "allocated memory 14.90 GiB is allocated by PyTorch, and 101.23 MiB is reserved by PyTorch but "
                 "unallocated. If reserved but unallocated memory is large try setting "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
                 "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")
AFTER_LAST_ITERATION = 10**9  # an epoch's validation pass comes after all of its iterations


def small_gpu(monkeypatch, above: int, val_above: int | None = None, epoch: int | None = None,
              iteration: int = 1) -> None:
    """Act as a GPU too small for more than `above` images per pass, from (epoch, iteration) on."""
    from detector.yolo import probe, recording

    limit_val = above if val_above is None else val_above

    def check(images: int, at_epoch: int | None, at_iteration: int | None, validation: bool = False) -> None:
        if images <= (limit_val if validation else above):
            return
        if epoch is not None and (at_epoch is None or (at_epoch, at_iteration or 1) < (epoch, iteration)):
            return
        raise torch.OutOfMemoryError(REAL_OOM_TEXT)

    cls = recording.RecordingTrainer
    parent = cls.__mro__[1]  # Ultralytics' DetectionTrainer: its validate runs after the record marks the phase
    preprocess, validate = cls.preprocess_batch, parent.validate

    def preprocess_batch(self, batch):
        batch = preprocess(self, batch)
        check(int(batch["img"].shape[0]), self.epoch + 1, self.progress.epoch_rows + 1)
        return batch

    def validate_(self):
        check(2 * self.batch_size, self.epoch + 1, AFTER_LAST_ITERATION, validation=True)
        return validate(self)

    monkeypatch.setattr(cls, "preprocess_batch", preprocess_batch)
    monkeypatch.setattr(parent, "validate", validate_)

    steps, val = probe._ProbeModel.train_steps, probe._ProbeModel.validate

    def train_steps(self, n, *a, **k):
        check(n, None, None)
        return steps(self, n, *a, **k)

    def probe_validate(self, n, *a, **k):
        check(n, None, None, validation=True)
        return val(self, n, *a, **k)

    monkeypatch.setattr(probe._ProbeModel, "train_steps", train_steps)
    monkeypatch.setattr(probe._ProbeModel, "validate", probe_validate)
