//! What process a container runs: Docker's rules for combining the image's
//! Entrypoint, Cmd, Env, WorkingDir and User with `docker run` arguments.

use oci_spec::image::Config;

use super::ProcessSpec;

/// What `vmc run` was told on its command line.
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    /// The command after the image name (replaces the image's Cmd).
    pub command: Vec<String>,
    /// `--entrypoint`: Some("") clears the image's entrypoint.
    pub entrypoint: Option<String>,
    /// `-e` values, already `KEY=VALUE`.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// Errors combining the two.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command specified: the image has no Entrypoint or Cmd; give a command after the image name")]
    NoCommand,
}

fn key(kv: &str) -> &str {
    kv.split_once('=').map_or(kv, |(k, _)| k)
}

/// Merges `env` into `base`: a later value replaces an earlier one of the same key.
pub fn merge_env(base: &mut Vec<String>, env: &[String]) {
    for e in env {
        let k = key(e);
        base.retain(|b| key(b) != k);
        base.push(e.clone());
    }
}

/// The process for an image `config` and the run `o`verrides.
pub fn process(config: Option<&Config>, o: &RunOverrides) -> Result<ProcessSpec, SpecError> {
    let image_ep: Vec<String> = config
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    let image_cmd: Vec<String> = config.and_then(|c| c.cmd().clone()).unwrap_or_default();
    // --entrypoint replaces the image's and, as in Docker, drops its Cmd.
    let (entrypoint, default_cmd) = match &o.entrypoint {
        Some(ep) if ep.is_empty() => (Vec::new(), Vec::new()),
        Some(ep) => (vec![ep.clone()], Vec::new()),
        None => (image_ep, image_cmd),
    };
    let cmd = if o.command.is_empty() {
        default_cmd
    } else {
        o.command.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let mut env: Vec<String> = config.and_then(|c| c.env().clone()).unwrap_or_default();
    merge_env(&mut env, &o.env);
    let cwd = o
        .workdir
        .clone()
        .or_else(|| {
            config
                .and_then(|c| c.working_dir().clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into());
    let user = o
        .user
        .clone()
        .or_else(|| config.and_then(|c| c.user().clone()))
        .unwrap_or_default();
    Ok(ProcessSpec {
        args,
        env,
        cwd,
        user,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use oci_spec::image::ConfigBuilder;

    use super::*;

    fn image(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> Config {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut b = ConfigBuilder::default()
            .env(vec!["PATH=/bin".to_string(), "A=image".to_string()])
            .working_dir("/app")
            .user("app");
        if let Some(e) = ep {
            b = b.entrypoint(v(e));
        }
        if let Some(c) = cmd {
            b = b.cmd(v(c));
        }
        b.build().unwrap()
    }

    fn run(c: &Config, o: RunOverrides) -> Vec<String> {
        process(Some(c), &o).unwrap().args
    }

    #[test]
    fn entrypoint_and_cmd_combine_like_docker() {
        let both = image(Some(&["node"]), Some(&["index.js"]));
        assert_eq!(run(&both, RunOverrides::default()), ["node", "index.js"]);
        let o = RunOverrides {
            command: vec!["other.js".into()],
            ..Default::default()
        };
        assert_eq!(
            run(&both, o),
            ["node", "other.js"],
            "CLI args replace Cmd only"
        );
        let o = RunOverrides {
            entrypoint: Some("sh".into()),
            ..Default::default()
        };
        assert_eq!(run(&both, o), ["sh"], "--entrypoint drops the image's Cmd");
        let o = RunOverrides {
            entrypoint: Some("sh".into()),
            command: vec!["-c".into(), "true".into()],
            ..Default::default()
        };
        assert_eq!(run(&both, o), ["sh", "-c", "true"]);
        let cmd_only = image(None, Some(&["/bin/sh"]));
        assert_eq!(run(&cmd_only, RunOverrides::default()), ["/bin/sh"]);
        let o = RunOverrides {
            command: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(run(&cmd_only, o), ["ls"]);
        let none = image(None, None);
        assert_eq!(
            process(Some(&none), &RunOverrides::default()).unwrap_err(),
            SpecError::NoCommand
        );
        assert_eq!(
            process(None, &RunOverrides::default()).unwrap_err(),
            SpecError::NoCommand
        );
        let o = RunOverrides {
            entrypoint: Some(String::new()),
            command: vec!["id".into()],
            ..Default::default()
        };
        assert_eq!(run(&both, o), ["id"], "--entrypoint '' clears it");
    }

    #[test]
    fn env_workdir_and_user_are_overridden() {
        let c = image(None, Some(&["x"]));
        let p = process(
            Some(&c),
            &RunOverrides {
                env: vec!["A=cli".into(), "B=new".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.env, ["PATH=/bin", "A=cli", "B=new"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/app", "app"));
        let p = process(
            Some(&c),
            &RunOverrides {
                workdir: Some("/tmp".into()),
                user: Some("0:0".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/tmp", "0:0"));
    }
}
