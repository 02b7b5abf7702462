//! SOAP 1.1 envelopes of `urn:vim25`: [`parse`] turns a request body into a
//! typed [`Call`] (a pure function of the bytes: malformed XML, unknown
//! methods, missing or mistyped parameters and oversized bodies are
//! [`Fault`]s, never a panic), and [`response`] and [`fault`] write the
//! answers.

use roxmltree::{Document, Node, ParsingOptions};

use super::faults::{Fault, FaultKind};
use super::value::{escape_into, write_elem, write_fields, MoRef, Val};

/// The largest request body taken (real clients send a few KiB).
pub const MAX_BODY: usize = 1 << 20;
/// The most XML nodes in a request.
const MAX_NODES: u32 = 100_000;
/// How deeply selection specs may nest.
const MAX_DEPTH: usize = 16;

const SOAP_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// The namespace of the API.
pub const VIM25: &str = "urn:vim25";

/// One request: the object called and the method with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `_this`.
    pub this: MoRef,
    /// The method.
    pub method: Method,
}

/// The methods of the subset, with their parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// `ServiceInstance.RetrieveServiceContent`.
    RetrieveServiceContent,
    /// `ServiceInstance.CurrentTime`.
    CurrentTime,
    /// `SessionManager.Login`.
    Login {
        /// `userName`.
        user_name: String,
        /// `password`.
        password: String,
    },
    /// `SessionManager.Logout`.
    Logout,
    /// `ViewManager.CreateContainerView`.
    CreateContainerView {
        /// The folder or datacenter to look in.
        container: MoRef,
        /// Types of the objects to list (all if empty).
        types: Vec<String>,
        /// Whether to look into child folders.
        recursive: bool,
    },
    /// `View.DestroyView`.
    DestroyView,
    /// A property read (`Fetch`, undocumented, what pyvmomi sends).
    Fetch {
        /// The property path.
        prop: String,
    },
    /// `PropertyCollector.RetrieveProperties`.
    RetrieveProperties {
        /// `specSet`.
        specs: Vec<FilterSpec>,
    },
    /// `PropertyCollector.RetrievePropertiesEx` (`options` ignored: every
    /// object is returned at once, with no token).
    RetrievePropertiesEx {
        /// `specSet`.
        specs: Vec<FilterSpec>,
    },
    /// `PropertyCollector.CreateFilter`.
    CreateFilter {
        /// `spec`.
        spec: FilterSpec,
        /// `partialUpdates`.
        partial_updates: bool,
    },
    /// `PropertyFilter.DestroyPropertyFilter`.
    DestroyPropertyFilter,
    /// `PropertyCollector.WaitForUpdates`: blocks until something changed.
    WaitForUpdates {
        /// The version of the last update seen (none: everything).
        version: Option<String>,
    },
    /// `PropertyCollector.WaitForUpdatesEx`.
    WaitForUpdatesEx {
        /// The version of the last update seen.
        version: Option<String>,
        /// `options.maxWaitSeconds` (0: do not wait; absent: wait for a change).
        max_wait_seconds: Option<i32>,
    },
    /// `PropertyCollector.CheckForUpdates`: never waits.
    CheckForUpdates {
        /// The version of the last update seen.
        version: Option<String>,
    },
    /// `PropertyCollector.CancelWaitForUpdates`.
    CancelWaitForUpdates,
    /// `VirtualMachine.ReconfigVM_Task`.
    ReconfigVmTask {
        /// `spec`.
        spec: ConfigSpec,
    },
    /// `VirtualMachine.CreateSnapshot_Task`.
    CreateSnapshotTask {
        /// `name`.
        name: String,
        /// `description`.
        description: Option<String>,
        /// `memory`.
        memory: bool,
        /// `quiesce`.
        quiesce: bool,
    },
    /// `VirtualMachineSnapshot.RemoveSnapshot_Task`.
    RemoveSnapshotTask {
        /// `removeChildren`.
        remove_children: bool,
    },
    /// `VirtualMachineSnapshot.RevertToSnapshot_Task`.
    RevertToSnapshotTask,
    /// `VirtualMachine.RevertToCurrentSnapshot_Task`.
    RevertToCurrentSnapshotTask,
    /// `VirtualMachine.RemoveAllSnapshots_Task`.
    RemoveAllSnapshotsTask,
    /// `VirtualMachine.PowerOnVM_Task`.
    PowerOnVmTask,
    /// `VirtualMachine.PowerOffVM_Task`.
    PowerOffVmTask,
    /// `VirtualMachine.QueryChangedDiskAreas`.
    QueryChangedDiskAreas {
        /// `snapshot` (required by this host).
        snapshot: Option<MoRef>,
        /// `deviceKey`.
        device_key: i32,
        /// `startOffset`.
        start_offset: i64,
        /// `changeId` (`*` for every allocated area).
        change_id: String,
    },
}

