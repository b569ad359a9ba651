//! `/metrics` in the Prometheus text exposition format, rendered from the engine's counters.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use algolink_engine::stats::Histogram;

use crate::state::AppState;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let (buckets, count, sum) = h.snapshot();
    for (bound, cumulative) in buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// The `# HELP` and `# TYPE` lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The metrics of the models `sees` accepts (a caller's namespaces); the server-wide auth
/// counters only when `server_wide` (the owner, or auth off).
pub fn render(st: &AppState, sees: &dyn Fn(&str) -> bool, server_wide: bool) -> String {
    let mut all = st.all_stats();
    all.retain(|((model, _), _)| sees(model));
    let mut out = String::with_capacity(4096 + all.len() * 8192);
    let series = |out: &mut String,
                  name: &str,
                  kind: &str,
                  help: &str,
                  f: &dyn Fn(&mut String, &str, &algolink_engine::Stats)| {
        family(out, name, kind, help);
        for ((model, version), s) in &all {
            let labels = format!("model=\"{}\",version=\"{version}\"", escape(model));
            f(out, &labels, s);
        }
    };
    series(&mut out, "algolink_requests_total", "counter", "Inference requests answered, by outcome.", &|out, l, s| {
        let _ = writeln!(out, "algolink_requests_total{{{l},outcome=\"success\"}} {}", s.success.get().0);
        let _ = writeln!(out, "algolink_requests_total{{{l},outcome=\"failure\"}} {}", s.failure.get().0);
    });
    series(
        &mut out,
        "algolink_rejected_total",
        "counter",
        "Requests refused because the queue was full.",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_rejected_total{{{l}}} {}", s.rejected.load(Relaxed));
        },
    );
    series(
        &mut out,
        "algolink_expired_total",
        "counter",
        "Requests whose deadline passed in the queue.",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_expired_total{{{l}}} {}", s.expired.load(Relaxed));
        },
    );
    series(
        &mut out,
        "algolink_shed_total",
        "counter",
        "Requests refused by adaptive batching because they were predicted to miss their deadline.",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_shed_total{{{l}}} {}", s.shed.load(Relaxed));
        },
    );
    series(
        &mut out,
        "algolink_shed_late_total",
        "counter",
        "Of algolink_shed_total, the requests refused while queued (the host slowed down after they \
         were let in), not on arrival.",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_shed_late_total{{{l}}} {}", s.shed_late.load(Relaxed));
        },
    );
    series(
        &mut out,
        "algolink_batch_model_seconds",
        "gauge",
        "The fitted execution time per batch, base + per_row x rows.",
        &|out, l, s| {
            let _ = writeln!(
                out,
                "algolink_batch_model_seconds{{{l},term=\"base\"}} {}",
                s.fit_base_ns.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "algolink_batch_model_seconds{{{l},term=\"per_row\"}} {}",
                s.fit_per_row_ns.load(Relaxed) as f64 / 1e9
            );
        },
    );
    series(
        &mut out,
        "algolink_batch_groups",
        "gauge",
        "Adaptive mode on the CPU: the groups gathered clients run in (1: one batch at a time on \
         every core; 2: two batches, side by side on half the cores each where the model allows, \
         else in turn).",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_batch_groups{{{l}}} {}", s.groups.load(Relaxed));
        },
    );
    series(
        &mut out,
        "algolink_batch_groups_rows_per_second",
        "gauge",
        "Adaptive mode on the CPU: the rows per second gathered clients made in each number of \
         groups, when last measured (0: not yet).",
        &|out, l, s| {
            for (groups, rate) in [1, 2].iter().zip(&s.groups_rows_per_second) {
                let _ = writeln!(
                    out,
                    "algolink_batch_groups_rows_per_second{{{l},groups=\"{groups}\"}} {}",
                    rate.load(Relaxed)
                );
            }
        },
    );
    series(
        &mut out,
        "algolink_latency_prediction_ratio",
        "gauge",
        "Adaptive admission's correction: the 99th percentile of recent requests' actual latency \
         over the latency predicted when they were admitted.",
        &|out, l, s| {
            let _ = writeln!(
                out,
                "algolink_latency_prediction_ratio{{{l}}} {}",
                s.prediction_factor_ppm.load(Relaxed) as f64 / 1e6
            );
        },
    );
    series(
        &mut out,
        "algolink_batch_wait_seconds",
        "histogram",
        "Each wait the batcher chose: for a fuller batch, or until the device frees up.",
        &|out, l, s| histogram(out, "algolink_batch_wait_seconds", l, &s.planned_wait_seconds),
    );
    series(
        &mut out,
        "algolink_cancelled_total",
        "counter",
        "Requests dropped before the device because the client left.",
        &|out, l, s| {
            let _ = writeln!(out, "algolink_cancelled_total{{{l}}} {}", s.cancelled.load(Relaxed));
        },
    );
    series(&mut out, "algolink_inference_rows_total", "counter", "Rows executed on the device.", &|out, l, s| {
        let _ = writeln!(out, "algolink_inference_rows_total{{{l}}} {}", s.rows.load(Relaxed));
    });
    series(&mut out, "algolink_queue_depth", "gauge", "Requests waiting in the queue.", &|out, l, s| {
        let _ = writeln!(out, "algolink_queue_depth{{{l}}} {}", s.queue_depth.load(Relaxed));
    });
    series(
        &mut out,
        "algolink_request_duration_seconds",
        "histogram",
        "End-to-end inference request duration.",
        &|out, l, s| histogram(out, "algolink_request_duration_seconds", l, &s.request_seconds),
    );
    series(
        &mut out,
        "algolink_queue_duration_seconds",
        "histogram",
        "Time requests waited before their batch ran.",
        &|out, l, s| histogram(out, "algolink_queue_duration_seconds", l, &s.queue_seconds),
    );
    series(
        &mut out,
        "algolink_compute_duration_seconds",
        "histogram",
        "Device time per executed batch.",
        &|out, l, s| histogram(out, "algolink_compute_duration_seconds", l, &s.compute_seconds),
    );
    series(&mut out, "algolink_batch_size", "histogram", "Rows per executed batch.", &|out, l, s| {
        histogram(out, "algolink_batch_size", l, &s.batch_size)
    });
    lifecycle(&mut out, st, sees);
    if !server_wide {
        return out;
    }
    family(
        &mut out,
        "algolink_auth_denied_total",
        "counter",
        "Requests refused for want of a valid token (401) or of a role (403).",
    );
    for (reason, n) in [("unauthenticated", &st.auth.denied_unauthenticated), ("forbidden", &st.auth.denied_forbidden)]
    {
        let _ = writeln!(out, "algolink_auth_denied_total{{reason=\"{reason}\"}} {}", n.load(Relaxed));
    }
    out
}

