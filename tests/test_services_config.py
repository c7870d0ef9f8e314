"""`fastserve up` / per-service flags: environment, validation, clear errors."""
from __future__ import annotations

import pytest

from fastserve.cli import main
from fastserve.common.config import ConfigError, config_from_args
from fastserve.launcher import NodeConfig, ensure_default_model


def test_every_flag_comes_from_the_environment_and_flags_win():
    env = {"FASTSERVE_MAX_BATCH_SIZE": "7", "FASTSERVE_POLICY": "fcfs", "FASTSERVE_GPU_KV_BLOCKS": "none",
           "FASTSERVE_MODEL": "/m",
           "FASTSERVE_HOST_KV_BLOCKS": "12", "FASTSERVE_BROKER": "amqp://u:p@h:5672/"}
    cfg = config_from_args(NodeConfig, {"max_batch_size": "9"}, env=env)
    assert (cfg.max_batch_size, cfg.policy, cfg.gpu_kv_blocks, cfg.host_kv_blocks) == (9, "fcfs", None, 12)
    sched = cfg.scheduler_config()
    assert (sched.max_batch_size, sched.policy) == (9, "fcfs")
    assert cfg.kvstore_config().host_kv_blocks == 12


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
    assert not cfg.host_kv_enabled and not cfg.scheduler_config().uses_host_kv


def test_every_service_config_takes_its_settings_from_the_one_definition():
    """A setting has one default and one rule: the per-service configs never
    re-declare them (common/settings.py), and `up` hands each service its own."""
    import dataclasses

    from fastserve.common import settings
    from fastserve.gateway.config import GatewayConfig
    from fastserve.gpu_worker.service import WorkerServiceConfig
    from fastserve.kvstore.service import KVStoreServiceConfig
    from fastserve.scheduler.core.config import SchedulerCoreConfig
    from fastserve.scheduler.service.config import SchedulerServiceConfig

    named = {k.lower(): v for k, v in vars(settings).items() if isinstance(v, settings.Setting)}
    for cls in (NodeConfig, GatewayConfig, WorkerServiceConfig, KVStoreServiceConfig, SchedulerServiceConfig,
                SchedulerCoreConfig):
        for f in dataclasses.fields(cls):
            if f.name in named:
                assert f.metadata.get("setting") is named[f.name], (cls.__name__, f.name)
    cfg = config_from_args(NodeConfig, {"block_size": "8", "max_batches_in_flight": "1"}, env={"FASTSERVE_MODEL": "/m"})
    assert cfg.worker_config().block_size == cfg.kvstore_config().block_size == 8
    assert cfg.scheduler_config().max_batches_in_flight == 1
    with pytest.raises(ConfigError, match="block_size must be > 0"):
        config_from_args(NodeConfig, {"block_size": "0"}, env={})


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
