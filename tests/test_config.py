from dataclasses import dataclass, field
from typing import Literal

import pytest

from reidscale.config import ConfigError, flatten, load_config, parse_job_args
from reidscale.train.config import TrainJobConfig


@dataclass
class Inner:
    width: int = 8
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, int] = (4, 2)

    def validate(self):
        if self.width < 1:
            raise ConfigError("width: must be >= 1")


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\ninner:\n  width: 16\n  ratio: 1\n")
    cfg = load_config(Outer, path, ["inner.width=32", "flag=true", "inner.sizes=[3, 4]", "inner.shape=[8, 4]"])
    assert cfg.name == "from_yaml"
    assert cfg.inner.width == 32
    assert cfg.inner.ratio == 1.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.flag is True
    assert cfg.inner.sizes == [3, 4]
    assert cfg.inner.shape == (8, 4)


def test_unknown_key_is_refused_with_its_dotted_name():
    with pytest.raises(ConfigError, match=r"inner\.widht"):
        load_config(Outer, None, ["inner.widht=3"])
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(Outer, None, ["nonsense=3"])


@pytest.mark.parametrize(
    "override, key",
    [("inner.width=abc", "inner.width"), ("inner.width=1.5", "inner.width"), ("flag=maybe", "flag"),
     ("inner.mode=c", "inner.mode"), ("inner.shape=[1]", "inner.shape"), ("inner=3", "inner")],
)
def test_wrong_type_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_section_validate_runs_and_names_the_section():
    with pytest.raises(ConfigError, match=r"inner\.width"):
        load_config(Outer, None, ["inner.width=0"])


def test_bad_yaml_file_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_parse_job_args_reads_config_flag_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\n")
    cfg = parse_job_args(Outer, ["--config", str(path), "inner.width=5"])
    assert (cfg.name, cfg.inner.width) == ("y", 5)
    with pytest.raises(ConfigError, match="unknown option"):
        parse_job_args(Outer, ["--bogus"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_job_args(Outer, ["justaword"])


def test_train_config_refuses_bad_values_before_work():
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(TrainJobConfig, None, ["train.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"train\.k"):
        load_config(TrainJobConfig, None, ["train.k=1"])
    with pytest.raises(ConfigError, match=r"model\.width"):
        load_config(TrainJobConfig, None, ["model.width=100", "model.heads=3"])
    with pytest.raises(ConfigError, match=r"tracking\.uri"):
        load_config(TrainJobConfig, None, ["tracking.uri=file:///tmp/mlruns"])


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(Outer, None, []))
    assert flat["inner.width"] == 8
    assert flat["inner.sizes"] == "[1, 2]"


def test_boolean_words_fit_string_choices():
    cfg = load_config(TrainJobConfig, None, ["train.use_gpu=true", "run_name=false"])
    assert cfg.train.use_gpu == "true"
    assert cfg.run_name == "false"


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(TrainJobConfig, root / "clipreid_vit_b16_person.yaml")
    assert cfg.recipe == "clipreid" and cfg.loss.id_weight == 0.25 and cfg.optim.lr == 5e-6
    assert cfg.transform.mean == (0.5, 0.5, 0.5)
    demo = load_config(TrainJobConfig, root / "demo" / "train.yaml")
    assert demo.train.num_workers == 2


def test_clipreid_recipe_with_a_non_projected_feature_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.feature"):
        load_config(TrainJobConfig, None, ["recipe=clipreid", "model.feature=cls+proj"])
    assert load_config(TrainJobConfig, None, ["recipe=baseline", "model.feature=cls+proj"]).model.feature == "cls+proj"


@dataclass
class _Lists:
    cameras: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    scales: tuple[float, ...] = ()


def test_comma_lists_on_the_command_line_read_items_as_their_type():
    cfg = parse_job_args(_Lists, ["cameras=0,3", "images=1.jpg,true,007.jpg", "scales=0.5, 1"])
    assert cfg.cameras == [0, 3]
    assert cfg.images == ["1.jpg", "true", "007.jpg"]  # file names stay exactly as typed
    assert cfg.scales == (0.5, 1.0)
    with pytest.raises(ConfigError, match=r"cameras\[1\]"):
        parse_job_args(_Lists, ["cameras=0,x"])
