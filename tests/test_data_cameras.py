"""Two cameras through real-format tiny checkpoints: one image placeholder per camera, readout works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.readout import backbone_inputs, read_backbone
from vla_energy.backbones.tiny import build_tiny_checkpoint
from vla_energy.data import VLACollator
from vla_energy.testing.lerobot_datasets import TASKS, frame_rgb

# Image tokens per 32 x 32 image (see tests/test_real_format_backbones.py).
IMAGE_TOKENS = {"idefics3": 4, "paligemma": 16, "llava": 16}
H = 3


def _examples(cameras: int) -> list[dict]:
    return [{"image": [frame_rgb(i, c, size=32, camera=c) + 1 for c in range(cameras)], "instruction": TASKS[i],
             "actions": np.zeros((H, 2), np.float32), "sample_id": i, "episode_index": i} for i in range(2)]


@pytest.mark.parametrize("family", sorted(IMAGE_TOKENS))
def test_two_cameras_give_two_image_placeholders_and_a_readout(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_backbone(str(build_tiny_checkpoint(family, tmp_path / family)))
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token)
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<image>")
    counts = {}
    for cameras in (1, 2):
        batch = collator(_examples(cameras))
        counts[cameras] = (batch["input_ids"] == image_id).sum(1).tolist()
        with torch.no_grad():
            out = loaded.model(**backbone_inputs(batch), output_hidden_states=True)
        readout = read_backbone(out.hidden_states, batch["input_ids"], batch.get("attention_mask"),
                                loaded.action_token_id, H)
        assert readout.action_hidden.shape[1:3] == (2, H) and torch.isfinite(readout.context).all()
    assert counts == {1: [IMAGE_TOKENS[family]] * 2, 2: [2 * IMAGE_TOKENS[family]] * 2}
