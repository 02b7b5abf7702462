//! [`Api`]: the state of the front end (the registry of objects and the
//! sessions) and the methods. [`Api::handle`] takes a request body and
//! answers it: parse, check the session, look up `_this`, run the method
//! (host work goes through [`Service::execute`]), serialise the result or
//! the fault. Tasks complete before their method returns.
//!
//! * this module: [`Api`], sessions, the dispatch of a call to its method;
//! * `collector`: the properties of each object and the property collector
//!   (views, traversal, retrieve, filters, `WaitForUpdates`);
//! * `tasks`: the methods that change the host (as tasks) and
//!   `QueryChangedDiskAreas`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::action::{ActionError, ErrorKind, Request, Response, SnapshotEntry, VmInfo};
use crate::exec::Service;

use super::envelope::{self, Call, ConfigSpec, FilterSpec, Method, ObjectSpec, Selection, TraversalSpec};
use super::faults::{Fault, FaultKind};
use super::objects::{self, key_of, Entity, Registry, SnapKey};
use super::session::{self, Filter, Sent, Sessions, View};
use super::value::{MoRef, Obj, Val};

mod collector;
mod tasks;

/// How often a blocked `WaitForUpdates` looks for changes.
const POLL: Duration = Duration::from_millis(100);
/// The longest a `WaitForUpdates` blocks before it is canceled.
const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// The most objects one property collection reaches.
const MAX_COLLECTED: usize = 100_000;

/// The answer to one request: an HTTP status, the SOAP body, and a cookie
/// to set.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// 200, or 500 for a fault.
    pub status: u16,
    /// The SOAP envelope.
    pub body: String,
    /// `Set-Cookie`, after a login.
    pub set_cookie: Option<String>,
}

impl Reply {
    fn fault(f: &Fault) -> Reply {
        Reply {
            status: 500,
            body: envelope::fault(f),
            set_cookie: None,
        }
    }
}

/// The vSphere API over one [`Service`].
#[derive(Debug)]
pub struct Api {
    service: Arc<Service>,
    user: String,
    password: Arc<str>,
    max_areas: usize,
    secure: bool,
    registry: Mutex<Registry>,
    sessions: Mutex<Sessions>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Compares without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn not_authenticated(this: &MoRef) -> Fault {
    Fault::new(
        FaultKind::NotAuthenticated { object: this.clone() },
        "The session is not authenticated.",
    )
}

fn method_not_found(this: &MoRef, m: &Method) -> Fault {
    Fault::new(
        FaultKind::MethodNotFound {
            receiver: this.clone(),
            method: m.name().to_owned(),
        },
        format!("The method {} is not a method of {}", m.name(), this),
    )
}

fn unexpected(r: Response) -> Fault {
    Fault::new(
        FaultKind::SystemError {
            reason: format!("unexpected answer of the host: {r:?}"),
        },
        "A general system error occurred: unexpected answer of the host",
    )
}

/// The fault of a host error, for an operation on `file` (a disk or the
/// VM's files).
fn host_fault(e: ActionError, file: &str) -> Fault {
    let kind = match e.kind {
        ErrorKind::NotFound => FaultKind::NotFound,
        ErrorKind::InUse => FaultKind::ResourceInUse { name: file.to_owned() },
        ErrorKind::AlreadyExists
        | ErrorKind::InvalidArgument
        | ErrorKind::OutOfRange
        | ErrorKind::MalformedChangeId
        | ErrorKind::ChangeIdAfterSnapshot
        | ErrorKind::InvalidRequest
        | ErrorKind::TooLarge => FaultKind::InvalidArgument { property: None },
        ErrorKind::PoweredOff => FaultKind::InvalidPowerState {
            requested: Some("poweredOn"),
            existing: "poweredOff",
        },
        ErrorKind::LimitReached => FaultKind::TooManySnapshotLevels,
        ErrorKind::TrackingDisabled
        | ErrorKind::TrackingReset
        | ErrorKind::ForeignChangeId
        | ErrorKind::Corrupt
        | ErrorKind::Io => FaultKind::FileFault { file: file.to_owned() },
        _ => FaultKind::SystemError {
            reason: e.message.clone(),
        },
    };
    Fault::new(kind, e.message)
}

/// The fault of a failed `QueryChangedDiskAreas`, as the API reference
/// assigns them: a change ID from before a tracking reset or from another
/// disk is `FileFault` (the tracking data cannot answer it: take a full
/// backup); a malformed change ID, one newer than the snapshot, tracking
/// off, and a start offset past the end are `InvalidArgument`.
fn query_fault(e: ActionError, file: &str) -> Fault {
    let property = match e.kind {
        ErrorKind::TrackingReset | ErrorKind::ForeignChangeId => {
            return Fault::new(
                FaultKind::FileFault { file: file.to_owned() },
                format!("Error caused by file {file}: {}", e.message),
            )
        }
        ErrorKind::MalformedChangeId | ErrorKind::ChangeIdAfterSnapshot | ErrorKind::TrackingDisabled => "changeId",
        ErrorKind::OutOfRange => "startOffset",
        _ => return host_fault(e, file),
    };
    Fault::invalid_argument(
        property,
        format!("A specified parameter was not correct: {property} ({})", e.message),
    )
}

/// A snapshot name the host takes (letters, digits, `-_.`, at most 64).
fn host_snapshot_name(wanted: &str, taken: &[SnapshotEntry]) -> String {
    let mut base: String = wanted
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(56)
        .collect();
    base = base.trim_start_matches('.').to_owned();
    if base.is_empty() {
        base = "snapshot".into();
    }
    let free = |n: &str| !taken.iter().any(|s| s.name == n);
    if free(&base) {
        return base;
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| free(n))
        .expect("a free name exists")
}

impl Api {
    /// The API over `service`, where user `root` logs in with `password`,
    /// answering at most `max_areas` changed areas per query (ESXi: about
    /// 2000); `secure` marks the session cookie `Secure` (HTTPS).
    pub fn new(service: Arc<Service>, password: Arc<str>, max_areas: usize, secure: bool) -> Api {
        Api {
            service,
            user: crate::http::USER.to_owned(),
            password,
            max_areas: max_areas.max(1),
            secure,
            registry: Mutex::new(Registry::default()),
            sessions: Mutex::new(Sessions::default()),
        }
    }

