import pytest

from catdog.config import load_config, parse_overrides, save_config
from catdog.errors import CatdogError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet101\noptim:\n  lr: 0.001\n")
    config = load_config(path, ["optim.lr=3e-4", "data.hflip=false", "sweep.ks=[10, all]"])
    assert config.model.name == "resnet101"
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.data.hflip is False
    assert config.sweep.ks == [10, "all"]
    assert config.optim.epochs == 5  # the seed's recipe fills what the file leaves out


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["optim.epochs=7", "model.freeze_stages=2"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["optim.lr=fast"], "optim.lr"),
    (["nosuchsection.x=1"], "nosuchsection: unknown key"),
    (["optim.lr"], "expected section.key=value"),
])
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(CatdogError, match=message):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(CatdogError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(CatdogError, match="expected a mapping"):
        load_config(tmp_path / "bad.yaml")


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1e-4", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.epochs=0", "optim.epochs"),
    ("data.batch_size=0", "data.batch_size"), ("data.eval_batch_size=-1", "data.eval_batch_size"),
    ("data.image_size=0", "data.image_size"), ("data.std=[0.2, 0, 0.2]", "data.std.1"),
    ("optim.label_smoothing=1", "optim.label_smoothing"), ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("model.drop_rate=1.5", "model.drop_rate"), ("extract.shard_size=0", "extract.shard_size"),
    ("extract.splits=[]", "extract.splits"), ("extract.splits=[val, val]", "extract.splits"),
    ("forest.n_estimators=0", "forest.n_estimators"), ("sweep.ks=[]", "sweep.ks"), ("sweep.ks=[-3]", "sweep.ks"),
    ("sweep.classifiers={}", "sweep.classifiers"), ("topact.overlay_alpha=1.5", "topact.overlay_alpha"),
    ("topact.colormap=rainbowish", "topact.colormap"), ("gradcam.removal_fraction=1", "gradcam.removal_fraction"),
    ("gradcam.methods=[]", "gradcam.methods"), ("gradcam.batch_size=0", "gradcam.batch_size"),
])
def test_values_out_of_range_are_refused_by_the_config(override, field):
    with pytest.raises(CatdogError, match=rf"^config defaults [+] overrides: {field.replace('.', '[.]')}(\.\d)?: "):
        load_config(None, [override])


def test_defaults_and_the_shipped_configs_are_valid():
    for path in (load_config.__globals__["Path"](__file__).parents[1] / "configs").glob("*.yaml"):
        if path.name != "ray-cluster.yaml":
            load_config(path)


def test_a_bare_no_on_the_command_line_means_no_mixed_precision():
    config = load_config(None, ["extract.mixed_precision=no", "train.mixed_precision=no"])
    assert config.extract.mixed_precision == config.train.mixed_precision == "no"
