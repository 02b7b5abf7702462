//! The faults of the API, typed: each is a vSphere fault class with its own
//! fields, sent as real hosts send them (see [`super::envelope::fault`]):
//! HTTP 500, `<detail><XFault xsi:type="X">`, with `faultMessage`.

use super::value::{MoRef, Obj, Val};

/// A fault: its class with its fields, and a message for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The class and its fields.
    pub kind: FaultKind,
    /// `faultstring` and `faultMessage[0].message`.
    pub message: String,
}

/// The fault classes this API sends.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// `vim.fault.InvalidLogin`: wrong user or password.
    InvalidLogin,
    /// `vim.fault.NotAuthenticated`: no session (or an expired one).
    NotAuthenticated {
        /// The object called.
        object: MoRef,
    },
    /// `vmodl.fault.ManagedObjectNotFound`: no such object (any more).
    ManagedObjectNotFound {
        /// The reference given.
        obj: MoRef,
    },
    /// `vmodl.fault.MethodNotFound`: the object has no such method.
    MethodNotFound {
        /// The object called.
        receiver: MoRef,
        /// The method asked for.
        method: String,
    },
    /// `vmodl.fault.InvalidRequest`: not a SOAP request of this API
    /// (malformed XML, no body, too large).
    InvalidRequest,
    /// `vmodl.fault.InvalidArgument`.
    InvalidArgument {
        /// The parameter or property at fault.
        property: Option<String>,
    },
    /// `vmodl.fault.InvalidType`: a parameter of the wrong type.
    InvalidType {
        /// The parameter.
        argument: Option<String>,
    },
    /// `vmodl.query.InvalidProperty`: a property path the type lacks.
    InvalidProperty {
        /// The path.
        name: String,
    },
    /// `vmodl.query.InvalidCollectorVersion`: a `WaitForUpdates` version not
    /// handed out.
    InvalidCollectorVersion,
    /// `vmodl.fault.NotSupported`.
    NotSupported,
    /// `vmodl.fault.RequestCanceled`.
    RequestCanceled,
    /// `vmodl.fault.SystemError`: anything else.
    SystemError {
        /// Why.
        reason: String,
    },
    /// `vim.fault.FileFault`: a disk's files (or its change tracking data)
    /// cannot be used.
    FileFault {
        /// The file.
        file: String,
    },
    /// `vim.fault.NotFound`.
    NotFound,
    /// `vim.fault.InvalidPowerState`.
    InvalidPowerState {
        /// The state the operation needs.
        requested: Option<&'static str>,
        /// The VM's state.
        existing: &'static str,
    },
    /// `vim.fault.InvalidState`.
    InvalidState,
    /// `vim.fault.ResourceInUse`.
    ResourceInUse {
        /// What is in use.
        name: String,
    },
    /// `vim.fault.TooManySnapshotLevels`.
    TooManySnapshotLevels,
}

impl Fault {
    /// A fault of `kind` saying `message`.
    pub fn new(kind: FaultKind, message: impl Into<String>) -> Fault {
        Fault {
            kind,
            message: message.into(),
        }
    }

    /// An [`FaultKind::InvalidArgument`] about `property`.
    pub fn invalid_argument(property: &str, message: impl Into<String>) -> Fault {
        Fault::new(
            FaultKind::InvalidArgument {
                property: Some(property.to_owned()),
            },
            message,
        )
    }

    /// A [`FaultKind::InvalidRequest`].
    pub fn invalid_request(message: impl Into<String>) -> Fault {
        Fault::new(FaultKind::InvalidRequest, message)
    }

    /// A [`FaultKind::ManagedObjectNotFound`] for `obj`.
    pub fn not_found(obj: &MoRef) -> Fault {
        Fault::new(
            FaultKind::ManagedObjectNotFound { obj: obj.clone() },
            format!(
                "The object '{}' has already been deleted or has not been completely created",
                obj
            ),
        )
    }

    /// The class's WSDL name (`FileFault`, `InvalidArgument`, ...).
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            FaultKind::InvalidLogin => "InvalidLogin",
            FaultKind::NotAuthenticated { .. } => "NotAuthenticated",
            FaultKind::ManagedObjectNotFound { .. } => "ManagedObjectNotFound",
            FaultKind::MethodNotFound { .. } => "MethodNotFound",
            FaultKind::InvalidRequest => "InvalidRequest",
            FaultKind::InvalidArgument { .. } => "InvalidArgument",
            FaultKind::InvalidType { .. } => "InvalidType",
            FaultKind::InvalidProperty { .. } => "InvalidProperty",
            FaultKind::InvalidCollectorVersion => "InvalidCollectorVersion",
            FaultKind::NotSupported => "NotSupported",
            FaultKind::RequestCanceled => "RequestCanceled",
            FaultKind::SystemError { .. } => "SystemError",
            FaultKind::FileFault { .. } => "FileFault",
            FaultKind::NotFound => "NotFound",
            FaultKind::InvalidPowerState { .. } => "InvalidPowerState",
            FaultKind::InvalidState => "InvalidState",
            FaultKind::ResourceInUse { .. } => "ResourceInUse",
            FaultKind::TooManySnapshotLevels => "TooManySnapshotLevels",
        }
    }

    /// The fault as a data object (the `detail` of a SOAP fault, or a
    /// failed task's `info.error.fault`): `faultMessage` first (a field of
    /// `MethodFault`), then the class's own fields.
    pub fn to_obj(&self) -> Obj {
        let msg = Obj::new("LocalizableMessage")
            .with("key", Val::str(format!("com.cbtsim.fault.{}", self.type_name())))
            .with("message", Val::str(self.message.clone()));
        let o = Obj::new(self.type_name()).with("faultMessage", Val::Array("LocalizableMessage", vec![msg.into()]));
        match &self.kind {
            FaultKind::NotAuthenticated { object } => o
                .with("object", object.clone())
                .with("privilegeId", Val::str("System.View")),
            FaultKind::ManagedObjectNotFound { obj } => o.with("obj", obj.clone()),
            FaultKind::MethodNotFound { receiver, method } => o
                .with("receiver", receiver.clone())
                .with("method", Val::str(method.clone())),
            FaultKind::InvalidArgument { property } => o.opt("invalidProperty", property.clone().map(Val::Str)),
            FaultKind::InvalidType { argument } => o.opt("argument", argument.clone().map(Val::Str)),
            FaultKind::InvalidProperty { name } => o.with("name", Val::str(name.clone())),
            FaultKind::SystemError { reason } => o.with("reason", Val::str(reason.clone())),
            FaultKind::FileFault { file } => o.with("file", Val::str(file.clone())),
            FaultKind::InvalidPowerState { requested, existing } => o
                .opt(
                    "requestedState",
                    requested.map(|r| Val::Enum("VirtualMachinePowerState", r)),
                )
                .with("existingState", Val::Enum("VirtualMachinePowerState", existing)),
            FaultKind::ResourceInUse { name } => o.with("name", Val::str(name.clone())),
            FaultKind::InvalidLogin
            | FaultKind::InvalidRequest
            | FaultKind::InvalidCollectorVersion
            | FaultKind::NotSupported
            | FaultKind::RequestCanceled
            | FaultKind::NotFound
            | FaultKind::InvalidState
            | FaultKind::TooManySnapshotLevels => o,
        }
    }
}