impl Method {
    /// The WSDL name of the method.
    pub fn name(&self) -> &'static str {
        match self {
            Method::RetrieveServiceContent => "RetrieveServiceContent",
            Method::CurrentTime => "CurrentTime",
            Method::Login { .. } => "Login",
            Method::Logout => "Logout",
            Method::CreateContainerView { .. } => "CreateContainerView",
            Method::DestroyView => "DestroyView",
            Method::Fetch { .. } => "Fetch",
            Method::RetrieveProperties { .. } => "RetrieveProperties",
            Method::RetrievePropertiesEx { .. } => "RetrievePropertiesEx",
            Method::CreateFilter { .. } => "CreateFilter",
            Method::DestroyPropertyFilter => "DestroyPropertyFilter",
            Method::WaitForUpdates { .. } => "WaitForUpdates",
            Method::WaitForUpdatesEx { .. } => "WaitForUpdatesEx",
            Method::CheckForUpdates { .. } => "CheckForUpdates",
            Method::CancelWaitForUpdates => "CancelWaitForUpdates",
            Method::ReconfigVmTask { .. } => "ReconfigVM_Task",
            Method::CreateSnapshotTask { .. } => "CreateSnapshot_Task",
            Method::RemoveSnapshotTask { .. } => "RemoveSnapshot_Task",
            Method::RevertToSnapshotTask => "RevertToSnapshot_Task",
            Method::RevertToCurrentSnapshotTask => "RevertToCurrentSnapshot_Task",
            Method::RemoveAllSnapshotsTask => "RemoveAllSnapshots_Task",
            Method::PowerOnVmTask => "PowerOnVM_Task",
            Method::PowerOffVmTask => "PowerOffVM_Task",
            Method::QueryChangedDiskAreas { .. } => "QueryChangedDiskAreas",
        }
    }
}

/// `PropertyFilterSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterSpec {
    /// `propSet`.
    pub prop_set: Vec<PropertySpec>,
    /// `objectSet`.
    pub object_set: Vec<ObjectSpec>,
}

/// `PropertySpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertySpec {
    /// `type`.
    pub ty: String,
    /// `all`.
    pub all: bool,
    /// `pathSet`.
    pub path_set: Vec<String>,
}

/// `ObjectSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectSpec {
    /// `obj`.
    pub obj: MoRef,
    /// `skip`: leave the object itself out.
    pub skip: bool,
    /// `selectSet`.
    pub select_set: Vec<Selection>,
}

/// A `SelectionSpec`: a traversal, or a reference to a named one.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// `SelectionSpec` naming a traversal.
    Named(String),
    /// `TraversalSpec`.
    Traversal(TraversalSpec),
}

/// `TraversalSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraversalSpec {
    /// `name`.
    pub name: Option<String>,
    /// `type`: the type it starts from.
    pub ty: String,
    /// `path`: the property holding the references to follow.
    pub path: String,
    /// `skip`: leave the objects reached out.
    pub skip: bool,
    /// `selectSet`.
    pub select_set: Vec<Selection>,
}

