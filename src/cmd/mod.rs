//! The verbs of vmc's command line, one file per group; `main` dispatches to them.

mod build;
mod container;
mod images;
mod run;
mod system;
mod volume;

pub(crate) use build::*;
pub(crate) use container::*;
pub(crate) use images::*;
pub(crate) use run::*;
pub(crate) use system::*;
pub(crate) use volume::*;

use anyhow::Result;
use vmc::image::Store;
use vmc::runtime;

/// Starts recording a run's phases if `--timings` or `VMC_TIMINGS` asks.
pub(crate) fn start_timings(flag: bool) {
    if flag || vmc::host::knobs().timings.is_some() {
        runtime::timings::enable();
    }
}

/// Ends a run's phases: `--timings` prints them, `VMC_TIMINGS` names a
/// file for them as JSON (`{"phases": [{"name", "ms"}...], "total_ms"}`).
pub(crate) fn report_timings(print: bool) {
    use runtime::timings;
    if !timings::enabled() {
        return;
    }
    timings::mark("cleanup");
    let marks = timings::marks();
    if print {
        eprint!("vmc: timings\n{}", timings::render(&marks));
    }
    if let Some(path) = &vmc::host::knobs().timings {
        let phases: Vec<serde_json::Value> = timings::durations(&marks)
            .into_iter()
            .map(|(name, ms)| serde_json::json!({ "name": name, "ms": ms }))
            .collect();
        let doc = serde_json::json!({
            "phases": phases,
            "total_ms": marks.last().map_or(0.0, |m| m.at_ms),
        });
        if let Err(e) = std::fs::write(path, doc.to_string()) {
            eprintln!("vmc: VMC_TIMINGS {}: {e}", path.display());
        }
    }
}

/// An environment entry as `-e` (and `--env-file`) give it, as Docker reads
/// them: `KEY=VALUE` as it is; a bare `KEY` takes this process's value,
/// and is left out when it has none.
pub(crate) fn env_entry(e: &str) -> Option<String> {
    if e.contains('=') {
        return Some(e.to_string());
    }
    std::env::var(e).ok().map(|v| format!("{e}={v}"))
}

/// A container name as Docker takes it: letters, digits, `_`, `.`, `-`.
pub(crate) fn check_container_name(n: &str) -> Result<()> {
    if n.is_empty()
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        anyhow::bail!("name '{n}': use letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// The image store at $VMC_HOME.
pub(crate) fn store() -> Result<Store> {
    Ok(Store::open(&runtime::vmc_home())?)
}

/// Prints rows of any number of cells (a `--format 'table ...'`'s cells,
/// split at tabs) as columns, as `print_table` does.
pub(crate) fn print_cells(rows: &[Vec<String>]) {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Prints each of `values` through a `--format` template: one line each,
/// or, for `table ...`, a header (`headers` names the columns) and aligned
/// columns.
pub(crate) fn print_formatted(
    format: &str,
    values: &[serde_json::Value],
    headers: &[(&str, &str)],
) -> Result<()> {
    let t = vmc::template::Template::parse(format)?;
    let lines: Vec<String> = values
        .iter()
        .map(|v| t.render(v))
        .collect::<Result<_, _>>()?;
    if t.table {
        let rows: Vec<Vec<String>> = std::iter::once(t.header(headers))
            .chain(lines)
            .map(|l| l.split('\t').map(String::from).collect())
            .collect();
        print_cells(&rows);
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}

/// Prints rows as columns as wide as their widest cell, three spaces
/// apart, like Docker's tables.
pub(crate) fn print_table<const N: usize>(rows: &[[String; N]]) {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    print_cells(&rows);
}
