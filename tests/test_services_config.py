"""`fastserve up` / per-service flags: environment, validation, clear errors."""
from __future__ import annotations

import pytest

from fastserve.deploy.cli import main
from fastserve.common.config import ConfigError, config_from_args
from fastserve.deploy.launcher import NodeConfig, ensure_default_model


def test_every_flag_comes_from_the_environment_and_flags_win():
    env = {"FASTSERVE_MAX_BATCH_SIZE": "7", "FASTSERVE_POLICY": "fcfs", "FASTSERVE_GPU_KV_BLOCKS": "none",
           "FASTSERVE_HOST_KV_BLOCKS": "12", "FASTSERVE_BROKER": "amqp://u:p@h:5672/"}
    cfg = config_from_args(NodeConfig, {"max_batch_size": "9"}, env=env)
    assert (cfg.max_batch_size, cfg.policy, cfg.gpu_kv_blocks, cfg.host_kv_blocks) == (9, "fcfs", None, 12)
    sched = cfg.scheduler_config()
    assert (sched.max_batch_size, sched.policy, sched.host_kv_blocks) == (9, "fcfs", 12)


@pytest.mark.parametrize("env, needle", [
    ({"FASTSERVE_POLICY": "lifo"}, "FASTSERVE_POLICY"),
    ({"FASTSERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ({"FASTSERVE_HOST_KV_BLOCKS": "0"}, "host-kv-blocks"),
    ({"FASTSERVE_BROKER": "redis://x"}, "broker"),
])
def test_bad_settings_are_named(env, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_args(NodeConfig, {}, env=env)


def test_host_pool_is_off_for_policies_that_never_move_kv():
    cfg = config_from_args(NodeConfig, {}, env={"FASTSERVE_KV_POLICY": "recompute", "FASTSERVE_MODEL": "/m"})
    assert cfg.scheduler_config().host_kv_blocks == 0 and cfg.worker_config().host_kv_blocks == 0


def test_single_service_commands_refuse_the_in_memory_bus(capsys):
    assert main(["scheduler", "--broker", "memory://"]) == 2
    assert "fastserve up" in capsys.readouterr().err
    assert main(["worker", "--broker", "amqp://guest:guest@127.0.0.1:5672/", "--model", ""]) == 2
    assert "--model" in capsys.readouterr().err


def test_default_model_is_made_once_and_said_to_be_random(tmp_path, capsys):
    path = ensure_default_model(tmp_path, preset="tiny")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "RANDOM" in capsys.readouterr().err
    mtime = (path / "model.safetensors").stat().st_mtime
    assert ensure_default_model(tmp_path, preset="tiny") == path
    assert (path / "model.safetensors").stat().st_mtime == mtime and "RANDOM" in capsys.readouterr().err
