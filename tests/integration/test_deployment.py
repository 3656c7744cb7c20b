"""The documented stack: docker-compose names every service with what it runs."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_runs_the_whole_stack_with_health_checks():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"postgres", "redis", "mailpit", "migrate", "api", "worker",
                             "beat"}
    for name in ("postgres", "redis", "mailpit", "api", "worker"):
        assert "healthcheck" in services[name], name
    assert services["api"]["command"][:2] == ["trialog", "serve"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers.app", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers.app", "beat"]
    env = services["migrate"]["environment"]
    assert {"TRIALOG_DATABASE_URL", "TRIALOG_REDIS_URL", "TRIALOG_SMTP_URL",
            "TRIALOG_CIPHER_KEY", "TRIALOG_ALLOCATION_SEED", "TRIALOG_PSEUDONYM_KEY"} <= set(env)
    for name in ("api", "worker", "beat"):  # every process gets the same settings
        assert services[name]["environment"] == env, name
    assert (ROOT / "Dockerfile").exists()
