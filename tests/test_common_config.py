import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from fastserve.common.config import ConfigError, add_config_args, config_from_args, config_from_env


@dataclass(frozen=True)
class DemoConfig:
    broker: str = field(default="memory://", metadata={"help": "broker URL"})
    port: int = 8000
    ratio: float = 2.0
    verbose: bool = False
    api_keys: tuple[str, ...] = ()
    max_queued: int | None = None
    policy: Literal["sj-mlfq", "mlfq", "fcfs"] = "sj-mlfq"

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")


def _parse(argv, env=None, **kw):
    parser = argparse.ArgumentParser()
    add_config_args(parser, DemoConfig)
    return config_from_args(DemoConfig, parser.parse_args(argv), env=env or {}, **kw)


def test_defaults():
    assert _parse([]) == DemoConfig()


def test_flags_typed():
    cfg = _parse(["--port", "9000", "--ratio", "1.5", "--verbose", "--api-keys", "a,b", "--max-queued", "7",
                  "--policy", "fcfs"])
    assert cfg == DemoConfig(port=9000, ratio=1.5, verbose=True, api_keys=("a", "b"), max_queued=7, policy="fcfs")


def test_env_used_when_no_flag_and_flag_wins_over_env():
    env = {"FASTSERVE_PORT": "9100", "FASTSERVE_VERBOSE": "yes", "FASTSERVE_API_KEYS": "k1, k2",
           "FASTSERVE_MAX_QUEUED": "none", "FASTSERVE_BROKER": "amqp://x/"}
    cfg = _parse([], env)
    assert (cfg.port, cfg.verbose, cfg.api_keys, cfg.max_queued, cfg.broker) == (9100, True, ("k1", "k2"), None, "amqp://x/")
    assert _parse(["--port", "9200", "--no-verbose"], env).port == 9200
    assert _parse(["--no-verbose"], env).verbose is False


def test_overrides_win():
    assert _parse(["--port", "1"], {"FASTSERVE_PORT": "2"}, port=3).port == 3


@pytest.mark.parametrize(
    "argv, env, match",
    [
        (["--port", "abc"], {}, r"--port: invalid value 'abc'"),
        ([], {"FASTSERVE_PORT": "x"}, r"FASTSERVE_PORT: invalid value 'x'"),
        ([], {"FASTSERVE_VERBOSE": "maybe"}, r"FASTSERVE_VERBOSE"),
        ([], {"FASTSERVE_POLICY": "lifo"}, r"must be one of sj-mlfq, mlfq, fcfs"),
        (["--port", "70000"], {}, r"DemoConfig: port must be in 1..65535, got 70000"),
    ],
)
def test_errors_name_the_source(argv, env, match):
    with pytest.raises(ConfigError, match=match):
        _parse(argv, env)


def test_bad_choice_on_cli_is_argparse_error():
    with pytest.raises(SystemExit):
        _parse(["--policy", "lifo"])


def test_config_from_env_and_unknown_override():
    assert config_from_env(DemoConfig, {"FASTSERVE_RATIO": "3"}).ratio == 3.0
    with pytest.raises(ConfigError, match="no field"):
        config_from_env(DemoConfig, {}, nope=1)


def test_help_mentions_env_and_default():
    parser = argparse.ArgumentParser()
    add_config_args(parser, DemoConfig)
    text = parser.format_help()
    assert "FASTSERVE_MAX_QUEUED" in text and "default: 8000" in text and "broker URL" in text
