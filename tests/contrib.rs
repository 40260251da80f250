//! The operator-facing files in `contrib/`: Prometheus alert rules and the
//! Grafana dashboard, held to what walsafe actually exports.
//!
//! * Both files parse (the rule file strictly, with Prometheus's own field
//!   names, so that a typo such as `annotation:` is an error here as it is
//!   in Prometheus).
//! * Every `walsafe_…` name in any expression is a metric named in
//!   `src/metrics.rs` (`pub const NAME: &str = "walsafe_…";`), with
//!   `_bucket`/`_sum`/`_count` only on histograms.
//! * Every alert has a summary and a description and a known severity;
//!   every duration parses as a Prometheus duration.
//! * Every expression passes a small PromQL well-formedness check: balanced
//!   brackets outside strings, label matchers, range durations, known
//!   function names, defined Grafana variables.
//! * `promtool` (Debian: `apt-get install prometheus`; scripts/test.sh
//!   installs it) checks the rule file, the dashboard's expressions, and
//!   the alerts' behaviour on synthetic series (which fire, and which stay
//!   quiet: an idle cluster must not page). Without it those two tests
//!   fail, saying how to install it: a check that did not run never
//!   passes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde::Deserialize;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

const ALERTS: &str = "contrib/prometheus/walsafe-alerts.yml";
const DASHBOARD: &str = "contrib/grafana/walsafe-dashboard.json";

/// What `src/metrics.rs` declares.
struct Declared {
    /// Every metric name.
    names: BTreeSet<String>,
    /// The names described as histograms.
    histograms: BTreeSet<String>,
}

fn declared() -> Declared {
    let src = read("src/metrics.rs");
    let konst = Regex::new(r#"pub const ([A-Z0-9_]+): &str = "(walsafe_[a-z0-9_]+)";"#).unwrap();
    let consts: BTreeMap<String, String> = konst
        .captures_iter(&src)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();
    assert!(
        consts.len() >= 17,
        "found only {} metric constants in src/metrics.rs; has the declaration style changed?",
        consts.len()
    );
    let hist = Regex::new(r"describe_histogram!\(\s*([A-Z0-9_]+)").unwrap();
    let histograms: BTreeSet<String> = hist
        .captures_iter(&src)
        .map(|c| {
            consts
                .get(&c[1])
                .unwrap_or_else(|| panic!("describe_histogram! of unknown constant {}", &c[1]))
                .clone()
        })
        .collect();
    assert!(
        histograms.contains("walsafe_fsync_duration_seconds"),
        "fsync histogram not found in src/metrics.rs"
    );
    Declared {
        names: consts.into_values().collect(),
        histograms,
    }
}

/// The walsafe metric each `walsafe_…` token of `expr` refers to; an
/// `Err` names a token that is not exported.
fn metric_refs(expr: &str, d: &Declared) -> Result<BTreeSet<String>, String> {
    let tok = Regex::new(r"\bwalsafe_[a-z0-9_]+").unwrap();
    let mut out = BTreeSet::new();
    for m in tok.find_iter(expr) {
        let name = m.as_str();
        if d.names.contains(name) {
            out.insert(name.to_string());
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s));
        match base {
            Some(b) if d.histograms.contains(b) => {
                out.insert(b.to_string());
            }
            Some(b) if d.names.contains(b) => {
                return Err(format!("{name}: {b} is not a histogram"))
            }
            _ => return Err(format!("{name} is not a metric in src/metrics.rs")),
        }
    }
    Ok(out)
}

/// A Prometheus duration (`1h30m`, `5m`, `90s`, `500ms`) in milliseconds.
fn parse_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let re = Regex::new(
        r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$",
    )
    .unwrap();
    let c = re.captures(s)?;
    if s.is_empty() {
        return None;
    }
    let unit_ms = [
        365 * 86_400_000,
        7 * 86_400_000,
        86_400_000,
        3_600_000,
        60_000,
        1_000,
        1,
    ];
    let mut total = 0u64;
    for (i, ms) in unit_ms.iter().enumerate() {
        if let Some(v) = c.get(i + 1) {
            total += v.as_str().parse::<u64>().ok()? * ms;
        }
    }
    Some(total)
}

/// PromQL functions and aggregation operators (Prometheus 2.x/3.x).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
    // aggregation operators
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    // keywords that may precede a parenthesis
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
];

