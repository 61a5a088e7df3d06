"""conf/ and the schemas agree, and each default has one source: the schema. A YAML file chooses
config groups and sets only what differs from its schema (a restated default would be a second
source that nothing keeps in step); every key it sets exists in the schema; every primary config
composes, with every choice of its groups, into a valid schema object."""

import dataclasses
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import MISSING, OmegaConf

from hydra_plugins.saev_sweeper.grouping_sweeper import GroupingSweeperConf
from saev.nn.config import SAEConfig
from saev.record import config as record_config
from saev.train import config as train_config
from saev.visualize import config as visualize_config

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
train_config.register()
visualize_config.register()

# Keys that name the group's choice itself (what `model=clip` or `sae=relu` means) may say so even
# where it equals the schema's default.
NAMING_KEYS = {"family", "activation", "name"}


def schemas() -> list[tuple[str, type]]:
    out = [
        ("record.yaml", record_config.RecordConfig),
        ("train.yaml", train_config.TrainConfig),
        ("visualize.yaml", visualize_config.VisualizeConfig),
        ("hydra/sweeper/grouping.yaml", GroupingSweeperConf),
    ]
    out += [(f"data/{n}.yaml", cls) for n, cls in record_config.DATA_SCHEMAS.items()]
    out += [(f"model/{p.name}", record_config.ModelConfig) for p in (CONF / "model").glob("*.yaml")]
    out += [(f"sae/{p.name}", SAEConfig) for p in (CONF / "sae").glob("*.yaml")]
    return sorted(out, key=lambda x: x[0])


def test_every_schema_backed_file_is_checked():
    checked = {name for name, _ in schemas()}
    on_disk = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    # Launchers belong to submitit's schemas; experiments are overrides of train.yaml.
    others = {n for n in on_disk if n.startswith(("hydra/launcher/", "experiment/"))}
    assert on_disk - others == checked


def schema_default(cls, path: list[str]):
    """The schema's default at a dotted path; KeyError if the schema has no such field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    f = fields[path[0]]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if len(path) == 1:
        return default
    return schema_default(type(default), path[1:])


def leaves(node: dict, prefix=()) -> list[tuple[list[str], object]]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += leaves(value, (*prefix, key))
        else:
            out.append(([*prefix, key], value))
    return out


@pytest.mark.parametrize("name, cls", schemas(), ids=[n for n, _ in schemas()])
def test_a_yaml_file_sets_only_what_differs_from_its_schema(name, cls):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / name)) or {}
    raw.pop("defaults", None)
    raw.pop("hydra", None)  # Hydra's own settings, not ours
    for path, value in leaves(raw):
        key = ".".join(path)
        try:
            default = schema_default(cls, path)
        except KeyError:
            pytest.fail(f"{name} sets {key}, which {cls.__name__} does not have")
        if path[-1] in NAMING_KEYS:
            continue
        value = MISSING if value == "???" else value
        assert value != default, f"{name} restates {cls.__name__}.{key}={default!r}; remove it"


def compose_object(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose(config, overrides=overrides))


@pytest.mark.parametrize("sae", sorted(p.stem for p in (CONF / "sae").glob("*.yaml")))
def test_train_composes_with_every_sae_kind(sae):
    cfg = compose_object("train", ["data.shard_root=/s", "data.layer=0", f"sae={sae}"])
    assert isinstance(cfg, train_config.TrainConfig) and cfg.sae.kind.endswith(cfg.sae.activation)
    assert cfg.lr_warmup_steps == schema_default(train_config.TrainConfig, ["lr_warmup_steps"])


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("data", sorted(record_config.DATA_SCHEMAS))
def test_record_composes_with_every_model_and_dataset(model, data):
    root = [] if data == "synthetic" else ["data.root=/images"]
    cfg = compose_object("record", [f"model={model}", f"data={data}", *root])
    assert cfg.model.family == model and cfg.data.name == data
    assert cfg.dump_to == schema_default(record_config.RecordConfig, ["dump_to"])


def test_visualize_composes_to_the_schema_defaults():
    cfg = compose_object("visualize", ["ckpt=/sae"])
    assert cfg == visualize_config.VisualizeConfig(ckpt="/sae")
