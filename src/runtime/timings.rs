//! Where a run's time goes (`vmc run --timings`, `vmc exec --timings`, and
//! per run in `vmc bench`): the host marks the end of each phase of a run
//! on the clock of [`elapsed_ms`](super::elapsed_ms) (from vmc's start), and
//! the guest agent's own steps of a phase arrive as `GuestMsg::Phases`
//! frames and are kept with it. Off (the default), a mark costs one atomic
//! load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmc_proto::{Phase, MAX_PHASES, MAX_PHASE_NAME};

/// The end of a phase: its name, when it ended (ms from vmc's start) and
/// the agent's steps within it (name, ms).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mark {
    pub phase: &'static str,
    pub at_ms: f64,
    pub guest: Vec<(String, f64)>,
}

#[derive(Default)]
struct Timeline {
    marks: Vec<Mark>,
    /// Agent steps received for the phase under way.
    pending: Vec<(String, f64)>,
}

static ON: AtomicBool = AtomicBool::new(false);
static TIMELINE: Mutex<Option<Timeline>> = Mutex::new(None);

/// Most agent steps kept for one phase (a few frames' worth).
const MAX_PENDING: usize = 4 * MAX_PHASES;

/// Agent phases the host does not accept.
#[derive(Debug, thiserror::Error)]
pub enum PhasesError {
    #[error("the agent sent {0} phases in one frame (at most {MAX_PHASES})")]
    TooMany(usize),
    #[error("the agent sent more phases than were asked for")]
    Unasked,
}

/// Starts recording (the clock starts with vmc; see `main`).
pub fn enable() {
    *TIMELINE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Timeline::default());
    ON.store(true, Ordering::SeqCst);
}

/// Whether this process records timings.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn with(f: impl FnOnce(&mut Timeline)) {
    if !enabled() {
        return;
    }
    if let Some(t) = TIMELINE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        f(t)
    }
}

/// Ends `phase` now, with the agent's steps received for it.
fn push(t: &mut Timeline, phase: &'static str) {
    let guest = std::mem::take(&mut t.pending);
    t.marks.push(Mark {
        phase,
        at_ms: super::elapsed_ms(),
        guest,
    })
}

/// The phase `phase` ended now.
pub fn mark(phase: &'static str) {
    with(|t| push(t, phase));
}

/// As [`mark`], unless `phase` has ended before (first output: called for
/// every output frame, it reads no clock while timings are off).
pub fn mark_once(phase: &'static str) {
    with(|t| {
        if !t.marks.iter().any(|m| m.phase == phase) {
            push(t, phase)
        }
    });
}

/// Keeps the agent's steps of the phase under way. They come from the
/// guest: their number is bounded and their names are cut to
/// [`MAX_PHASE_NAME`] characters of printable ASCII.
pub fn guest(phases: Vec<Phase>) -> Result<(), PhasesError> {
    if phases.len() > MAX_PHASES {
        return Err(PhasesError::TooMany(phases.len()));
    }
    let mut result = Ok(());
    with(|t| {
        if t.pending.len() + phases.len() > MAX_PENDING {
            result = Err(PhasesError::Unasked);
            return;
        }
        for p in phases {
            let name: String = p
                .name
                .chars()
                .take(MAX_PHASE_NAME)
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            t.pending.push((name, p.us as f64 / 1000.0));
        }
    });
    result
}

/// The marks so far, in order.
pub fn marks() -> Vec<Mark> {
    TIMELINE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|t| t.marks.clone())
        .unwrap_or_default()
}

/// The table `--timings` prints: each phase's duration and end, and the
/// agent's steps under it.
pub fn render(marks: &[Mark]) -> String {
    let mut out = format!("{:<16} {:>10} {:>10}\n", "phase", "took ms", "at ms");
    let mut last = 0.0;
    for m in marks {
        out.push_str(&format!(
            "{:<16} {:>10.1} {:>10.1}\n",
            m.phase,
            m.at_ms - last,
            m.at_ms
        ));
        last = m.at_ms;
        if !m.guest.is_empty() {
            let steps: Vec<String> = m
                .guest
                .iter()
                .map(|(n, ms)| format!("{n} {ms:.1}"))
                .collect();
            out.push_str(&format!("  in the guest: {}\n", steps.join(", ")));
        }
    }
    out
}

/// Each phase's duration in ms by name, for the bench's JSON file
/// (`VMC_TIMINGS`); agent steps are named `phase/step`.
pub fn durations(marks: &[Mark]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut last = 0.0;
    for m in marks {
        out.push((m.phase.to_string(), m.at_ms - last));
        last = m.at_ms;
        for (n, ms) in &m.guest {
            out.push((format!("{}/{n}", m.phase), *ms));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(name: &str, us: u64) -> Phase {
        Phase {
            name: name.into(),
            us,
        }
    }

    /// One test for the process-wide timeline: phases in order with the
    /// agent's steps kept under the phase they arrived in, a repeated
    /// first-output mark ignored, and a guest's phases bounded in number
    /// and cleaned of control characters.
    #[test]
    fn phases_are_recorded_in_order_with_the_guests_steps_bounded() {
        enable();
        mark("prepare");
        guest(vec![phase("disk sizes", 1500), phase("over\x1b[2J", 2000)]).unwrap();
        mark("mount");
        mark_once("first output");
        mark_once("first output");
        let m = marks();
        assert_eq!(
            m.iter().map(|m| m.phase).collect::<Vec<_>>(),
            ["prepare", "mount", "first output"]
        );
        assert!(m[0].guest.is_empty());
        assert_eq!(
            m[1].guest,
            [
                ("disk sizes".to_string(), 1.5),
                ("over?[2J".to_string(), 2.0)
            ]
        );
        assert!(m.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let text = render(&m);
        assert!(
            text.contains("in the guest: disk sizes 1.5, over?[2J 2.0"),
            "{text}"
        );
        let d = durations(&m);
        assert_eq!(d[2].0, "mount/disk sizes");

        let many: Vec<Phase> = (0..MAX_PHASES + 1).map(|_| phase("x", 1)).collect();
        assert!(matches!(guest(many), Err(PhasesError::TooMany(_))));
        let long = "n".repeat(1000);
        for _ in 0..4 {
            guest((0..MAX_PHASES).map(|_| phase(&long, 1)).collect()).unwrap();
        }
        assert!(matches!(
            guest(vec![phase("x", 1)]),
            Err(PhasesError::Unasked)
        ));
        mark("exit");
        let last = marks().pop().unwrap();
        assert_eq!(last.guest.len(), MAX_PENDING);
        assert!(last.guest.iter().all(|(n, _)| n.len() == MAX_PHASE_NAME));
    }
}
