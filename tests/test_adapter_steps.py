"""benchmarks/adapter_steps.py: the adapter gated to the first k sampler steps."""

import pytest
import torch

from benchmarks.adapter_steps import adapter_on_first, main
from t2i_rl.train import Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides


def test_gating_to_every_step_changes_nothing_and_to_fewer_uses_the_base_model(tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=2)
    trainer = Trainer(compose_cfg((overrides, reward)))
    trainer.fit()
    with torch.no_grad():
        for p in trainer.policy.trainable_parameters():  # an adapter far from zero: its effect is visible
            p.add_(0.5)
    latents, embeds = torch.randn(2, 4, 8, 8), trainer.policy.encode_prompts(["two red circles"] * 2)
    full = [trainer.policy.noise_pred(latents, i, embeds) for i in range(2)]
    base = [trainer.policy.noise_pred(latents, i, embeds, reference=True) for i in range(2)]
    adapter_on_first(trainer.policy, 2)  # tiny runs sample 2 steps: on both, as trained
    assert all(torch.equal(trainer.policy.noise_pred(latents, i, embeds), full[i]) for i in range(2))
    adapter_on_first(trainer.policy, 1)
    assert torch.equal(trainer.policy.noise_pred(latents, 0, embeds), full[0])
    assert torch.equal(trainer.policy.noise_pred(latents, 1, embeds), base[1])
    assert not torch.equal(full[1], base[1])


def test_the_command_evaluates_a_checkpoint_and_refuses_other_folders(tiny_assets, tmp_path, capsys):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=1)
    Trainer(compose_cfg((overrides, reward))).fit()
    clip = tiny_assets["clip"]
    extra = [o for o in overrides if not o.startswith(("output_dir", "epochs"))]
    extra.append(f"env.reward={{name:textnorm,base:{{name:clip,path:'{clip}'}},tau:0.05}}")
    assert main([str(tmp_path / "run" / "checkpoints" / "last"), "--steps", "1", "2", "--", *extra]) == 0
    out = capsys.readouterr().out
    assert "| 0-0 |" in out and "| 0-1 |" in out
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2 and "not a checkpoint folder" in capsys.readouterr().err
