//! The benchmark report: JSON for machines (and `--compare`), a markdown
//! table for people, an SVG chart. The SVG is written by hand: one bar
//! chart of a few dozen rows does not justify a plotting crate and its
//! font stack.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Order statistics of one metric's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p90: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        if s.is_empty() {
            return Summary {
                n: 0,
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                p90: f64::NAN,
            };
        }
        let median = if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        // Nearest rank.
        let rank = ((s.len() as f64) * 0.9).ceil() as usize;
        Summary {
            n: s.len(),
            median,
            min: s[0],
            max: s[s.len() - 1],
            p90: s[rank.clamp(1, s.len()) - 1],
        }
    }
}

/// One metric of one scenario, per runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// Whether a smaller number is better (times, memory) or not (throughput).
    pub lower_is_better: bool,
    /// Runtime name -> summary.
    pub results: BTreeMap<String, Summary>,
}

impl Row {
    /// The vm/ns ratio of the medians, when both exist.
    pub fn ratio(&self) -> Option<f64> {
        self.ratio_of("vm", "ns")
    }

    /// The ratio of `a`'s median to `b`'s, when both exist.
    pub fn ratio_of(&self, a: &str, b: &str) -> Option<f64> {
        let d = self.results.get(b)?.median;
        let n = self.results.get(a)?.median;
        (d > 0.0 && n.is_finite()).then(|| n / d)
    }
}

/// Where the numbers come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub host_kernel: String,
    pub guest_kernel: String,
    /// KVM backend: hardware (vmx/svm), nested, or kvm_pvm native.
    pub backend: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub vmc_version: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub machine: Machine,
    pub image: String,
    pub quick: bool,
    /// Measured runs per scenario (warm-up runs excluded).
    pub runs: usize,
    /// Unrecorded warm-up runs per scenario (start always has one; memory
    /// and density have none).
    pub warmup: usize,
    /// Runtimes in column order.
    pub runtimes: Vec<String>,
    /// What each scenario ran.
    pub workloads: BTreeMap<String, String>,
    /// Seconds each scenario took, warm-ups and setup included.
    #[serde(default)]
    pub durations_s: BTreeMap<String, f64>,
    pub rows: Vec<Row>,
    /// Skipped scenarios and failures, one line each.
    pub notes: Vec<String>,
}

