//! [`Api`]: the state of the front end (the registry of objects and the
//! sessions) and the methods. [`Api::handle`] takes a request body and
//! answers it: parse, check the session, look up `_this`, run the method
//! (host work goes through [`Service::execute`]), serialise the result or
//! the fault. Tasks complete before their method returns.

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

/// Whether an object of type `ty` is a `spec` (for property specs and
/// traversals that name a base type).
fn is_a(ty: &str, spec: &str) -> bool {
    ty == spec
        || (spec == "ManagedEntity" && matches!(ty, "VirtualMachine" | "Folder" | "Datacenter"))
        || (spec == "ManagedObjectView" || spec == "View") && ty == "ContainerView"
        || spec == "ManagedObject"
}

fn refs_of(v: &Val) -> Vec<MoRef> {
    match v {
        Val::Ref(r) => vec![r.clone()],
        Val::Array(_, items) => items.iter().flat_map(refs_of).collect(),
        Val::Any(v) => refs_of(v),
        _ => Vec::new(),
    }
}

/// The changes between what a filter sent and what is true now.
fn diff(sent: &Sent, now: &Sent) -> Vec<Val> {
    let change = |name: &str, v: Option<&Val>| {
        Val::Obj(
            Obj::new("PropertyChange")
                .with("name", Val::str(name))
                .with("op", Val::Enum("PropertyChangeOp", "assign"))
                .opt("val", v.map(|v| Val::any(v.clone()))),
        )
    };
    let mut out = Vec::new();
    for (obj, props) in now {
        let (kind, changes): (&str, Vec<Val>) = match sent.get(obj) {
            None => ("enter", props.iter().map(|(n, v)| change(n, Some(v))).collect()),
            Some(old) => {
                let mut c: Vec<Val> = props
                    .iter()
                    .filter(|(n, v)| old.get(*n) != Some(*v))
                    .map(|(n, v)| change(n, Some(v)))
                    .collect();
                c.extend(old.keys().filter(|n| !props.contains_key(*n)).map(|n| change(n, None)));
                if c.is_empty() {
                    continue;
                }
                ("modify", c)
            }
        };
        out.push(Val::Obj(
            Obj::new("ObjectUpdate")
                .with("kind", Val::Enum("ObjectUpdateKind", kind))
                .with("obj", obj.clone())
                .with("changeSet", Val::Array("PropertyChange", changes)),
        ));
    }
    for obj in sent.keys().filter(|o| !now.contains_key(*o)) {
        out.push(Val::Obj(
            Obj::new("ObjectUpdate")
                .with("kind", Val::Enum("ObjectUpdateKind", "leave"))
                .with("obj", obj.clone()),
        ));
    }
    out
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

    // ----- properties -----

    /// Every property of an object, by name.
    fn properties(&self, e: &Entity, r: &MoRef, cookie: &str) -> Result<Vec<(&'static str, Val)>, Fault> {
        let root = MoRef::new("Folder", "ha-folder-root");
        let dc = MoRef::new("Datacenter", "ha-datacenter");
        let vm_folder = MoRef::new("Folder", "ha-folder-vm");
        let refs = |v: Vec<MoRef>| Val::Array("ManagedObjectReference", v.into_iter().map(Val::Ref).collect());
        let strings = |v: &[&str]| Val::Array("string", v.iter().map(|s| Val::str(*s)).collect());
        Ok(match e {
            Entity::ServiceInstance => vec![
                ("content", objects::service_content().into()),
                ("serverClock", Val::Time(now())),
            ],
            Entity::RootFolder => vec![
                ("name", Val::str("ha-folder-root")),
                ("childEntity", refs(vec![dc])),
                ("childType", strings(&["Datacenter"])),
            ],
            Entity::Datacenter => vec![
                ("name", Val::str("ha-datacenter")),
                ("parent", root.into()),
                ("vmFolder", vm_folder.into()),
            ],
            Entity::VmFolder => {
                let vms = self.vms()?;
                let mut reg = self.registry.lock();
                vec![
                    ("name", Val::str("vm")),
                    ("parent", dc.into()),
                    ("childEntity", refs(vms.iter().map(|v| reg.vm_ref(&v.name)).collect())),
                    ("childType", strings(&["VirtualMachine"])),
                ]
            }
            Entity::PropertyCollector => {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                vec![(
                    "filter",
                    refs(
                        s.filters
                            .keys()
                            .map(|id| MoRef::new("PropertyFilter", id.clone()))
                            .collect(),
                    ),
                )]
            }
            Entity::ViewManager => {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                vec![(
                    "viewList",
                    refs(
                        s.views
                            .keys()
                            .map(|id| MoRef::new("ContainerView", id.clone()))
                            .collect(),
                    ),
                )]
            }
            Entity::SessionManager => {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                vec![("currentSession", user_session(s).into())]
            }
            Entity::ContainerView(id) => {
                let view = {
                    let mut sessions = self.sessions.lock();
                    let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                    s.views.get(id).cloned().ok_or_else(|| Fault::not_found(r))?
                };
                let types: Vec<&str> = view.types.iter().map(String::as_str).collect();
                vec![
                    ("container", view.container.clone().into()),
                    ("type", strings(&types)),
                    ("recursive", Val::Bool(view.recursive)),
                    ("view", refs(self.view_contents(&view)?)),
                ]
            }
            Entity::PropertyFilter(id) => {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(r))?;
                if !s.filters.contains_key(id) {
                    return Err(Fault::not_found(r));
                }
                vec![("partialUpdates", Val::Bool(true))]
            }
            Entity::Task(id) => {
                let reg = self.registry.lock();
                let t = reg.task(id).ok_or_else(|| Fault::not_found(r))?;
                vec![("info", t.info.clone().into())]
            }
            Entity::Vm(name) => {
                let v = self.vm(name)?;
                let snaps = self.snapshots(name)?;
                let change_ids = match self.execute(Request::VmChangeIds { vm: name.clone() }) {
                    Ok(Response::ChangeIds(ids)) => ids,
                    Ok(r) => return Err(unexpected(r)),
                    Err(e) => return Err(host_fault(e, &objects::disk_file(name, 0))),
                };
                let mut reg = self.registry.lock();
                let mut props = vec![
                    ("name", Val::str(name.clone())),
                    ("parent", vm_folder.into()),
                    (
                        "config",
                        objects::config_info(name, &objects::live_disks(&v, &change_ids), v.cbt).into(),
                    ),
                    ("runtime", objects::runtime_info(&v).into()),
                    ("summary", objects::summary(r, &v).into()),
                    ("capability", objects::capability().into()),
                    ("overallStatus", Val::Enum("ManagedEntityStatus", "green")),
                ];
                if let Some(info) = reg.snapshot_info(name, &snaps) {
                    props.push(("snapshot", info.into()));
                    props.push((
                        "rootSnapshot",
                        refs(
                            snaps
                                .first()
                                .map(|s| reg.snap_ref(&key_of(name, s)))
                                .into_iter()
                                .collect(),
                        ),
                    ));
                }
                props
            }
            Entity::Snapshot(k) => {
                let snaps = self.snapshots(&k.vm)?;
                let pos = snaps
                    .iter()
                    .position(|s| s.name == k.name && s.created == k.created)
                    .ok_or_else(|| Fault::not_found(r))?;
                let s = &snaps[pos];
                let cbt = s.disks.iter().any(|d| d.change_id.is_some());
                let mut reg = self.registry.lock();
                let children: Vec<MoRef> = snaps
                    .get(pos + 1)
                    .map(|c| reg.snap_ref(&key_of(&k.vm, c)))
                    .into_iter()
                    .collect();
                vec![
                    (
                        "config",
                        objects::config_info(&k.vm, &objects::snapshot_disks(s), cbt).into(),
                    ),
                    ("childSnapshot", refs(children)),
                    ("vm", reg.vm_ref(&k.vm).into()),
                ]
            }
        })
    }

    /// The value at property path `path` (`config.hardware.device`), or
    /// none when unset.
    fn property(&self, e: &Entity, r: &MoRef, path: &str, cookie: &str) -> Result<Option<Val>, Fault> {
        let props = self.properties(e, r, cookie)?;
        let mut parts = path.split('.');
        let first = parts.next().unwrap_or("");
        let invalid = || {
            Fault::new(
                FaultKind::InvalidProperty { name: path.to_owned() },
                format!("{} has no property {path}", r.ty),
            )
        };
        let Some((_, mut v)) = props.into_iter().find(|(n, _)| *n == first) else {
            // A property of the type that this host leaves unset.
            return if known_unset(&r.ty, first) {
                Ok(None)
            } else {
                Err(invalid())
            };
        };
        for p in parts {
            let next = match &v {
                Val::Obj(o) => o.get(p).cloned(),
                _ => return Err(invalid()),
            };
            match next {
                Some(n) => v = n,
                None => return Ok(None),
            }
        }
        Ok(Some(v))
    }

    fn view_contents(&self, view: &View) -> Result<Vec<MoRef>, Fault> {
        let wants = |ty: &str| view.types.is_empty() || view.types.iter().any(|t| is_a(ty, t));
        let vms = self.vms()?;
        let mut reg = self.registry.lock();
        let vm_refs: Vec<MoRef> = vms.iter().map(|v| reg.vm_ref(&v.name)).collect();
        let dc = MoRef::new("Datacenter", "ha-datacenter");
        let vm_folder = MoRef::new("Folder", "ha-folder-vm");
        let reached: Vec<MoRef> = match (view.container.id.as_str(), view.recursive) {
            ("ha-folder-root", false) => vec![dc],
            ("ha-folder-root", true) => std::iter::once(dc)
                .chain(std::iter::once(vm_folder))
                .chain(vm_refs)
                .collect(),
            ("ha-datacenter", false) => vec![vm_folder],
            ("ha-datacenter", true) => std::iter::once(vm_folder).chain(vm_refs).collect(),
            ("ha-folder-vm", _) => vm_refs,
            _ => return Err(Fault::not_found(&view.container)),
        };
        Ok(reached.into_iter().filter(|r| wants(&r.ty)).collect())
    }

    fn create_view(&self, cookie: &str, container: &MoRef, types: &[String], recursive: bool) -> Result<MoRef, Fault> {
        let ok = matches!(
            (container.ty.as_str(), container.id.as_str()),
            ("Folder", "ha-folder-root") | ("Datacenter", "ha-datacenter") | ("Folder", "ha-folder-vm")
        );
        if !ok {
            return Err(Fault::not_found(container));
        }
        let mut sessions = self.sessions.lock();
        let s = sessions.get(cookie).ok_or_else(|| not_authenticated(container))?;
        if s.views.len() >= session::MAX_OBJECTS_PER_SESSION {
            return Err(Fault::invalid_argument("container", "too many views in this session"));
        }
        let id = s.object_id();
        s.views.insert(
            id.clone(),
            View {
                container: container.clone(),
                types: types.to_vec(),
                recursive,
            },
        );
        Ok(MoRef::new("ContainerView", id))
    }

    // ----- the property collector -----

    /// The objects a filter spec reaches, in order, each once. With
    /// `strict`, an object of the spec that does not exist is a fault;
    /// otherwise it is left out (a filter's object that went away).
    fn reach(&self, spec: &FilterSpec, cookie: &str, strict: bool) -> Result<Vec<(MoRef, Entity)>, Fault> {
        let mut named: HashMap<String, TraversalSpec> = HashMap::new();
        fn gather(sel: &[Selection], named: &mut HashMap<String, TraversalSpec>) {
            for s in sel {
                if let Selection::Traversal(t) = s {
                    if let Some(n) = &t.name {
                        named.entry(n.clone()).or_insert_with(|| t.clone());
                    }
                    gather(&t.select_set, named);
                }
            }
        }
        for o in &spec.object_set {
            gather(&o.select_set, &mut named);
        }
        let mut out: Vec<(MoRef, Entity)> = Vec::new();
        let mut seen: BTreeSet<MoRef> = BTreeSet::new();
        let mut visited: BTreeSet<(MoRef, String, String)> = BTreeSet::new();
        for ObjectSpec { obj, skip, select_set } in &spec.object_set {
            let e = match self.entity(obj, cookie) {
                Ok(e) => e,
                Err(f) if !strict && matches!(f.kind, FaultKind::ManagedObjectNotFound { .. }) => continue,
                Err(f) => return Err(f),
            };
            if !skip && seen.insert(obj.clone()) {
                out.push((obj.clone(), e.clone()));
            }
            let mut stack: Vec<(MoRef, Entity, Vec<Selection>, usize)> = vec![(obj.clone(), e, select_set.clone(), 0)];
            while let Some((r, e, sels, depth)) = stack.pop() {
                if depth > 16 || out.len() > MAX_COLLECTED {
                    break;
                }
                for s in &sels {
                    let t = match s {
                        Selection::Traversal(t) => t,
                        Selection::Named(n) => match named.get(n) {
                            Some(t) => t,
                            None => continue,
                        },
                    };
                    if !is_a(&r.ty, &t.ty) || !visited.insert((r.clone(), t.ty.clone(), t.path.clone())) {
                        continue;
                    }
                    let Ok(Some(v)) = self.property(&e, &r, &t.path, cookie) else {
                        continue;
                    };
                    for next in refs_of(&v) {
                        let Ok(ne) = self.entity(&next, cookie) else {
                            continue;
                        };
                        if !t.skip && seen.insert(next.clone()) {
                            out.push((next.clone(), ne.clone()));
                        }
                        stack.push((next, ne, t.select_set.clone(), depth + 1));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The properties a filter spec asks for, per object reached.
    fn collect(&self, spec: &FilterSpec, cookie: &str, strict: bool) -> Result<Sent, Fault> {
        let mut out = Sent::new();
        for (r, e) in self.reach(spec, cookie, strict)? {
            let specs: Vec<_> = spec.prop_set.iter().filter(|p| is_a(&r.ty, &p.ty)).collect();
            if specs.is_empty() {
                continue;
            }
            let mut props = BTreeMap::new();
            let got = (|| -> Result<(), Fault> {
                let all = specs.iter().any(|p| p.all);
                if all {
                    for (n, v) in self.properties(&e, &r, cookie)? {
                        props.insert(n.to_owned(), v);
                    }
                }
                for p in specs.iter().flat_map(|p| &p.path_set) {
                    if let Some(v) = self.property(&e, &r, p, cookie)? {
                        props.insert(p.clone(), v);
                    }
                }
                Ok(())
            })();
            match got {
                Ok(()) => {
                    out.insert(r, props);
                }
                Err(f) if !strict && matches!(f.kind, FaultKind::ManagedObjectNotFound { .. }) => {}
                Err(f) => return Err(f),
            }
        }
        Ok(out)
    }

    fn retrieve(&self, specs: &[FilterSpec], cookie: &str) -> Result<Vec<Val>, Fault> {
        let mut all = Sent::new();
        for s in specs {
            for (r, props) in self.collect(s, cookie, true)? {
                all.entry(r).or_default().extend(props);
            }
        }
        Ok(all
            .into_iter()
            .map(|(r, props)| {
                Val::Obj(
                    Obj::new("ObjectContent").with("obj", r).with(
                        "propSet",
                        Val::Array(
                            "DynamicProperty",
                            props
                                .into_iter()
                                .map(|(n, v)| {
                                    Val::Obj(
                                        Obj::new("DynamicProperty")
                                            .with("name", Val::str(n))
                                            .with("val", Val::any(v)),
                                    )
                                })
                                .collect(),
                        ),
                    ),
                )
            })
            .collect())
    }

    fn create_filter(&self, cookie: &str, spec: &FilterSpec) -> Result<MoRef, Fault> {
        // Checked now, so a bad path or object is the caller's fault at once.
        self.collect(spec, cookie, true)?;
        let mut sessions = self.sessions.lock();
        let s = sessions
            .get(cookie)
            .ok_or_else(|| not_authenticated(&MoRef::new("PropertyCollector", "ha-property-collector")))?;
        if s.filters.len() >= session::MAX_OBJECTS_PER_SESSION {
            return Err(Fault::invalid_argument("spec", "too many filters in this session"));
        }
        let id = s.object_id();
        s.filters.insert(
            id.clone(),
            Filter {
                spec: spec.clone(),
                sent: Sent::new(),
            },
        );
        Ok(MoRef::new("PropertyFilter", id))
    }

    /// `WaitForUpdates` and its variants: the changes since `version`
    /// (everything without one), waiting up to `wait` for one; none when
    /// the wait ends without a change, unless `cancel_on_timeout` (the old
    /// call, which has no timeout of its own, is then canceled).
    fn wait_for_updates(
        &self,
        cookie: &str,
        this: &MoRef,
        version: Option<&str>,
        wait: Option<Duration>,
        cancel_on_timeout: bool,
    ) -> Result<Option<Val>, Fault> {
        let deadline = wait.map(|w| Instant::now() + w);
        let first = {
            let mut sessions = self.sessions.lock();
            let s = sessions.get(cookie).ok_or_else(|| not_authenticated(this))?;
            s.cancel_wait = false;
            match version.map(str::trim).filter(|v| !v.is_empty()) {
                None => {
                    for f in s.filters.values_mut() {
                        f.sent.clear();
                    }
                    true
                }
                Some(v) if v == s.version.to_string() => false,
                Some(v) => {
                    return Err(Fault::new(
                        FaultKind::InvalidCollectorVersion,
                        format!("The version {v:?} was not handed out by this collector"),
                    ))
                }
            }
        };
        loop {
            let filters: Vec<(String, FilterSpec, Sent)> = {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(this))?;
                s.filters
                    .iter()
                    .map(|(id, f)| (id.clone(), f.spec.clone(), f.sent.clone()))
                    .collect()
            };
            let mut updates = Vec::new();
            for (id, spec, sent) in filters {
                let now = self.collect(&spec, cookie, false)?;
                let d = diff(&sent, &now);
                if !d.is_empty() {
                    updates.push((id, d, now));
                }
            }
            if !updates.is_empty() || first {
                let mut sessions = self.sessions.lock();
                let s = sessions.get(cookie).ok_or_else(|| not_authenticated(this))?;
                s.version += 1;
                let mut set = Vec::new();
                for (id, d, now) in updates {
                    if let Some(f) = s.filters.get_mut(&id) {
                        f.sent = now;
                        set.push(Val::Obj(
                            Obj::new("PropertyFilterUpdate")
                                .with("filter", MoRef::new("PropertyFilter", id))
                                .with("objectSet", Val::Array("ObjectUpdate", d)),
                        ));
                    }
                }
                return Ok(Some(
                    Obj::new("UpdateSet")
                        .with("version", Val::str(s.version.to_string()))
                        .with("filterSet", Val::Array("PropertyFilterUpdate", set))
                        .with("truncated", Val::Bool(false))
                        .into(),
                ));
            }
            let canceled = self.sessions.lock().get(cookie).is_none_or(|s| s.cancel_wait);
            if canceled || self.service.is_stopping() {
                return Err(Fault::new(FaultKind::RequestCanceled, "The request was canceled"));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match left {
                Some(l) if l.is_zero() => {
                    return if cancel_on_timeout {
                        Err(Fault::new(FaultKind::RequestCanceled, "The wait for updates timed out"))
                    } else {
                        Ok(None)
                    };
                }
                Some(l) => std::thread::sleep(l.min(POLL)),
                None => std::thread::sleep(POLL),
            }
        }
    }

    // ----- tasks -----

    /// Runs `work` as a task on VM `vm` (the task's entity also for
    /// snapshot methods, as hostd does): the task is finished (`success`
    /// with the result, or `error` with the fault) when this returns its
    /// reference.
    fn vm_task(&self, vm: &str, method: &str, work: impl FnOnce() -> Result<Option<Val>, Fault>) -> MoRef {
        let queued = now();
        let outcome = work();
        let done = now();
        let mut reg = self.registry.lock();
        let entity = reg.vm_ref(vm);
        let vm_id = reg.vm_id(vm);
        let id = format!("haTask-{vm_id}-{method}-{}", reg.task_number());
        let task = MoRef::new("Task", id.clone());
        let mut info = Obj::new("TaskInfo")
            .with("key", Val::str(id.clone()))
            .with("task", task)
            .with("name", Val::str(method))
            .with("descriptionId", Val::str(method))
            .with("entity", entity)
            .with("entityName", Val::str(vm));
        info = match outcome {
            Ok(result) => info
                .with("state", Val::Enum("TaskInfoState", "success"))
                .with("cancelled", Val::Bool(false))
                .with("cancelable", Val::Bool(false))
                .opt("result", result.map(Val::any)),
            Err(f) => info
                .with("state", Val::Enum("TaskInfoState", "error"))
                .with("cancelled", Val::Bool(false))
                .with("cancelable", Val::Bool(false))
                .with(
                    "error",
                    Obj::new("LocalizedMethodFault")
                        .with("fault", f.to_obj())
                        .with("localizedMessage", Val::str(f.message.clone())),
                ),
        };
        info = info
            .with("queueTime", Val::Time(queued))
            .with("startTime", Val::Time(queued))
            .with("completeTime", Val::Time(done))
            .with(
                "eventChainId",
                Val::Int(i32::try_from(reg.task_number() % (i32::MAX as u64)).unwrap_or(0)),
            );
        reg.add_task(id, info)
    }

    fn reconfigure(&self, vm: &str, spec: &ConfigSpec) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.reconfigure", || {
            if !spec.other.is_empty() {
                return Err(Fault::new(
                    FaultKind::NotSupported,
                    format!(
                        "cbtsim changes only changeTrackingEnabled and disk capacities, not {}",
                        spec.other.join(", ")
                    ),
                ));
            }
            let info = self.vm(vm)?;
            // Checked as a whole before anything changes.
            let mut grow = Vec::new();
            for c in &spec.device_change {
                let supported = c.operation.as_deref() == Some("edit")
                    && c.file_operation.is_none()
                    && c.device_type.as_deref().is_none_or(|t| t == "VirtualDisk");
                if !supported {
                    return Err(Fault::new(
                        FaultKind::NotSupported,
                        "cbtsim supports only deviceChange edits of a VirtualDisk's capacity",
                    ));
                }
                let key = c
                    .key
                    .ok_or_else(|| Fault::invalid_argument("deviceChange.device.key", "no device key"))?;
                let disk = objects::disk_index(key, info.disks.len()).ok_or_else(|| {
                    Fault::invalid_argument("deviceChange.device.key", format!("no disk with device key {key}"))
                })?;
                let bytes = match (c.capacity_in_bytes, c.capacity_in_kb) {
                    (Some(b), _) if b > 0 => b,
                    (_, Some(kb)) if kb > 0 => kb.saturating_mul(1024),
                    _ => continue,
                };
                let size = u64::try_from(bytes).unwrap_or(0);
                if size < info.disks[disk] {
                    return Err(Fault::invalid_argument(
                        "deviceChange.device.capacityInBytes",
                        format!("disk {key} cannot shrink from {} to {size} bytes", info.disks[disk]),
                    ));
                }
                if size > info.disks[disk] {
                    grow.push((disk, size));
                }
            }
            for (disk, size) in grow {
                self.execute(Request::DiskExtend {
                    vm: vm.to_owned(),
                    disk,
                    size,
                })
                .map_err(|e| match e.kind {
                    ErrorKind::InvalidArgument => {
                        Fault::invalid_argument("deviceChange.device.capacityInBytes", e.message)
                    }
                    _ => host_fault(e, &objects::disk_file(vm, disk)),
                })?;
            }
            if let Some(on) = spec.change_tracking_enabled {
                self.execute(Request::VmCbt { vm: vm.to_owned(), on })
                    .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            }
            Ok(None)
        })
    }

    fn create_snapshot(&self, vm: &str, name: &str, description: &str, memory: bool, quiesce: bool) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.createSnapshot", || {
            if memory {
                return Err(Fault::new(
                    FaultKind::NotSupported,
                    "cbtsim VMs have no memory state: snapshot with memory=False",
                ));
            }
            let info = self.vm(vm)?;
            let before = self.snapshots(vm)?;
            let host_name = host_snapshot_name(name, &before);
            self.execute(Request::SnapshotCreate {
                vm: vm.to_owned(),
                name: host_name.clone(),
            })
            .map_err(|e| host_fault(e, &format!("[{}] {vm}/{vm}.vmsd", objects::DATASTORE)))?;
            let made = self
                .snapshots(vm)?
                .into_iter()
                .find(|s| s.name == host_name)
                .ok_or_else(|| Fault::new(FaultKind::NotFound, format!("snapshot {host_name} vanished")))?;
            let key = key_of(vm, &made);
            let mut reg = self.registry.lock();
            reg.snapshot_created(&key, name, description, quiesce, info.powered_on);
            Ok(Some(reg.snap_ref(&key).into()))
        })
    }

    fn remove_snapshot(&self, k: &SnapKey, children: bool) -> MoRef {
        self.vm_task(&k.vm, "vim.vm.Snapshot.remove", || {
            let snaps = self.snapshots(&k.vm)?;
            let pos = snaps
                .iter()
                .position(|s| s.name == k.name && s.created == k.created)
                .ok_or_else(|| Fault::new(FaultKind::NotFound, "the snapshot is gone"))?;
            let doomed: Vec<&SnapshotEntry> = if children {
                snaps[pos..].iter().rev().collect()
            } else {
                vec![&snaps[pos]]
            };
            for s in doomed {
                self.execute(Request::SnapshotRemove {
                    vm: k.vm.clone(),
                    name: s.name.clone(),
                })
                .map_err(|e| host_fault(e, &objects::disk_file(&k.vm, 0)))?;
            }
            Ok(None)
        })
    }

    fn revert(&self, k: &SnapKey) -> MoRef {
        self.vm_task(&k.vm, "vim.vm.Snapshot.revert", || {
            self.execute(Request::SnapshotRevert {
                vm: k.vm.clone(),
                name: k.name.clone(),
            })
            .map_err(|e| host_fault(e, &objects::disk_file(&k.vm, 0)))?;
            Ok(None)
        })
    }

    fn revert_current(&self, vm: &str) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.revertToCurrentSnapshot", || {
            let current = self
                .snapshots(vm)?
                .pop()
                .ok_or_else(|| Fault::new(FaultKind::NotFound, "The VM has no snapshot"))?;
            self.execute(Request::SnapshotRevert {
                vm: vm.to_owned(),
                name: current.name,
            })
            .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            Ok(None)
        })
    }

    fn remove_all(&self, vm: &str) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.removeAllSnapshots", || {
            for s in self.snapshots(vm)?.into_iter().rev() {
                self.execute(Request::SnapshotRemove {
                    vm: vm.to_owned(),
                    name: s.name,
                })
                .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            }
            Ok(None)
        })
    }

    fn power(&self, vm: &str, on: bool) -> MoRef {
        let method = if on {
            "vim.VirtualMachine.powerOn"
        } else {
            "vim.VirtualMachine.powerOff"
        };
        self.vm_task(vm, method, || {
            let v = self.vm(vm)?;
            if v.powered_on == on {
                let state = if on { "poweredOn" } else { "poweredOff" };
                return Err(Fault::new(
                    FaultKind::InvalidPowerState {
                        requested: None,
                        existing: state,
                    },
                    format!("The attempted operation cannot be performed in the current state ({state})."),
                ));
            }
            self.execute(Request::VmPower { vm: vm.to_owned(), on })
                .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            Ok(None)
        })
    }

    // ----- change tracking -----

    fn query(&self, vm: &str, this: &MoRef, m: &Method) -> Result<Obj, Fault> {
        let Method::QueryChangedDiskAreas {
            snapshot,
            device_key,
            start_offset,
            change_id,
        } = m
        else {
            return Err(method_not_found(this, m));
        };
        let snap = snapshot
            .as_ref()
            .ok_or_else(|| Fault::invalid_argument("snapshot", "cbtsim needs the snapshot to query"))?;
        let key = match self.registry.lock().resolve(snap) {
            Some(Entity::Snapshot(k)) => k,
            _ => return Err(Fault::not_found(snap)),
        };
        let entry = self.snapshot(&key)?;
        if key.vm != vm {
            return Err(Fault::invalid_argument(
                "snapshot",
                format!("snapshot {} is not a snapshot of VM {vm}", snap.id),
            ));
        }
        let disk = objects::disk_index(*device_key, entry.disks.len()).ok_or_else(|| {
            Fault::invalid_argument(
                "deviceKey",
                format!(
                    "A specified parameter was not correct: deviceKey ({device_key} is not a disk of the snapshot)"
                ),
            )
        })?;
        let start = u64::try_from(*start_offset).map_err(|_| {
            Fault::invalid_argument(
                "startOffset",
                format!("A specified parameter was not correct: startOffset ({start_offset} is negative)"),
            )
        })?;
        let file = objects::disk_file(vm, disk);
        let page = match self.execute(Request::QueryPage {
            vm: vm.to_owned(),
            snapshot: key.name.clone(),
            disk,
            start_offset: start,
            since: change_id.trim().to_owned(),
            max_areas: Some(self.max_areas),
        }) {
            Ok(Response::ChangedAreaPage(p)) => p,
            Ok(r) => return Err(unexpected(r)),
            Err(e) => return Err(query_fault(e, &file)),
        };
        let long = |x: u64| Val::Long(i64::try_from(x).unwrap_or(i64::MAX));
        Ok(Obj::new("DiskChangeInfo")
            .with("startOffset", Val::Long(*start_offset))
            .with("length", long(page.length))
            .with(
                "changedArea",
                Val::Array(
                    "DiskChangeExtent",
                    page.changed_area
                        .iter()
                        .map(|a| {
                            Val::Obj(
                                Obj::new("DiskChangeExtent")
                                    .with("start", long(a.start))
                                    .with("length", long(a.length)),
                            )
                        })
                        .collect(),
                ),
            ))
    }
}

/// Properties every object of a type has, left unset by this host (read as
/// none rather than as an unknown property).
fn known_unset(ty: &str, name: &str) -> bool {
    match ty {
        "VirtualMachine" => matches!(
            name,
            "snapshot"
                | "rootSnapshot"
                | "guest"
                | "resourcePool"
                | "datastore"
                | "network"
                | "layoutEx"
                | "layout"
                | "storage"
        ),
        _ => false,
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
