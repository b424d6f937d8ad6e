"""Every bad value of the training command is one `error:` line and exit code 2, before any work:
no model loads, no run folder is made, and nothing else is printed (no library notices either)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CATS = b"two red circles on a white background\na photo of a cat\n"
LATIN = b"two red circles on a white background\n\xff\xfe\n"  # not UTF-8


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root writes anywhere it may: /proc is not such a place)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder if not os.access(folder, os.W_OK) else Path("/proc/1")


# (id, the arguments given tmp_path, what the error line must name)
CASES = [
    ("epochs", lambda t: ["epochs=abc"], "epochs = abc is invalid"),
    ("seed", lambda t: ["seed=abc"], "seed = abc is invalid"),
    ("device", lambda t: ["device=foo"], "device = foo is invalid"),
    ("threads", lambda t: ["threads=-3"], "threads = -3 is invalid"),
    ("resume", lambda t: ["resume=maybe"], "resume = maybe is invalid"),
    ("max_bad_steps", lambda t: ["health.max_bad_steps=0"], "health.max_bad_steps = 0 is invalid"),
    ("lr_inf", lambda t: ["agent.lr=inf"], "agent.lr = inf is invalid"),
    ("samples_per_epoch", lambda t: ["agent=rwr", "agent.samples_per_epoch=6", "env.batch_size=4"],
     "agent.samples_per_epoch = 6 is invalid: must be at most env.batch_size (4) or a multiple of it"),
    ("missing_prompt_file", lambda t: ["env.prompts=file:/nonexistent/prompts.txt"],
     "prompt file /nonexistent/prompts.txt does not exist"),
    ("non_utf8_prompt_file", lambda t: [f"env.prompts=file:{write(t / 'latin.txt', LATIN)}"],
     "latin.txt is not UTF-8 text"),
    ("prompt_outside_the_judges_grammar", lambda t: [f"env.prompts=file:{write(t / 'cats.txt', CATS)}"],
     "the judge (env.gold) reads ShapesWorld prompts only, and 'a photo of a cat' is not one"),
    ("prompt_outside_the_shapes_contrastive_grammar",
     lambda t: ["env=textnorm", "env.gold=null", f"env.prompts=file:{write(t / 'cats.txt', CATS)}"],
     "the shapes contrastive source of env.reward reads ShapesWorld prompts only, and 'a photo of a cat'"),
    ("held_out_prompt_outside_the_grammar", lambda t: ["eval.prompts=[a cat]"], "eval.prompts = ['a cat'] is invalid"),
    ("output_dir_is_a_file", lambda t: [f"output_dir={write(t / 'afile', b'')}"], "afile is a file, not a folder"),
    ("output_dir_in_a_file", lambda t: [f"output_dir={write(t / 'afile', b'')}/run"], "afile is a file, not a folder"),
    ("output_dir_unwritable", lambda t: [f"output_dir={unwritable(t)}/run"], "is not writable"),
    ("monitor_is_the_judge", lambda t: ["env.monitor=gold"], "env.monitor = gold is invalid: the judge is gold"),
    ("monitor_inside_the_reward", lambda t: ["env=ensemble", "env.monitor=pairwise"],
     "env.monitor = pairwise is invalid: the optimized reward env.reward scores with pairwise too"),
    ("early_stop_without_monitor", lambda t: ["early_stop.enabled=true", "env.monitor=null"],
     "early_stop.watch = monitor needs env.monitor, which is null"),
    ("early_stop_without_heldout", lambda t: ["early_stop.enabled=true", "eval.num_prompts=0"],
     "early_stop.enabled = true needs held-out prompts to watch, but eval.num_prompts = 0"),
    ("early_stop_without_evaluations", lambda t: ["early_stop.enabled=true", "eval.every=0"],
     "early_stop.enabled = true needs evaluations to compare, but eval.every = 0"),
    ("sweep_without_multirun", lambda t: ["hydra.sweeper.params={agent.lr:1e-3}"],
     "hydra.sweeper.params = {agent.lr:1e-3} is a sweep's setting, which a single run has no use for: add --multirun"),
    ("lora_targets_empty", lambda t: ["agent.lora_targets=[]"], "agent.lora_targets = [] is invalid: the UNet layers"),
    ("lora_target_matching_no_layer", lambda t: ["agent.lora_targets=[to_q,attn3.to_k]"],
     "agent.lora_targets = ['to_q', 'attn3.to_k'] is invalid: 'attn3.to_k' matches no layer of the UNet"),
    ("lora_target_that_is_a_block", lambda t: ["agent.lora_targets=[attn2]"],
     "agent.lora_targets = ['attn2'] is invalid: 'attn2' names Attention modules, which LoRA cannot wrap"),
    ("score_pool_not_dividing_the_latents", lambda t: ["agent.score_pool=3"],
     "agent.score_pool = 3 is invalid: it must divide the latents' side (16 pixels), for example 1, 2, 4, 8, 16"),
    ("early_stop_watch", lambda t: ["early_stop.watch=proxy"], "early_stop.watch = proxy is invalid: must be one of"),
    ("resume_false_over_a_run", lambda t: ["resume=false", f"output_dir={old_run(t)}"],
     "old holds a run (metrics.jsonl, tb), which resume=false would mix a new run into: resume=true continues it"),
]


def old_run(tmp_path: Path) -> Path:
    """A folder holding what a run writes first: its metrics and TensorBoard events."""
    folder = tmp_path / "old"
    (folder / "tb").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return folder


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make_args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2_before_any_work(tmp_path, make_args, message, refused_by_train):
    run_dir = tmp_path / "run"
    args = make_args(tmp_path)
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={run_dir}")
    code, lines = refused_by_train(args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not run_dir.exists()
    assert not (tmp_path / "afile" / "run").exists() and not (tmp_path / "locked" / "run").exists()


def test_the_command_line_prints_the_error_line_and_nothing_else(tmp_path):
    """The real command, in a fresh interpreter: no library notice before the error line either."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2i_rl.train", "epochs=abc", f"output_dir={run_dir}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: epochs = abc is invalid"), proc.stderr
    assert proc.stdout == "" and not run_dir.exists()
