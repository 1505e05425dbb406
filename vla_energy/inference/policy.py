"""EnergyPolicy: a saved policy (backbone, adapter, heads, normalization) that predicts action chunks.

Control API in LeRobot's style: `reset()`, `select_action(observation)` (one action per call from a queue filled
with a chunk) and `predict_action_chunk(observation, mode=...)`, observations keyed as in LeRobot datasets
(`observation.images.<camera>`, `observation.state`, `task`).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from vla_energy.backbones.readout import BackboneReadout
from vla_energy.inference.candidates import CANDIDATE_SOURCES, context_key, make_candidates
from vla_energy.inference.cuda_graphs import GraphedRefine
from vla_energy.inference.rerank import (
    PREDICT_MODES,
    REFINE_STEP_SIZES,
    Bound,
    energy_weighted_mean,
    refine,
    relative_energy,
    rerank,
)
from vla_energy.losses.perturbation import pin_constant_dims

__all__ = ["EnergyPolicy", "candidate_bounds", "REFERENCE_CHUNKS"]

# How many training chunks (a fixed draw from retrieval_chunks) the relative energy is measured against.
REFERENCE_CHUNKS = 64


def candidate_bounds(norm_stats: Any) -> tuple[Bound, Bound]:
    """Bounds of candidate chunks in normalized units (`NormStats.normalized_bounds`); no bound without statistics."""
    return (None, None) if norm_stats is None else norm_stats.normalized_bounds()


def _as_pil_list(value: Any, key: str) -> tuple[list[Any], bool]:
    """Images of one camera -> (list of RGB PIL images, whether it was a single unbatched image).

    Accepts PIL images, uint8 or float (in [0, 1]) arrays / tensors laid out HWC or CHW, batched ([B, ...]) or not,
    and lists of those."""
    from PIL import Image

    from vla_energy.data import to_pil_image

    if isinstance(value, Image.Image):
        return [to_pil_image(value, key)], True
    if isinstance(value, (list, tuple)):
        return [_as_pil_list(v, f"{key}[{i}]")[0][0] for i, v in enumerate(value)], False
    arr = value.detach().cpu().float().numpy() if isinstance(value, Tensor) and value.is_floating_point() else (
        value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value))
    if arr.ndim not in (3, 4):
        raise ValueError(f"{key} has shape {arr.shape}, expected an image (H, W, C) / (C, H, W) or a batch of them")
    single = arr.ndim == 3
    frames = arr[None] if single else arr
    if frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):  # CHW (LeRobot's float tensors)
        frames = frames.transpose(0, 2, 3, 1)
    return [to_pil_image(f, key) for f in frames], single


class EnergyPolicy:
    """A saved policy (backbone + adapter, action head, energy head, normalization) that predicts action chunks."""

    def __init__(self, loaded: Any, device: str | torch.device = "cpu", n_action_steps: Optional[int] = None,
                 cuda_graphs: bool = False) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={device!r}")
        # refine from CUDA graphs: the same result, without launching its many small kernels one by one.
        self._refine = GraphedRefine() if cuda_graphs else refine
        horizon = loaded.plugin.horizon
        # The prompt, processor options and camera layout of training.
        self.collator = loaded.collator()
        inputs = loaded.inputs()
        self.camera_layout = inputs.get("camera_layout") or "tile"
        # The cameras the policy was trained on, in their order (None: one unnamed image column).
        self.cameras = inputs.get("cameras")
        self.n_action_steps = horizon if n_action_steps is None else int(n_action_steps)
        if not 1 <= self.n_action_steps <= horizon:
            raise ValueError(f"n_action_steps={n_action_steps}, expected 1..horizon={horizon}")
        self._queue: deque[Tensor] = deque()
        self._reference_chunks: Optional[Tensor] = None

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False, dtype: str | torch.dtype | None = None,
                        revision: Optional[str] = None, n_action_steps: Optional[int] = None,
                        cuda_graphs: bool = False) -> EnergyPolicy:
        """Load a policy: a run directory, its model/, a checkpoint directory, or a hub repo id (snapshot_download;
        offline it comes from the hub cache), in `dtype` (default: its training dtype) on `device`; cuda_graphs:
        mode="refine" replays CUDA graphs (captured on the first call of each input shape)."""
        from vla_energy.modeling.serialization import load_policy

        loaded = load_policy(path_or_repo, device=device, trust_remote_code=trust_remote_code, dtype=dtype,
                             revision=revision)
        return cls(loaded, device, n_action_steps, cuda_graphs)

    @property
    def plugin(self):
        return self.loaded.plugin

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the heads (and backbone) as loaded."""
        return next(self.plugin.action_head.parameters()).dtype

    @property
    def uses_state(self) -> bool:
        """Whether the policy was trained with the proprioceptive state (it has a state projector)."""
        return self.plugin.state_projector is not None

    def normalize_state(self, state: Any) -> Tensor:
        """Raw states [B, Ds] -> float32 [B, Ds] normalized with the saved statistics (NormStats.state)."""
        state = torch.as_tensor(np.asarray(state.detach().cpu() if isinstance(state, Tensor) else state, np.float32))
        if state.dim() != 2:
            raise ValueError(f"observation.state has shape {tuple(state.shape)}, expected (Ds,) or (B, Ds)")
        stats = None if self.loaded.norm_stats is None else self.loaded.norm_stats.state
        if stats is None:
            raise ValueError(f"the policy {self.loaded.path} was trained with the state but saved no state statistics "
                             "(norm_stats.json has no 'state'): cannot normalize observation.state")
        if state.shape[1] != stats.action_dim:
            raise ValueError(f"observation.state has shape {tuple(state.shape)}, expected (B, Ds={stats.action_dim}) "
                             "as in training")
        return stats.normalize(state)

    @property
    def reference_chunks(self) -> Optional[Tensor]:
        """The training chunks [R,H,Da] relative energies are measured against: a fixed draw (seed 0) of
        REFERENCE_CHUNKS of the saved retrieval chunks; None when the policy saved none."""
        chunks = self.loaded.retrieval_chunks
        if chunks is None:
            return None
        if self._reference_chunks is None:
            g = torch.Generator().manual_seed(0)
            pick = torch.randperm(len(chunks), generator=g)[:REFERENCE_CHUNKS]
            self._reference_chunks = chunks[pick.to(chunks.device)]
        return self._reference_chunks

    @torch.no_grad()
    def encode(self, images: Sequence[Any], instructions: Sequence[str], states: Optional[Tensor] = None
               ) -> BackboneReadout:
        """Backbone readout for raw images + instructions (+ normalized states [B, Ds] when the policy uses them)."""
        from vla_energy.data import to_pil_image

        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images and {len(instructions)} instructions, expected as many")
        if self.uses_state and (states is None or len(states) != len(images)):
            raise ValueError(f"the policy was trained with the state: pass one (observation.)state per image, got "
                             f"{None if states is None else tuple(states.shape)} for {len(images)} images")
        # One image per sample, or a list of camera images per sample (camera_layout separate).
        per_sample = self._as_trained([[to_pil_image(v) for v in im] if isinstance(im, (list, tuple))
                                       else [to_pil_image(im)] for im in images])
        inputs = self.collator.model_inputs(per_sample, list(instructions), with_state=self.uses_state)
        batch = {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        if self.uses_state:
            batch["state"] = states.to(self.device)
        return self.loaded.model.encode(**batch)

    def _as_trained(self, per_sample: list[list[Any]]) -> list[list[Any]]:
        """Each sample's images laid out as in training: as many as the policy's cameras (tiled into one image with
        camera_layout tile); a different count is an error naming the cameras. A policy that does not record its
        cameras (saved outside the recipe) takes the images as given."""
        from vla_energy.data.cameras import tile_images

        cameras = self.cameras
        if not cameras:
            return per_sample
        tile = self.camera_layout == "tile" and len(cameras) > 1
        for i, ims in enumerate(per_sample):
            if len(ims) != len(cameras) and not (tile and len(ims) == 1):
                raise ValueError(f"sample {i} has {len(ims)} image(s), the policy was trained on {len(cameras)} "
                                 f"camera(s) {cameras} (camera_layout {self.camera_layout}): pass one image per "
                                 "camera, in that order")
        return [[tile_images(ims)] if tile and len(ims) > 1 else ims for ims in per_sample]

    def _chunks(self, images: Sequence[Any], instructions: Sequence[str], mode: str, num_samples: int, sigma: float,
                refine_steps: int, step_sizes: Sequence[float], seed: int, states: Optional[Tensor] = None,
                candidates: str = "gaussian", with_energy: bool = False, with_relative: bool = False
                ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Normalized chunks [B,H,Da] (float32) from the policy, rerank, mean or refine, candidates within bounds;
        with_energy the energy head's energy of each [B], with_relative its relative energy [B] (float32; else
        None)."""
        if mode not in PREDICT_MODES:
            raise ValueError(f"mode={mode!r}, expected one of {PREDICT_MODES}")
        if candidates not in CANDIDATE_SOURCES:
            raise ValueError(f"candidates={candidates!r}, expected one of {CANDIDATE_SOURCES}")
        readout = self.encode(images, instructions, states)
        head = self.plugin.energy_head
        with torch.no_grad():
            policy, layers = self.plugin.predict_actions(readout)
            # Encoded once for every call of the head below (refine makes 1 + 2 * refine_steps); it holds the mask.
            ctx = head.encode_context(readout.context, readout.context_mask) \
                if mode != "policy" or with_energy or with_relative else None
        cmask = None
        low, high = candidate_bounds(self.loaded.norm_stats)
        # A dimension the data never moves carries no action; the head was never shown it elsewhere (a flow sample's
        # noise there would dominate the chunk's energy), so every mode outputs, and scores, it at its value.
        policy = pin_constant_dims(policy, low, high)
        chunk = policy
        if mode in ("rerank", "mean"):
            g = torch.Generator(device=policy.device).manual_seed(seed)
            sampler = partial(self.plugin.sample_actions, readout) if self.plugin.is_flow else None
            query = context_key(readout.context, readout.context_mask) if candidates == "neighbors" else None
            cands = make_candidates(candidates, policy, num_samples, layer_actions=layers, sigma=sigma,
                                    chunks=self.loaded.retrieval_chunks, generator=g, low=low, high=high,
                                    sampler=sampler, contexts=self.loaded.retrieval_contexts, query=query)
            ranked = rerank(head, ctx, cands.to(policy.dtype), context_mask=cmask)
            chunk = ranked.best if mode == "rerank" else energy_weighted_mean(cands, ranked.energies,
                                                                             self.plugin.args.tau)
        elif mode == "refine":
            chunk, _ = self._refine(head, ctx, policy, refine_steps, step_sizes, context_mask=cmask, low=low,
                                    high=high)
        energy = rerank(head, ctx, chunk[:, None].to(policy.dtype)).energies[:, 0].float() if with_energy else None
        relative = None
        if with_relative:
            references = self.reference_chunks
            if references is None:
                raise ValueError(f"the policy {self.loaded.path} saved no training chunks to measure relative "
                                 "energies against (retrieval_chunks.safetensors): train with --retrieval_chunks > 0 "
                                 "or add them with add_retrieval_chunks(path)")
            relative = relative_energy(head, ctx, chunk.to(policy.dtype), references, self.plugin.args.tau, energy)
        return chunk.float(), energy, relative

    def predict(
        self,
        images: Sequence[Any],
        instructions: Sequence[str],
        mode: str = "policy",
        num_samples: int = 16,
        sigma: float = 0.1,
        refine_steps: int = 10,
        step_sizes: Sequence[float] = REFINE_STEP_SIZES,
        seed: int = 0,
        normalized: bool = False,
        states: Optional[Any] = None,
        candidates: str = "gaussian",
    ) -> np.ndarray:
        """Action chunks [B,H,Da] (unnormalized unless normalized=True) from the policy, rerank, mean or refine;
        `states` [B, Ds] in raw units (a policy trained with the state needs them); `candidates` of rerank / mean:
        gaussian (the policy + Gaussian perturbations), layers (its layer-wise predictions), retrieval (the
        training chunks nearest to the policy's), neighbors (the chunks of the training samples whose contexts are
        nearest to this observation's, whatever action was taken there) or samples (a flow head's samples: the
        policy's chunk and num_samples - 1 draws seeded by `seed`; rerank is best-of-N; mean averages them, which
        across modes lands between them); refine descends the energy from the policy's chunk with a line search over `step_sizes` for
        `refine_steps` steps. With a flow head, mode="policy" is its sample from the fixed noise chunk
        (flow_noise_seed)."""
        states = self.normalize_state(states) if self.uses_state and states is not None else None
        out = self._chunks(images, instructions, mode, num_samples, sigma, refine_steps, step_sizes, seed,
                           states, candidates)[0].cpu().numpy()
        if normalized or self.loaded.norm_stats is None:
            return out
        return self.loaded.norm_stats.unnormalize(out)

    # LeRobot-style control API ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()

    def _parse_observation(self, observation: Mapping[str, Any]) -> tuple[list[Any], list[str], bool]:
        """(images per sample, tasks, single) from dataset-keyed observations, cameras laid out as in training."""

        present = [k for k in observation if k.startswith("observation.image")]
        cameras = self.cameras or []
        if cameras and all(c in observation for c in cameras):
            keys = cameras
        elif len(cameras) > 1:
            missing = [c for c in cameras if c not in observation]
            raise ValueError(f"observation lacks camera(s) {missing}: the policy was trained on the cameras {cameras} "
                             f"(camera_layout {self.camera_layout}); the observation has {present}")
        elif len(present) == 1:  # one camera: its key may be named differently on the robot
            keys = present
        elif not present:
            raise ValueError(f"observation has no image: expected 'observation.images.<camera>' keys, got "
                             f"{sorted(observation)}")
        else:
            raise ValueError(f"observation has the cameras {present}, the policy was trained on one "
                             f"({cameras[0] if cameras else 'unnamed'}): pass only that one")
        per_camera = [_as_pil_list(observation[k], k) for k in keys]
        single = per_camera[0][1]
        counts = {k: len(ims) for k, (ims, _) in zip(keys, per_camera)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"cameras have different batch sizes {counts}")
        # A list per sample in camera order; encode lays them out as in training (tiled, or separate).
        images = [list(ims) if len(ims) > 1 else ims[0] for ims in zip(*(p[0] for p in per_camera))]
        if "task" not in observation:
            raise ValueError(f"observation has no 'task' (the instruction string); keys: {sorted(observation)}")
        task = observation["task"]
        tasks = [task] * len(images) if isinstance(task, str) else [str(t) for t in task]
        if len(tasks) != len(images):
            raise ValueError(f"got {len(tasks)} tasks for {len(images)} observations, expected as many")
        return images, tasks, single

    def predict_action_chunk(self, observation: Mapping[str, Any], mode: str = "policy", normalized: bool = False,
                             return_energy: bool = False, relative_energy: bool = False, **kwargs: Any
                             ) -> Tensor | tuple[Tensor, ...]:
        """Action chunk [B,H,Da] ([H,Da] for one unbatched observation), float32 on the policy's device, in action
        units (normalized=True: as the model predicts them); with return_energy also the energy head's energy of
        each chunk [B] ([] unbatched), a failure signal (docs/sim.md), and with relative_energy too its energy
        relative to the policy's reference training chunks (`reference_chunks`, `rerank.relative_energy`). kwargs: num_samples, sigma, refine_steps,
        step_sizes, seed, candidates ("gaussian" | "layers" | "retrieval" | "neighbors" | "samples") of the
        rerank / mean / refine modes."""
        images, tasks, single = self._parse_observation(observation)
        opts = {"num_samples": 16, "sigma": 0.1, "refine_steps": 10, "step_sizes": REFINE_STEP_SIZES, "seed": 0,
                "candidates": "gaussian"}
        unknown = sorted(set(kwargs) - set(opts))
        if unknown:
            raise TypeError(f"predict_action_chunk got unknown options {unknown}, expected some of {sorted(opts)}")
        states = None
        if self.uses_state:
            if "observation.state" not in observation:
                raise ValueError(f"the policy was trained with the state: the observation needs 'observation.state'; "
                                 f"keys: {sorted(observation)}")
            raw = observation["observation.state"]
            raw = raw.detach().cpu() if isinstance(raw, Tensor) else np.asarray(raw, np.float32)
            states = self.normalize_state(raw[None] if raw.ndim == 1 else raw)
        if relative_energy and not return_energy:
            raise ValueError("relative_energy=True comes with the energy: pass return_energy=True too")
        chunk, energy, relative = self._chunks(images, tasks, mode, **{**opts, **kwargs}, states=states,
                                               with_energy=return_energy, with_relative=relative_energy)
        if not normalized and self.loaded.norm_stats is not None:
            chunk = self.loaded.norm_stats.unnormalize(chunk)
        out = tuple(t for t in (chunk, energy, relative) if t is not None)
        if len(out) == 1:
            return chunk[0] if single else chunk
        return tuple(t[0] for t in out) if single else out

    def select_action(self, observation: Mapping[str, Any], mode: str = "policy", **kwargs: Any) -> Tensor:
        """The next action [Da] ([B,Da] batched): a new chunk is predicted when the queue of n_action_steps
        actions is empty."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation, mode=mode, **kwargs)
            steps = chunk[: self.n_action_steps] if chunk.dim() == 2 else chunk[:, : self.n_action_steps].transpose(0, 1)
            self._queue.extend(steps)
        return self._queue.popleft()

    # Sharing ------------------------------------------------------------------------------------------------------

    def push_to_hub(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: str = "Upload vla_energy policy", revision: Optional[str] = None) -> Any:
        """Upload the policy files (not a checkpoint's optimizer / RNG state) with its model card to a hub model
        repo (HfApi.create_repo + upload_folder); returns upload_folder's CommitInfo. A policy whose base model is
        a local directory is refused (others could not load it), unless its LoRA is merged into saved weights."""
        from huggingface_hub import HfApi

        from vla_energy.backbones.loading import TINY_PREFIX
        from vla_energy.modeling.model_card import write_model_card
        from vla_energy.modeling.serialization import POLICY_PATTERNS, shareable_base

        path = self.loaded.path
        if path is None:
            raise ValueError("this policy was not loaded from a directory: save it with save_policy first")
        problem = shareable_base(self.loaded.info)
        if problem is not None:
            raise ValueError(f"{path} would not load for others from the hub: {problem}")
        info = self.loaded.info
        if not info.get("revision") and not info.get("merged") and not str(info["backbone"]).startswith(TINY_PREFIX):
            warnings.warn(f"{path} names its base model {info['backbone']!r} without a revision: it loads whatever "
                          "the hub holds under that name at the time", stacklevel=2)
        if not (path / "README.md").exists():
            write_model_card(path)
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model",
                                 allow_patterns=POLICY_PATTERNS, commit_message=commit_message, revision=revision)
