//! `--cap-add` and `--cap-drop`: Docker's capability names and its rules
//! for combining them with the default set.

use vmc_spawn::DOCKER_DEFAULT_CAPS;

/// Linux capabilities by number (capability.h), without the `CAP_` prefix.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Every capability above.
const ALL: u64 = (1 << NAMES.len()) - 1;

/// A capability name Linux does not have.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability '{0}' (use names such as NET_ADMIN, or ALL)")]
pub struct UnknownCapability(pub String);

/// Every capability's name as the OCI runtime spec writes it (`CAP_CHOWN`).
pub fn names() -> Vec<String> {
    NAMES.iter().map(|n| format!("CAP_{n}")).collect()
}

/// The bits `name` stands for: one capability (`NET_ADMIN`, `cap_net_admin`)
/// or `ALL`.
pub(crate) fn bits(name: &str) -> Result<u64, UnknownCapability> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Ok(ALL);
    }
    NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| 1 << i)
        .ok_or_else(|| UnknownCapability(name.to_string()))
}

/// The capability set for `add` and `drop` as Docker computes it: the
/// default set (every capability when `add` holds ALL), less what `drop`
/// names (everything for ALL), plus what `add` names. `None` when neither
/// is given (the default set, recorded as such).
pub fn effective(add: &[String], drop: &[String]) -> Result<Option<u64>, UnknownCapability> {
    if add.is_empty() && drop.is_empty() {
        return Ok(None);
    }
    let add = add
        .iter()
        .map(|n| bits(n))
        .try_fold(0, |a, b| b.map(|b| a | b))?;
    let drop = drop
        .iter()
        .map(|n| bits(n))
        .try_fold(0, |a, b| b.map(|b| a | b))?;
    let base = if add == ALL { ALL } else { DOCKER_DEFAULT_CAPS };
    Ok(Some((base & !drop) | add))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn dockers_rules_for_adding_and_dropping() {
        assert_eq!(effective(&[], &[]).unwrap(), None);
        let admin = 1 << 21;
        assert_eq!(
            effective(&s(&["SYS_ADMIN"]), &[]).unwrap(),
            Some(DOCKER_DEFAULT_CAPS | admin)
        );
        assert_eq!(
            effective(&s(&["cap_sys_admin"]), &[]).unwrap(),
            Some(DOCKER_DEFAULT_CAPS | admin)
        );
        assert_eq!(
            effective(&[], &s(&["CHOWN"])).unwrap(),
            Some(DOCKER_DEFAULT_CAPS & !1)
        );
        // Drop everything, then add one back.
        assert_eq!(
            effective(&s(&["NET_BIND_SERVICE"]), &s(&["ALL"])).unwrap(),
            Some(1 << 10)
        );
        assert_eq!(effective(&s(&["ALL"]), &[]).unwrap(), Some(ALL));
        assert_eq!(effective(&[], &s(&["all"])).unwrap(), Some(0));
        let e = effective(&s(&["NOPE"]), &[]).unwrap_err();
        assert_eq!(e, UnknownCapability("NOPE".into()));
        assert_eq!(
            e.to_string(),
            "unknown capability 'NOPE' (use names such as NET_ADMIN, or ALL)"
        );
    }
}