    /// Answers one `POST /sdk`: `body` is the SOAP request, `cookie` the
    /// `Cookie` header. Never panics on any input.
    pub fn handle(&self, body: &[u8], cookie: Option<&str>, user_agent: &str) -> Reply {
        let call = match envelope::parse(body) {
            Ok(c) => c,
            Err(f) => return Reply::fault(&f),
        };
        let session = cookie.and_then(session::cookie_session);
        match self.dispatch(&call, session.as_deref(), user_agent) {
            Ok((ret, set_cookie)) => Reply {
                status: 200,
                body: envelope::response(call.method.name(), ret.as_ref()),
                set_cookie,
            },
            Err(f) => Reply::fault(&f),
        }
    }

    fn execute(&self, r: Request) -> Result<Response, ActionError> {
        self.service.execute(r, &())
    }

    /// Every VM (registering their IDs, in name order).
    fn vms(&self) -> Result<Vec<VmInfo>, Fault> {
        let mut vms = match self.execute(Request::VmList {}) {
            Ok(Response::Vms(v)) => v,
            Ok(r) => return Err(unexpected(r)),
            Err(e) => return Err(host_fault(e, objects::DATASTORE)),
        };
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        let mut reg = self.registry.lock();
        for v in &vms {
            reg.vm_id(&v.name);
        }
        Ok(vms)
    }

    fn vm(&self, name: &str) -> Result<VmInfo, Fault> {
        self.vms()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Fault::not_found(&self.registry.lock().vm_ref(name)))
    }

    fn snapshots(&self, vm: &str) -> Result<Vec<SnapshotEntry>, Fault> {
        match self.execute(Request::SnapshotList { vm: vm.to_owned() }) {
            Ok(Response::Snapshots { snapshots, .. }) => Ok(snapshots),
            Ok(r) => Err(unexpected(r)),
            Err(e) if e.kind == ErrorKind::NotFound => Err(Fault::not_found(&self.registry.lock().vm_ref(vm))),
            Err(e) => Err(host_fault(e, &format!("[{}] {vm}/", objects::DATASTORE))),
        }
    }

    fn snapshot(&self, key: &SnapKey) -> Result<SnapshotEntry, Fault> {
        self.snapshots(&key.vm)?
            .into_iter()
            .find(|s| s.name == key.name && s.created == key.created)
            .ok_or_else(|| Fault::not_found(&self.registry.lock().snap_ref(key)))
    }

    /// What `r` names, checked to exist.
    fn entity(&self, r: &MoRef, cookie: &str) -> Result<Entity, Fault> {
        if r.ty == "VirtualMachine" && self.registry.lock().resolve(r).is_none() {
            // A VM made since the last listing gets its ID now.
            self.vms()?;
        }
        let found = self.registry.lock().resolve(r);
        let e = match found {
            Some(e) => e,
            None => {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                match r.ty.as_str() {
                    "ContainerView" if s.views.contains_key(&r.id) => Entity::ContainerView(r.id.clone()),
                    "PropertyFilter" if s.filters.contains_key(&r.id) => Entity::PropertyFilter(r.id.clone()),
                    _ => return Err(Fault::not_found(r)),
                }
            }
        };
        match &e {
            Entity::Vm(name) => {
                self.vm(name)?;
            }
            Entity::Snapshot(k) => {
                self.snapshot(k)?;
            }
            _ => {}
        }
        Ok(e)
    }

