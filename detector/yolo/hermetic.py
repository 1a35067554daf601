"""Ultralytics patched for the hermetic runtime: its AMP self-check without the weights download."""

from __future__ import annotations

import re

import torch
from ultralytics.engine import trainer as _ul_trainer
from ultralytics.utils import LOGGER


# GPUs Ultralytics' own AMP check rejects by name (its check_amp, 8.4).
_AMP_BAD_GPUS = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.I)


def offline_check_amp(model) -> bool:
    """Ultralytics' AMP check without its yolo26n.pt download: same GPU blocklist, no weights needed."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    ok = not _AMP_BAD_GPUS.search(torch.cuda.get_device_name(device))
    LOGGER.info(f"AMP: offline check {'passed' if ok else 'failed, AMP disabled'} (no download)")
    return ok


_ul_trainer.check_amp = offline_check_amp  # the trainer calls it by this module-level name
