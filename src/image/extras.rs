//! The parts of Docker's image config the OCI image spec (and so
//! `oci-spec`'s types) leaves out: `Healthcheck` and `OnBuild`, kept in the
//! config blob's `config` object under Docker's names, so that images built
//! here and images loaded or pulled from Docker keep them both ways.

use serde::{Deserialize, Serialize};

/// Docker's `HEALTHCHECK` (durations in nanoseconds, 0: the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", arg...]` or `["CMD-SHELL", "command"]`.
    #[serde(default)]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: u64,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub retries: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Docker's defaults for what a HEALTHCHECK leaves out.
pub const DEFAULT_INTERVAL_NS: u64 = 30_000_000_000;
pub const DEFAULT_TIMEOUT_NS: u64 = 30_000_000_000;
pub const DEFAULT_START_INTERVAL_NS: u64 = 5_000_000_000;
pub const DEFAULT_RETRIES: u32 = 3;

impl Healthcheck {
    /// Whether it is `NONE` (or empty): no check.
    pub fn disabled(&self) -> bool {
        self.test.first().is_none_or(|t| t == "NONE")
    }

    /// The command it runs (`CMD-SHELL`: through `/bin/sh -c`).
    pub fn command(&self) -> Option<Vec<String>> {
        match self.test.split_first()? {
            (k, rest) if k == "CMD" && !rest.is_empty() => Some(rest.to_vec()),
            (k, [cmd]) if k == "CMD-SHELL" => {
                Some(vec!["/bin/sh".into(), "-c".into(), cmd.clone()])
            }
            _ => None,
        }
    }

    pub fn interval_ns(&self) -> u64 {
        nonzero(self.interval, DEFAULT_INTERVAL_NS)
    }

    pub fn timeout_ns(&self) -> u64 {
        nonzero(self.timeout, DEFAULT_TIMEOUT_NS)
    }

    pub fn start_interval_ns(&self) -> u64 {
        nonzero(self.start_interval, DEFAULT_START_INTERVAL_NS)
    }

    pub fn retries_or_default(&self) -> u32 {
        if self.retries == 0 {
            DEFAULT_RETRIES
        } else {
            self.retries
        }
    }
}

fn nonzero(v: u64, default: u64) -> u64 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// What an image config carries beyond the OCI spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extras {
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
    /// `ONBUILD` triggers, as written after ONBUILD.
    #[serde(default)]
    pub on_build: Vec<String>,
}

/// The most ONBUILD triggers and the longest one read from a config blob
/// (an image's config is untrusted input).
const MAX_TRIGGERS: usize = 256;
const MAX_TRIGGER: usize = 64 << 10;

impl Extras {
    /// Reads them from a config blob (absent or malformed: none).
    pub fn from_config_blob(blob: &[u8]) -> Extras {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(blob) else {
            return Extras::default();
        };
        let c = &v["config"];
        let healthcheck = serde_json::from_value::<Healthcheck>(c["Healthcheck"].clone())
            .ok()
            .filter(|h| !h.test.is_empty());
        let on_build = c["OnBuild"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str())
                    .filter(|t| t.len() <= MAX_TRIGGER)
                    .take(MAX_TRIGGERS)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Extras {
            healthcheck,
            on_build,
        }
    }

    /// Adds them to a config as JSON (`config.Healthcheck`,
    /// `config.OnBuild`), making the `config` object if it has none.
    pub fn add_to(&self, config: &mut serde_json::Value) {
        if self.healthcheck.is_none() && self.on_build.is_empty() {
            return;
        }
        let Some(obj) = config.as_object_mut() else {
            return;
        };
        let c = obj.entry("config").or_insert_with(|| serde_json::json!({}));
        if c.is_null() {
            *c = serde_json::json!({});
        }
        if let Some(c) = c.as_object_mut() {
            if let Some(h) = &self.healthcheck {
                c.insert(
                    "Healthcheck".into(),
                    serde_json::to_value(h).unwrap_or_default(),
                );
            }
            if !self.on_build.is_empty() {
                c.insert("OnBuild".into(), serde_json::json!(self.on_build));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written into a config and read back; Docker's spelling; defaults.
    #[test]
    fn extras_round_trip_through_a_config_blob() {
        let e = Extras {
            healthcheck: Some(Healthcheck {
                test: vec!["CMD-SHELL".into(), "wget -q localhost".into()],
                interval: 5_000_000_000,
                retries: 2,
                ..Default::default()
            }),
            on_build: vec!["RUN echo hi".into()],
        };
        let mut v = serde_json::json!({"architecture": "amd64"});
        e.add_to(&mut v);
        assert_eq!(
            v["config"]["Healthcheck"],
            serde_json::json!({"Test": ["CMD-SHELL", "wget -q localhost"], "Interval": 5000000000u64, "Retries": 2})
        );
        let back = Extras::from_config_blob(v.to_string().as_bytes());
        assert_eq!(back, e);
        let h = back.healthcheck.unwrap();
        assert_eq!(h.command().unwrap(), ["/bin/sh", "-c", "wget -q localhost"]);
        assert_eq!(
            (h.timeout_ns(), h.retries_or_default()),
            (30_000_000_000, 2)
        );
        assert!(Extras::from_config_blob(b"{}").healthcheck.is_none());
        assert!(Extras::from_config_blob(b"not json").on_build.is_empty());
        let none = Healthcheck {
            test: vec!["NONE".into()],
            ..Default::default()
        };
        assert!(none.disabled() && none.command().is_none());
    }
}