/// `VirtualMachineConfigSpec`, as far as this host changes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigSpec {
    /// `changeTrackingEnabled`.
    pub change_tracking_enabled: Option<bool>,
    /// `deviceChange`.
    pub device_change: Vec<DeviceChange>,
    /// Other fields that were set (refused: this host cannot change them).
    pub other: Vec<String>,
}

/// `VirtualDeviceConfigSpec`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceChange {
    /// `operation` (`add`, `remove`, `edit`).
    pub operation: Option<String>,
    /// `fileOperation`.
    pub file_operation: Option<String>,
    /// The device's `xsi:type`.
    pub device_type: Option<String>,
    /// `device.key`.
    pub key: Option<i32>,
    /// `device.capacityInKB`.
    pub capacity_in_kb: Option<i64>,
    /// `device.capacityInBytes`.
    pub capacity_in_bytes: Option<i64>,
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<Call, Fault> {
    if body.len() > MAX_BODY {
        return Err(Fault::invalid_request(format!(
            "the request body of {} bytes is over the limit of {MAX_BODY}",
            body.len()
        )));
    }
    let text =
        std::str::from_utf8(body).map_err(|e| Fault::invalid_request(format!("the request is not UTF-8: {e}")))?;
    let opts = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..ParsingOptions::default()
    };
    let doc =
        Document::parse_with_options(text, opts).map_err(|e| Fault::invalid_request(format!("malformed XML: {e}")))?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" || env.tag_name().namespace() != Some(SOAP_ENV) {
        return Err(Fault::invalid_request("the document is not a SOAP 1.1 Envelope"));
    }
    let body = elements(env)
        .find(|n| n.tag_name().name() == "Body" && n.tag_name().namespace() == Some(SOAP_ENV))
        .ok_or_else(|| Fault::invalid_request("the Envelope has no Body"))?;
    let mut calls = elements(body);
    let m = calls
        .next()
        .ok_or_else(|| Fault::invalid_request("the Body names no method"))?;
    if calls.next().is_some() {
        return Err(Fault::invalid_request("the Body holds more than one method"));
    }
    if m.tag_name().namespace() != Some(VIM25) {
        return Err(Fault::invalid_request(format!(
            "method {} is not in namespace {VIM25}",
            m.tag_name().name()
        )));
    }
    let this = moref(req(m, "_this")?)?;
    let name = m.tag_name().name();
    let method = match name {
        "RetrieveServiceContent" => Method::RetrieveServiceContent,
        "CurrentTime" => Method::CurrentTime,
        "Login" => Method::Login {
            user_name: text_of(req(m, "userName")?),
            password: text_of(req(m, "password")?),
        },
        "Logout" => Method::Logout,
        "CreateContainerView" => Method::CreateContainerView {
            container: moref(req(m, "container")?)?,
            types: named(m, "type").map(text_of).collect(),
            recursive: boolean(req(m, "recursive")?)?,
        },
        "DestroyView" => Method::DestroyView,
        "Fetch" => Method::Fetch {
            prop: text_of(req(m, "prop")?),
        },
        "RetrieveProperties" => Method::RetrieveProperties {
            specs: named(m, "specSet").map(filter_spec).collect::<Result<_, _>>()?,
        },
        "RetrievePropertiesEx" => Method::RetrievePropertiesEx {
            specs: named(m, "specSet").map(filter_spec).collect::<Result<_, _>>()?,
        },
        "CreateFilter" => Method::CreateFilter {
            spec: filter_spec(req(m, "spec")?)?,
            partial_updates: boolean(req(m, "partialUpdates")?)?,
        },
        "DestroyPropertyFilter" => Method::DestroyPropertyFilter,
        "WaitForUpdates" => Method::WaitForUpdates {
            version: opt(m, "version").map(text_of),
        },
        "WaitForUpdatesEx" => Method::WaitForUpdatesEx {
            version: opt(m, "version").map(text_of),
            max_wait_seconds: match opt(m, "options").and_then(|o| opt(o, "maxWaitSeconds")) {
                Some(n) => Some(int(n)?),
                None => None,
            },
        },
        "CheckForUpdates" => Method::CheckForUpdates {
            version: opt(m, "version").map(text_of),
        },
        "CancelWaitForUpdates" => Method::CancelWaitForUpdates,
        "ReconfigVM_Task" => Method::ReconfigVmTask {
            spec: config_spec(req(m, "spec")?)?,
        },
        "CreateSnapshot_Task" => Method::CreateSnapshotTask {
            name: text_of(req(m, "name")?),
            description: opt(m, "description").map(text_of),
            memory: boolean(req(m, "memory")?)?,
            quiesce: boolean(req(m, "quiesce")?)?,
        },
        "RemoveSnapshot_Task" => Method::RemoveSnapshotTask {
            remove_children: boolean(req(m, "removeChildren")?)?,
        },
        "RevertToSnapshot_Task" => Method::RevertToSnapshotTask,
        "RevertToCurrentSnapshot_Task" => Method::RevertToCurrentSnapshotTask,
        "RemoveAllSnapshots_Task" => Method::RemoveAllSnapshotsTask,
        "PowerOnVM_Task" => Method::PowerOnVmTask,
        "PowerOffVM_Task" => Method::PowerOffVmTask,
        "QueryChangedDiskAreas" => Method::QueryChangedDiskAreas {
            snapshot: opt(m, "snapshot").map(moref).transpose()?,
            device_key: int(req(m, "deviceKey")?)?,
            start_offset: long(req(m, "startOffset")?)?,
            change_id: text_of(req(m, "changeId")?),
        },
        other => {
            return Err(Fault::new(
                FaultKind::MethodNotFound {
                    receiver: this.clone(),
                    method: other.to_owned(),
                },
                format!("The method {other} is not implemented by cbtsim (on {this})"),
            ))
        }
    };
    Ok(Call { this, method })
}

fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

fn named<'a, 'i>(n: Node<'a, 'i>, name: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    elements(n).filter(move |c| c.tag_name().name() == name)
}

fn opt<'a, 'i>(n: Node<'a, 'i>, name: &'static str) -> Option<Node<'a, 'i>> {
    named(n, name).next()
}

fn req<'a, 'i>(n: Node<'a, 'i>, name: &'static str) -> Result<Node<'a, 'i>, Fault> {
    opt(n, name).ok_or_else(|| {
        Fault::invalid_request(format!(
            "required parameter {name} of {} is missing",
            n.tag_name().name()
        ))
    })
}

/// The text of an element (its text children together).
fn text_of(n: Node) -> String {
    n.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect()
}

fn xsi_type<'a>(n: Node<'a, '_>) -> Option<&'a str> {
    n.attribute((XSI, "type"))
        .map(|t| t.rsplit_once(':').map_or(t, |(_, local)| local))
}

fn bad_value(n: Node, what: &str) -> Fault {
    let mut shown = text_of(n);
    if shown.len() > 64 {
        let mut cut = 64;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    Fault::invalid_request(format!("parameter {} is not {what}: {shown:?}", n.tag_name().name()))
}

fn boolean(n: Node) -> Result<bool, Fault> {
    match text_of(n).trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_value(n, "a boolean")),
    }
}

fn int(n: Node) -> Result<i32, Fault> {
    text_of(n).trim().parse().map_err(|_| bad_value(n, "an int"))
}

fn long(n: Node) -> Result<i64, Fault> {
    text_of(n).trim().parse().map_err(|_| bad_value(n, "a long"))
}

fn moref(n: Node) -> Result<MoRef, Fault> {
    let ty = n.attribute("type").ok_or_else(|| {
        Fault::invalid_request(format!(
            "parameter {} is not a managed object reference (no type attribute)",
            n.tag_name().name()
        ))
    })?;
    Ok(MoRef::new(ty, text_of(n).trim()))
}

