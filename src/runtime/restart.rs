//! Restart policies (`--restart no|on-failure[:N]|always|unless-stopped`),
//! Docker's rules without a daemon: a detached container's supervisor
//! decides, when the workload ends, whether to run it again, and waits
//! Docker's backoff first (100 ms, doubled at each restart up to a minute,
//! back to 100 ms after a run of 10 s or more).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A container's restart policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "name")]
pub enum RestartPolicy {
    /// Never restart (the default).
    #[default]
    No,
    /// Restart when the exit code is not 0, at most `max` times since the
    /// last `vmc start` (0: no limit).
    OnFailure { max: u32 },
    /// Restart whatever the exit code, unless stopped by `vmc stop`/`kill`.
    Always,
    /// As `always`. (Docker tells the two apart only when its daemon
    /// restarts; vmc has no daemon, so nothing restarts with the host.)
    UnlessStopped,
}

/// A `--restart` value that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid restart policy '{0}': use no, on-failure[:N], always or unless-stopped")]
    Unknown(String),
    #[error("invalid restart policy '{0}': the most retries must be a number")]
    Count(String),
    #[error("invalid restart policy '{0}': only on-failure takes a number of retries")]
    NoCount(String),
}

/// The first backoff, doubled at each restart.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest backoff.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A run at least this long resets the backoff.
const SETTLED: Duration = Duration::from_secs(10);

impl RestartPolicy {
    /// Docker's `--restart` syntax.
    pub fn parse(s: &str) -> Result<RestartPolicy, PolicyError> {
        let (name, count) = match s.split_once(':') {
            Some((n, c)) => (n, Some(c)),
            None => (s, None),
        };
        let policy = match name {
            "" | "no" => RestartPolicy::No,
            "always" => RestartPolicy::Always,
            "unless-stopped" => RestartPolicy::UnlessStopped,
            "on-failure" => {
                let max = match count {
                    None => 0,
                    Some(c) => c.parse().map_err(|_| PolicyError::Count(s.into()))?,
                };
                return Ok(RestartPolicy::OnFailure { max });
            }
            _ => return Err(PolicyError::Unknown(s.into())),
        };
        if count.is_some() {
            return Err(PolicyError::NoCount(s.into()));
        }
        Ok(policy)
    }

    /// Docker's name for it (`HostConfig.RestartPolicy.Name`).
    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure { .. } => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }

    /// `HostConfig.RestartPolicy.MaximumRetryCount`.
    pub fn max_retries(self) -> u32 {
        match self {
            RestartPolicy::OnFailure { max } => max,
            _ => 0,
        }
    }

    /// Whether a workload that ended with `code`, after `restarts` restarts
    /// since the last start, runs again. A container stopped by the user
    /// (`vmc stop`, `vmc kill`) never does.
    pub fn should_restart(self, code: i32, restarts: u32, stopped_by_user: bool) -> bool {
        if stopped_by_user {
            return false;
        }
        match self {
            RestartPolicy::No => false,
            RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
            RestartPolicy::OnFailure { max } => code != 0 && (max == 0 || restarts < max),
        }
    }
}

/// The wait before the next restart: `previous` was the last one (None at
/// the first restart), and the run that just ended lasted `ran`.
pub fn backoff(previous: Option<Duration>, ran: Duration) -> Duration {
    match previous {
        Some(d) if ran < SETTLED => (d * 2).min(MAX_DELAY),
        _ => FIRST_DELAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker's spellings parse, and what Docker refuses is refused by
    /// name.
    #[test]
    fn policies_parse_as_docker_spells_them() {
        assert_eq!(RestartPolicy::parse("no"), Ok(RestartPolicy::No));
        assert_eq!(RestartPolicy::parse("always"), Ok(RestartPolicy::Always));
        assert_eq!(
            RestartPolicy::parse("unless-stopped"),
            Ok(RestartPolicy::UnlessStopped)
        );
        assert_eq!(
            RestartPolicy::parse("on-failure"),
            Ok(RestartPolicy::OnFailure { max: 0 })
        );
        assert_eq!(
            RestartPolicy::parse("on-failure:3"),
            Ok(RestartPolicy::OnFailure { max: 3 })
        );
        assert!(matches!(
            RestartPolicy::parse("sometimes"),
            Err(PolicyError::Unknown(_))
        ));
        assert!(matches!(
            RestartPolicy::parse("on-failure:x"),
            Err(PolicyError::Count(_))
        ));
        assert!(matches!(
            RestartPolicy::parse("always:2"),
            Err(PolicyError::NoCount(_))
        ));
        let p = RestartPolicy::parse("on-failure:5").unwrap();
        assert_eq!((p.name(), p.max_retries()), ("on-failure", 5));
    }

    /// on-failure restarts only failures, up to its count; always restarts
    /// any exit; nothing restarts what the user stopped.
    #[test]
    fn the_policies_decide_as_dockers_do() {
        let on_failure = RestartPolicy::OnFailure { max: 2 };
        assert!(on_failure.should_restart(1, 0, false));
        assert!(on_failure.should_restart(137, 1, false));
        assert!(!on_failure.should_restart(1, 2, false));
        assert!(!on_failure.should_restart(0, 0, false));
        assert!(RestartPolicy::OnFailure { max: 0 }.should_restart(3, 1000, false));
        assert!(RestartPolicy::Always.should_restart(0, 1000, false));
        assert!(RestartPolicy::UnlessStopped.should_restart(0, 7, false));
        assert!(!RestartPolicy::No.should_restart(1, 0, false));
        for p in [
            RestartPolicy::Always,
            RestartPolicy::UnlessStopped,
            on_failure,
        ] {
            assert!(!p.should_restart(1, 0, true), "{p:?}");
        }
    }

    /// The backoff doubles from 100 ms to at most a minute, and a run of 10
    /// s or more starts it again at 100 ms.
    #[test]
    fn the_backoff_doubles_and_resets_after_a_settled_run() {
        let short = Duration::from_millis(50);
        let mut d = backoff(None, short);
        assert_eq!(d, Duration::from_millis(100));
        d = backoff(Some(d), short);
        assert_eq!(d, Duration::from_millis(200));
        for _ in 0..20 {
            d = backoff(Some(d), short);
        }
        assert_eq!(d, Duration::from_secs(60));
        assert_eq!(
            backoff(Some(d), Duration::from_secs(10)),
            Duration::from_millis(100)
        );
    }
}
