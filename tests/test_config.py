import json
from pathlib import Path

import pytest

from ds_grace import GraceConfig, GraceConfigError, load_ds_config
from ds_grace.cli import main as cli_main
from ds_grace.topology import Topology

CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


@pytest.mark.parametrize("name", ["vanilla_moe.json", "grace.json"])
def test_shipped_configs_load(name):
    ds_config, grace = load_ds_config(CONFIGS / name)
    assert "grace" not in ds_config
    assert ds_config["moe"]["enabled"] is True
    assert grace.enabled is (name == "grace.json")


def test_grace_json_shows_every_section():
    raw = json.loads((CONFIGS / "grace.json").read_text())["grace"]
    assert set(raw) == set(GraceConfig.model_fields)
    for section, model in GraceConfig.model_fields.items():
        if hasattr(model.annotation, "model_fields"):
            assert set(raw[section]) == set(model.annotation.model_fields), section


def test_missing_block_is_vanilla_and_input_is_not_mutated():
    raw = {"dtype": "fp32", "grace": {"routing": {"policy": "wrr"}}}
    ds_config, grace = load_ds_config(raw)
    assert raw["grace"] == {"routing": {"policy": "wrr"}}
    assert ds_config == {"dtype": "fp32"}
    assert grace.routing.policy == "wrr"
    _, vanilla = load_ds_config({"dtype": "fp32"})
    assert vanilla.enabled is False


def test_defaults_are_the_recommended_setup():
    grace = GraceConfig()
    assert grace.enabled and grace.grouping.enabled and grace.replication.enabled
    assert grace.routing.policy == "tar"
    assert grace.communication.path == "auto" and grace.communication.dedup
    assert grace.vanilla.drop_tokens is False


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"grouping": {"ratio": 1.7}}, "grace.grouping.ratio (1.7) must be in [0, 1]"),
        ({"grouping": {"ratio": "fast"}}, 'grace.grouping.ratio ("fast")'),
        ({"bogus": 1}, "grace.bogus (1) is not a known field"),
        (
            {"replication": {"online": {"intervl": 3}}},
            "grace.replication.online.intervl (3) is not a known field",
        ),
        (
            {"routing": {"policy": "random"}},
            "grace.routing.policy (\"random\") must be 'tar', 'wrr' or 'primary'",
        ),
        ({"communication": {"timeout_s": 0}}, "grace.communication.timeout_s (0) must be greater than 0"),
        ({"topology": {"num_nodes": 0}}, 'grace.topology.num_nodes (0) must be an integer >= 1 or "auto"'),
        ({"topology": {"gpus_per_node": "4"}}, 'grace.topology.gpus_per_node ("4") must be a valid integer'),
        ({"grouping": {"enabled": "yes"}}, 'grace.grouping.enabled ("yes") must be a valid boolean'),
        (
            {"grouping": {"max_experts_per_gpu": 0}},
            "grace.grouping.max_experts_per_gpu (0) must be greater than or equal to 1",
        ),
        (
            {"replication": {"mode": "greedy"}},
            "grace.replication.mode (\"greedy\") must be 'paper' or 'budget'",
        ),
        (
            {"replication": {"online": {"threshold": 1.5}}},
            "grace.replication.online.threshold (1.5) must be less than or equal to 1",
        ),
        (
            {"vanilla": {"eval_capacity_factor": -1}},
            "grace.vanilla.eval_capacity_factor (-1) must be greater than 0",
        ),
    ],
)
def test_bad_values_name_field_value_and_rule(block, message):
    with pytest.raises(GraceConfigError) as info:
        load_ds_config({"grace": block})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"communication": {"path": "hierarchical", "dedup": False}},
            "grace.communication.dedup (false) must be true when grace.communication.path is hierarchical",
        ),
        (
            {"replication": {"enabled": False, "online": {"enabled": True}}},
            "grace.replication.online.enabled (true) requires grace.replication.enabled to be true",
        ),
        (
            {"grouping": {"enabled": False, "ratio": 0.2}},
            "grace.grouping.ratio (0.2) is set but grace.grouping.enabled is false",
        ),
        (
            {"replication": {"mode": "budget", "extra_slots_per_gpu": 0}},
            "grace.replication.extra_slots_per_gpu (0) must be >= 1 in budget mode",
        ),
    ],
)
def test_contradictions_are_errors(block, message):
    with pytest.raises(GraceConfigError) as info:
        load_ds_config({"grace": block})
    assert message in str(info.value)


def test_block_must_be_an_object():
    with pytest.raises(GraceConfigError, match=r"grace \(\[1, 2\]\) must be a JSON object"):
        load_ds_config({"grace": [1, 2]})


def test_file_errors(tmp_path):
    with pytest.raises(GraceConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraceConfigError, match="is not valid JSON"):
        load_ds_config(bad)


def test_topology_resolution():
    grace = GraceConfig()
    assert grace.resolve_topology(world_size=4, env={"LOCAL_SIZE": "2", "CROSS_SIZE": "2"}) == Topology(2, 2)
    assert grace.resolve_topology(world_size=4, env={}) == Topology(1, 4)
    fixed = GraceConfig.model_validate({"topology": {"num_nodes": 2, "gpus_per_node": 2}})
    assert fixed.resolve_topology(world_size=4, env={}) == Topology(2, 2)
    with pytest.raises(GraceConfigError) as info:
        fixed.resolve_topology(world_size=8, env={})
    assert "must equal the expert-parallel world size (8)" in str(info.value)
    half = GraceConfig.model_validate({"topology": {"num_nodes": 3}})
    with pytest.raises(GraceConfigError, match="grace.topology.num_nodes"):
        half.resolve_topology(world_size=4, env={})


def test_check_config_cli(tmp_path, capsys):
    assert cli_main(["check-config", str(CONFIGS / "vanilla_moe.json"), "--world-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["grace"]["routing"]["policy"] == "tar"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grace": {"grouping": {"ratio": 2}}}))
    assert cli_main(["check-config", str(bad)]) == 2
    assert "grace.grouping.ratio (2) must be in [0, 1]" in capsys.readouterr().err
