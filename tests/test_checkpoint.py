"""Checkpoint files: no pickle, half-written checkpoints ignored, truncated state files give clear errors."""

import json

import pytest
import torch

from vla_energy.losses.bank import ActionBank
from vla_energy.training.checkpoints import (
    COMPLETE_MARKER,
    TrainState,
    latest_checkpoint,
    load_states,
    resolve_resume,
    save_states,
)


def _bank() -> ActionBank:
    bank = ActionBank(4, 2, 3)
    bank.stage(torch.randn(3, 2, 3), sample_ids=torch.tensor([1, 2, 3]))
    bank.commit()
    return bank


def test_states_roundtrip_without_pickle(tmp_path):
    bank, state = _bank(), TrainState(step=7, micro_step=14, skipped_steps=1, history=[{"step": 7, "loss": 0.5}])
    save_states(tmp_path, {"bank": bank, "train_state": state})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bank.json", "bank.safetensors", "train_state.json", "train_state.safetensors"]
    restored, restored_state = ActionBank(4, 2, 3), TrainState()
    load_states(tmp_path, {"bank": restored, "train_state": restored_state})
    assert all(torch.equal(a, b) for a, b in zip(restored.entries(), bank.entries()))
    assert restored_state == state


def test_truncated_state_file_is_a_clear_error(tmp_path):
    save_states(tmp_path, {"bank": _bank()})
    data = (tmp_path / "bank.safetensors").read_bytes()
    (tmp_path / "bank.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="bank.safetensors .* is corrupted"):
        load_states(tmp_path, {"bank": ActionBank(4, 2, 3)})
    with pytest.raises(FileNotFoundError, match="has no train_state.safetensors"):
        load_states(tmp_path, {"train_state": TrainState()})


def test_latest_skips_half_written_and_resume_refuses_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / f"step_{step:07d}"
        d.mkdir(parents=True)
        if complete:
            (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (root / "step_0000008.tmp").mkdir()  # a save killed before its rename
    assert latest_checkpoint(root).name == "step_0000004"
    assert resolve_resume("latest", tmp_path).name == "step_0000004"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(root / "step_0000006"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path / "elsewhere")
