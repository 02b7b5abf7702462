//! The property collector: the properties of each object, container views,
//! traversal of filter specs, `RetrieveProperties(Ex)`, filters and
//! `WaitForUpdates(Ex)` (the changes since what a filter last sent).

use super::*;

/// Whether an object of type `ty` is a `spec` (for property specs and
/// traversals that name a base type).
pub(super) fn is_a(ty: &str, spec: &str) -> bool {
    ty == spec
        || (spec == "ManagedEntity" && matches!(ty, "VirtualMachine" | "Folder" | "Datacenter"))
        || (spec == "ManagedObjectView" || spec == "View") && ty == "ContainerView"
        || spec == "ManagedObject"
}

pub(super) fn refs_of(v: &Val) -> Vec<MoRef> {
    match v {
        Val::Ref(r) => vec![r.clone()],
        Val::Array(_, items) => items.iter().flat_map(refs_of).collect(),
        Val::Any(v) => refs_of(v),
        _ => Vec::new(),
    }
}

/// The changes between what a filter sent and what is true now.
pub(super) fn diff(sent: &Sent, now: &Sent) -> Vec<Val> {
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
    /// Every property of an object, by name.
    pub(super) fn properties(&self, e: &Entity, r: &MoRef, cookie: &str) -> Result<Vec<(&'static str, Val)>, Fault> {
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
    pub(super) fn property(&self, e: &Entity, r: &MoRef, path: &str, cookie: &str) -> Result<Option<Val>, Fault> {
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

    pub(super) fn view_contents(&self, view: &View) -> Result<Vec<MoRef>, Fault> {
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

    pub(super) fn create_view(
        &self,
        cookie: &str,
        container: &MoRef,
        types: &[String],
        recursive: bool,
    ) -> Result<MoRef, Fault> {
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
    pub(super) fn reach(&self, spec: &FilterSpec, cookie: &str, strict: bool) -> Result<Vec<(MoRef, Entity)>, Fault> {
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
    pub(super) fn collect(&self, spec: &FilterSpec, cookie: &str, strict: bool) -> Result<Sent, Fault> {
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

    pub(super) fn retrieve(&self, specs: &[FilterSpec], cookie: &str) -> Result<Vec<Val>, Fault> {
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

    pub(super) fn create_filter(&self, cookie: &str, spec: &FilterSpec) -> Result<MoRef, Fault> {
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
    pub(super) fn wait_for_updates(
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
}

/// Properties every object of a type has, left unset by this host (read as
/// none rather than as an unknown property).
pub(super) fn known_unset(ty: &str, name: &str) -> bool {
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
