//! Resolves Docker's `--user` syntax (`user`, `uid`, `user:group`, `uid:gid`)
//! against the container's own /etc/passwd and /etc/group, as runc does.

/// The identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = Passwd<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || l.starts_with('#') {
            return None;
        }
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members)
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || l.starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// A `--user` that the container's passwd or group file does not have.
#[derive(Debug, PartialEq, Eq)]
pub enum UnknownUser {
    User(String),
    Group(String),
}

// Docker's (runc's) wording, written out: this crate keeps its
// dependencies to libc and tar (it runs in the guest too).
impl std::fmt::Display for UnknownUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnknownUser::User(u) => {
                write!(
                    f,
                    "unable to find user {u}: no matching entries in passwd file"
                )
            }
            UnknownUser::Group(g) => {
                write!(
                    f,
                    "unable to find group {g}: no matching entries in group file"
                )
            }
        }
    }
}

impl std::error::Error for UnknownUser {}

/// Resolves `spec` against the given passwd and group file contents.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<ExecUser, UnknownUser> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let numeric = user.parse::<u32>().ok();
    let entry = passwd_entries(passwd).find(|p| match numeric {
        Some(uid) => p.uid == uid,
        None => p.name == user,
    });
    let (uid, mut gid, home, name) = match (entry, numeric) {
        (Some(p), _) => (p.uid, p.gid, p.home.to_string(), Some(p.name)),
        (None, Some(uid)) => (uid, 0, "/".to_string(), None),
        (None, None) => return Err(UnknownUser::User(user.to_string())),
    };
    let mut groups = Vec::new();
    match grp {
        Some(g) if !g.is_empty() => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(group)
                    .find(|(n, _, _)| *n == g)
                    .map(|(_, id, _)| id)
                    .ok_or_else(|| UnknownUser::Group(g.to_string()))?,
            };
        }
        _ => {
            if let Some(name) = name {
                groups = group_entries(group)
                    .filter(|(_, _, members)| members.contains(&name))
                    .map(|(_, id, _)| id)
                    .collect();
            }
        }
    }
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(ExecUser {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                          app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\napp:x:1000:\nstaff:x:50:app\n";

    #[test]
    fn empty_means_root_with_roots_groups() {
        let u = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        assert_eq!(u.groups, vec![0, 10]);
    }

    #[test]
    fn names_and_numbers_resolve_through_passwd() {
        let u = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 10, 50]);
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap().home, "/home/app");
    }

    #[test]
    fn unknown_numeric_uid_runs_with_gid_zero() {
        let u = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
    }

    #[test]
    fn explicit_group_by_name_or_number() {
        let u = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert_eq!(resolve("1:7", PASSWD, GROUP).unwrap().gid, 7);
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = resolve("nobody", PASSWD, GROUP).unwrap_err();
        assert_eq!(e, UnknownUser::User("nobody".into()));
        assert_eq!(
            e.to_string(),
            "unable to find user nobody: no matching entries in passwd file"
        );
        let e = resolve("app:nogroup", PASSWD, GROUP).unwrap_err();
        assert_eq!(e, UnknownUser::Group("nogroup".into()));
        assert_eq!(
            e.to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
    }
}
