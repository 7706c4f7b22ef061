//! Timing a process on the host: from a start to its first output and to
//! its exit, or step by step by the marker lines its script prints.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::bench::runtimes::MeasureError;

/// Runs `cmd` to its exit; ms from `t0` to its first stdout byte and to
/// its exit. Fails when it fails, or prints nothing when `output`.
pub(super) fn first_output_and_exit(
    cmd: &mut Command,
    t0: Instant,
    output: bool,
) -> Result<(f64, f64), MeasureError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MeasureError::io("spawning"))?;
    let mut out = child
        .stdout
        .take()
        .ok_or(MeasureError::Missing("no stdout"))?;
    let mut b = [0u8; 256];
    let n = out.read(&mut b).unwrap_or(0);
    let first = t0.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let o = child
        .wait_with_output()
        .map_err(MeasureError::io("waiting"))?;
    let exit = t0.elapsed();
    if !o.status.success() || (output && n == 0) {
        return Err(MeasureError::Failed {
            status: o.status,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok((first.as_secs_f64() * 1000.0, exit.as_secs_f64() * 1000.0))
}

/// Runs `cmd`, which prints `S` and then `E` after each of `steps` steps;
/// returns each step's duration in ms, as seen from the host.
pub(super) fn markers(cmd: &mut Command, steps: usize) -> Result<Vec<f64>, MeasureError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MeasureError::io("spawning"))?;
    let out = child
        .stdout
        .take()
        .ok_or(MeasureError::Missing("no stdout"))?;
    let mut lines = BufReader::new(out).lines();
    let mut times = Vec::new();
    let mut last = None;
    for l in lines.by_ref() {
        let Ok(l) = l else { break };
        let now = Instant::now();
        match (l.trim(), last) {
            ("S", None) => last = Some(now),
            ("E", Some(t)) => {
                times.push(now.duration_since(t).as_secs_f64() * 1000.0);
                last = Some(now);
            }
            _ => {}
        }
    }
    let o = child
        .wait_with_output()
        .map_err(MeasureError::io("waiting"))?;
    if !o.status.success() || times.len() != steps {
        return Err(MeasureError::Failed {
            status: o.status,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_time_each_step() {
        // Each step is timed from the end of the one before: the longer
        // step (a 0.6 s sleep against 0.2 s) comes out longer, and the
        // steps add up to no more than the whole run (a step timed from the
        // start would not). No bound on a step itself: a loaded host reads
        // a marker late, which moves time from one step to the next.
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo S; sleep 0.2; echo E; echo noise; sleep 0.6; echo E",
        ]);
        let t0 = Instant::now();
        let t = markers(&mut c, 2).unwrap();
        let whole = t0.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(t.len(), 2);
        assert!(t[0] > 0.0 && t[1] > t[0], "{t:?}");
        assert!(t[0] + t[1] <= whole, "{t:?} in {whole} ms");
        let mut c = Command::new("sh");
        c.args(["-c", "echo S; false || exit 97; echo E"]);
        let e = markers(&mut c, 1).unwrap_err();
        assert!(
            matches!(&e, MeasureError::Failed { status, .. } if status.code() == Some(97)),
            "{e}"
        );
    }

    #[test]
    fn first_output_comes_before_exit() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo hi; sleep 0.2"]);
        let (first, exit) = first_output_and_exit(&mut c, Instant::now(), true).unwrap();
        assert!(first < exit && exit >= 150.0, "{first} {exit}");
        let mut c = Command::new("sh");
        c.args(["-c", "echo no >&2; exit 3"]);
        let e = first_output_and_exit(&mut c, Instant::now(), false).unwrap_err();
        assert!(
            matches!(&e, MeasureError::Failed { status, stderr }
                if status.code() == Some(3) && stderr == "no"),
            "{e}"
        );
        assert_eq!(e.to_string(), "exit status: 3: no");
    }
}