/// Traffic shares of routed models, shadow mirrors, and experiment outcomes.
fn lifecycle(out: &mut String, st: &AppState, sees: &dyn Fn(&str) -> bool) {
    family(
        out,
        "algolink_route_share_percent",
        "gauge",
        "Share of a model's unversioned requests routed to a variant.",
    );
    for (model, r) in st.all_routings().into_iter().filter(|(m, _)| sees(m)) {
        for (v, p) in r.variants.iter().zip(r.split.percents()) {
            let _ = writeln!(
                out,
                "algolink_route_share_percent{{model=\"{}\",variant=\"{}\",version=\"{}\"}} {p}",
                escape(&model),
                escape(&v.label),
                v.version
            );
        }
    }
    let mut shadows = st.all_shadow_stats();
    shadows.retain(|((model, _), _)| sees(model));
    family(out, "algolink_shadow_requests_total", "counter", "Requests mirrored to a shadow version, by outcome.");
    for ((model, version), s) in &shadows {
        let (ok, failed, dropped, _) = s.counts();
        for (outcome, n) in [("success", ok), ("failure", failed), ("dropped", dropped)] {
            let _ = writeln!(
                out,
                "algolink_shadow_requests_total{{model=\"{}\",version=\"{version}\",outcome=\"{outcome}\"}} {n}",
                escape(model)
            );
        }
    }
    family(
        out,
        "algolink_shadow_max_abs_difference",
        "gauge",
        "Largest element-wise difference between a shadow's and the primary's outputs.",
    );
    for ((model, version), s) in &shadows {
        let _ = writeln!(
            out,
            "algolink_shadow_max_abs_difference{{model=\"{}\",version=\"{version}\"}} {}",
            escape(model),
            s.counts().3
        );
    }
    let mut totals = st.experiment_totals();
    totals.retain(|(model, ..)| sees(model));
    for (name, kind, help, value) in [
        ("algolink_experiment_outcomes_total", "counter", "Outcomes recorded per variant of a running experiment.", 0),
        ("algolink_experiment_outcome_sum", "gauge", "Sum of the outcomes per variant of a running experiment.", 1),
    ] {
        family(out, name, kind, help);
        for (model, id, version, m) in &totals {
            let v = if value == 0 { m.n as f64 } else { m.sum };
            let _ =
                writeln!(out, "{name}{{model=\"{}\",experiment=\"{id}\",version=\"{version}\"}} {v}", escape(model));
        }
    }
}
