import pytest

from mocov3.config import ConfigError, load_config, scaled_lr


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.1 and cfg.optim.base_lr == 1.5e-4
    assert cfg.method.temperature == 0.2 and cfg.method.momentum == 0.99
    assert cfg.method.proj_layers == 3 and cfg.method.pred_layers == 2
    assert cfg.method.proj_hidden_dim == 4096 and cfg.method.out_dim == 256
    assert cfg.model.pos_embed == "sincos" and cfg.model.freeze_patch_embed and cfg.model.pooling == "cls"
    assert cfg.data.blur_prob == [1.0, 0.1] and cfg.data.solarize_prob == [0.0, 0.2]


def test_short_keys_and_dotted_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name: vit_base\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, ["epochs=7", "batch_size=512", "model=vit_small", "method=mocov3", "image_size=32",
                          "patch_size=4", "base_lr=1e-3", "seed=3", "data.crop_scale=[0.2, 1.0]"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.name, cfg.data.image_size) == (7, 512, "vit_small", 32)
    assert (cfg.model.patch_size, cfg.optim.base_lr, cfg.train.seed) == (4, 1e-3, 3)
    assert cfg.data.crop_scale == [0.2, 1.0]


@pytest.mark.parametrize("override,msg", [
    ("nonsense=1", "unknown config key"),
    ("optim.nonsense=1", "unknown config key 'optim.nonsense'"),
    ("epochs=ten", "expected an integer"),
    ("base_lr=fast", "expected a number"),
    ("model.freeze_patch_embed=maybe", "expected true or false"),
    ("model.pos_embed=rope", "is not one of"),
    ("data.crop_scale=[0.2]", "list of 2"),
    ("novalue", "key=value"),
    ("image_size=30", "not a multiple of"),
])
def test_bad_overrides_are_one_line_errors(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_sections(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_lr_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_recipes_load():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    assert len(recipes) >= 20
    seen = set()
    for r in recipes:
        cfg = load_config(r)
        seen.add((cfg.method.name, cfg.model.name.split("_")[0].rstrip("0123456789")))
    # every method x backbone family has a recipe (issue: SimCLR, BYOL, SwAV beside MoCo v3)
    assert {(m, b) for m in ("mocov3", "simclr", "byol", "swav") for b in ("vit", "resnet")} <= seen
