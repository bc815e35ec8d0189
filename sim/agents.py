"""Policies that act in simulated time, without a server: the expert, a random policy, a checkpoint.

`run_sim_episodes` plays the closed-loop task (sim.scene.ReachTask) on a
fixed list of seeds with the simulation paused while an agent thinks, so it
measures what a policy does with no latency at all. The expert and the random
policy act every tick; a checkpoint's chunk is executed `replan_every` rows at
a time before the next observation. The wall-clock evaluation through the
served stack is benchmarks/closed_loop.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.demos import random_action
from sim.expert import ReachExpert
from sim.scene import EPISODE_TICKS, ReacherScene, ReachTask


class ExpertAgent:
    """The scripted expert (it reads the target from the simulator)."""

    replan_every = 1

    def __init__(self):
        self.expert = ReachExpert()

    def chunk(self, scene: ReacherScene) -> np.ndarray:
        q, qd = scene.joints
        return self.expert.action(q, qd, scene.target)[None]


class RandomAgent:
    """A uniformly random setpoint every tick: the floor any policy must beat."""

    replan_every = 1

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def chunk(self, scene: ReacherScene) -> np.ndarray:
        return random_action(self.rng)[None]



class CheckpointAgent:
    """A checkpoint run in-process through the server's own input path (JPEG, parse, the policy's frame transform, predict)."""

    def __init__(self, path, prompt: str = "reach the red ball", replan_every: int = 16):
        from serve_app.checkpoint import open_checkpoint
        from serve_app.policies import load_policy

        self.policy = load_policy(open_checkpoint(path), "cpu")
        self.prompt, self.replan_every = prompt, replan_every

    def chunk(self, scene: ReacherScene) -> np.ndarray:
        from policy_wire import robot_inference_pb2 as pb
        from robot_client.image_codec import encode_camera
        from serve_app.observation import ObservationBatch
        from serve_app.parse import parse_observation

        spec = self.policy.spec
        request = pb.ObservationRequest(
            images=[encode_camera(f, (spec.image_height, spec.image_width)) for f in scene.render()],
            robot_state=pb.RobotState(state=scene.policy_state().tolist()),
            prompt=self.prompt,
        )
        batch = ObservationBatch.stack([parse_observation(request, spec, self.policy.frames)])
        return self.policy.predict(batch)[0]


@dataclass
class EpisodeResults:
    seeds: list[int]
    targets_reached: list[int]
    targets: int

    @property
    def success_rate(self) -> float:
        return float(np.mean([r >= self.targets for r in self.targets_reached]))

    @property
    def mean_targets(self) -> float:
        return float(np.mean(self.targets_reached))

    def __str__(self) -> str:
        return f"success {self.success_rate:.0%} of {len(self.seeds)} episodes, {self.mean_targets:.2f}/{self.targets} targets per episode"


def run_sim_episodes(agent, seeds, ticks: int = EPISODE_TICKS) -> EpisodeResults:
    scene = ReacherScene()
    reached = []
    try:
        for seed in seeds:
            task = ReachTask(scene, seed)
            plan: list[np.ndarray] = []
            for _ in range(ticks):
                if not plan:
                    plan = list(agent.chunk(scene)[: agent.replan_every])
                scene.step_to(plan.pop(0))
                task.after_tick()
            reached.append(task.reached)
    finally:
        scene.close()
    return EpisodeResults(list(seeds), reached, task.targets)
