//! The JSON report and the human summary.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::cli::{Args, Endpoint, Mode, Rate};
use crate::publisher::PubReport;
use crate::sys::ProcSample;
use crate::worker::{Counts, WorkerReport, new_histogram};

/// CPU seconds by thread name.
pub type ThreadCpu = Vec<(String, f64)>;

/// CPU and memory at both ends of a phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phase {
    pub server: Option<(ProcSample, ProcSample)>,
    pub generator: Option<(ProcSample, ProcSample)>,
}

impl Phase {
    pub fn new(s0: Option<ProcSample>, s1: Option<ProcSample>, g0: ProcSample, g1: ProcSample) -> Phase {
        Phase { server: s0.zip(s1), generator: Some((g0, g1)) }
    }

    fn server_cpu(&self) -> Option<f64> {
        self.server.map(|(a, b)| (b.cpu_seconds - a.cpu_seconds).max(0.0))
    }

    fn generator_cpu(&self) -> Option<f64> {
        self.generator.map(|(a, b)| (b.cpu_seconds - a.cpu_seconds).max(0.0))
    }
}

#[derive(Debug)]
pub struct Report {
    config: Value,
    mode: Mode,
    duration: f64,
    hold: f64,
    pub connect_phase: Phase,
    pub hold_phase: Phase,
    pub window_phase: Phase,
    /// Per-thread CPU of the generator at both ends of the measured window.
    pub window_threads: Option<(ThreadCpu, ThreadCpu)>,
    /// --aux-pid over the measured window.
    pub aux_window: Option<(ProcSample, ProcSample)>,
    pub server_end: Option<ProcSample>,
    pub gen_end: Option<ProcSample>,
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn per(numerator: Option<f64>, denominator: u64, scale: f64) -> Value {
    match numerator {
        Some(n) if denominator > 0 => json!(round(n * scale / denominator as f64, 3)),
        _ => Value::Null,
    }
}

/// Percentiles in microseconds of a nanosecond histogram.
fn percentiles_us(h: &Histogram<u64>, with_mean: bool) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let us = |ns: u64| round(ns as f64 / 1000.0, 1);
    let mut v = json!({
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "max": us(h.max()),
    });
    if with_mean {
        v["mean"] = json!(round(h.mean() / 1000.0, 1));
        v["count"] = json!(h.len());
    }
    v
}

impl Report {
    pub fn new(args: &Args, endpoint: &Endpoint, source_ips: usize) -> Report {
        let rate = match args.rate {
            Rate::Fixed(r) => json!(r),
            Rate::Max => json!("max"),
        };
        let config = json!({
            "url": args.url,
            "target": endpoint.addr.to_string(),
            "tls": endpoint.tls,
            "connections": args.connections,
            "users": args.users,
            "topic": args.topic,
            "threads": args.threads,
            "source_ips": source_ips,
            "connect_rate": args.connect_rate,
            "rate": rate,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "hold_s": args.hold.as_secs_f64(),
            "payload_bytes": args.payload_bytes,
            "publish_conns": args.publish_conns,
            "batch": args.batch,
            "absent_users": args.absent_users,
            "server_pids": args.server_pid,
            "aux_pids": args.aux_pid,
        });
        Report {
            config,
            mode: args.mode,
            duration: args.duration.as_secs_f64(),
            hold: args.hold.as_secs_f64(),
            connect_phase: Phase::default(),
            hold_phase: Phase::default(),
            window_phase: Phase::default(),
            window_threads: None,
            aux_window: None,
            server_end: None,
            gen_end: None,
        }
    }