fn filter_spec(n: Node) -> Result<FilterSpec, Fault> {
    let prop_set = named(n, "propSet")
        .map(|p| {
            Ok(PropertySpec {
                ty: text_of(req(p, "type")?).trim().to_owned(),
                all: match opt(p, "all") {
                    Some(a) => boolean(a)?,
                    None => false,
                },
                path_set: named(p, "pathSet").map(|s| text_of(s).trim().to_owned()).collect(),
            })
        })
        .collect::<Result<_, Fault>>()?;
    let object_set = named(n, "objectSet")
        .map(|o| {
            Ok(ObjectSpec {
                obj: moref(req(o, "obj")?)?,
                skip: match opt(o, "skip") {
                    Some(s) => boolean(s)?,
                    None => false,
                },
                select_set: selections(o, 0)?,
            })
        })
        .collect::<Result<_, Fault>>()?;
    Ok(FilterSpec { prop_set, object_set })
}

fn selections(n: Node, depth: usize) -> Result<Vec<Selection>, Fault> {
    if depth > MAX_DEPTH {
        return Err(Fault::invalid_request(format!(
            "selection specs nest deeper than {MAX_DEPTH}"
        )));
    }
    named(n, "selectSet")
        .map(|s| {
            let traversal = xsi_type(s) == Some("TraversalSpec") || opt(s, "path").is_some();
            if !traversal {
                return Ok(Selection::Named(text_of(req(s, "name")?).trim().to_owned()));
            }
            Ok(Selection::Traversal(TraversalSpec {
                name: opt(s, "name").map(|x| text_of(x).trim().to_owned()),
                ty: text_of(req(s, "type")?).trim().to_owned(),
                path: text_of(req(s, "path")?).trim().to_owned(),
                skip: match opt(s, "skip") {
                    Some(x) => boolean(x)?,
                    None => false,
                },
                select_set: selections(s, depth + 1)?,
            }))
        })
        .collect()
}

fn config_spec(n: Node) -> Result<ConfigSpec, Fault> {
    let mut spec = ConfigSpec::default();
    for f in elements(n) {
        match f.tag_name().name() {
            "changeTrackingEnabled" => spec.change_tracking_enabled = Some(boolean(f)?),
            "deviceChange" => {
                let device = opt(f, "device");
                spec.device_change.push(DeviceChange {
                    operation: opt(f, "operation").map(|o| text_of(o).trim().to_owned()),
                    file_operation: opt(f, "fileOperation").map(|o| text_of(o).trim().to_owned()),
                    device_type: device.and_then(xsi_type).map(str::to_owned),
                    key: device.and_then(|d| opt(d, "key")).map(int).transpose()?,
                    capacity_in_kb: device.and_then(|d| opt(d, "capacityInKB")).map(long).transpose()?,
                    capacity_in_bytes: device.and_then(|d| opt(d, "capacityInBytes")).map(long).transpose()?,
                });
            }
            other => spec.other.push(other.to_owned()),
        }
    }
    Ok(spec)
}

const ENVELOPE_START: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soapenv:Envelope \
     xmlns:soapenc=\"http://schemas.xmlsoap.org/soap/encoding/\" \
     xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
     xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
     xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n<soapenv:Body>\n";
const ENVELOPE_END: &str = "\n</soapenv:Body>\n</soapenv:Envelope>";

/// The answer of `method`: `<methodResponse>` with the result (an array
/// becomes repeated `returnval` elements; none, an empty response).
pub fn response(method: &str, ret: Option<&Val>) -> String {
    let mut out = String::from(ENVELOPE_START);
    out.push('<');
    out.push_str(method);
    out.push_str("Response xmlns=\"urn:vim25\">");
    if let Some(v) = ret {
        write_elem(&mut out, "returnval", v, false);
    }
    out.push_str("</");
    out.push_str(method);
    out.push_str("Response>");
    out.push_str(ENVELOPE_END);
    out
}

