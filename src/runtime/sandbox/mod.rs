//! Build sandboxes: a root in which processes run one after another, each
//! one's changes committed as an OCI layer tar and kept as a lower for the
//! next. `vmc build` runs a stage's RUN steps in one. Each engine makes its
//! own ([`Engine::sandbox`](super::engine::Engine::sandbox)): a microVM fed
//! layers by the agent ([`vm`]), or an overlay of layer directories on the
//! host run in namespaces ([`ns`]).

use std::io::{Read, Write};

use vmc_proto::{ExitStatus, ProcessSpec, StartFailure};

use super::RuntimeError;

pub mod ns;
pub mod vm;

/// How a process run in a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Exited(ExitStatus),
    StartFailed(StartFailure, String),
}

/// The hostname of a build step, as BuildKit names it.
pub const HOSTNAME: &str = "buildkitsandbox";

/// A root whose changes become layers.
pub trait Sandbox {
    /// Adds the uncompressed layer tar `layer` on top of the root.
    fn apply_layer(&mut self, layer: &mut dyn Read) -> Result<(), RuntimeError>;

    /// Runs `spec` in the root to its end; its output goes to `out`
    /// (is-stderr, bytes).
    fn run(
        &mut self,
        spec: ProcessSpec,
        out: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<RunResult, RuntimeError>;

    /// Writes the changes since the last commit (or the start) as a layer
    /// tar to `sink`; they stay in the root for what runs next.
    fn commit(&mut self, sink: &mut dyn Write) -> Result<(), RuntimeError>;

    /// Stops the sandbox and removes what it made.
    fn stop(self: Box<Self>);
}
