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
