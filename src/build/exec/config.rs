//! The config-only steps (ENV, LABEL, WORKDIR, USER, CMD, ENTRYPOINT,
//! EXPOSE, VOLUME, SHELL, STOPSIGNAL, MAINTAINER): they change the image
//! config and the builder's state, and make no layer.

use oci_spec::image::ConfigBuilder;

use super::{step_err, BuildError, Builder, State};
use crate::build::dockerfile::{Cmd, Step, StepKind};
use crate::build::words;

impl Builder<'_> {
    pub(super) fn config_step(&mut self, step: &Step, st: &mut State) -> Result<(), BuildError> {
        let lookup_env = Self::env_lookup(st);
        let mut c = st
            .config
            .config()
            .clone()
            .unwrap_or_else(|| ConfigBuilder::default().build().expect("static"));
        let expand = |s: &str| words::expand(s, &lookup_env).map_err(|e| step_err(step, e));
        let shell_form = |s: &str, shell: &[String]| {
            let mut v = shell.to_vec();
            v.push(s.to_string());
            v
        };
        match &step.kind {
            StepKind::Env(raw) => {
                let kv = words::key_values(raw, &lookup_env).map_err(|e| step_err(step, e))?;
                let mut env = c.env().clone().unwrap_or_default();
                let new: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{k}={}", v.unwrap_or_default()))
                    .collect();
                crate::runtime::spec::merge_env(&mut env, &new);
                c.set_env(Some(env));
            }
            StepKind::Label(raw) => {
                let kv = words::key_values(raw, &lookup_env).map_err(|e| step_err(step, e))?;
                let mut labels = c.labels().clone().unwrap_or_default();
                for (k, v) in kv {
                    labels.insert(k, v.unwrap_or_default());
                }
                c.set_labels(Some(labels));
            }
            StepKind::Workdir(raw) => {
                let w = expand(raw)?;
                let base = c.working_dir().clone().unwrap_or_else(|| "/".into());
                let abs = if w.starts_with('/') {
                    w
                } else {
                    format!("{}/{w}", base.trim_end_matches('/'))
                };
                // Normalised by its text, as Docker records it.
                c.set_working_dir(Some(vmc_spawn::clean_path(&abs)));
            }
            StepKind::User(raw) => {
                c.set_user(Some(expand(raw)?));
            }
            StepKind::Cmd(cmd) => {
                c.set_cmd(Some(match cmd {
                    Cmd::Exec(v) => v.clone(),
                    Cmd::Shell(s) => shell_form(s, &st.shell),
                }));
                st.cmd_set = true;
            }
            StepKind::Entrypoint(cmd) => {
                c.set_entrypoint(Some(match cmd {
                    Cmd::Exec(v) => v.clone(),
                    Cmd::Shell(s) => shell_form(s, &st.shell),
                }));
                // As in Docker: a new ENTRYPOINT drops a CMD inherited from the base.
                if !st.cmd_set {
                    c.set_cmd(None);
                }
            }
            StepKind::Expose(raw) => {
                let mut ports = c.exposed_ports().clone().unwrap_or_default();
                for p in words::split_words(raw, &lookup_env).map_err(|e| step_err(step, e))? {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
                c.set_exposed_ports(Some(ports));
            }
            StepKind::Volume(v) => {
                let mut vols = c.volumes().clone().unwrap_or_default();
                for x in v {
                    vols.push(expand(x)?);
                }
                c.set_volumes(Some(vols));
            }
            StepKind::Shell(v) => {
                if v.is_empty() {
                    return Err(step_err(
                        step,
                        "SHELL needs the JSON form, e.g. SHELL [\"/bin/bash\", \"-c\"]",
                    ));
                }
                st.shell = v.clone();
            }
            StepKind::Stopsignal(raw) => {
                c.set_stop_signal(Some(expand(raw)?));
            }
            StepKind::Maintainer(m) => {
                st.config.set_author(Some(m.clone()));
            }
            StepKind::Healthcheck(h) => {
                st.extras.healthcheck = Some(h.clone());
            }
            StepKind::Onbuild(t) => {
                st.extras.on_build.push(t.clone());
            }
            StepKind::Ignored(what) => {
                let msg = format!(" ---> {what} is not supported by vmc build and was ignored");
                self.say(&msg);
            }
            StepKind::Run { .. } | StepKind::Copy { .. } | StepKind::Arg(_) => {}
        }
        st.config.set_config(Some(c));
        Self::history(st, &step.text, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmc_spawn::clean_path;

    #[test]
    fn workdirs_are_cleaned_like_docker() {
        for (p, want) in [
            ("/app/../x/./y", "/x/y"),
            ("/", "/"),
            ("/a//b/", "/a/b"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a"),
            ("/a/./.", "/a"),
        ] {
            assert_eq!(clean_path(p), want, "{p}");
        }
    }
}
