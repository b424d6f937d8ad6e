"""The README's walk-through agent runs as printed: it trains, and its loss is the hand-computed one."""

import re
import types
from pathlib import Path

import pytest
import torch

from agents.base import per_prompt_normalize

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def example() -> types.ModuleType:
    block = re.search(r"<!-- agent-example -->\n```python\n(.*?)```\n<!-- /agent-example -->", README.read_text(),
                      re.S)
    assert block, "the README's agent example is missing its markers"
    module = types.ModuleType("readme_agent")
    exec(compile(block.group(1), "README.md", "exec"), module.__dict__)  # noqa: S102 - the README's own code
    return module


def test_the_readme_agent_trains_with_the_loss_it_states(example, tiny_agent):
    agent = tiny_agent(example.PGAgent, trained_step=1, samples_per_epoch=2, train_batch_size=2)
    rollout = agent.collect()
    adv = per_prompt_normalize(rollout.prompts, rollout.rewards)
    with torch.no_grad():  # one minibatch of both samples: its loss by hand, before the step
        log_prob = agent.policy.log_prob(rollout.latents[:, 1], rollout.latents[:, 2], 1, rollout.embeds)
    expected = -(adv * log_prob).mean().item()
    before = [p.detach().clone() for p in agent.params]
    stats = agent.update(rollout)
    assert stats["loss/policy"] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert any(not torch.equal(a, b) for a, b in zip(agent.params, before)), "the update changed nothing"


def test_the_readme_agent_refuses_a_bad_step(example, tiny_agent):
    with pytest.raises(ValueError, match=r"agent.trained_step = -1 is invalid: must be an int >= 0"):
        example.PGConfig(trained_step=-1)
    with pytest.raises(ValueError, match=r"agent.trained_step = 3 is invalid: the sampler has 3 steps"):
        tiny_agent(example.PGAgent, trained_step=3)
