"""One config per component: flags generated from the dataclass, TOML files checked against it, and
defaults < file < the flags the user passed; `swarm peer --config` end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from swarm.compression import CodecConfig
from swarm.config import add_flags, build, field_docs, flag_values, load_toml, to_flags
from swarm.diloco import OuterConfig
from swarm.peers.train import TrainConfig
from swarm.pipeline.config import PipelineConfig
from swarm.training import FILE_ONLY, FLAGS, TrainingConfig
from tests.conftest import StartCoordinator

SWARM = [sys.executable, "-m", "swarm.cli.main"]


@dataclass(kw_only=True, slots=True)
class Inner:
    """A nested table."""

    size: int = 8
    """Windows per batch."""
    paths: list[str] = field(default_factory=list)
    """Files to read."""


@dataclass(kw_only=True, slots=True)
class Example:
    """A component's settings."""

    sync_every: int = 20
    """H: steps between syncs."""
    lr: float = 3e-3
    """Peak lr; 10 % at the end."""
    mode: Literal["fast", "safe"] = "safe"
    """How to run."""
    verbose: bool = False
    """Say more."""
    inner: Inner = field(default_factory=Inner)
    """The nested part."""
    extra: Inner | None = None
    """Unset: no extra part."""


def _parser(**kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_flags(parser, Example, **kwargs)  # type: ignore[arg-type]
    return parser


def _parse(*argv: str, **kwargs: object) -> Example:
    return build(Example, flag_values(_parser(**kwargs).parse_args(argv), Example))


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- flags


def test_every_field_gets_a_flag_with_its_doc_as_help_and_its_default_shown() -> None:
    text = _parser().format_help()
    for flag in ("--sync-every", "--lr", "--mode", "--verbose", "--no-verbose", "--inner.size", "--inner.paths",
                 "--extra.size"):
        assert flag in text, flag
    assert "H: steps between syncs. (default: 20)" in " ".join(text.split())
    assert "10 % at the end" in text  # a % in a doc does not break argparse's formatting
    assert "{fast,safe}" in text  # a Literal is a choice
    # Under a field whose default is None the nested defaults are not the defaults: its doc says what is.
    assert "(extra: Unset: no extra part.)" in " ".join(text.split())


def test_flags_parse_to_typed_values_and_nested_tables() -> None:
    config = _parse("--sync-every", "5", "--lr", "0.1", "--mode", "fast", "--verbose", "--inner.size", "4",
                    "--inner.paths", "a", "b")
    assert config == Example(sync_every=5, lr=0.1, mode="fast", verbose=True, inner=Inner(size=4, paths=["a", "b"]))
    assert _parse("--extra.size", "2").extra == Inner(size=2)  # a None field given in part: built from its defaults
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "reckless"])


def test_an_alias_keeps_an_old_flag_name_working_next_to_the_generated_one() -> None:
    aliases = {"sync_every": "--inner-steps", "inner.size": "--batch-size"}
    assert _parse("--inner-steps", "7", "--batch-size", "2", aliases=aliases) == \
        _parse("--sync-every", "7", "--inner.size", "2", aliases=aliases)


def test_skipped_fields_get_no_flag() -> None:
    text = _parser(skip={"lr", "inner.paths"}).format_help()
    assert "--lr" not in text and "--inner.paths" not in text and "--inner.size" in text


def test_only_flags_the_user_passed_are_values() -> None:
    args = _parser().parse_args(["--inner.size", "3"])
    assert flag_values(args, Example) == {"inner": {"size": 3}}
    assert flag_values(_parser().parse_args([]), Example) == {}


def test_to_flags_gives_back_the_flags_of_the_values() -> None:
    values = {"sync_every": 3, "verbose": False, "inner": {"paths": ["x", "y"]}}
    argv = to_flags(values)
    assert argv == ["--sync-every", "3", "--no-verbose", "--inner.paths", "x", "y"]
    assert flag_values(_parser().parse_args(argv), Example) == values


def test_field_docs_reads_the_string_under_each_field_bases_included() -> None:
    docs = field_docs(PipelineConfig)
    assert docs["sync_every"] == field_docs(TrainingConfig)["sync_every"]  # from the base
    assert docs["stages"].startswith("S: pipeline stages")


# ----------------------------------------------------------------- TOML


