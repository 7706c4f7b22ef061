//! The agent's own phases on one connection, for `vmc run --timings`: the
//! host asks with `HostMsg::Timings`, and each answer to `Mount` and
//! `Start` is then preceded by a `GuestMsg::Phases` of the steps it took.
//! Off, a lap reads no clock.

use std::time::Instant;

use vmc_proto::{GuestMsg, Phase, MAX_PHASES};

pub struct Laps {
    on: bool,
    last: Instant,
    phases: Vec<Phase>,
}

impl Laps {
    /// Laps from `since` (when the connection was accepted): the handshake's
    /// are always taken, as the host asks only after it.
    pub fn from(since: Instant) -> Laps {
        Laps {
            on: true,
            last: since,
            phases: Vec::new(),
        }
    }

    /// Ends the phase `name` now.
    pub fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if self.phases.len() < MAX_PHASES {
            self.phases.push(Phase {
                name: name.into(),
                us: now.duration_since(self.last).as_micros() as u64,
            });
        }
        self.last = now;
    }

    /// Starts timing a new request.
    pub fn restart(&mut self) {
        if self.on {
            self.last = Instant::now();
            self.phases.clear();
        }
    }

    /// Stops taking laps (the host did not ask for them).
    pub fn off(&mut self) {
        self.on = false;
        self.phases.clear();
    }

    /// The phases taken since the last report, as a frame to send (an
    /// empty one too).
    pub fn take(&mut self) -> GuestMsg {
        GuestMsg::Phases(std::mem::take(&mut self.phases))
    }

    /// The phases taken since the last report, as a frame to send, if
    /// there are any (none once off: the host did not ask).
    pub fn report(&mut self) -> Option<GuestMsg> {
        let phases = std::mem::take(&mut self.phases);
        (!phases.is_empty()).then_some(GuestMsg::Phases(phases))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_reported_in_order_bounded_and_not_once_off() {
        let mut l = Laps::from(Instant::now());
        l.lap("a");
        l.lap("b");
        match l.report() {
            Some(GuestMsg::Phases(p)) => {
                assert_eq!(
                    p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                    ["a", "b"]
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.report(), None, "a report takes the phases");
        for _ in 0..MAX_PHASES + 5 {
            l.lap("x");
        }
        match l.report() {
            Some(GuestMsg::Phases(p)) => assert_eq!(p.len(), MAX_PHASES),
            other => panic!("{other:?}"),
        }
        // The host did not ask: what was taken is dropped, nothing more is.
        l.lap("y");
        l.off();
        assert_eq!(l.report(), None, "off: what was taken is not reported");
        l.lap("z");
        l.restart();
        assert_eq!(l.report(), None, "off: nothing is taken");
    }
}
