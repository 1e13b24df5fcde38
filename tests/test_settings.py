"""Settings come from LMFORGE_* variables and flags, and survive the trip to a child process."""

from __future__ import annotations

from pathlib import Path

from lmforge_server.settings import Settings


def test_environment_variables_are_typed_and_flags_win(tmp_path):
    env = {
        "LMFORGE_DATA_DIR": str(tmp_path),
        "LMFORGE_LEASE_TTL_S": "2.5",
        "LMFORGE_MAX_BATCH_SIZE": "8",
        "LMFORGE_INFERENCE_SPIN": "false",
        "LMFORGE_API_KEYS": "k1:alice, k2:bob",
        "LMFORGE_API_ADDR": "0.0.0.0:1",
    }
    s = Settings.from_env(env, api_addr="127.0.0.1:2")
    assert s.data_dir == tmp_path and s.artifacts_dir == tmp_path / "artifacts"
    assert s.lease_ttl_s == 2.5 and s.max_batch_size == 8 and s.inference_spin is False
    assert s.api_keys == {"k1": "alice", "k2": "bob"}
    assert s.api_addr == "127.0.0.1:2"
    assert Settings.from_env({}).inference_spin is True


def test_to_env_rebuilds_the_same_settings():
    s = Settings(
        data_dir=Path("/tmp/x"), api_keys={"k": "t"}, inference_spin=False, parity_limit=1e-3
    )
    assert Settings.from_env(s.to_env()) == s