/// `12.3`, `1234`, `0.012`: three significant digits.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{}x", num(r)))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    /// The report's header line: machine, kernels, backend, version.
    pub fn describe(&self) -> String {
        let m = &self.machine;
        format!(
            "{} · {} cores · {} GiB · host kernel {} · guest kernel {} · backend {} · vmc {} · image {} · {} run(s) after {} warm-up (start: 2){}",
            m.cpu,
            m.cores,
            num(m.memory_gib),
            m.host_kernel,
            m.guest_kernel,
            m.backend,
            self.vmc_version,
            self.image,
            self.runs,
            self.warmup,
            if self.quick { " · --quick sizes" } else { "" }
        )
    }

    /// A markdown document: header, one table, workloads, notes.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### vmc bench, {}\n", self.date);
        let _ = writeln!(s, "{}\n", self.describe());
        let mut head = "| scenario | metric | unit | n |".to_string();
        let mut rule = "|---|---|---|--:|".to_string();
        for r in &self.runtimes {
            let _ = write!(head, " {r} |");
            rule.push_str("--:|");
        }
        head.push_str(" vm/ns |");
        rule.push_str("--:|");
        // vmc's VM against the other VMM, row by row.
        let qemu = self.runtimes.iter().any(|r| r == "qemu");
        if qemu {
            head.push_str(" vm/qemu |");
            rule.push_str("--:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for row in &self.rows {
            let n = row.results.values().map(|x| x.n).max().unwrap_or(0);
            let _ = write!(
                s,
                "| {} | {} | {} | {n} |",
                row.scenario, row.metric, row.unit
            );
            for r in &self.runtimes {
                let cell = match row.results.get(r) {
                    Some(x) if x.n > 0 => format!(
                        "{} ({}–{}, p90 {})",
                        num(x.median),
                        num(x.min),
                        num(x.max),
                        num(x.p90)
                    ),
                    _ => "-".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = write!(s, " {} |", ratio_cell(row.ratio()));
            if qemu {
                let _ = write!(s, " {} |", ratio_cell(row.ratio_of("vm", "qemu")));
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "\nCells: median (min–max, p90) over n runs; {}.",
            if qemu {
                "vm/ns and vm/qemu are ratios of the medians"
            } else {
                "vm/ns is the ratio of the medians"
            }
        );
        if !self.workloads.is_empty() {
            let _ = writeln!(s, "\nWorkloads:\n");
            for (k, v) in &self.workloads {
                let _ = writeln!(s, "* {k}: {v}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nNotes:\n");
            for n in &self.notes {
                let _ = writeln!(s, "* {n}");
            }
        }
        s
    }

    /// A horizontal bar chart: one group per row, one bar per runtime, each
    /// group on its own logarithmic scale (units differ by row, and values
    /// by orders of magnitude), from a third of its smallest value to its
    /// largest; the numbers are printed beside the bars.
    pub fn svg(&self) -> String {
        const W: f64 = 960.0;
        const LABEL: f64 = 330.0;
        const BAR: f64 = 14.0;
        const GAP: f64 = 12.0;
        let colors = [
            "#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2",
        ];
        let rows: Vec<&Row> = self.rows.iter().filter(|r| !r.results.is_empty()).collect();
        let group_h = |r: &Row| r.results.len() as f64 * BAR + GAP;
        let legend_h = 28.0;
        let title_h = 44.0;
        let height = title_h + legend_h + rows.iter().map(|r| group_h(r)).sum::<f64>() + 10.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="8" y="18" font-size="14" font-weight="bold">vmc bench: container vs microVM ({}), medians, log scale per row</text>"#,
            esc(&self.date)
        );
        let _ = writeln!(
            s,
            r#"<text x="8" y="34" font-size="10">{}</text>"#,
            esc(&self.describe())
        );
        let mut x = 8.0;
        for (i, r) in self.runtimes.iter().enumerate() {
            let c = colors[i % colors.len()];
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
                title_h + 2.0,
                x + 16.0,
                title_h + 12.0,
                esc(r)
            );
            x += 30.0 + 7.0 * r.len() as f64;
        }
        let mut y = title_h + legend_h;
        for row in rows {
            let max = row
                .results
                .values()
                .map(|x| x.median)
                .filter(|m| m.is_finite())
                .fold(0.0, f64::max);
            // The scale starts at a third of the row's smallest median, so
            // that the smallest bar still shows.
            let min = row
                .results
                .values()
                .map(|x| x.median)
                .filter(|m| m.is_finite() && *m > 0.0)
                .fold(f64::INFINITY, f64::min);
            let lo = if min.is_finite() { min / 3.0 } else { 0.0 };
            let label = format!(
                "{}: {} ({}, {})",
                row.scenario,
                row.metric,
                row.unit,
                if row.lower_is_better {
                    "lower is better"
                } else {
                    "higher is better"
                }
            );
            let _ = writeln!(
                s,
                r#"<text x="8" y="{}">{}</text>"#,
                y + BAR - 3.0,
                esc(&truncate(&label, 58))
            );
            let mut by = y;
            for (i, r) in self.runtimes.iter().enumerate() {
                let Some(x) = row.results.get(r) else {
                    continue;
                };
                // Log scale: runtimes differ by orders of magnitude here.
                let frac = if max > 0.0 && x.median > 0.0 && lo < max {
                    ((x.median.ln() - lo.ln()) / (max.ln() - lo.ln())).clamp(0.0, 1.0)
                } else if max > 0.0 && x.median > 0.0 {
                    1.0
                } else {
                    0.0
                };
                let w = (frac * (W - LABEL - 90.0)).max(1.0);
                let _ = writeln!(
                    s,
                    r#"<rect x="{LABEL}" y="{by}" width="{w:.1}" height="{}" fill="{}"><title>{} {}</title></rect><text x="{:.1}" y="{}">{} {}</text>"#,
                    BAR - 2.0,
                    colors[i % colors.len()],
                    esc(r),
                    num(x.median),
                    LABEL + w + 4.0,
                    by + BAR - 4.0,
                    num(x.median),
                    esc(&row.unit)
                );
                by += BAR;
            }
            y += group_h(row);
        }
        s.push_str("</svg>\n");
        s
    }

    /// Each median next to `old`'s, per row and runtime present in both.
    pub fn compare(&self, old: &Report) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "### Changes since {} (vmc {})\n\n| scenario | metric | runtime | before | now | change |\n|---|---|---|--:|--:|--:|",
            old.date, old.vmc_version
        );
        let mut any = false;
        for row in &self.rows {
            let Some(o) = old
                .rows
                .iter()
                .find(|o| o.scenario == row.scenario && o.metric == row.metric)
            else {
                continue;
            };
            for (rt, now) in &row.results {
                let Some(before) = o.results.get(rt) else {
                    continue;
                };
                any = true;
                let _ = writeln!(
                    s,
                    "| {} | {} ({}) | {rt} | {} | {} | {} |",
                    row.scenario,
                    row.metric,
                    row.unit,
                    num(before.median),
                    num(now.median),
                    change(before.median, now.median, row.lower_is_better)
                );
            }
        }
        if !any {
            s.push_str("| (no rows in common) | | | | | |\n");
        }
        s
    }
}

