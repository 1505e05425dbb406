"""Scripted experts that take one of several routes: first to a via-point beside the straight path, then Meta-World's
scripted policy from wherever the hand is.

With `routes` routes the via-points lie at lateral offsets `route_offset * s` for s evenly spaced in [-1, 1] (two
routes: one on either side of the straight path; three: left, straight, right). The via-point sits halfway from the
hand's start to the goal, at the start's height, offset horizontally at right angles to that line. The route of an
episode is drawn from its task and seed, so the same episode gets the same route and tasks draw independently. Tuned (both routes of `--routes 2`, offset
0.2 m, succeed in 20 of 20 seeded episodes each) on ROUTE_TASKS, which are outside MT10.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

__all__ = ["ROUTE_TASKS", "MT10_TASKS", "route_sides", "draw_route", "via_point", "route_action", "RoutedExpert"]

ROUTE_TASKS = ("reach-wall-v3", "coffee-button-v3", "plate-slide-v3")
MT10_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
              "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# A stream of its own: Meta-World seeds the initial state from the bare episode seed (the same generator as
# default_rng(seed)), and the route must not be a function of the first position drawn.
_ROUTE_STREAM = 0x726F757465


def route_sides(routes: int) -> np.ndarray:
    """The lateral side of each route, evenly spaced in [-1, 1] (one route: 0, the expert's own path)."""
    if routes < 1:
        raise ValueError(f"routes={routes}, expected at least 1 (1: the expert's own route)")
    return np.zeros(1) if routes == 1 else np.linspace(-1.0, 1.0, routes)


def draw_route(episode_seed: int, routes: int, task: str = "") -> int:
    """The route of the episode of `task` with this seed: uniform over `routes`, the same for the same episode;
    tasks sharing seeds draw independently."""
    route_sides(routes)
    return int(np.random.default_rng([int(episode_seed), zlib.crc32(task.encode()), _ROUTE_STREAM]).integers(routes))


def via_point(hand: np.ndarray, goal: np.ndarray, side: float, offset: float, fraction: float = 0.5) -> np.ndarray:
    """The point `fraction` of the way from `hand` to `goal` (horizontally), moved `side * offset` at right angles
    to that line (positive: counter-clockwise seen from above), at the hand's height."""
    hand, goal = np.asarray(hand, np.float64), np.asarray(goal, np.float64)
    if hand.shape != (3,) or goal.shape != (3,):
        raise ValueError(f"hand {hand.shape} and goal {goal.shape}, expected two 3-d positions")
    d = goal[:2] - hand[:2]
    length = float(np.linalg.norm(d))
    if length < 1e-6:
        raise ValueError(f"hand {hand.tolist()} is above the goal {goal.tolist()}: no straight path to go beside")
    normal = np.array([-d[1], d[0]]) / length
    xy = hand[:2] + fraction * d + side * offset * normal
    return np.array([xy[0], xy[1], hand[2]])


def route_action(hand: np.ndarray, via: np.ndarray, expert_action: np.ndarray, gain: float = 10.0) -> np.ndarray:
    """The action towards the via-point (proportional, clipped to [-1, 1]) with the expert's gripper command."""
    move = np.clip(gain * (np.asarray(via) - np.asarray(hand)), -1.0, 1.0)
    return np.concatenate([move, np.asarray(expert_action)[3:]]).astype(np.float32)


class RoutedExpert:
    """A scripted policy that first moves the hand to its via-point (until within `radius` m, at most
    `max_via_steps` steps), then acts as `expert`. Call `reset()` at every episode start."""

    def __init__(self, expert: Any, side: float = 0.0, offset: float = 0.2, radius: float = 0.02,
                 max_via_steps: int = 60) -> None:
        self.expert, self.side, self.offset = expert, float(side), float(offset)
        self.radius, self.max_via_steps = float(radius), int(max_via_steps)
        self.reset()

    def reset(self) -> None:
        """Forget the via-point: the next state is an episode's first."""
        self.via: np.ndarray | None = None
        self.steps = 0
        self.reached = self.side == 0.0 or self.offset == 0.0

    def get_action(self, state: np.ndarray) -> np.ndarray:
        """The 4-d action for Meta-World's 39-d state (hand position first, goal last)."""
        action = np.clip(np.asarray(self.expert.get_action(state), np.float32), -1.0, 1.0)
        if self.reached:
            return action
        hand = np.asarray(state[:3], np.float64)
        if self.via is None:
            self.via = via_point(hand, np.asarray(state[-3:]), self.side, self.offset)
        if np.linalg.norm(hand - self.via) < self.radius or self.steps >= self.max_via_steps:
            self.reached = True
            return action
        self.steps += 1
        return route_action(hand, self.via, action)
