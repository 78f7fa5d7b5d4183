"""The stage plan of a run: which sources each stage trains on, over which steps (counted over the whole run), and
with which optimiser settings. Each later stage starts from the weights its predecessor ended with, with a fresh
optimiser and schedule."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from x2vlm.config import ConfigError, RunConfig, TrainConfig


@dataclass(frozen=True)
class Stage:
    name: str
    index: int  # position in the run's plan
    sources: tuple  # names of data sources, one batch of each per step
    begin: int  # first step (over the whole run)
    end: int  # one past the last step
    lr: float  # base learning rate of this stage

    @property
    def steps(self) -> int:
        return self.end - self.begin

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """The optimiser settings of this stage: its own step count and learning rate, a fresh schedule."""
        return dataclasses.replace(cfg, steps=self.steps, lr=self.lr, warmup_steps=min(cfg.warmup_steps, self.steps),
                                   stages=[])


def plan_stages(cfg: RunConfig) -> list[Stage]:
    """The stages in run order. No declared stages: one stage "main" over all sources for train.steps steps."""
    declared = [(st.name, st.steps, st.sources, st.lr) for st in cfg.train.stages] or \
        [("main", cfg.train.steps, [s.name for s in cfg.data.sources], 0.0)]
    plan, begin = [], 0
    for index, (name, steps, sources, lr) in enumerate(declared):
        plan.append(Stage(name, index, tuple(sources), begin, begin + steps, lr or cfg.train.lr))
        begin += steps
    return plan


def select_stage(plan: list[Stage], name: str | None) -> list[Stage]:
    """The whole plan, or the one stage named (ConfigError naming the choices when there is none)."""
    if name is None:
        return plan
    chosen = [st for st in plan if st.name == name]
    if not chosen:
        raise ConfigError(f"--stage: expected one of {[st.name for st in plan]}, got {name!r}")
    return chosen
