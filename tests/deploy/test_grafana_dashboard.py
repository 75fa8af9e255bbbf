"""deploy/grafana/tunery.json: a dashboard Grafana can load, whose every query names series
Tunery exports, and that shows what the operator asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tunery.json"
TOKEN = "dashboard-test-token"

# PromQL's own words: aggregations, functions are told apart by the "(" after them.
PROMQL_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                             "and", "or", "unless", "bool", "offset"})
# The sample names of a family of each type, as the text format writes them.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "info": ("_info",),
            "summary": ("", "_sum", "_count", "_created"), "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The series `expr` selects: what is left once strings, label matchers, ranges, label
    lists and functions are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = set()
    # Not inside a number or a duration (0.95, 5m).
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue
        found.add(match.group())
    return found


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def sample_names(exposition: str) -> set[str]:
    return {family.name + suffix for family in text_string_to_metric_families(exposition)
            for suffix in SUFFIXES[family.type]}


@pytest.fixture
def exported(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every sample name Tunery serves: a real scrape of the API, and the worker's registry."""
    monkeypatch.setenv("TUNERY_METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()
    import torch

    import worker.metrics  # noqa: F401 - defines the worker's metrics in this process
    from api.main import create_app

    with TestClient(create_app()) as client:
        api = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    # The GPU memory series exist only where CUDA is: this machine may have none, so the
    # collector is shown one device (the edge of what the machine can reach).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    worker = generate_latest(REGISTRY).decode()
    return sample_names(api) | sample_names(worker)


def test_the_expression_reader_finds_the_series_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{job=~"$x", '
            'route!="b"}[$__rate_interval]))) / ignoring(le) max(c_total offset 5m) or on() d')
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}


def test_the_dashboard_is_a_grafana_model_with_a_unique_id_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tunery" and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


def test_every_series_the_dashboard_queries_is_one_tunery_exports(exported: set[str]) -> None:
    exprs = dashboard_exprs()
    assert all(metric_names(expr) for expr in exprs)
    queried = set().union(*(metric_names(expr) for expr in exprs))
    assert sorted(queried - exported) == []


def test_the_dashboard_shows_requests_jobs_queue_training_and_gpu_memory() -> None:
    queried = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert {
        "tunery_http_requests_total", "tunery_http_request_duration_seconds_bucket",
        "tunery_jobs", "tunery_queue_depth", "tunery_broker_waiting_messages",
        "tunery_worker_tokens_per_second", "tunery_worker_phase_duration_seconds_bucket",
        "tunery_worker_gpu_memory_allocated_bytes", "tunery_worker_gpu_memory_reserved_bytes",
    } <= queried