/// `+12.0% (worse)`, `-3.1% (better)`.
pub fn change(before: f64, now: f64, lower_is_better: bool) -> String {
    if !(before.is_finite() && now.is_finite()) || before == 0.0 {
        return "-".into();
    }
    let pct = (now - before) / before * 100.0;
    let verdict = if pct.abs() < 0.05 {
        "same"
    } else if (pct < 0.0) == lower_is_better {
        "better"
    } else {
        "worse"
    };
    format!("{pct:+.1}% ({verdict})")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut results = BTreeMap::new();
        results.insert("ns".to_string(), Summary::of(&[2.0, 1.0, 3.0]));
        results.insert("vm".to_string(), Summary::of(&[20.0, 30.0, 10.0]));
        Report {
            vmc_version: "0.1.0".into(),
            date: "2026-11-28T00:00:00Z".into(),
            machine: Machine::default(),
            image: "busybox".into(),
            quick: true,
            runs: 3,
            warmup: 1,
            runtimes: vec!["ns".into(), "vm".into(), "crun".into()],
            workloads: BTreeMap::new(),
            durations_s: BTreeMap::new(),
            rows: vec![Row {
                scenario: "start".into(),
                metric: "to exit <&>".into(),
                unit: "ms".into(),
                lower_is_better: true,
                results,
            }],
            notes: vec!["crun: not installed".into()],
        }
    }

    #[test]
    fn summaries_are_order_statistics() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (s.n, s.median, s.min, s.max, s.p90),
            (5, 3.0, 1.0, 5.0, 5.0)
        );
        let t = Summary::of(&(1..=10).map(f64::from).collect::<Vec<_>>());
        assert_eq!((t.median, t.p90), (5.5, 9.0));
        assert_eq!(Summary::of(&[f64::NAN, 1.0]).n, 1);
        assert!(Summary::of(&[]).median.is_nan());
    }

    #[test]
    fn markdown_has_a_column_per_runtime_and_the_ratio() {
        let md = report().markdown();
        assert!(
            md.contains("| scenario | metric | unit | n | ns | vm | crun | vm/ns |"),
            "{md}"
        );
        assert!(md.contains("| start | to exit <&> | ms | 3 | 2.00 (1.00–3.00, p90 3.00) | 20.0 (10.0–30.0, p90 30.0) | - | 10.0x |"), "{md}");
        assert!(md.contains("* crun: not installed"), "{md}");
        assert!(!md.contains("vm/qemu"), "{md}");
    }

    #[test]
    fn a_qemu_column_brings_the_vm_to_qemu_ratio() {
        let mut r = report();
        r.runtimes.push("qemu".into());
        let one = |m: f64| Summary::of(&[m]);
        r.rows[0].results.insert("qemu".into(), one(5.0));
        let md = r.markdown();
        assert!(md.contains("| vm/ns | vm/qemu |"), "{md}");
        assert!(
            md.contains("| 5.00 (5.00–5.00, p90 5.00) | 10.0x | 4.00x |"),
            "{md}"
        );
        assert!(md.contains("vm/ns and vm/qemu are ratios"), "{md}");
        assert_eq!(r.rows[0].ratio_of("vm", "qemu"), Some(4.0));
        assert_eq!(r.rows[0].ratio_of("vm", "none"), None);
    }

    #[test]
    fn svg_is_escaped_and_has_a_bar_per_result() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("to exit &lt;&amp;&gt;") && !svg.contains("<&>"));
        assert_eq!(svg.matches("<title>").count(), 2);
    }

    #[test]
    fn compare_reports_changes_with_direction() {
        let now = report();
        let mut old = report();
        old.rows[0].results.get_mut("vm").unwrap().median = 40.0;
        let c = now.compare(&old);
        assert!(
            c.contains("| start | to exit <&> (ms) | vm | 40.0 | 20.0 | -50.0% (better) |"),
            "{c}"
        );
        assert!(c.contains("| ns | 2.00 | 2.00 | +0.0% (same) |"), "{c}");
        assert_eq!(change(10.0, 12.0, false), "+20.0% (better)");
        assert_eq!(change(10.0, 12.0, true), "+20.0% (worse)");
    }

    #[test]
    fn json_round_trips() {
        let r = report();
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.rows[0].results, r.rows[0].results);
    }
}
