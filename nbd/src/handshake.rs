//! Option haggling: a state machine fed one parsed option at a time. It calls
//! the backend ([`Exports`]) but does no I/O: replies are appended to a
//! buffer the caller sends.

use std::sync::Arc;

use crate::backend::{Export, Exports, OpenError};
use crate::proto::{self, ClientOption, InfoRequest, MetaRequest};
use crate::transmission::Session;

/// Most metadata contexts one `NBD_OPT_SET_META_CONTEXT` may select
/// (more: `NBD_REP_ERR_TOO_BIG`).
pub const MAX_SELECTED_CONTEXTS: usize = 256;

/// Limits that bound what one connection may cost the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest read or write payload (also advertised as the maximum
    /// payload; an export may lower it). Bounds the memory per connection.
    pub max_payload: u32,
    /// Largest option data the server reads; larger options are skipped and
    /// answered with `NBD_REP_ERR_TOO_BIG`.
    pub max_option_data: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 1 << 25,
            max_option_data: 1 << 16,
        }
    }
}

/// What to do after an option.
#[derive(Debug)]
pub enum Step {
    /// Send the replies, read the next option.
    Continue,
    /// Send the replies, then close the connection.
    Close,
    /// Send the replies, then serve requests with this session.
    Transmission(Box<Session>),
}

/// The contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, for one export.
#[derive(Debug, Clone)]
struct Selection {
    export: String,
    /// Context names; the context ID of `contexts[i]` is `i + 1`.
    contexts: Vec<String>,
}

/// The negotiation state of one connection.
pub struct Handshake {
    exports: Arc<dyn Exports>,
    limits: Limits,
    no_zeroes: bool,
    structured: bool,
    selection: Option<Selection>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("limits", &self.limits)
            .field("no_zeroes", &self.no_zeroes)
            .field("structured", &self.structured)
            .field("selection", &self.selection)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// A new negotiation, after the client flags (already checked with
    /// [`proto::parse_client_flags`]) arrived.
    pub fn new(exports: Arc<dyn Exports>, limits: Limits, client_flags: u32) -> Self {
        Handshake {
            exports,
            limits,
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
            structured: false,
            selection: None,
        }
    }

    /// Answers an option whose data was too large to read (the caller
    /// skipped it): `NBD_REP_ERR_TOO_BIG`, or a closed connection for
    /// `NBD_OPT_EXPORT_NAME`, which has no error replies.
    pub fn too_big(&mut self, option: u32, out: &mut Vec<u8>) -> Step {
        if option == proto::OPT_EXPORT_NAME {
            return Step::Close;
        }
        let msg = format!("option data longer than {} bytes", self.limits.max_option_data);
        proto::put_option_reply(out, option, proto::REP_ERR_TOO_BIG, msg.as_bytes());
        Step::Continue
    }