/// Replaces Grafana variables (`$name`, `${name}`) by placeholders;
/// `Err` names one that is neither a builtin nor in `vars`.
fn substitute_grafana_vars(expr: &str, vars: &BTreeSet<String>) -> Result<String, String> {
    let re = Regex::new(r"\$(?:\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|([A-Za-z0-9_]+))").unwrap();
    let mut err = None;
    let out = re.replace_all(expr, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).unwrap().as_str();
        match name {
            "__rate_interval" | "__interval" | "__range" => "5m".to_string(),
            n if vars.contains(n) => "placeholder".to_string(),
            n => {
                err = Some(format!("undefined Grafana variable ${n}"));
                String::new()
            }
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(out.into_owned()),
    }
}

/// Scans a string literal starting at `i` (a quote); returns the index
/// after its closing quote.
fn skip_string(b: &[u8], i: usize) -> Result<usize, String> {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == b'\\' && q != b'`' {
            j += 2;
            continue;
        }
        if b[j] == q {
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(format!("unterminated string starting at byte {i}"))
}

/// A cheap PromQL well-formedness check (not a parser): see the module doc.
fn check_promql(expr: &str) -> Result<(), String> {
    let e = expr.trim();
    if e.is_empty() {
        return Err("empty expression".into());
    }
    let b = e.as_bytes();
    let matcher = Regex::new(
        r#"^[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)$"#,
    )
    .unwrap();
    // (opening byte, index, whether it opens a call's argument list)
    let mut stack: Vec<(u8, usize, bool)> = Vec::new();
    let mut last_ident: Option<String> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i)?;
                last_ident = None;
                continue;
            }
            b'{' => {
                // Label matchers: up to the matching '}' (strings skipped).
                let mut j = i + 1;
                let mut parts = Vec::new();
                let mut start = j;
                loop {
                    if j >= b.len() {
                        return Err(format!("unclosed '{{' at byte {i}"));
                    }
                    match b[j] {
                        b'"' | b'\'' | b'`' => {
                            j = skip_string(b, j)?;
                            continue;
                        }
                        b',' => {
                            parts.push(&e[start..j]);
                            start = j + 1;
                        }
                        b'}' => {
                            parts.push(&e[start..j]);
                            break;
                        }
                        b'{' | b'(' | b')' | b'[' | b']' => {
                            return Err(format!(
                                "'{}' inside label matchers at byte {j}",
                                b[j] as char
                            ))
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let n = parts.len();
                for (k, p) in parts.iter().enumerate() {
                    let p = p.trim();
                    if p.is_empty() && k + 1 == n && n > 1 {
                        continue; // trailing comma
                    }
                    if p.is_empty() && n == 1 {
                        continue; // `{}` after a metric name
                    }
                    if !matcher.is_match(p) {
                        return Err(format!("bad label matcher {p:?}"));
                    }
                }
                i = j + 1;
                last_ident = None;
                continue;
            }
            b'[' => {
                let close = e[i..]
                    .find(']')
                    .map(|k| i + k)
                    .ok_or_else(|| format!("unclosed '[' at byte {i}"))?;
                let inner = e[i + 1..close].trim();
                let (range, step) = match inner.split_once(':') {
                    Some((r, s)) => (r.trim(), Some(s.trim())),
                    None => (inner, None),
                };
                if parse_duration(range).is_none_or(|ms| ms == 0) {
                    return Err(format!("bad range duration {range:?}"));
                }
                if let Some(s) = step {
                    if !s.is_empty() && parse_duration(s).is_none() {
                        return Err(format!("bad subquery step {s:?}"));
                    }
                }
                i = close + 1;
                last_ident = None;
                continue;
            }
            b'(' => {
                let call = last_ident.take();
                if let Some(name) = &call {
                    if !FUNCTIONS.contains(&name.as_str()) {
                        return Err(format!("unknown function {name}()"));
                    }
                }
                stack.push((b'(', i, call.is_some()));
            }
            b')' => {
                let Some((b'(', at, is_call)) = stack.pop() else {
                    return Err(format!("unbalanced ')' at byte {i}"));
                };
                if !is_call && e[at + 1..i].trim().is_empty() {
                    return Err(format!("empty parentheses at byte {at}"));
                }
                last_ident = None;
            }
            b']' | b'}' => return Err(format!("unbalanced '{}' at byte {i}", c as char)),
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':')
                {
                    j += 1;
                }
                last_ident = Some(e[i..j].to_string());
                i = j;
                // Skip blanks so that `sum by (x)` and `rate (x)` still see the name.
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                continue;
            }
            b'$' => return Err(format!("unsubstituted variable at byte {i}")),
            _ => last_ident = None,
        }
        i += 1;
    }
    if let Some((o, at, _)) = stack.pop() {
        return Err(format!("unclosed '{}' at byte {at}", o as char));
    }
    let last = *b.last().unwrap();
    if b"+-*/%^=<>!,".contains(&last) {
        return Err(format!("expression ends with operator '{}'", last as char));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    record: Option<String>,
    expr: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules() -> RuleFile {
    serde_norway::from_str(&read(ALERTS)).unwrap_or_else(|e| panic!("{ALERTS}: {e}"))
}

/// `{{` and `}}` pair up in a Go template.
fn balanced_template(s: &str) -> bool {
    let mut depth = 0i32;
    let mut rest = s;
    while let Some(i) = rest.find(['{', '}']) {
        if rest[i..].starts_with("{{") {
            depth += 1;
            rest = &rest[i + 2..];
        } else if rest[i..].starts_with("}}") {
            depth -= 1;
            if depth < 0 {
                return false;
            }
            rest = &rest[i + 2..];
        } else {
            rest = &rest[i + 1..];
        }
    }
    depth == 0
}

#[test]
fn alert_rules_are_complete_and_well_formed() {
    let file = rules();
    let d = declared();
    assert!(!file.groups.is_empty(), "{ALERTS} has no group");
    let mut problems = Vec::new();
    let mut group_names = BTreeSet::new();
    let mut seen: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for g in &file.groups {
        if !group_names.insert(g.name.clone()) {
            problems.push(format!("group {:?} appears twice", g.name));
        }
        if let Some(iv) = &g.interval {
            if parse_duration(iv).is_none() {
                problems.push(format!("group {}: bad interval {iv:?}", g.name));
            }
        }
        let _ = g.limit;
        assert!(!g.rules.is_empty(), "group {} has no rules", g.name);
        for r in &g.rules {
            let Some(name) = &r.alert else {
                problems.push(format!(
                    "rule {:?} is not an alert (recording rules do not belong in this file)",
                    r.record
                ));
                continue;
            };
            let at = format!("alert {name}");
            if let Err(e) = check_promql(&r.expr) {
                problems.push(format!("{at}: expr {:?}: {e}", r.expr));
            }
            match metric_refs(&r.expr, &d) {
                Ok(m) if m.is_empty() && !r.expr.contains("up{") => {
                    problems.push(format!("{at}: uses no walsafe metric"))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{at}: {e}")),
            }
            for (what, v) in [("for", &r.for_), ("keep_firing_for", &r.keep_firing_for)] {
                if let Some(v) = v {
                    if parse_duration(v).is_none() {
                        problems.push(format!("{at}: {what}: {v:?} is not a duration"));
                    }
                }
            }
            for key in ["summary", "description"] {
                match r.annotations.get(key) {
                    Some(t) if t.trim().len() >= 20 => {}
                    Some(t) => problems.push(format!("{at}: {key} is too short: {t:?}")),
                    None => problems.push(format!("{at}: no {key} annotation")),
                }
            }
            for (k, v) in r.annotations.iter().chain(r.labels.iter()) {
                if !balanced_template(v) {
                    problems.push(format!("{at}: unbalanced {{{{ }}}} in {k}"));
                }
            }
            let severity = r.labels.get("severity").cloned().unwrap_or_default();
            if !["critical", "warning", "info"].contains(&severity.as_str()) {
                problems.push(format!(
                    "{at}: severity label {severity:?} is not critical, warning or info"
                ));
            }
            seen.entry(name.clone())
                .or_default()
                .push((severity, r.expr.clone()));
        }
    }
    // The alerts operators are promised, with their tiers.
    for name in [
        "WalsafeArchiveLagHigh",
        "WalsafeArchiveGaps",
        "WalsafeNotConnected",
        "WalsafeLastArchivedTooOld",
        "WalsafeDown",
        "WalsafeUploadErrors",
        "WalsafeConflict",
        "WalsafeSpoolBacklog",
        "WalsafeNoRecentBackup",
        "WalsafeNoRecentDrill",
        "WalsafeDrillRtoHigh",
    ] {
        if !seen.contains_key(name) {
            problems.push(format!("alert {name} is missing"));
        }
    }
    for (name, tiers) in &seen {
        let sev: BTreeSet<&str> = tiers.iter().map(|(s, _)| s.as_str()).collect();
        if sev.len() != tiers.len() {
            problems.push(format!(
                "alert {name} has several rules with the same severity; Alertmanager could not tell them apart"
            ));
        }
    }
    if let Some(lag) = seen.get("WalsafeArchiveLagHigh") {
        let sev: BTreeSet<&str> = lag.iter().map(|(s, _)| s.as_str()).collect();
        if sev != BTreeSet::from(["warning", "critical"]) {
            problems.push(format!(
                "WalsafeArchiveLagHigh needs a warning and a critical tier, has {sev:?}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{ALERTS}:\n  {}",
        problems.join("\n  ")
    );
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels is an array") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter());
        }
    }
    out
}

/// (panel title, expr) of every query in the dashboard.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        if let Some(ts) = p["targets"].as_array() {
            for t in ts {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    t["expr"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    out
}

fn template_vars(d: &serde_json::Value) -> BTreeSet<String> {
    d["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dashboard_is_importable_and_shows_every_metric() {
    let d = dashboard();
    let decl = declared();
    let mut problems = Vec::new();
    for key in ["title", "uid"] {
        if d[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no {key}"));
        }
    }
    if d["schemaVersion"].as_u64().is_none() {
        problems.push("no schemaVersion".into());
    }
    if !d["id"].is_null() {
        problems.push("id must be null in an exported dashboard (Grafana assigns it)".into());
    }
    let vars = template_vars(&d);
    let ds_var = d["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["type"] == "datasource"));
    let ds_name = match ds_var {
        Some(v) if v["query"] == "prometheus" => v["name"].as_str().unwrap().to_string(),
        _ => {
            problems.push("no templated datasource variable of type prometheus".into());
            String::new()
        }
    };
    let ds_ref = |v: &serde_json::Value| -> bool {
        v["type"] == "prometheus"
            && (v["uid"] == format!("${{{ds_name}}}") || v["uid"] == format!("${ds_name}"))
    };
    // Queries of templating variables use the same data source.
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" && !ds_ref(&v["datasource"]) {
            problems.push(format!(
                "variable {} does not use the datasource variable",
                v["name"]
            ));
        }
    }

    let mut ids = BTreeSet::new();
    let mut rects: Vec<(String, [i64; 4])> = Vec::new();
    let mut used = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("").to_string();
        let at = format!("panel {title:?}");
        if title.is_empty() {
            problems.push(format!("panel {} has no title", p["id"]));
        }
        match p["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            _ => problems.push(format!("{at}: missing or duplicate id {}", p["id"])),
        }
        let g = &p["gridPos"];
        let pos: Vec<i64> = ["x", "y", "w", "h"]
            .iter()
            .map(|k| g[*k].as_i64().unwrap_or(-1))
            .collect();
        let [x, y, w, h] = [pos[0], pos[1], pos[2], pos[3]];
        if x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > 24 {
            problems.push(format!("{at}: bad gridPos {g}"));
        }
        for (other, r) in &rects {
            if x < r[0] + r[2] && r[0] < x + w && y < r[1] + r[3] && r[1] < y + h {
                problems.push(format!("{at} overlaps panel {other:?}"));
            }
        }
        rects.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        if !ds_ref(&p["datasource"]) {
            problems.push(format!("{at}: datasource is not ${{{ds_name}}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{at}: no queries"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or("");
            if !refs.insert(t["refId"].as_str().unwrap_or("").to_string()) {
                problems.push(format!("{at}: duplicate refId {}", t["refId"]));
            }
            if !t["datasource"].is_null() && !ds_ref(&t["datasource"]) {
                problems.push(format!("{at}: query {} has another datasource", t["refId"]));
            }
            match substitute_grafana_vars(expr, &vars).and_then(|s| {
                check_promql(&s)?;
                Ok(s)
            }) {
                Ok(_) => {}
                Err(e) => problems.push(format!("{at}: {expr:?}: {e}")),
            }
            match metric_refs(expr, &decl) {
                Ok(m) if m.is_empty() => {
                    problems.push(format!("{at}: {expr:?} uses no walsafe metric"))
                }
                Ok(m) => used.extend(m),
                Err(e) => problems.push(format!("{at}: {e}")),
            }
        }
    }
    for name in &decl.names {
        if !used.contains(name) {
            problems.push(format!("metric {name} is on no panel"));
        }
    }
    let exprs: Vec<String> = dashboard_exprs(&d).into_iter().map(|(_, e)| e).collect();
    for (what, needle) in [
        ("upload latency p50", "histogram_quantile(0.5, sum by (instance, kind, le) (rate(walsafe_upload_duration_seconds_bucket"),
        ("upload latency p99", "histogram_quantile(0.99, sum by (instance, kind, le) (rate(walsafe_upload_duration_seconds_bucket"),
        ("fsync latency p99", "histogram_quantile(0.99, sum by (instance, le) (rate(walsafe_fsync_duration_seconds_bucket"),
        ("uploads by kind and result", "sum by (instance, kind, result) (rate(walsafe_uploads_total"),
    ] {
        if !exprs.iter().any(|e| e.contains(needle)) {
            problems.push(format!("no {what} query ({needle}…)"));
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn promql_checker_catches_what_it_claims() {
    for good in [
        "walsafe_archive_lag_seconds > 5",
        r#"sum by (kind) (rate(walsafe_uploads_total{result="error",kind=~"seg.*"}[5m])) > 0"#,
        "time() - walsafe_last_archived_timestamp_seconds > 900",
        r#"absent(up{job="walsafe"}) or up{job="walsafe"} == 0"#,
        "max_over_time(walsafe_timeline[1h:1m])",
        r#"up{job="a)b"}"#,
    ] {
        assert_eq!(check_promql(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        "  ",
        "rate(walsafe_uploads_total[5m]",
        "rate(walsafe_uploads_total[5m]))",
        "walsafe_uploads_total[5x]",
        r#"walsafe_uploads_total{result="error"[5m]"#,
        r#"walsafe_uploads_total{result=error}"#,
        "ratee(walsafe_uploads_total[5m])",
        "walsafe_archive_lag_seconds >",
        "()",
        r#"up{job="walsafe}"#,
    ] {
        assert!(check_promql(bad).is_err(), "accepted {bad:?}");
    }
    let d = declared();
    assert!(metric_refs("walsafe_fsync_duration_seconds_bucket", &d).is_ok());
    assert!(metric_refs("walsafe_spool_bytes_bucket", &d).is_err());
    assert!(metric_refs("walsafe_no_such_metric", &d).is_err());
    assert_eq!(parse_duration("1h30m"), Some(5_400_000));
    assert_eq!(parse_duration("500ms"), Some(500));
    assert_eq!(parse_duration("5 m"), None);
    assert_eq!(parse_duration(""), None);
    let vars = BTreeSet::from(["instance".to_string()]);
    assert!(
        substitute_grafana_vars(r#"x{instance=~"$instance"}[$__rate_interval]"#, &vars).is_ok()
    );
    assert!(substitute_grafana_vars(r#"x{instance=~"$host"}"#, &vars).is_err());
}

/// `promtool`; a test that needs it fails, saying how to install it,
/// rather than pass without checking anything.
fn promtool() -> PathBuf {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool is not installed, so the alert rules and dashboard queries cannot be checked: apt-get install prometheus (scripts/test.sh installs it)"
    );
    PathBuf::from("promtool")
}

fn run_promtool(tool: &Path, args: &[&str], dir: &Path) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_the_dashboard_queries() {
    let tool = promtool();
    let tmp = tempfile::tempdir().unwrap();
    run_promtool(
        &tool,
        &["check", "rules", root().join(ALERTS).to_str().unwrap()],
        tmp.path(),
    );
    // Every dashboard query as a recording rule, variables substituted.
    let d = dashboard();
    let vars = template_vars(&d);
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in dashboard_exprs(&d).iter().enumerate() {
        let e = substitute_grafana_vars(expr, &vars).unwrap();
        text += &format!(
            "      - record: dashboard:q{i}\n        expr: {}\n        labels:\n          panel: {}\n",
            serde_json::to_string(&e).unwrap(),
            serde_json::to_string(title).unwrap()
        );
    }
    std::fs::write(tmp.path().join("dashboard.yml"), text).unwrap();
    run_promtool(&tool, &["check", "rules", "dashboard.yml"], tmp.path());
}

/// Synthetic series and the alerts they must (and must not) raise, in
/// `promtool test rules` format. The rules are this repository's, with
/// annotations removed (promtool would otherwise compare rendered text).
const ALERT_CASES: &str = r#"
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  # The live RPO: warning after 2 min above 5 s, critical after 5 min above 60 s.
  - interval: 1m
    input_series:
      - series: 'walsafe_archive_lag_seconds{job="walsafe",instance="db1"}'
        values: '0 10x10 120x10'
      - series: 'walsafe_archive_lag_seconds{job="walsafe",instance="quiet"}'
        values: '0x21'
    alert_rule_test:
      - {eval_time: 2m, alertname: WalsafeArchiveLagHigh, exp_alerts: []}
      - eval_time: 4m
        alertname: WalsafeArchiveLagHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: db1}
      - eval_time: 13m
        alertname: WalsafeArchiveLagHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: db1}
      - eval_time: 17m
        alertname: WalsafeArchiveLagHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: db1}
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  # An idle cluster writes no WAL: an old last-archived time alone must not
  # page; with WAL waiting it must; a moving archive never does.
  - interval: 1m
    input_series:
      - series: 'walsafe_last_archived_timestamp_seconds{job="walsafe",instance="idle"}'
        values: '0x60'
      - series: 'walsafe_archive_lag_bytes{job="walsafe",instance="idle"}'
        values: '0x60'
      - series: 'walsafe_last_archived_timestamp_seconds{job="walsafe",instance="stuck"}'
        values: '0x60'
      - series: 'walsafe_archive_lag_bytes{job="walsafe",instance="stuck"}'
        values: '8192x60'
      - series: 'walsafe_last_archived_timestamp_seconds{job="walsafe",instance="busy"}'
        values: '0+60x60'
      - series: 'walsafe_archive_lag_bytes{job="walsafe",instance="busy"}'
        values: '8192x60'
    alert_rule_test:
      - {eval_time: 16m, alertname: WalsafeLastArchivedTooOld, exp_alerts: []}
      - eval_time: 60m
        alertname: WalsafeLastArchivedTooOld
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: stuck}

  - interval: 1m
    input_series:
      - series: 'walsafe_replication_connected{job="walsafe",instance="db1"}'
        values: '1 1 0x5 1x5'
    alert_rule_test:
      - {eval_time: 3m, alertname: WalsafeNotConnected, exp_alerts: []}
      - eval_time: 5m
        alertname: WalsafeNotConnected
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}
      - {eval_time: 8m, alertname: WalsafeNotConnected, exp_alerts: []}

  - interval: 1m
    input_series:
      - series: 'up{job="walsafe",instance="db1"}'
        values: '1 0x5'
      - series: 'up{job="walsafe",instance="db2"}'
        values: '1x6'
    alert_rule_test:
      - {eval_time: 2m, alertname: WalsafeDown, exp_alerts: []}
      - eval_time: 4m
        alertname: WalsafeDown
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  # No walsafe target at all.
  - interval: 1m
    input_series:
      - series: 'up{job="node",instance="db1"}'
        values: '1x6'
    alert_rule_test:
      - eval_time: 4m
        alertname: WalsafeDown
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe}

  - interval: 1m
    input_series:
      - series: 'walsafe_uploads_total{job="walsafe",instance="db1",kind="segment",result="error"}'
        values: '0+1x20 20x30'
      - series: 'walsafe_uploads_total{job="walsafe",instance="db1",kind="chunk",result="ok"}'
        values: '0+300x50'
    alert_rule_test:
      - {eval_time: 5m, alertname: WalsafeUploadErrors, exp_alerts: []}
      - eval_time: 15m
        alertname: WalsafeUploadErrors
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: db1, kind: segment}
      - {eval_time: 40m, alertname: WalsafeUploadErrors, exp_alerts: []}

  # The conflict counter is born at 1.
  - interval: 1m
    input_series:
      - series: 'walsafe_upload_conflicts_total{job="walsafe",instance="db1"}'
        values: '_x5 1x10'
    alert_rule_test:
      - {eval_time: 3m, alertname: WalsafeConflict, exp_alerts: []}
      - eval_time: 7m
        alertname: WalsafeConflict
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  - interval: 1m
    input_series:
      - series: 'walsafe_upload_stalled{job="walsafe",instance="db1"}'
        values: '0x3 1x5 0x5'
    alert_rule_test:
      - {eval_time: 2m, alertname: WalsafeUploadsStalled, exp_alerts: []}
      - eval_time: 5m
        alertname: WalsafeUploadsStalled
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}
      - {eval_time: 11m, alertname: WalsafeUploadsStalled, exp_alerts: []}

  - interval: 1m
    input_series:
      - series: 'walsafe_spool_full{job="walsafe",instance="db1"}'
        values: '0x3 1x10'
    alert_rule_test:
      - {eval_time: 4m, alertname: WalsafeSpoolFull, exp_alerts: []}
      - eval_time: 6m
        alertname: WalsafeSpoolFull
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  - interval: 1m
    input_series:
      - series: 'walsafe_upload_refused_total{job="walsafe",instance="db1"}'
        values: '0x5 1x10'
    alert_rule_test:
      - {eval_time: 3m, alertname: WalsafeStrangerWal, exp_alerts: []}
      - eval_time: 7m
        alertname: WalsafeStrangerWal
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  - interval: 1m
    input_series:
      - series: 'walsafe_archive_gaps{job="walsafe",instance="db1"}'
        values: '0 0 1x5'
    alert_rule_test:
      - {eval_time: 1m, alertname: WalsafeArchiveGaps, exp_alerts: []}
      - eval_time: 3m
        alertname: WalsafeArchiveGaps
        exp_alerts:
          - exp_labels: {severity: critical, job: walsafe, instance: db1}

  - interval: 1m
    input_series:
      - series: 'walsafe_spool_pending_segments{job="walsafe",instance="db1"}'
        values: '12x20'
      - series: 'walsafe_spool_pending_segments{job="walsafe",instance="db2"}'
        values: '2x20'
    alert_rule_test:
      - {eval_time: 5m, alertname: WalsafeSpoolBacklog, exp_alerts: []}
      - eval_time: 11m
        alertname: WalsafeSpoolBacklog
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: db1}

  # A daily backup keeps it quiet; one 26 hours old (or none) warns.
  - interval: 1m
    input_series:
      - series: 'walsafe_last_backup_timestamp_seconds{job="walsafe",instance="daily"}'
        values: '0+60x1800'
      - series: 'walsafe_last_backup_timestamp_seconds{job="walsafe",instance="stale"}'
        values: '0x1800'
    alert_rule_test:
      - {eval_time: 20h, alertname: WalsafeNoRecentBackup, exp_alerts: []}
      - eval_time: 28h
        alertname: WalsafeNoRecentBackup
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: stale}

  # A weekly drill keeps it quiet; none for 8 days warns. An RTO over an
  # hour warns.
  - interval: 1m
    input_series:
      - series: 'walsafe_last_drill_success_timestamp_seconds{job="walsafe",instance="weekly"}'
        values: '0+60x13000'
      - series: 'walsafe_last_drill_success_timestamp_seconds{job="walsafe",instance="never"}'
        values: '0x13000'
      - series: 'walsafe_last_drill_rto_seconds{job="walsafe",instance="weekly"}'
        values: '600x13000'
      - series: 'walsafe_last_drill_rto_seconds{job="walsafe",instance="slow"}'
        values: '5400x13000'
    alert_rule_test:
      - {eval_time: 7d, alertname: WalsafeNoRecentDrill, exp_alerts: []}
      - eval_time: 9d
        alertname: WalsafeNoRecentDrill
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: never}
      - eval_time: 2h
        alertname: WalsafeDrillRtoHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: walsafe, instance: slow}
"#;

#[test]
fn promtool_alerts_fire_when_they_should_and_only_then() {
    let tool = promtool();
    let tmp = tempfile::tempdir().unwrap();
    let mut v: serde_norway::Value = serde_norway::from_str(&read(ALERTS)).unwrap();
    for g in v["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            r.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        tmp.path().join("rules.yml"),
        serde_norway::to_string(&v).unwrap(),
    )
    .unwrap();
    std::fs::write(tmp.path().join("cases.yml"), ALERT_CASES).unwrap();
    run_promtool(&tool, &["test", "rules", "cases.yml"], tmp.path());
}