def test_a_toml_table_loads_into_the_dataclass(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[example]\nsync_every = 5\nlr = 1\nmode = 'fast'\n[example.inner]\npaths = ['a']\n"
                           "[other]\nx = 1\n")
    values = load_toml(Example, path, "example")
    assert values == {"sync_every": 5, "lr": 1.0, "mode": "fast", "inner": {"paths": ["a"]}}  # an int is a float
    assert build(Example, values) == Example(sync_every=5, lr=1.0, mode="fast", inner=Inner(paths=["a"]))


@pytest.mark.parametrize(("text", "words"), [
    ("[example]\nsync_evry = 5\n", ["unknown key example.sync_evry", "known keys of [example]", "sync_every"]),
    ("[example.inner]\nsise = 5\n", ["unknown key example.inner.sise", "size"]),
    ("[example]\nsync_every = '5'\n", ["example.sync_every must be an integer", "'5' (str)"]),
    ("[example]\nsync_every = true\n", ["example.sync_every must be an integer", "True (bool)"]),
    ("[example]\nlr = 'fast'\n", ["example.lr must be a number"]),
    ("[example]\nmode = 'reckless'\n", ["example.mode must be one of 'fast', 'safe'"]),
    ("[example]\ninner = 3\n", ["example.inner must be a table"]),
    ("[example.inner]\npaths = 'a'\n", ["example.inner.paths must be a list"]),
    ("[example.inner]\npaths = [1]\n", ["example.inner.paths[0] must be a string"]),
    ("[exmaple]\nlr = 1.0\n", ["no [example] table", "exmaple"]),
    ("[example\n", ["not valid TOML"]),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = _toml(tmp_path, text)
    with pytest.raises(ValueError) as refused:
        load_toml(Example, path, "example")
    message = str(refused.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, (word, message)


# ------------------------------------------------------------- precedence


def test_defaults_then_file_then_the_flags_given(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[example]\nsync_every = 5\nlr = 0.5\n[example.inner]\nsize = 2\npaths = ['f']\n")
    args = _parser().parse_args(["--lr", "0.25", "--inner.paths", "flag"])
    config = build(Example, load_toml(Example, path, "example"), flag_values(args, Example))
    # lr and inner.paths from the flags, sync_every and inner.size from the file, mode from the defaults.
    assert config == Example(sync_every=5, lr=0.25, mode="safe", inner=Inner(size=2, paths=["flag"]))


def test_build_refuses_an_unknown_option_and_the_dataclass_its_own_bad_values() -> None:
    with pytest.raises(ValueError, match="no option 'sync_evry'"):
        build(TrainConfig, {"sync_evry": 1})
    with pytest.raises(ValueError, match=r"train.steps \(10\) must be >= train.sync_every \(20\)"):
        build(TrainConfig, {"steps": 10})
    with pytest.raises(ValueError, match="pipeline.model must be one of"):
        build(PipelineConfig, {"model": "huge"})


def test_outer_options_given_in_part_change_the_codecs_recipe() -> None:
    config = build(TrainConfig, {"codec": {"name": "sparseloco"}, "outer": {"lr": 0.9}})
    assert config.outer == dataclasses.replace(OuterConfig.recipe("sparseloco"), lr=0.9)
    assert build(TrainConfig, {"outer": {"momentum": 0.5}}).outer == OuterConfig(momentum=0.5)
    assert build(TrainConfig, {"codec": {"name": "sparseloco"}}).outer is None  # DiLoCo takes the recipe


# --------------------------------------------------- the shared training config


def test_train_and_pipeline_share_every_training_field_and_its_default() -> None:
    shared = [f.name for f in dataclasses.fields(TrainingConfig)]
    base, train, pipeline = TrainingConfig(), TrainConfig(), PipelineConfig()
    for name in shared:
        assert getattr(train, name) == getattr(base, name) == getattr(pipeline, name), name
    assert base.outer is None  # the codec's recipe, in both


def test_every_training_field_has_a_flag_or_is_left_to_the_file() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainingConfig, aliases=FLAGS, skip=FILE_ONLY)
    dests = {a.dest.removeprefix("config:") for a in parser._actions}
    for f in dataclasses.fields(TrainingConfig):
        assert f.name in FILE_ONLY or f.name in dests or any(d.startswith(f.name + ".") for d in dests), f.name
    old = parser.parse_args(["--inner-steps", "5", "--codec", "int8", "--data", "x", "--batch-size", "4", "--seq-len",
                             "32", "--outer-lr", "0.5", "--outer-momentum", "0.8", "--feedback-decay", "1"])
    new = parser.parse_args(["--sync-every", "5", "--codec.name", "int8", "--data.paths", "x", "--data.batch-size",
                             "4", "--data.seq-len", "32", "--outer.lr", "0.5", "--outer.momentum", "0.8",
                             "--outer.feedback-decay", "1"])
    assert vars(old) == vars(new)


def test_codec_and_data_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="codec.k only applies"):
        build(TrainConfig, {"codec": {"name": "int8", "k": 64}})
    with pytest.raises(ValueError, match="data.batch_size"):
        build(TrainConfig, {"data": {"batch_size": 0}})
    assert build(TrainConfig, {"codec": {"name": "topk", "k": 64}}).codec == CodecConfig(name="topk", k=64)


def test_the_coordinator_checks_its_table_with_the_same_loader(tmp_path: Path) -> None:
    from swarm.coordinator.config import CoordinatorConfig

    path = _toml(tmp_path, "run_id = 'r1'\n[coordinator]\nlease_s = '5'\n")
    with pytest.raises(ValueError, match=r"peer.toml: coordinator.lease_s must be a number, got '5'"):
        CoordinatorConfig.from_toml(path)
    path.write_text("run_id = 'r1'\n[coordinator]\nlease_s = 8\nmin_peers = 3\n")
    config = CoordinatorConfig.from_toml(path, min_peers=2, stages=None)  # None: the flag was not given
    assert (config.run_id, config.lease_s, config.min_peers, config.heartbeat_interval_s) == ("r1", 8.0, 2, 2.0)


# ------------------------------------------------------------ swarm peer --config


def _swarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWARM, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def test_peer_help_shows_config_and_the_generated_and_old_flags() -> None:
    result = _swarm("peer", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--sync-every", "--inner-steps", "--codec.name", "--codec", "--data.batch-size",
                 "--batch-size", "--stages", "--recovery.method", "--recovery", "--fragments"):
        assert f"{flag} " in result.stdout, flag


def test_peer_refuses_a_config_with_an_unknown_key_before_joining(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[train]\nsteps = 40\nsync_evry = 20\n")
    result = _swarm("peer", "--coordinator", "127.0.0.1:9", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"swarm peer: {path}: unknown key train.sync_evry; known keys of [train]: "
                                     + ", ".join(f.name for f in dataclasses.fields(TrainConfig)))


def test_peer_reads_the_table_of_its_task_and_a_flag_overrides_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[train]\ndevice = 'gpu0'\n[pipeline]\nmicrobatches = 3\n")
    result = _swarm("peer", "--coordinator", "127.0.0.1:9", "--config", str(path))
    assert result.returncode == 2 and "--device 'gpu0' is not a device" in result.stderr  # the file's value
    result = _swarm("peer", "--coordinator", "127.0.0.1:9", "--config", str(path), "--task", "pipeline")
    assert result.returncode == 2 and "pipeline.microbatches (3)" in result.stderr  # 8 windows do not cut in 3
    missing = _swarm("peer", "--coordinator", "127.0.0.1:9", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    result = _swarm("peer", "--coordinator", "127.0.0.1:9", "--config", str(path), "--task", "control",
                    "--codec", "fp16", "--retry-for-s", "0.1")
    assert result.returncode == 1 and "not reachable" in result.stderr  # protocol tasks ignore the tables


@pytest.mark.slow
def test_peer_trains_with_the_settings_of_its_config_file(tmp_path: Path, coordinator_proc: StartCoordinator) -> None:
    coord = coordinator_proc(extra_args=["--min-peers", "1"])
    path = _toml(tmp_path, "[train]\nsteps = 20\nsync_every = 20\nlr = 1e-2\n[train.codec]\nname = 'int8'\n"
                           "[train.data]\nbatch_size = 4\nseq_len = 32\n")
    result = _swarm("peer", "--coordinator", coord.target, "--threads", "1",
                    "--config", str(path), "--inner-steps", "10", timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    extra = json.loads(result.stdout.strip().splitlines()[-1])["peer_report"]["extra"]
    # sync_every from the flag (two rounds), the codec from the file.
    assert extra["sync_every"] == 10 and extra["codec"] == "int8" and extra["final_round"] == 1