    fn dispatch(
        &self,
        call: &Call,
        cookie: Option<&str>,
        user_agent: &str,
    ) -> Result<(Option<Val>, Option<String>), Fault> {
        let this = &call.this;
        let is_si = this.ty == "ServiceInstance" && this.id == "ServiceInstance";
        // Allowed without a session.
        match &call.method {
            Method::RetrieveServiceContent if is_si => return Ok((Some(objects::service_content().into()), None)),
            Method::Fetch { prop } if is_si && prop == "content" => {
                return Ok((Some(objects::service_content().into()), None))
            }
            Method::CurrentTime if is_si => return Ok((Some(Val::Time(now())), None)),
            Method::Login { user_name, password } => {
                if this.ty != "SessionManager" || this.id != "ha-sessionmgr" {
                    return Err(if self.registry.lock().resolve(this).is_some() {
                        method_not_found(this, &call.method)
                    } else {
                        Fault::not_found(this)
                    });
                }
                let ok = same(user_name.as_bytes(), self.user.as_bytes())
                    & same(password.as_bytes(), self.password.as_bytes());
                if !ok {
                    return Err(Fault::new(
                        FaultKind::InvalidLogin,
                        "Cannot complete login due to an incorrect user name or password.",
                    ));
                }
                let t = now();
                let mut sessions = self.sessions.lock();
                let c = sessions.login(user_name, user_agent, t);
                let s = sessions.get(&c).expect("just logged in");
                let us = user_session(s);
                return Ok((Some(us.into()), Some(session::set_cookie(&c, self.secure))));
            }
            _ => {}
        }
        let cookie = cookie.ok_or_else(|| not_authenticated(this))?;
        if self.sessions.lock().get(cookie).is_none() {
            return Err(not_authenticated(this));
        }
        let entity = self.entity(this, cookie)?;
        let ret = match (&entity, &call.method) {
            (Entity::ServiceInstance, Method::RetrieveServiceContent) => Some(objects::service_content().into()),
            (Entity::ServiceInstance, Method::CurrentTime) => Some(Val::Time(now())),
            (Entity::SessionManager, Method::Logout) => {
                self.sessions.lock().logout(cookie);
                None
            }
            (_, Method::Fetch { prop }) => self.property(&entity, this, prop, cookie)?,
            (
                Entity::ViewManager,
                Method::CreateContainerView {
                    container,
                    types,
                    recursive,
                },
            ) => Some(self.create_view(cookie, container, types, *recursive)?.into()),
            (Entity::ContainerView(id), Method::DestroyView) => {
                if let Some(s) = self.sessions.lock().get(cookie) {
                    s.views.remove(id);
                }
                None
            }
            (Entity::PropertyCollector, Method::RetrieveProperties { specs }) => {
                let objects = self.retrieve(specs, cookie)?;
                Some(Val::Array("ObjectContent", objects))
            }
            (Entity::PropertyCollector, Method::RetrievePropertiesEx { specs }) => {
                let objects = self.retrieve(specs, cookie)?;
                (!objects.is_empty()).then(|| {
                    Obj::new("RetrieveResult")
                        .with("objects", Val::Array("ObjectContent", objects))
                        .into()
                })
            }
            (Entity::PropertyCollector, Method::CreateFilter { spec, .. }) => {
                Some(self.create_filter(cookie, spec)?.into())
            }
            (Entity::PropertyFilter(id), Method::DestroyPropertyFilter) => {
                if let Some(s) = self.sessions.lock().get(cookie) {
                    s.filters.remove(id);
                }
                None
            }
            (Entity::PropertyCollector, Method::WaitForUpdates { version }) => {
                self.wait_for_updates(cookie, this, version.as_deref(), Some(MAX_WAIT), true)?
            }
            (
                Entity::PropertyCollector,
                Method::WaitForUpdatesEx {
                    version,
                    max_wait_seconds,
                },
            ) => {
                let wait = match max_wait_seconds {
                    Some(s) => Duration::from_secs(u64::try_from(*s).unwrap_or(0)).min(MAX_WAIT),
                    None => MAX_WAIT,
                };
                self.wait_for_updates(cookie, this, version.as_deref(), Some(wait), max_wait_seconds.is_none())?
            }
            (Entity::PropertyCollector, Method::CheckForUpdates { version }) => {
                self.wait_for_updates(cookie, this, version.as_deref(), Some(Duration::ZERO), false)?
            }
            (Entity::PropertyCollector, Method::CancelWaitForUpdates) => {
                if let Some(s) = self.sessions.lock().get(cookie) {
                    s.cancel_wait = true;
                }
                None
            }
            (Entity::Vm(vm), m @ Method::QueryChangedDiskAreas { .. }) => Some(self.query(vm, this, m)?.into()),
            (Entity::Vm(vm), Method::ReconfigVmTask { spec }) => Some(self.reconfigure(vm, spec).into()),
            (
                Entity::Vm(vm),
                Method::CreateSnapshotTask {
                    name,
                    description,
                    memory,
                    quiesce,
                },
            ) => Some(
                self.create_snapshot(vm, name, description.as_deref().unwrap_or(""), *memory, *quiesce)
                    .into(),
            ),
            (Entity::Vm(vm), Method::PowerOnVmTask) => Some(self.power(vm, true).into()),
            (Entity::Vm(vm), Method::PowerOffVmTask) => Some(self.power(vm, false).into()),
            (Entity::Vm(vm), Method::RevertToCurrentSnapshotTask) => Some(self.revert_current(vm).into()),
            (Entity::Vm(vm), Method::RemoveAllSnapshotsTask) => Some(self.remove_all(vm).into()),
            (Entity::Snapshot(k), Method::RemoveSnapshotTask { remove_children }) => {
                Some(self.remove_snapshot(k, *remove_children).into())
            }
            (Entity::Snapshot(k), Method::RevertToSnapshotTask) => Some(self.revert(k).into()),
            (_, m) => return Err(method_not_found(this, m)),
        };
        Ok((ret, None))
    }
}

