//! Where a command's request goes. Every command on the VMs of a datastore builds one
//! [`Request`] (or a few) and sends it here: to the `cbtsim serve` that owns the datastore
//! when one answers on its control socket, else to a [`Service`] of this process over the
//! datastore opened here. Either way the command gets the same [`Response`] or
//! [`ActionError`], so it prints the same output and exits the same way; the command only
//! parses arguments and renders.
//!
//! A socket or status file that a killed serve left behind does not confuse it: a socket
//! that refuses the connection is no service, and the datastore is opened here.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context as _};
use backup::Progress;
use service::{client, ActionError, Request, Response, Service};

use super::Ctx;

/// A service to send requests to.
#[derive(Debug)]
pub enum Backend {
    /// The `cbtsim serve` of this datastore.
    Serve(PathBuf),
    /// The datastore opened in this process.
    Local(Box<Service>),
}

impl Backend {
    /// The service of `ctx`'s datastore, which must exist.
    pub fn open(ctx: &Ctx) -> anyhow::Result<Self> {
        Self::new(ctx, false)
    }

    /// The same, creating the datastore if it is missing (`vm create`).
    pub fn open_or_create(ctx: &Ctx) -> anyhow::Result<Self> {
        Self::new(ctx, true)
    }

    fn new(ctx: &Ctx, create: bool) -> anyhow::Result<Self> {
        let Some(dir) = &ctx.datastore else {
            bail!("no datastore: pass --datastore DIR or set CBTSIM_DATASTORE");
        };
        if client::is_serving(dir) {
            return Ok(Backend::Serve(dir.clone()));
        }
        if !create {
            ensure!(dir.is_dir(), "datastore {} does not exist", dir.display());
        }
        let s = Service::local(dir).with_context(|| format!("cannot open datastore {}", dir.display()))?;
        Ok(Backend::Local(Box::new(s)))
    }

    /// Whether a `cbtsim serve` answers the requests.
    pub fn is_serve(&self) -> bool {
        matches!(self, Backend::Serve(_))
    }

    /// Runs `request`; `progress` hears how a long one goes.
    pub fn call(&self, request: Request, progress: &dyn Progress) -> Result<Response, ActionError> {
        match self {
            Backend::Serve(dir) => client::call(dir, &request, progress),
            Backend::Local(s) => s.execute(request, progress),
        }
    }
}

/// Sends the one request of a command to the service of `ctx`'s datastore.
pub fn request(ctx: &Ctx, request: Request, progress: &dyn Progress) -> anyhow::Result<Response> {
    Ok(Backend::open(ctx)?.call(request, progress)?)
}

/// The error for a result of the wrong kind (a serve of another version, or a bug).
pub fn unexpected(r: &Response) -> anyhow::Error {
    let what = serde_json::to_string(r).unwrap_or_default();
    let what: String = what.chars().take(200).collect();
    anyhow::anyhow!("the service gave an unexpected answer: {what}")
}

/// `answer!(response, Response::X(x) => x)`: the value of the expected variant, or
/// [`unexpected`].
macro_rules! answer {
    ($r:expr, $p:pat => $v:expr) => {
        match $r {
            $p => $v,
            other => return Err($crate::cli::dispatch::unexpected(&other)),
        }
    };
}
pub(crate) use answer;
