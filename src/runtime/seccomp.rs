//! Namespace mode's system-call filter: Docker's default seccomp profile,
//! `--security-opt seccomp=unconfined` and `--security-opt
//! seccomp=FILE.json` (Docker's profile format, which the OCI runtime
//! spec's `linux.seccomp` also parses as).
//!
//! A profile is an allow-list: a default action (Docker's: fail with EPERM)
//! and rules, each naming system calls, an action, optional argument
//! comparisons, and the capabilities, architectures or kernel it applies to
//! (`includes`/`excludes`). seccompiler (rust-vmm's, Firecracker's) turns
//! rules into BPF, one action per program; a profile with several actions
//! becomes several programs that the kernel stacks, taking the most
//! restrictive answer of all: one program that lets every rule's system
//! calls through and gives the default action to the rest, then one per
//! other action that gives it to its own rules' calls and lets the rest
//! through. For a call named by rules of one action that is exactly the
//! profile's meaning.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};
use vmc_spawn::SeccompProgram;

/// Docker's default profile for this architecture, written out in its
/// format.
const DEFAULT_PROFILE: &str = include_str!("seccomp_default.json");

/// The largest profile file read (Docker's own is about 20 KiB).
const MAX_PROFILE: u64 = 1 << 20;

/// What `--security-opt seccomp=` asked for; recorded in the container's
/// config so that `vmc exec` gets the same filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    /// Docker's default profile.
    #[default]
    Default,
    /// No filter.
    Unconfined,
    /// A profile's JSON text (read once, when the container is made).
    Profile(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {0}: {1}")]
    Read(String, String),
    #[error("seccomp profile: {0} (Docker's profile format: see README, Security model)")]
    Invalid(String),
    #[error("seccomp profile: {0}")]
    Capability(#[from] super::caps::UnknownCapability),
}

impl Seccomp {
    /// `--security-opt seccomp=VALUE`: `unconfined`, `builtin`/`default`,
    /// or the path of a profile, read (regular file, 1 MiB at most) and
    /// checked now.
    pub fn from_option(value: &str) -> Result<Self, SeccompError> {
        match value {
            "unconfined" => return Ok(Self::Unconfined),
            "builtin" | "default" => return Ok(Self::Default),
            _ => {}
        }
        let read_err = |e: &dyn std::fmt::Display| SeccompError::Read(value.into(), e.to_string());
        let file = std::fs::File::open(value).map_err(|e| read_err(&e))?;
        let meta = file.metadata().map_err(|e| read_err(&e))?;
        if !meta.is_file() {
            return Err(read_err(&"not a regular file"));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_PROFILE + 1), &mut text)
            .map_err(|e| read_err(&e))?;
        if text.len() as u64 > MAX_PROFILE {
            return Err(read_err(&"larger than 1 MiB"));
        }
        let s = Self::Profile(text);
        // Refused now, with its reason, rather than when the container starts.
        s.programs(vmc_spawn::DOCKER_DEFAULT_CAPS)?;
        Ok(s)
    }

    /// The filters for a container whose capability set is `caps`.
    pub fn programs(&self, caps: u64) -> Result<Vec<SeccompProgram>, SeccompError> {
        let text = match self {
            Self::Unconfined => return Ok(Vec::new()),
            Self::Default => DEFAULT_PROFILE,
            Self::Profile(t) => t,
        };
        let profile: Profile = serde_json::from_str(text)
            .map_err(|e| SeccompError::Invalid(format!("not a profile: {e}")))?;
        compile(&profile, caps, kernel_version())
    }
}

/// A profile in Docker's format (unknown fields, such as `comment`, are
/// ignored, as Docker does).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    syscalls: Option<Vec<Rule>>,
    #[serde(default)]
    flags: Option<Vec<String>>,
    listener_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    names: Option<Vec<String>>,
    /// The older single-name form.
    name: Option<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default)]
    includes: Option<Filter>,
    #[serde(default)]
    excludes: Option<Filter>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    arches: Option<Vec<String>>,
    min_kernel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// The architecture names profiles use for this machine (Docker's: Go's
