"""Gymnasium environments of t2i-rl (registered as `t2i_rl/...` when `t2i_rl` is imported)."""

from .denoise import (
    DenoiseEnv,
    DenoiseVectorEnv,
    NumpyDenoise,
    fixed_prompts,
    heldout_counterpart,
    make_numpy_env,
    make_prompt_source,
    training_eval_prompts,
)

__all__ = ["DenoiseEnv", "DenoiseVectorEnv", "NumpyDenoise", "make_numpy_env", "make_prompt_source",
           "heldout_counterpart", "fixed_prompts", "training_eval_prompts"]
