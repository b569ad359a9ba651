#!/usr/bin/env python3
"""Writes algolink-dashboard.json, the Grafana dashboard for AlgoLink's Prometheus metrics.
Run it after changing the panels; tests/tests/protocol.rs checks that every metric it queries is
one the server exports."""

import json
import os

RATE = "$__rate_interval"
SEL = 'model=~"$model"'


def panel(title, targets, unit, x, y, w=12, h=8, kind="timeseries", description=""):
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def quantile(q, metric):
    return f"histogram_quantile({q}, sum by (le, model, version) (rate({metric}_bucket{{{SEL}}}[{RATE}])))"


panels = [
    panel("Requests per second", [(f"sum by (model, version) (rate(algolink_requests_total{{{SEL}}}[{RATE}]))", "{{model}} v{{version}}")], "reqps", 0, 0),
    panel(
        "Error ratio",
        [(
            f'sum by (model, version) (rate(algolink_requests_total{{{SEL},outcome="failure"}}[{RATE}])) / '
            f"sum by (model, version) (rate(algolink_requests_total{{{SEL}}}[{RATE}]))",
            "{{model}} v{{version}}",
        )],
        "percentunit", 12, 0,
    ),
    panel(
        "Request latency p50 / p99",
        [(quantile(0.5, "algolink_request_duration_seconds"), "p50 {{model}} v{{version}}"),
         (quantile(0.99, "algolink_request_duration_seconds"), "p99 {{model}} v{{version}}")],
        "s", 0, 8,
    ),
    panel(
        "Queue time p99 and device time p99",
        [(quantile(0.99, "algolink_queue_duration_seconds"), "queue {{model}} v{{version}}"),
         (quantile(0.99, "algolink_compute_duration_seconds"), "device {{model}} v{{version}}")],
        "s", 12, 8,
    ),
    panel(
        "Mean rows per executed batch",
        [(
            f"sum by (model, version) (rate(algolink_batch_size_sum{{{SEL}}}[{RATE}])) / "
            f"sum by (model, version) (rate(algolink_batch_size_count{{{SEL}}}[{RATE}]))",
            "{{model}} v{{version}}",
        )],
        "short", 0, 16,
    ),
    panel(
        "Batch size distribution",
        [(f"sum by (le) (increase(algolink_batch_size_bucket{{{SEL}}}[{RATE}]))", "{{le}}")],
        "short", 12, 16, kind="heatmap",
    ),
    panel("Queue depth", [(f"sum by (model, version) (algolink_queue_depth{{{SEL}}})", "{{model}} v{{version}}")], "short", 0, 24,
          description="The autoscaling signal: requests waiting per version."),
    panel(
        "Refused: queue full, shed, expired, client gone",
        [(f"sum by (model) (rate(algolink_rejected_total{{{SEL}}}[{RATE}]))", "queue full {{model}}"),
         (f"sum by (model) (rate(algolink_shed_total{{{SEL}}}[{RATE}]))", "shed {{model}}"),
         (f"sum by (model) (rate(algolink_shed_late_total{{{SEL}}}[{RATE}]))", "of them while queued {{model}}"),
         (f"sum by (model) (rate(algolink_expired_total{{{SEL}}}[{RATE}]))", "expired {{model}}"),
         (f"sum by (model) (rate(algolink_cancelled_total{{{SEL}}}[{RATE}]))", "client gone {{model}}")],
        "reqps", 12, 24,
    ),
    panel(
        "Adaptive batching: chosen wait p90 and fitted batch time",
        [(quantile(0.9, "algolink_batch_wait_seconds"), "wait p90 {{model}} v{{version}}"),
         (f'algolink_batch_model_seconds{{{SEL},term="base"}}', "base {{model}} v{{version}}"),
         (f'algolink_batch_model_seconds{{{SEL},term="per_row"}}', "per row {{model}} v{{version}}")],
        "s", 0, 32,
    ),
    panel("Rows per second on the device", [(f"sum by (model, version) (rate(algolink_inference_rows_total{{{SEL}}}[{RATE}]))", "{{model}} v{{version}}")], "short", 12, 32),
    panel("Traffic split", [(f"algolink_route_share_percent{{{SEL}}}", "{{model}} {{variant}} (v{{version}})")], "percent", 0, 40),
    panel(
        "Experiment: mean outcome per variant",
        [(f"algolink_experiment_outcome_sum{{{SEL}}} / algolink_experiment_outcomes_total{{{SEL}}}", "{{model}} #{{experiment}} v{{version}}")],
        "short", 12, 40,
    ),
    panel(
        "Shadow traffic",
        [(f"sum by (model, version, outcome) (rate(algolink_shadow_requests_total{{{SEL}}}[{RATE}]))", "{{model}} v{{version}} {{outcome}}"),
         (f"algolink_shadow_max_abs_difference{{{SEL}}}", "max |diff| {{model}} v{{version}}")],
        "short", 0, 48,
    ),
    panel("Auth denials", [(f"sum by (reason) (rate(algolink_auth_denied_total[{RATE}]))", "{{reason}}")], "reqps", 12, 48),
    panel(
        "Adaptive admission: latency correction",
        [(f"algolink_latency_prediction_ratio{{{SEL}}}", "{{model}} v{{version}}")],
        "short", 0, 56,
        description="What admission multiplies its latency predictions by: the p99 of actual over predicted "
        "latency of recent requests. Well above 1: the host is slower than the batch-time model says "
        "(CPU contention), and requests are shed earlier.",
    ),
    panel(
        "Adaptive batching on the CPU: groups, and rows/s measured each way",
        [
            (f"algolink_batch_groups{{{SEL}}}", "{{model}} v{{version}} groups"),
            (f"algolink_batch_groups_rows_per_second{{{SEL}}}", "{{model}} v{{version}} in {{groups}}"),
        ],
        "short", 12, 56,
        description="How many groups gathered clients (and, for tract models, saturated traffic) run in: "
        "1, one batch at a time on every core; 2, two batches side by side. And the rows per second each "
        "way made when last measured: the planner keeps the faster.",
    ),
]
for i, p in enumerate(panels):
    p["id"] = i + 1

dashboard = {
    "title": "AlgoLink",
    "uid": "algolink",
    "tags": ["algolink", "model-serving"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {
                "name": "model",
                "type": "query",
                "label": "Model",
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": "label_values(algolink_requests_total, model)", "refId": "models"},
                "definition": "label_values(algolink_requests_total, model)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
            },
        ]
    },
    "panels": panels,
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "algolink-dashboard.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {len(panels)} panels")