    pub fn finish(self, workers: Vec<WorkerReport>, publish: Option<PubReport>) -> Value {
        let mut c = Counts::default();
        let mut latency = new_histogram();
        let mut connect_latency = new_histogram();
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut closes: BTreeMap<String, u64> = BTreeMap::new();
        let tls = workers.iter().find_map(|w| w.tls.clone());
        c.min_window_msgs = u64::MAX;
        let mut first_attempt = u64::MAX;
        let mut last_established = 0;
        for w in &workers {
            let k = &w.counts;
            c.attempted += k.attempted;
            c.established += k.established;
            c.failed += k.failed;
            c.unexpected_closes += k.unexpected_closes;
            c.received_all += k.received_all;
            c.received_window += k.received_window;
            c.duplicates_all += k.duplicates_all;
            c.duplicates_window += k.duplicates_window;
            c.unchecked_reordered += k.unchecked_reordered;
            c.other_messages += k.other_messages;
            c.pings += k.pings;
            c.open_at_end += k.open_at_end;
            c.silent_at_end += k.silent_at_end;
            c.min_window_msgs = c.min_window_msgs.min(k.min_window_msgs);
            c.max_silence_ns = c.max_silence_ns.max(k.max_silence_ns);
            if k.attempted > 0 {
                first_attempt = first_attempt.min(k.first_attempt_ns);
            }
            last_established = last_established.max(k.last_established_ns);
            // Same bounds everywhere: adding cannot fail.
            let _ = latency.add(&w.latency);
            let _ = connect_latency.add(&w.connect_latency);
            for (k, v) in &w.failures {
                *failures.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &w.closes {
                *closes.entry(k.clone()).or_default() += v;
            }
        }
        let connect_seconds =
            if c.established > 0 { last_established.saturating_sub(first_attempt) as f64 / 1e9 } else { 0.0 };
        let connect_rate = if connect_seconds > 0.0 { c.established as f64 / connect_seconds } else { 0.0 };

        let connect_cpu_server = self.connect_phase.server_cpu();
        let connect_cpu_gen = self.connect_phase.generator_cpu();
        let (rss_before, rss_after_connect) = match self.connect_phase.server {
            Some((a, b)) => (Some(a.rss_kb), Some(b.rss_kb)),
            None => (None, None),
        };
        let rss_after = self.server_end.map(|s| s.rss_kb);
        let rss_per_conn = match (rss_before, rss_after) {
            (Some(a), Some(b)) if c.established > 0 => {
                json!(((b as f64 - a as f64) * 1024.0 / c.established as f64).round())
            }
            _ => Value::Null,
        };
        let (steady, steady_seconds) = match self.mode {
            Mode::Connect | Mode::CeilingServer => (self.hold_phase, self.hold),
            _ => (self.window_phase, self.duration),
        };
        let deliveries = match self.mode {
            Mode::Connect | Mode::CeilingServer => 0,
            _ => c.received_window,
        };
        let utilization = |cpu: Option<f64>| match cpu {
            Some(cpu) if steady_seconds > 0.0 => json!(round(cpu / steady_seconds, 3)),
            _ => Value::Null,
        };
        let server = json!({
            "rss_before_kb": rss_before,
            "rss_after_connect_kb": rss_after_connect,
            "rss_after_kb": rss_after,
            "rss_per_conn_bytes": rss_per_conn,
            "connect_cpu_seconds": connect_cpu_server.map(|x| round(x, 3)),
            "cpu_us_per_conn": per(connect_cpu_server, c.established, 1e6),
            "cpu_seconds": steady.server_cpu().map(|x| round(x, 3)),
            "cpu_cores_busy": utilization(steady.server_cpu()),
            "cpu_us_per_delivery": per(steady.server_cpu(), deliveries, 1e6),
        });
        let gen_rss = self.gen_end.map(|g| g.rss_kb);
        let gen_rss_start = self.connect_phase.generator.map(|(a, _)| a.rss_kb);
        let generator = json!({
            "rss_kb": gen_rss,
            "rss_per_conn_bytes": match (gen_rss_start, gen_rss) {
                (Some(a), Some(b)) if c.established > 0 =>
                    json!(((b as f64 - a as f64) * 1024.0 / c.established as f64).round()),
                _ => Value::Null,
            },
            "connect_cpu_seconds": connect_cpu_gen.map(|x| round(x, 3)),
            "cpu_us_per_conn": per(connect_cpu_gen, c.established, 1e6),
            "cpu_seconds": steady.generator_cpu().map(|x| round(x, 3)),
            "cpu_cores_busy": utilization(steady.generator_cpu()),
            "cpu_us_per_delivery": per(steady.generator_cpu(), deliveries, 1e6),
        });
        let mut generator = generator;
        if let Some((before, after)) = &self.window_threads {
            let mut by_thread = serde_json::Map::new();
            for (name, cpu) in after {
                let start = before.iter().find(|(n, _)| n == name).map_or(0.0, |(_, c)| *c);
                by_thread.insert(name.clone(), json!(round(cpu - start, 3)));
            }
            generator["cpu_seconds_by_thread"] = Value::Object(by_thread);
        }
        let mut out = json!({
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "config": self.config,
            "connections": {
                "attempted": c.attempted,
                "established": c.established,
                "failed": c.failed,
                "unexpected_closes": c.unexpected_closes,
                "connect_seconds": round(connect_seconds, 3),
                "connect_rate_achieved": connect_rate.round(),
                "connect_latency_us": percentiles_us(&connect_latency, false),
                "failures": failures,
                "closes": closes,
                "pings_answered": c.pings,
                "tls": tls,
            },
            "server": server,
            "generator": generator,
        });
        if let Some((a, b)) = self.aux_window {
            let cpu = Some((b.cpu_seconds - a.cpu_seconds).max(0.0));
            out["aux"] = json!({
                "cpu_seconds": cpu.map(|x| round(x, 3)),
                "cpu_cores_busy": utilization(cpu),
                "cpu_us_per_delivery": per(cpu, deliveries, 1e6),
            });
        }
        if let Some(p) = publish {
            // Per message published, not per delivery: what a publish costs when it reaches
            // nobody (absent users) or many (broadcast).
            out["server"]["cpu_us_per_message"] = per(steady.server_cpu(), p.sent_window, 1e6);
            let lost = p.expected_window.saturating_sub(c.received_window);
            out["publish"] = json!({
                "sent": p.sent_all,
                "sent_in_window": p.sent_window,
                "rate_achieved": round(p.sent_window as f64 / self.duration.max(1e-9), 1),
                "replies_ok": p.replies_ok,
                "errors": p.errors,
                "error_kinds": p.error_kinds,
                "not_routed": p.not_routed,
                "idle_closes": p.idle_closes,
                "unsent_backlog": p.unsent,
                "backlog_max": p.backlog_max,
                "written_off": p.written_off,
                "send_lag_us": percentiles_us(&p.lag, false),
            });
            out["deliveries"] = json!({
                "expected": p.expected_window,
                "received": c.received_window,
                "lost": lost,
                "duplicates": c.duplicates_window,
                "unchecked_reordered": c.unchecked_reordered,
                "received_all_phases": c.received_all,
                "duplicates_all_phases": c.duplicates_all,
                "other_messages": c.other_messages,
            });
            // Every connection still receiving: each open one got window messages, and none
            // has been silent for long when the run ended.
            out["per_connection"] = json!({
                "open_at_end": c.open_at_end,
                "received_none_in_window": c.silent_at_end,
                "min_window_messages": if c.open_at_end > 0 { json!(c.min_window_msgs) } else { Value::Null },
                "max_silence_at_end_s": round(c.max_silence_ns as f64 / 1e9, 3),
            });
            out["deliveries_per_sec"] = json!(round(c.received_window as f64 / self.duration.max(1e-9), 1));
            out["latency_us"] = percentiles_us(&latency, true);
        }
        out
    }
}

/// A few lines for a human.
pub fn summary(v: &Value) -> String {
    let mut s = String::new();
    let c = &v["connections"];
    s += &format!(
        "connections: {}/{} established, {} failed, {} unexpected closes, {} conn/s ({}s); connect p99 {} us\n",
        c["established"],
        c["attempted"],
        c["failed"],
        c["unexpected_closes"],
        c["connect_rate_achieved"],
        c["connect_seconds"],
        c["connect_latency_us"]["p99"]
    );
    if c["failures"].as_object().is_some_and(|m| !m.is_empty()) {
        s += &format!("  failures: {}\n", c["failures"]);
    }
    if c["closes"].as_object().is_some_and(|m| !m.is_empty()) {
        s += &format!("  closes: {}\n", c["closes"]);
    }
    if !v["deliveries"].is_null() {
        let d = &v["deliveries"];
        let l = &v["latency_us"];
        s += &format!(
            "publish: {} sent ({} msg/s in window), {} errors; deliveries: {} expected, {} received, {} lost, {} dup; {} deliveries/s\n",
            v["publish"]["sent"],
            v["publish"]["rate_achieved"],
            v["publish"]["errors"],
            d["expected"],
            d["received"],
            d["lost"],
            d["duplicates"],
            v["deliveries_per_sec"]
        );
        let pc = &v["per_connection"];
        s += &format!(
            "per connection: {} open at the end, {} received nothing in the window, min {} window messages, longest silence at the end {} s\n",
            pc["open_at_end"], pc["received_none_in_window"], pc["min_window_messages"], pc["max_silence_at_end_s"]
        );
        s += &format!(
            "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}\n",
            l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
        );
    }
    let sv = &v["server"];
    s += &format!(
        "server: rss {} -> {} kB ({} B/conn), cpu {} us/conn, {} s in steady phase ({} cores), {} us/delivery\n",
        sv["rss_before_kb"],
        sv["rss_after_kb"],
        sv["rss_per_conn_bytes"],
        sv["cpu_us_per_conn"],
        sv["cpu_seconds"],
        sv["cpu_cores_busy"],
        sv["cpu_us_per_delivery"]
    );
    let g = &v["generator"];
    s += &format!(
        "generator: rss {} kB ({} B/conn), cpu {} us/conn, {} s in steady phase ({} cores), {} us/delivery\n",
        g["rss_kb"],
        g["rss_per_conn_bytes"],
        g["cpu_us_per_conn"],
        g["cpu_seconds"],
        g["cpu_cores_busy"],
        g["cpu_us_per_delivery"]
    );
    s
}
