"""Does a run learn from its reward? The default task trained on the judge itself, and on its negation.

    python benchmarks/reward_controls.py --control oracle|anti [KEY=VALUE ...]

The KEY=VALUE overrides are the training command's (`python -m t2i_rl.train`), for example
`epochs=100`; the run folder is `runs/control-<control>-seed<seed>` unless `output_dir` is given,
and its config records `control`, so that no training command resumes it as a run of its own
reward (nor a control the default run's folder). The run is the Trainer's, with every evaluation,
diagnostic and checkpoint; only the reward that the agent optimizes is replaced, in the training
env and in the evaluation envs (so `eval/*/proxy` is the control's reward). For the agents that
read the env's reward when they sample (`AGENTS`): ReFL and DRaFT need a differentiable reward and
SB3 copies the reward into an env of its own.

- `oracle`: the judge's score (the fraction of the prompt's attributes that hold), what a proxy
  that agreed with gold on every image would give. An oracle run that gains no more gold than the
  proxy's run shows that the proxy is not what limits the learning.
- `anti`: one minus the judge's score. A run that learns from its reward makes gold fall; one whose
  gold rises anyway moves there for a reason other than its reward.

The judge is never a reward in the package itself (it stands in for the human); these runs are
controls of the optimizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t2i_rl.rewards.base import RewardFunction, RewardOutput  # noqa: E402
from t2i_rl.rewards.gold import GoldReward  # noqa: E402

CONTROLS = ("oracle", "anti")
AGENTS = ("ddpo", "dpok", "ddpo_trl", "rwr")


class JudgeReward(RewardFunction):
    """The judge's score as a reward (`oracle`), or one minus it (`anti`)."""

    differentiable = False

    def __init__(self, control: str) -> None:
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        self.name = f"judge_{control}"
        self.control = control
        self.judge = GoldReward()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        score = self.judge(images, prompts).scores
        return RewardOutput(score if self.control == "oracle" else 1.0 - score, {})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", choices=CONTROLS, required=True)
    parser.add_argument("overrides", nargs="*", help="the training command's KEY=VALUE overrides")
    args = parser.parse_args(argv)

    from t2i_rl.train import Trainer, compose_config, validate

    overrides = [*args.overrides, f"+control={args.control}"]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir=runs/control-{args.control}-seed${{seed}}")
    try:
        cfg = compose_config(overrides)  # once: validated and trained as composed
        validated = validate(cfg)
    except ValueError as err:  # as the training command says it: one line, exit 2
        parser.exit(2, f"error: {err}\n")
    if cfg.agent.name not in AGENTS:
        parser.exit(2, f"error: agent={cfg.agent.name} is invalid for a reward control: it must read the env's "
                       f"reward as it samples ({', '.join(AGENTS)})\n")
    trainer = Trainer(cfg, validated)
    reward = JudgeReward(args.control)
    for env in [trainer.env, *(env for _, _, env in trainer.eval_sets.values())]:
        env.reward_fn = reward
    return trainer.fit()


if __name__ == "__main__":
    main()
