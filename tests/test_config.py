"""Config merging (defaults < YAML files in order < overrides) and its one-line errors."""

from pathlib import Path

import pytest

from mtp_lightning.config import ALL_KEYS, Config, load_config, to_yaml
from mtp_lightning.config_checks import RANGES
from mtp_lightning.errors import UserError

CONF = Path(__file__).resolve().parent.parent / "conf"


def test_merge_order(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model:\n  heads: {rank: 3, n_future: 2}\ntrainer: {max_steps: 7}\n")
    b.write_text("model:\n  heads: {rank: 5}\n")
    cfg = load_config([str(a), str(b)], ["trainer.max_steps=11"])
    assert (cfg.model.heads.rank, cfg.model.heads.n_future, cfg.trainer.max_steps) == (5, 2, 11)
    assert cfg.data.kind == "code" and cfg.run.root == "runs"  # untouched defaults


def test_keys_other_tools_rely_on():
    for key in ("run.name", "run.root", "run.seed", "trainer.max_steps", "trainer.devices",
                "trainer.accelerator", "trainer.strategy", "trainer.precision", "checkpoint.every_n_steps",
                "data.kind", "data.source", "model.heads.n_future", "model.heads.rank"):
        assert key in ALL_KEYS


@pytest.mark.parametrize("overrides, message", [
    (["model.heads.rnak=3"], "unknown config key 'model.heads.rnak' in the command line (did you mean "
                             "'model.heads.rank'?)"),
    (["trainer.max_steps=many"], "config key 'trainer.max_steps' in the command line expects int, got 'many'"),
    (["model.heads.rank=0"], "model.heads.rank=0 must be >= 1"),
    (["model.gpt.n_head=5"], "model.gpt.n_head=5 does not divide model.gpt.d_model=256"),
    (["model.heads.n_future=300"], "model.heads.n_future=300 is larger than the window data.seq_len=256"),
    (["model.heads.kind=conv"], "model.heads.kind='conv' is not one of linear, mlp, block"),
    (["model.loss.balance=aux"], "model.loss.balance='aux' is not one of switch, cv2, none"),
    (["data.kind=audio"], "data.kind='audio' is not one of code, text"),
    (["trainer.strategy=deepspeed"], "trainer.strategy='deepspeed' is not one of"),
    (["max_steps"], "override 'max_steps' is not of the form key=value"),
    (["run.name=a/b"], "run.name='a/b' must be a plain folder name"),
    (["draft_tuning.steps=-1"], "draft_tuning.steps=-1 must be >= 0 (0 turns draft tuning off)"),
    (["draft_tuning.steps=5", "draft_tuning.new_tokens=200"],
     "draft_tuning.prompt_len=64 + draft_tuning.new_tokens=200 exceeds model.gpt.max_seq_len=256"),
    (["draft_tuning.steps=5", "model.heads.n_future=1"], "model.heads.n_future=1 has none"),
    (["draft_tuning.steps=5", "draft_tuning.lr=0"], "draft_tuning.lr=0.0 must be > 0"),
    (["draft_tuning.steps=5", "draft_tuning.temperature=-1"], "draft_tuning.temperature=-1.0 must be >= 0"),
])
def test_errors_name_the_key_and_value(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_errors_are_collected():
    with pytest.raises(UserError) as e:
        load_config(overrides=["model.heads.rank=0", "model.gpt.n_layer=0"])
    assert "model.heads.rank=0" in str(e.value) and "model.gpt.n_layer=0" in str(e.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found: 'nope.yaml'"):
        load_config(["nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config([str(bad)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  head:\n    rank: 2\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.head.rank' in '.*typo.yaml' \(did you mean "
                                        r"'model.heads.rank'\?\)"):
        load_config([str(typo)])


def _is_sweep(path: Path) -> bool:
    """Sweep files hold one top-level ``sweep:`` mapping; tests/test_sweep.py loads them."""
    return any(line.startswith("sweep:") for line in path.read_text().splitlines())


@pytest.mark.parametrize("preset", sorted(p.name for p in CONF.glob("*.yaml") if not _is_sweep(p)))
def test_every_preset_loads(preset):
    cfg = load_config([str(CONF / preset)])
    assert cfg.run.name
    assert load_config(overrides=[]) == Config()  # no files, no overrides: the schema's defaults
    # the printed config is itself a valid config file
    assert to_yaml(cfg).startswith("run:")


def _outside(rule: str, integer: bool):
    """A value just outside ``rule`` (``">= 1"``, ``"> 0"``, ``"[0, 1)"``...)."""
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return hi if rule[-1] == ")" else hi + 1
    op, bound = rule.split()
    return float(bound) - (1 if integer or op == ">=" else 0)


def test_every_numeric_key_has_a_range():
    numeric = {key for key, typ in ALL_KEYS.items() if typ in ("int", "float")}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_value_outside_its_range_is_refused(key):
    rule, _, note = RANGES[key].partition(";")
    integer = ALL_KEYS[key] == "int"
    value = _outside(rule, integer)
    value = int(value) if integer else float(value)
    bound = f"in {rule}" if rule[0] in "[(" else rule
    expected = f"{key}={value} must be {bound}" + (f" ({note.strip()})" if note else "")
    with pytest.raises(UserError) as e:
        load_config(overrides=[f"{key}={value}"])
    assert expected in str(e.value).split("invalid config: ", 1)[1].split("; "), str(e.value)


def test_negative_head_lr_and_warmup_are_refused_together():
    with pytest.raises(UserError) as e:
        load_config(overrides=["optim.head_lr=-0.001", "optim.warmup_steps=-5"])
    assert str(e.value) == ("invalid config: optim.head_lr=-0.001 must be >= 0 (0 uses optim.lr); "
                            "optim.warmup_steps=-5 must be >= 0")


def test_not_a_number_is_outside_every_range():
    with pytest.raises(UserError, match=r"optim.lr=nan must be > 0"):
        load_config(overrides=["optim.lr=nan"])
