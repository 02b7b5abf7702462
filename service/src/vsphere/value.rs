//! The values of the vSphere API ([`Val`]: strings, numbers, managed object
//! references, data objects, arrays) and their XML, written in one place.
//!
//! Every data object carries its `xsi:type` (always allowed, required where
//! the declared type is a base type such as `VirtualDevice`). A slot declared
//! `anyType` (`PropertyChange.val`, `DynamicProperty.val`, `TaskInfo.result`)
//! is marked [`Val::Any`]: there primitives carry `xsi:type="xsd:..."`,
//! references `xsi:type="ManagedObjectReference"`, and arrays become
//! `ArrayOfX` elements with children named `X`.

use std::fmt::Write as _;

/// A managed object reference: `<name type="VirtualMachine">1</name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// The managed object's type (`VirtualMachine`, `Task`, ...).
    pub ty: String,
    /// Its ID (`1`, `ha-folder-root`, `1-snapshot-2`, ...).
    pub id: String,
}

impl MoRef {
    /// A reference to object `id` of type `ty`.
    pub fn new(ty: &str, id: impl Into<String>) -> Self {
        MoRef {
            ty: ty.to_owned(),
            id: id.into(),
        }
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ty, self.id)
    }
}

/// A value of the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// `xsd:string`.
    Str(String),
    /// `xsd:boolean`.
    Bool(bool),
    /// `xsd:int`.
    Int(i32),
    /// `xsd:long`.
    Long(i64),
    /// `xsd:dateTime`, from seconds since the Unix epoch.
    Time(u64),
    /// An enumeration's value: (type, value).
    Enum(&'static str, &'static str),
    /// A managed object reference.
    Ref(MoRef),
    /// A data object.
    Obj(Obj),
    /// An array: the item type's name (`string`, `ManagedObjectReference`,
    /// `VirtualDevice`, ...) and the items.
    Array(&'static str, Vec<Val>),
    /// A value in a slot declared `anyType`.
    Any(Box<Val>),
}

impl Val {
    /// A string.
    pub fn str(s: impl Into<String>) -> Val {
        Val::Str(s.into())
    }

    /// A value in an `anyType` slot.
    pub fn any(v: Val) -> Val {
        Val::Any(Box::new(v))
    }

    /// The data object, if this is one.
    pub fn as_obj(&self) -> Option<&Obj> {
        match self {
            Val::Obj(o) => Some(o),
            Val::Any(v) => v.as_obj(),
            _ => None,
        }
    }
}

impl From<Obj> for Val {
    fn from(o: Obj) -> Val {
        Val::Obj(o)
    }
}

impl From<MoRef> for Val {
    fn from(r: MoRef) -> Val {
        Val::Ref(r)
    }
}

/// A data object: its type and its fields, in the WSDL's order. Array
/// fields are [`Val::Array`] (written as repeated elements).
#[derive(Debug, Clone, PartialEq)]
pub struct Obj {
    /// The type (`VirtualDisk`, `TaskInfo`, ...).
    pub ty: &'static str,
    /// The fields that are set.
    pub fields: Vec<(&'static str, Val)>,
}

impl Obj {
    /// An object of type `ty` with no field set.
    pub fn new(ty: &'static str) -> Obj {
        Obj { ty, fields: Vec::new() }
    }

    /// Sets field `name`.
    pub fn with(mut self, name: &'static str, v: impl Into<Val>) -> Obj {
        self.fields.push((name, v.into()));
        self
    }

    /// Sets field `name` if `v` is some.
    pub fn opt(self, name: &'static str, v: Option<impl Into<Val>>) -> Obj {
        match v {
            Some(v) => self.with(name, v),
            None => self,
        }
    }

    /// Field `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Val> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Escapes text for XML, replacing characters XML 1.0 cannot carry.
pub fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// `2024-05-01T12:00:00Z` for `secs` seconds since the Unix epoch.
pub fn datetime(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes `v` as element `name`; `any` when the slot is declared `anyType`.
pub fn write_elem(out: &mut String, name: &str, v: &Val, any: bool) {
    let prim = |out: &mut String, xsd: &str, text: &str| {
        out.push('<');
        out.push_str(name);
        if any {
            let _ = write!(out, " xsi:type=\"xsd:{xsd}\"");
        }
        out.push('>');
        escape_into(out, text);
        let _ = write!(out, "</{name}>");
    };
    match v {
        Val::Str(s) => prim(out, "string", s),
        Val::Bool(b) => prim(out, "boolean", if *b { "true" } else { "false" }),
        Val::Int(i) => prim(out, "int", &i.to_string()),
        Val::Long(l) => prim(out, "long", &l.to_string()),
        Val::Time(t) => prim(out, "dateTime", &datetime(*t)),
        Val::Enum(ty, s) => {
            out.push('<');
            out.push_str(name);
            if any {
                let _ = write!(out, " xsi:type=\"{ty}\"");
            }
            out.push('>');
            escape_into(out, s);
            let _ = write!(out, "</{name}>");
        }
        Val::Ref(r) => {
            let _ = write!(out, "<{name} type=\"");
            escape_into(out, &r.ty);
            out.push('"');
            if any {
                out.push_str(" xsi:type=\"ManagedObjectReference\"");
            }
            out.push('>');
            escape_into(out, &r.id);
            let _ = write!(out, "</{name}>");
        }
        Val::Obj(o) => {
            let _ = write!(out, "<{name} xsi:type=\"{}\">", o.ty);
            write_fields(out, o);
            let _ = write!(out, "</{name}>");
        }
        Val::Array(item, items) => {
            if any {
                let _ = write!(out, "<{name} xsi:type=\"ArrayOf{}\">", capitalize(item));
                for i in items {
                    write_elem(out, item, i, false);
                }
                let _ = write!(out, "</{name}>");
            } else {
                for i in items {
                    write_elem(out, name, i, false);
                }
            }
        }
        Val::Any(inner) => write_elem(out, name, inner, true),
    }
}

/// Writes the fields of `o` (inside its element).
pub fn write_fields(out: &mut String, o: &Obj) {
    for (n, v) in &o.fields {
        write_elem(out, n, v, false);
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_are_iso8601_utc() {
        assert_eq!(datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(datetime(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(datetime(1_717_243_199), "2024-06-01T11:59:59Z");
    }

    #[test]
    fn any_slots_carry_types_and_arrays_wrap() {
        let mut s = String::new();
        write_elem(&mut s, "val", &Val::any(Val::str("a<b")), false);
        assert_eq!(s, "<val xsi:type=\"xsd:string\">a&lt;b</val>");
        let mut s = String::new();
        let refs = Val::Array(
            "ManagedObjectReference",
            vec![Val::Ref(MoRef::new("VirtualMachine", "1"))],
        );
        write_elem(&mut s, "val", &Val::any(refs.clone()), false);
        assert_eq!(
            s,
            "<val xsi:type=\"ArrayOfManagedObjectReference\"><ManagedObjectReference type=\"VirtualMachine\">1</ManagedObjectReference></val>"
        );
        let mut s = String::new();
        write_elem(&mut s, "view", &refs, false);
        assert_eq!(s, "<view type=\"VirtualMachine\">1</view>");
        let mut s = String::new();
        write_elem(&mut s, "x", &Val::Str("\u{1}ok".into()), false);
        assert_eq!(s, "<x>\u{FFFD}ok</x>");
    }
}