/// GOARCH, plus x32 on x86_64).
fn arch_names() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["amd64", "x32"],
        "aarch64" => &["arm64"],
        "riscv64" => &["riscv64"],
        _ => &[],
    }
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_version(&release).unwrap_or((0, 0))
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction, SeccompError> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno),
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_NOTIFY" => {
            return Err(SeccompError::Invalid(
                "SCMP_ACT_NOTIFY is not supported (vmc has no seccomp agent)".into(),
            ))
        }
        other => return Err(SeccompError::Invalid(format!("unknown action '{other}'"))),
    })
}

fn condition(a: &Arg) -> Result<SeccompCondition, SeccompError> {
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, a.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, a.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, a.value),
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, a.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, a.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, a.value),
        // libseccomp's: (arg & value) == valueTwo.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        other => {
            return Err(SeccompError::Invalid(format!(
                "unknown argument operator '{other}'"
            )))
        }
    };
    // Whole 64-bit registers, as libseccomp compares them.
    SeccompCondition::new(a.index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SeccompError::Invalid(format!("argument {}: {e}", a.index)))
}

/// Whether a rule's `includes`/`excludes` let it apply to a container with
/// `caps` on this machine (Docker's meaning: every included capability and
/// any included architecture must be present, no excluded one).
fn applies(rule: &Rule, caps: u64, kernel: (u32, u32)) -> Result<bool, SeccompError> {
    let has_cap = |name: &String| -> Result<bool, SeccompError> {
        let bit = super::caps::bits(name)?;
        Ok(caps & bit == bit)
    };
    let on_arch = |arches: &Vec<String>| arches.iter().any(|a| arch_names().contains(&a.as_str()));
    if let Some(inc) = &rule.includes {
        for c in inc.caps.iter().flatten() {
            if !has_cap(c)? {
                return Ok(false);
            }
        }
        if inc
            .arches
            .as_ref()
            .is_some_and(|a| !a.is_empty() && !on_arch(a))
        {
            return Ok(false);
        }
        if let Some(min) = &inc.min_kernel {
            let min = parse_version(min).ok_or_else(|| {
                SeccompError::Invalid(format!("minKernel '{min}' is not a version"))
            })?;
            if kernel < min {
                return Ok(false);
            }
        }
    }
    if let Some(exc) = &rule.excludes {
        for c in exc.caps.iter().flatten() {
            if has_cap(c)? {
                return Ok(false);
            }
        }
        if exc.arches.as_ref().is_some_and(on_arch) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Rules of one action: per system call, `None` when it matches whatever
/// its arguments, else the argument rules of which one must match.
type Calls = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn add(calls: &mut Calls, nr: i64, rules: Option<Vec<SeccompRule>>) {
    match (calls.get_mut(&nr), rules) {
        (None, r) => {
            calls.insert(nr, r);
        }
        // Already unconditional: stays so.
        (Some(None), _) => {}
        (Some(slot), None) => *slot = None,
        (Some(Some(have)), Some(more)) => have.extend(more),
    }
}

/// Argument comparisons of one rule: all must hold; comparisons of the
/// same argument can't be ANDed by libseccomp, so Docker's runtimes make
/// each its own alternative then, as this does.
fn argument_rules(args: &[Arg]) -> Result<Option<Vec<SeccompRule>>, SeccompError> {
    if args.is_empty() {
        return Ok(None);
    }
    if args.len() > 6 || args.iter().any(|a| a.index > 5) {
        return Err(SeccompError::Invalid(
            "an argument index above 5 (system calls have 6)".into(),
        ));
    }
    let conditions = args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    let mut indices: Vec<u8> = args.iter().map(|a| a.index).collect();
    indices.sort_unstable();
    indices.dedup();
    let rule = |c: Vec<SeccompCondition>| {
        SeccompRule::new(c).map_err(|e| SeccompError::Invalid(e.to_string()))
    };
    Ok(Some(if indices.len() == args.len() {
        vec![rule(conditions)?]
    } else {
        conditions
            .into_iter()
            .map(|c| rule(vec![c]))
            .collect::<Result<_, _>>()?
    }))
}

fn compile(
    profile: &Profile,
    caps: u64,
    kernel: (u32, u32),
) -> Result<Vec<SeccompProgram>, SeccompError> {
    if profile
        .listener_path
        .as_deref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(SeccompError::Invalid(
            "listenerPath is not supported (vmc has no seccomp agent)".into(),
        ));
    }
    if let Some(flag) = profile.flags.iter().flatten().next() {
        return Err(SeccompError::Invalid(format!(
            "flag {flag} is not supported"
        )));
    }
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SeccompError::Invalid(e.to_string()))?;
    // Actions in the order met; `u32::from` is each one's BPF return value.
    let mut groups: Vec<(SeccompAction, Calls)> = Vec::new();
    for rule in profile.syscalls.iter().flatten() {
        let act = action(&rule.action, rule.errno_ret)?;
        let args = argument_rules(rule.args.as_deref().unwrap_or_default())?;
        if !applies(rule, caps, kernel)? || act == default {
            continue;
        }
        let names = rule.names.iter().flatten().chain(rule.name.as_ref());
        let idx = match groups.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                groups.push((act, Calls::new()));
                groups.len() - 1
            }
        };
        for name in names {
            // A name this architecture lacks (a 32-bit call, a newer one)
            // is skipped, as Docker's runtimes do.
            if let Ok(nr) = syscalls::Sysno::from_str(name) {
                add(&mut groups[idx].1, nr.id() as i64, args.clone());
            }
        }
    }
    let build = |calls: &Calls, mismatch: SeccompAction, matched: SeccompAction| {
        let rules = calls
            .iter()
            .map(|(nr, r)| (*nr, r.clone().unwrap_or_default()))
            .collect();
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(BpfProgram::try_from)
            .map(|p| {
                SeccompProgram(
                    p.iter()
                        .map(|i| libc::sock_filter {
                            code: i.code,
                            jt: i.jt,
                            jf: i.jf,
                            k: i.k,
                        })
                        .collect(),
                )
            })
            .map_err(|e| SeccompError::Invalid(e.to_string()))
    };
    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        let mut every = Calls::new();
        for (_, calls) in &groups {
            for (nr, r) in calls {
                add(&mut every, *nr, r.clone());
            }
        }
        programs.push(build(&every, default, SeccompAction::Allow)?);
    }
    for (act, calls) in &groups {
        if *act != SeccompAction::Allow && !calls.is_empty() {
            programs.push(build(calls, SeccompAction::Allow, act.clone())?);
        }
    }
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmc_spawn::DOCKER_DEFAULT_CAPS;

    const SYS_ADMIN: u64 = 1 << 21;

    fn default_profile() -> Profile {
        serde_json::from_str(DEFAULT_PROFILE).unwrap()
    }

    #[test]
    fn every_name_in_the_default_profile_is_a_system_call_of_this_machine() {
        let unknown: Vec<String> = default_profile()
            .syscalls
            .unwrap()
            .iter()
            .flat_map(|r| r.names.clone().unwrap())
            .filter(|n| syscalls::Sysno::from_str(n).is_err())
            .collect();
        assert!(unknown.is_empty(), "misspelt or foreign: {unknown:?}");
    }

    #[test]
    fn the_default_profile_compiles_to_an_allow_list_and_clone3s_enosys() {
        let p = compile(&default_profile(), DOCKER_DEFAULT_CAPS, (6, 1)).unwrap();
        assert_eq!(p.len(), 2, "allow-list, then clone3's ENOSYS");
        assert!(p.iter().all(|p| p.0.len() < 4096));
        // With CAP_SYS_ADMIN, clone3 is allowed: the allow-list alone.
        let p = compile(&default_profile(), DOCKER_DEFAULT_CAPS | SYS_ADMIN, (6, 1)).unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn includes_and_excludes_follow_capabilities_arches_and_kernel() {
        let rule: Rule = serde_json::from_str(
            r#"{"names":["ptrace"],"action":"SCMP_ACT_ALLOW",
                "includes":{"caps":["CAP_SYS_PTRACE"],"minKernel":"4.8","arches":["amd64","arm64"]},
                "excludes":{"caps":["CAP_SYS_ADMIN"]}}"#,
        )
        .unwrap();
        let ptrace = 1 << 19;
        assert!(applies(&rule, ptrace, (6, 1)).unwrap());
        assert!(!applies(&rule, 0, (6, 1)).unwrap(), "capability missing");
        assert!(!applies(&rule, ptrace, (4, 4)).unwrap(), "kernel too old");
        assert!(
            !applies(&rule, ptrace | SYS_ADMIN, (6, 1)).unwrap(),
            "excluded"
        );
        let foreign: Rule = serde_json::from_str(
            r#"{"names":["s390_pci_mmio_read"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["s390x"]}}"#,
        )
        .unwrap();
        assert!(!applies(&foreign, ptrace, (6, 1)).unwrap());
        let bad: Rule = serde_json::from_str(
            r#"{"names":["x"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_NOPE"]}}"#,
        )
        .unwrap();
        assert!(applies(&bad, 0, (6, 1)).is_err());
    }

    #[test]
    fn bad_profiles_are_refused_with_their_reason() {
        for (json, want) in [
            ("{", "not a profile"),
            (
                r#"{"defaultAction":"SCMP_ACT_NOPE"}"#,
                "unknown action 'SCMP_ACT_NOPE'",
            ),
            (r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#, "not supported"),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":7,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
                "index above 5",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":1,"op":"SCMP_CMP_SOME"}]}]}"#,
                "unknown argument operator",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","flags":["SECCOMP_FILTER_FLAG_LOG"]}"#,
                "not supported",
            ),
        ] {
            let e = Seccomp::Profile(json.into())
                .programs(DOCKER_DEFAULT_CAPS)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn same_argument_comparisons_become_alternatives() {
        let args: Vec<Arg> = serde_json::from_str(
            r#"[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},{"index":0,"value":2,"op":"SCMP_CMP_EQ"}]"#,
        )
        .unwrap();
        assert_eq!(argument_rules(&args).unwrap().unwrap().len(), 2);
        let args: Vec<Arg> = serde_json::from_str(
            r#"[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},{"index":1,"value":2,"op":"SCMP_CMP_EQ"}]"#,
        )
        .unwrap();
        assert_eq!(argument_rules(&args).unwrap().unwrap().len(), 1);
    }

    #[test]
    fn unconfined_has_no_filter_and_versions_parse() {
        assert!(Seccomp::Unconfined.programs(0).unwrap().is_empty());
        assert_eq!(parse_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_version("4.8"), Some((4, 8)));
        assert_eq!(parse_version("5"), Some((5, 0)));
        assert_eq!(parse_version("x"), None);
    }

    /// Installs the default profile in a forked child (no_new_privs makes
    /// that possible without privilege) and tries what it must refuse and
    /// allow; the child reports by exit code.
    #[test]
    fn the_default_filter_refuses_keyrings_namespaces_and_vsock_and_allows_the_rest() {
        let progs = Seccomp::Default.programs(DOCKER_DEFAULT_CAPS).unwrap();
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: system calls on plain data; the child exits without unwinding.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for p in &progs {
                    let f = libc::sock_fprog {
                        len: p.0.len() as u16,
                        filter: p.0.as_ptr().cast_mut(),
                    };
                    if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &f) < 0 {
                        libc::_exit(100);
                    }
                }
                let errno = || *libc::__errno_location();
                let refused = |r: libc::c_long, e: libc::c_int| r == -1 && errno() == e;
                let checks = [
                    refused(
                        libc::syscall(
                            libc::SYS_add_key,
                            c"user".as_ptr(),
                            c"k".as_ptr(),
                            c"v".as_ptr(),
                            1usize,
                            -4i32, // KEY_SPEC_USER_KEYRING
                        ),
                        libc::EPERM,
                    ),
                    refused(
                        libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
                        libc::EPERM,
                    ),
                    refused(
                        libc::syscall(libc::SYS_socket, libc::AF_VSOCK, libc::SOCK_STREAM, 0),
                        libc::EPERM,
                    ),
                    refused(
                        libc::syscall(
                            libc::SYS_personality,
                            0x0040000, /* ADDR_NO_RANDOMIZE */
                        ),
                        libc::EPERM,
                    ),
                    refused(
                        libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize),
                        libc::ENOSYS,
                    ),
                    libc::syscall(libc::SYS_personality, 0xffff_ffffu64) >= 0,
                    libc::getpid() > 0,
                    libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0,
                    // unshare without namespace flags is fine.
                    libc::syscall(libc::SYS_unshare, libc::CLONE_FILES) == 0,
                ];
                let failed = checks.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                libc::_exit(failed as i32);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child killed: {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "check number {} failed (100: the filter was not installed)",
            libc::WEXITSTATUS(status)
        );
    }
}