fn user_session(s: &session::Session) -> Obj {
    Obj::new("UserSession")
        .with("key", Val::str(s.key.clone()))
        .with("userName", Val::str(s.user.clone()))
        .with("fullName", Val::str("Administrator"))
        .with("loginTime", Val::Time(s.login_time))
        .with("lastActiveTime", Val::Time(now()))
        .with("locale", Val::str("en"))
        .with("messageLocale", Val::str("en"))
        .with("extensionSession", Val::Bool(false))
        .with("userAgent", Val::str(s.user_agent.clone()))
        .with("callCount", Val::Long(s.calls))
}

#[cfg(test)]
mod tests {
    use super::collector::diff;
    use super::*;

    #[test]
    fn snapshot_names_fit_the_host() {
        let taken = |names: &[&str]| -> Vec<SnapshotEntry> {
            names
                .iter()
                .map(|n| SnapshotEntry {
                    name: (*n).into(),
                    created: 0,
                    created_utc: backup::format_utc(0),
                    disks: vec![],
                })
                .collect()
        };
        assert_eq!(host_snapshot_name("VEEAM BACKUP", &taken(&[])), "VEEAM_BACKUP");
        assert_eq!(host_snapshot_name("b", &taken(&["b", "b-2"])), "b-3");
        assert_eq!(host_snapshot_name("..", &taken(&[])), "snapshot");
        assert_eq!(host_snapshot_name(&"x".repeat(100), &taken(&[])).len(), 56);
    }

    #[test]
    fn change_id_faults_follow_the_api_reference() {
        let f = |k| query_fault(ActionError::new(k, "m"), "[ds] a.vmdk");
        assert_eq!(f(ErrorKind::TrackingReset).type_name(), "FileFault");
        assert_eq!(f(ErrorKind::ForeignChangeId).type_name(), "FileFault");
        for k in [
            ErrorKind::MalformedChangeId,
            ErrorKind::ChangeIdAfterSnapshot,
            ErrorKind::TrackingDisabled,
        ] {
            assert_eq!(
                f(k).kind,
                FaultKind::InvalidArgument {
                    property: Some("changeId".into())
                }
            );
        }
        assert_eq!(
            f(ErrorKind::OutOfRange).kind,
            FaultKind::InvalidArgument {
                property: Some("startOffset".into())
            }
        );
    }

    #[test]
    fn diffs_enter_modify_and_leave() {
        let a = MoRef::new("Task", "a");
        let b = MoRef::new("Task", "b");
        let mut old = Sent::new();
        old.insert(a.clone(), [("x".to_owned(), Val::Int(1))].into_iter().collect());
        old.insert(b.clone(), BTreeMap::new());
        let mut now = Sent::new();
        now.insert(a.clone(), [("x".to_owned(), Val::Int(2))].into_iter().collect());
        now.insert(MoRef::new("Task", "c"), BTreeMap::new());
        let d = diff(&old, &now);
        let kinds: Vec<&Val> = d.iter().map(|u| u.as_obj().unwrap().get("kind").unwrap()).collect();
        assert_eq!(
            kinds,
            [
                &Val::Enum("ObjectUpdateKind", "modify"),
                &Val::Enum("ObjectUpdateKind", "enter"),
                &Val::Enum("ObjectUpdateKind", "leave")
            ]
        );
        assert!(diff(&now, &now).is_empty());
    }
}
