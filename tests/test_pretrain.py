import torch

from t2i_rl.models import load_pipeline
from t2i_rl.pretrain import DEFAULT_CONFIG, main
from t2i_rl.recipe import load_config


def test_pretrain_smoke_run_saves_a_loadable_pipeline(tmp_path):
    out = tmp_path / "sd"
    rc = main([
        f"output_dir={out}", "vae.steps=3", "vae.batch_size=8", "unet.steps=3", "unet.batch_size=8",
        "unet.pool_size=256", "model.vae_channels=[16,32]", "model.unet_channels=[16,32]",
        "model.text_hidden_size=32", "checkpoint_every=2",
    ])
    assert rc == 0
    pipe = load_pipeline(str(out))
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' spread
    images = pipe(["one red circle on a white background"], num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)


def test_pretrain_is_reproducible_from_the_seed(tmp_path):
    args = ["vae.steps=2", "vae.batch_size=4", "unet.steps=2", "unet.batch_size=4", "unet.pool_size=256",
            "model.vae_channels=[16,32]", "model.unet_channels=[16,32]", "model.text_hidden_size=32",
            "checkpoint_every=0"]
    main([f"output_dir={tmp_path / 'a'}"] + args)
    main([f"output_dir={tmp_path / 'b'}"] + args)
    a, b = load_pipeline(str(tmp_path / "a")), load_pipeline(str(tmp_path / "b"))
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k])


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    assert main([f"output_dir={tmp_path / 'x'}", "unet.lr=-1"]) == 2
    assert "unet.lr must be > 0" in capsys.readouterr().err
    assert main(["steps"]) == 2
    assert not (tmp_path / "x").exists()


def test_shipped_config_is_the_default():
    cfg = load_config(DEFAULT_CONFIG, [])
    assert cfg.output_dir == "t2i_rl/assets/shapes-sd" and cfg.resolution == 32
