import pytest

from mocov3.config import ConfigError, load_config, scaled_lr


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.1 and cfg.optim.base_lr == 1.5e-4
    assert cfg.method.temperature == 0.2 and cfg.method.momentum == 0.99
    assert cfg.method.proj_layers == 3 and cfg.method.pred_layers == 2
    assert cfg.method.proj_hidden_dim == 4096 and cfg.method.out_dim == 256
    assert cfg.model.pos_embed == "sincos" and cfg.model.freeze_patch_embed and cfg.model.pooling == "cls"
    assert cfg.data.blur_prob == (1.0, 0.1) and cfg.data.solarize_prob == (0.0, 0.2)


def test_short_keys_and_dotted_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name: vit_base\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, ["epochs=7", "batch_size=512", "model=vit_small", "method=mocov3", "image_size=32",
                          "patch_size=4", "base_lr=1e-3", "seed=3", "data.crop_scale=[0.2, 1.0]"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.name, cfg.data.image_size) == (7, 512, "vit_small", 32)
    assert (cfg.model.patch_size, cfg.optim.base_lr, cfg.train.seed) == (4, 1e-3, 3)
    assert cfg.data.crop_scale == (0.2, 1.0)


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

    from mocov3.config import recipe_names

    configs = Path(__file__).parents[1].joinpath("configs")
    recipes = sorted(configs.rglob("*.yaml"))
    assert [str(r.relative_to(configs)) for r in recipes] == recipe_names()  # configs/ is the shipped set
    seen = set()
    for r in recipes:
        cfg = load_config(r)
        seen.add((cfg.method.name, cfg.model.name.split("_")[0].rstrip("0123456789")))
    # every method x backbone family has a recipe (issue: SimCLR, BYOL, SwAV beside MoCo v3)
    assert {(m, b) for m in ("mocov3", "simclr", "byol", "swav") for b in ("vit", "resnet")} <= seen


def test_recipe_extends_a_base_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  name: vit_base\ntrain:\n  epochs: 5\n  batch_size: 512\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml", ["batch_size=256"])
    assert (cfg.model.name, cfg.train.epochs, cfg.train.batch_size) == ("vit_base", 7, 256)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "e.yaml")


def test_recipes_that_differ_by_a_few_keys_extend_a_base():
    from pathlib import Path

    import yaml

    root = Path(__file__).parents[1] / "configs"
    byol = yaml.safe_load((root / "imagenet_byol_vit_small.yaml").read_text())
    assert byol["base"] == "imagenet_vit_small.yaml" and len(byol) <= 3
    a = load_config(root / "imagenet_byol_vit_small.yaml")
    b = load_config(root / "imagenet_vit_small.yaml", ["method=byol"])
    from mocov3.config import to_dict

    assert to_dict(a) == to_dict(b)


def test_tuples_are_typed_and_saved_as_lists(tmp_path):
    import yaml

    from mocov3.config import save_config

    cfg = load_config(None, ["data.mean=[0.5, 0.5, 0.5]", "train.save_epochs=[1, 3]"])
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.train.save_epochs == (1, 3)
    save_config(cfg, tmp_path / "c.yaml")
    back = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert back["data"]["mean"] == [0.5, 0.5, 0.5]
    assert load_config(tmp_path / "c.yaml").data.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="list of 3"):
        load_config(None, ["data.mean=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.save_epochs=[1.5]"])


def test_validation_is_pure():
    import copy

    from mocov3.config import to_dict, validate

    cfg = load_config(None, ["model=resnet18"])
    before = copy.deepcopy(to_dict(cfg))
    validate(cfg)
    assert to_dict(cfg) == before  # the ViT default freeze_patch_embed is not rewritten for a ResNet


def _out_of_range(low, high, low_incl, high_incl):
    """Values just outside a declared range (one below, one above where bounded)."""
    out = []
    if low is not None:
        out.append(low - 1 if low_incl else low)
    if high is not None:
        out.append(high + 1 if high_incl else high)
    return out


def test_every_numeric_field_declares_its_range():
    import dataclasses
    import typing

    from mocov3.config import Config, _field_types, ranges

    declared = ranges()
    for sec in dataclasses.fields(Config):
        for name, tp in _field_types(type(sec.default_factory())).items():
            base = [a for a in typing.get_args(tp) if a is not type(None)][0] if typing.get_origin(tp) is typing.Union \
                else tp
            if base in (int, float):
                assert f"{sec.name}.{name}" in declared, f"{sec.name}.{name} has no range (_f(..., ge=..., le=...))"


def test_every_numeric_range_is_checked():
    from mocov3.config import ranges

    for key, rng in ranges().items():
        section, name = key.split(".")
        default = getattr(getattr(load_config(), section), name)
        for bad in _out_of_range(*rng):
            integer = isinstance(default, (int, str)) or default is None and name != "mlp_ratio"  # str: "auto"
            value = int(bad) if integer else float(bad)
            with pytest.raises(ConfigError, match="out of range") as e:
                load_config(None, [f"{key}={value}"])
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,msg", [
    ("base_lr=.nan", "finite"), ("train.device=tpu9", "not one of"), ("model.num_heads=5", "divisible"),
    ("data.crop_ratio=[2.0, 1.0]", "min <= max"), ("eval.knn_k=0", "out of range"),
    ("method.temperature=0", "out of range"), ("optim.warmup_epochs=-1", "out of range"),
])
def test_cross_field_and_special_values(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_model_names_match_the_presets():
    from mocov3.config import ModelConfig
    from mocov3.models import ALL_MODELS
    import typing

    assert list(typing.get_args(typing.get_type_hints(ModelConfig)["name"])) == ALL_MODELS


def test_yaml_booleans_read_as_choice_words():
    assert load_config(None, ["eval.knn_init=off"]).eval.knn_init == "off"
    assert load_config(None, ["data.in_memory=no"]).data.in_memory == "no"
    assert load_config(None, ["train.compile=true"]).train.compile == "true"
    assert load_config(None, ["train.compile=false"]).train.compile == "false"


def test_shipped_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from mocov3.config import RECIPES, load_config, to_dict

    root = Path(__file__).parents[1]
    assert (root / "configs").resolve() == RECIPES.resolve()  # configs/ is the shipped folder
    want = to_dict(load_config(root / "configs" / "imagenet_byol_vit_small.yaml"))  # uses base:
    monkeypatch.chdir(tmp_path)
    for name in ("imagenet_byol_vit_small.yaml", "configs/imagenet_byol_vit_small.yaml", "imagenet_byol_vit_small"):
        assert to_dict(load_config(name)) == want
    assert to_dict(load_config("study/cifar10_vit_cpu.yaml"))["model"]["depth"] == 4
    (tmp_path / "quickstart_cpu.yaml").write_text("epochs: 7\n")  # a file of that name wins
    assert load_config("quickstart_cpu.yaml").train.epochs == 7
    with pytest.raises(ConfigError, match="config file not found: nope.yaml .shipped recipes: cifar10"):
        load_config("nope.yaml")


def test_method_names_are_the_registrys():
    """config.py cannot import the methods (a lower layer), so its ``method.name`` choices are written there;
    they must be exactly the names the method registry holds, and the help lists must come from it."""
    import typing

    from mocov3.config import MethodConfig
    from mocov3.methods import METHODS

    assert set(typing.get_args(typing.get_type_hints(MethodConfig)["name"])) == set(METHODS)
    from mocov3.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    for name in METHODS:
        assert name in text
    import mocov3.losses

    assert "four" not in mocov3.losses.__doc__