    /// Handles one option with its data; appends the replies to `out`.
    pub fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let opt = match ClientOption::parse(option, data) {
            Ok(opt) => opt,
            Err(_) if option == proto::OPT_EXPORT_NAME => return Step::Close,
            Err(e) => {
                if option == proto::OPT_SET_META_CONTEXT {
                    self.selection = None;
                }
                proto::put_option_reply(out, option, proto::REP_ERR_INVALID, e.0.as_bytes());
                return Step::Continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => self.export_name(&name, out),
            ClientOption::Abort => {
                proto::put_option_reply(out, option, proto::REP_ACK, &[]);
                Step::Close
            }
            ClientOption::List => {
                for e in self.exports.list() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(proto::truncate(&e.description, proto::MAX_STRING).as_bytes());
                    proto::put_option_reply(out, option, proto::REP_SERVER, &d);
                }
                proto::put_option_reply(out, option, proto::REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::Info(req) => {
                self.info(option, &req, out);
                Step::Continue
            }
            ClientOption::Go(req) => match self.info(option, &req, out) {
                Some(export) => Step::Transmission(Box::new(self.session(&req.name, export))),
                None => Step::Continue,
            },
            ClientOption::StructuredReply => {
                self.structured = true;
                proto::put_option_reply(out, option, proto::REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::ListMetaContext(req) => {
                self.list_meta(option, &req, out);
                Step::Continue
            }
            ClientOption::SetMetaContext(req) => {
                self.set_meta(option, &req, out);
                Step::Continue
            }
            ClientOption::Unsupported(code) => {
                let msg = format!("option {code} is not supported");
                proto::put_option_reply(out, option, proto::REP_ERR_UNSUP, msg.as_bytes());
                Step::Continue
            }
        }
    }

    fn export_name(&mut self, name: &str, out: &mut Vec<u8>) -> Step {
        let Ok(export) = self.exports.open(name) else {
            return Step::Close;
        };
        let session = self.session(name, export);
        out.extend_from_slice(&session.size().to_be_bytes());
        out.extend_from_slice(&session.transmission_flags().to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Step::Transmission(Box::new(session))
    }

    fn session(&mut self, name: &str, export: Arc<dyn Export>) -> Session {
        let contexts = match self.selection.take() {
            Some(sel) if sel.export == name => sel.contexts,
            _ => Vec::new(),
        };
        Session::new(export, self.structured, contexts, self.limits.max_payload)
    }

    /// Opens an export for an option, or answers the error and returns `None`.
    fn open(&self, option: u32, name: &str, out: &mut Vec<u8>) -> Option<Arc<dyn Export>> {
        match self.exports.open(name) {
            Ok(export) => Some(export),
            Err(e) => {
                let reply = match e {
                    OpenError::Unknown(_) | OpenError::Unavailable(_) => proto::REP_ERR_UNKNOWN,
                    OpenError::Policy(_) => proto::REP_ERR_POLICY,
                    OpenError::Shutdown => proto::REP_ERR_SHUTDOWN,
                };
                let msg = e.to_string();
                proto::put_option_reply(out, option, reply, proto::truncate(&msg, proto::MAX_STRING).as_bytes());
                None
            }
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: the information replies and `ACK`.
    fn info(&mut self, option: u32, req: &InfoRequest, out: &mut Vec<u8>) -> Option<Arc<dyn Export>> {
        let export = self.open(option, &req.name, out)?;
        let flags = Session::flags_for(export.as_ref());
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size().to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        proto::put_option_reply(out, option, proto::REP_INFO, &info);
        // Block sizes are always sent: a client that did not ask ignores them.
        let bs = Session::block_size_for(export.as_ref(), self.limits.max_payload);
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&bs.min().to_be_bytes());
        info.extend_from_slice(&bs.preferred().to_be_bytes());
        info.extend_from_slice(&bs.max_payload().to_be_bytes());
        proto::put_option_reply(out, option, proto::REP_INFO, &info);
        if req.requests.contains(&proto::INFO_NAME) {
            let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(req.name.as_bytes());
            proto::put_option_reply(out, option, proto::REP_INFO, &info);
        }
        let description = export.description();
        if req.requests.contains(&proto::INFO_DESCRIPTION) && !description.is_empty() {
            let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(proto::truncate(&description, proto::MAX_STRING).as_bytes());
            proto::put_option_reply(out, option, proto::REP_INFO, &info);
        }
        proto::put_option_reply(out, option, proto::REP_ACK, &[]);
        Some(export)
    }

    /// The export's listed contexts with valid names.
    fn listed_contexts(export: &dyn Export) -> Vec<String> {
        export
            .meta_contexts()
            .into_iter()
            .filter(|c| proto::is_context_name(c))
            .collect()
    }

    /// `NBD_OPT_LIST_META_CONTEXT`. No query lists every context; a query
    /// ending in `:` (`base:`, `qemu:`, `qemu:dirty-bitmap:`) lists the
    /// contexts that start with it; any other query lists itself if the
    /// export accepts it.
    fn list_meta(&mut self, option: u32, req: &MetaRequest, out: &mut Vec<u8>) {
        let Some(export) = self.open(option, &req.export, out) else {
            return;
        };
        let listed = Self::listed_contexts(export.as_ref());
        let mut found: Vec<String> = Vec::new();
        if req.queries.is_empty() {
            found = listed;
        } else {
            for q in &req.queries {
                if q.ends_with(':') {
                    found.extend(listed.iter().filter(|c| c.starts_with(q.as_str())).cloned());
                } else if export.has_meta_context(q) {
                    found.push(q.clone());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for name in found.iter().filter(|n| seen.insert(n.as_str())) {
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            proto::put_option_reply(out, option, proto::REP_META_CONTEXT, &d);
        }
        proto::put_option_reply(out, option, proto::REP_ACK, &[]);
    }

    /// `NBD_OPT_SET_META_CONTEXT`: selects the contexts named exactly by a
    /// query and accepted by the export (wildcards select nothing). Replaces
    /// any earlier selection, even when it fails.
    fn set_meta(&mut self, option: u32, req: &MetaRequest, out: &mut Vec<u8>) {
        self.selection = None;
        if !self.structured {
            let msg = "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first";
            proto::put_option_reply(out, option, proto::REP_ERR_INVALID, msg.as_bytes());
            return;
        }
        let Some(export) = self.open(option, &req.export, out) else {
            return;
        };
        let mut contexts: Vec<String> = Vec::new();
        for q in &req.queries {
            if !contexts.contains(q) && proto::is_context_name(q) && export.has_meta_context(q) {
                contexts.push(q.clone());
            }
        }
        if contexts.len() > MAX_SELECTED_CONTEXTS {
            let msg = format!("at most {MAX_SELECTED_CONTEXTS} metadata contexts");
            proto::put_option_reply(out, option, proto::REP_ERR_TOO_BIG, msg.as_bytes());
            return;
        }
        for (i, name) in contexts.iter().enumerate() {
            let mut d = (i as u32 + 1).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            proto::put_option_reply(out, option, proto::REP_META_CONTEXT, &d);
        }
        proto::put_option_reply(out, option, proto::REP_ACK, &[]);
        self.selection = Some(Selection {
            export: req.export.clone(),
            contexts,
        });
    }
}