/// A SOAP fault (sent with HTTP status 500).
pub fn fault(f: &Fault) -> String {
    let mut out = String::from(ENVELOPE_START);
    out.push_str("<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>");
    escape_into(&mut out, &f.message);
    out.push_str("</faultstring><detail>");
    let detail = f.to_obj();
    let elem = format!("{}Fault", detail.ty);
    out.push_str(&format!("<{elem} xmlns=\"urn:vim25\" xsi:type=\"{}\">", detail.ty));
    write_fields(&mut out, &detail);
    out.push_str(&format!("</{elem}></detail></soapenv:Fault>"));
    out.push_str(ENVELOPE_END);
    out
}

/// `GET /sdk/vimServiceVersions.xml`: the API versions served.
pub const SERVICE_VERSIONS: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n\
<namespaces version=\"1.0\">\n\
  <namespace>\n\
    <name>urn:vim25</name>\n\
    <version>8.0.3.0</version>\n\
    <priorVersions>\n\
      <version>8.0.2.0</version>\n\
      <version>8.0.1.0</version>\n\
      <version>8.0.0.2</version>\n\
      <version>8.0.0.1</version>\n\
      <version>8.0.0.0</version>\n\
      <version>7.0.3.0</version>\n\
      <version>7.0.2.0</version>\n\
      <version>7.0.1.0</version>\n\
      <version>7.0.0.0</version>\n\
      <version>6.7.3</version>\n\
      <version>6.7</version>\n\
      <version>6.5</version>\n\
      <version>6.0</version>\n\
    </priorVersions>\n\
  </namespace>\n\
</namespaces>\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(inner: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soapenv:Envelope xmlns:soapenc=\"http://schemas.xmlsoap.org/soap/encoding/\" \
             xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n<soapenv:Body>{inner}</soapenv:Body>\n</soapenv:Envelope>"
        )
    }

    #[test]
    fn parses_what_pyvmomi_sends() {
        let b = envelope(
            "<QueryChangedDiskAreas xmlns=\"urn:vim25\"><_this versionId=\"8.0.3.0\" type=\"VirtualMachine\">1</_this>\
             <snapshot versionId=\"8.0.3.0\" type=\"VirtualMachineSnapshot\">1-snapshot-2</snapshot>\
             <deviceKey versionId=\"8.0.3.0\">2000</deviceKey><startOffset versionId=\"8.0.3.0\">0</startOffset>\
             <changeId versionId=\"8.0.3.0\">*</changeId></QueryChangedDiskAreas>",
        );
        let c = parse(b.as_bytes()).unwrap();
        assert_eq!(c.this, MoRef::new("VirtualMachine", "1"));
        assert_eq!(
            c.method,
            Method::QueryChangedDiskAreas {
                snapshot: Some(MoRef::new("VirtualMachineSnapshot", "1-snapshot-2")),
                device_key: 2000,
                start_offset: 0,
                change_id: "*".into()
            }
        );
        let b = envelope(
            "<ReconfigVM_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">1</_this><spec><deviceChange>\
             <operation>edit</operation><device xsi:type=\"VirtualDisk\"><key>2000</key><capacityInKB>0</capacityInKB>\
             <capacityInBytes>1073741824</capacityInBytes></device></deviceChange><changeTrackingEnabled>true</changeTrackingEnabled>\
             <name>x</name></spec></ReconfigVM_Task>",
        );
        let Method::ReconfigVmTask { spec } = parse(b.as_bytes()).unwrap().method else {
            panic!()
        };
        assert_eq!(spec.change_tracking_enabled, Some(true));
        assert_eq!(spec.other, ["name"]);
        assert_eq!(spec.device_change[0].device_type.as_deref(), Some("VirtualDisk"));
        assert_eq!(spec.device_change[0].capacity_in_bytes, Some(1 << 30));
        let b = envelope(
            "<RetrievePropertiesEx xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">ha-property-collector</_this>\
             <specSet><propSet><type>VirtualMachine</type><pathSet>config.hardware.device</pathSet><pathSet>snapshot</pathSet></propSet>\
             <objectSet><obj type=\"ContainerView\">v</obj><skip>true</skip><selectSet xsi:type=\"TraversalSpec\"><name>t</name>\
             <type>ContainerView</type><path>view</path><skip>false</skip><selectSet><name>t</name></selectSet></selectSet></objectSet>\
             </specSet><options></options></RetrievePropertiesEx>",
        );
        let Method::RetrievePropertiesEx { specs } = parse(b.as_bytes()).unwrap().method else {
            panic!()
        };
        assert_eq!(specs[0].prop_set[0].path_set, ["config.hardware.device", "snapshot"]);
        let Selection::Traversal(t) = &specs[0].object_set[0].select_set[0] else {
            panic!()
        };
        assert_eq!((t.ty.as_str(), t.path.as_str()), ("ContainerView", "view"));
        assert_eq!(t.select_set, [Selection::Named("t".into())]);
    }

    #[test]
    fn bad_requests_are_typed_faults() {
        let kind = |b: &str| parse(b.as_bytes()).unwrap_err();
        assert_eq!(kind("").kind, FaultKind::InvalidRequest);
        assert_eq!(kind("<a>").kind, FaultKind::InvalidRequest);
        assert_eq!(kind("<a/>").kind, FaultKind::InvalidRequest);
        assert_eq!(kind(&envelope("")).kind, FaultKind::InvalidRequest);
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;\">]><x>&b;</x>";
        assert_eq!(kind(dtd).kind, FaultKind::InvalidRequest);
        let f = kind(&envelope(
            "<Explode xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">1</_this></Explode>",
        ));
        assert_eq!(
            f.kind,
            FaultKind::MethodNotFound {
                receiver: MoRef::new("VirtualMachine", "1"),
                method: "Explode".into()
            }
        );
        let f = kind(&envelope(
            "<QueryChangedDiskAreas xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">1</_this>\
             <deviceKey>abc</deviceKey><startOffset>0</startOffset><changeId>*</changeId></QueryChangedDiskAreas>",
        ));
        assert_eq!(f.kind, FaultKind::InvalidRequest);
        assert!(f.message.contains("deviceKey"), "{}", f.message);
        let f = kind(&envelope("<Login xmlns=\"urn:vim25\"><_this>x</_this></Login>"));
        assert!(f.message.contains("type attribute"), "{}", f.message);
        let f = kind(&envelope(
            "<Login xmlns=\"urn:other\"><_this type=\"SessionManager\">x</_this></Login>",
        ));
        assert_eq!(f.kind, FaultKind::InvalidRequest);
        let huge = vec![b' '; MAX_BODY + 1];
        assert!(parse(&huge).unwrap_err().message.contains("over the limit"));
        let deep = format!(
            "<RetrieveProperties xmlns=\"urn:vim25\"><_this type=\"PropertyCollector\">p</_this><specSet><objectSet><obj type=\"Folder\">f</obj>{}{}</objectSet></specSet></RetrieveProperties>",
            "<selectSet><type>Folder</type><path>childEntity</path>".repeat(40),
            "</selectSet>".repeat(40)
        );
        assert!(kind(&envelope(&deep)).message.contains("nest deeper"));
    }

    #[test]
    fn faults_have_the_shape_pyvmomi_reads() {
        let f = Fault::new(
            FaultKind::FileFault {
                file: "[ds] a.vmdk".into(),
            },
            "Error caused by file [ds] a.vmdk",
        );
        let x = fault(&f);
        assert!(
            x.contains("<detail><FileFaultFault xmlns=\"urn:vim25\" xsi:type=\"FileFault\">"),
            "{x}"
        );
        assert!(x.contains("<file>[ds] a.vmdk</file>"), "{x}");
        assert!(
            x.contains("<faultstring>Error caused by file [ds] a.vmdk</faultstring>"),
            "{x}"
        );
        // No default namespace on the Envelope or the Body.
        assert!(!x[..x.find("<detail>").unwrap()].contains(" xmlns=\""), "{x}");
    }
}
