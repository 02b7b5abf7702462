//! Streaming parsers of public block I/O trace formats.
//!
//! A [`TraceReader`] reads one trace file through a `BufReader`, one record at a time
//! (constant memory), and yields [`TraceRecord`]s: time, device, kind, byte offset and
//! length. Formats ([`TraceFormat`], parsed from the names in brackets):
//!
//! | format | layout |
//! |---|---|
//! | MSR Cambridge (`msr`) | CSV `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`; Windows filetime (100 ns), `Read`/`Write`, bytes; device `Hostname_DiskNumber` |
//! | CloudPhysics vscsi v1 (`vscsi`) | 32-byte little-endian records `u32 sn, u32 len, u32 nSG, u16 cmd, u16 ver (0x0100), u64 lbn, u64 ts_us`; len in bytes, lbn in 512-byte sectors |
//! | CloudPhysics CSV (`cloudphysics-csv`) | CSV `version,time,op,size,lbn`: time in seconds, op the SCSI opcode in hex, size in bytes, lbn in sectors |
//! | blkparse (`blkparse`) | blkparse's default text output; queue (`Q`) events only; RWBS `D` discard, `W` write, `R` read, leading `F` flush; sector and count in 512-byte sectors; device `major,minor` |
//! | fio iolog (`fio-iolog`) | `fio version 2 iolog` (`file action [offset length]`) or `fio version 3 iolog` (`time_ms file action [offset length]`); device = file |
//! | Alibaba (`alibaba`) | CSV `device_id,opcode,offset,length,timestamp`: `R`/`W`, bytes, microseconds |
//! | Tencent CBS (`tencent`) | CSV `Timestamp,Offset,Size,IOType,VolumeID`: seconds, sectors, sectors, 0 read / 1 write |
//!
//! SCSI opcodes: READ(6/10/12/16) `0x08 0x28 0xa8 0x88`, WRITE(6/10/12/16) `0x0a 0x2a 0xaa
//! 0x8a`, SYNCHRONIZE CACHE(10/16) `0x35 0x91` (a flush). Records of other commands, fio's
//! file actions (`add`, `open`, `close`, `wait`) and blkparse events other than `Q` are not
//! records: they are counted by [`TraceReader::ignored`]. Blank lines, `\r\n` line endings,
//! a header line (CSV formats) and blkparse's closing summary are accepted.
//!
//! A malformed line is an error naming file, line and field
//! (`trace.csv:17: field 'size': invalid digit in "12x"`); with
//! [`TraceReader::skip_bad`] such lines are skipped and counted instead
//! ([`TraceReader::skipped`]). Read errors and a bad fio header always end the iteration.
//!
//! Times are as recorded, converted to microseconds (their epoch is the format's).
//!
//! # Layout
//! `reader` holds [`TraceReader`] (lines, headers, skipping, the device filter); each
//! format has its own module of line parsers (`msr`, `vscsi` with CloudPhysics CSV,
//! `blkparse`, `fio`, `alibaba`, `tencent`), each with its tests, all built on the field
//! helpers here.

mod alibaba;
mod blkparse;
mod fio;
mod msr;
mod reader;
mod tencent;
mod vscsi;

use std::fmt;
use std::io;
use std::num::IntErrorKind;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::op::IoOp;

/// A trace file format (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TraceFormat {
    /// MSR Cambridge CSV (`msr`).
    Msr,
    /// CloudPhysics vscsi binary v1 (`vscsi`).
    Vscsi,
    /// CloudPhysics CSV (`cloudphysics-csv`).
    CloudphysicsCsv,
    /// blkparse default text output (`blkparse`).
    Blkparse,
    /// fio iolog version 2 or 3 (`fio-iolog`).
    FioIolog,
    /// Alibaba block trace CSV (`alibaba`).
    Alibaba,
    /// Tencent CBS CSV (`tencent`).
    Tencent,
}

impl TraceFormat {
    /// All formats.
    pub const ALL: [TraceFormat; 7] = [
        TraceFormat::Msr,
        TraceFormat::Vscsi,
        TraceFormat::CloudphysicsCsv,
        TraceFormat::Blkparse,
        TraceFormat::FioIolog,
        TraceFormat::Alibaba,
        TraceFormat::Tencent,
    ];

    /// The format's name, as [`FromStr`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            TraceFormat::Msr => "msr",
            TraceFormat::Vscsi => "vscsi",
            TraceFormat::CloudphysicsCsv => "cloudphysics-csv",
            TraceFormat::Blkparse => "blkparse",
            TraceFormat::FioIolog => "fio-iolog",
            TraceFormat::Alibaba => "alibaba",
            TraceFormat::Tencent => "tencent",
        }
    }

    /// The first column's name of the format's optional header line (CSV formats).
    fn header(self) -> Option<&'static str> {
        match self {
            TraceFormat::Msr | TraceFormat::Tencent => Some("timestamp"),
            TraceFormat::CloudphysicsCsv => Some("version"),
            TraceFormat::Alibaba => Some("device_id"),
            _ => None,
        }
    }
}

impl fmt::Display for TraceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TraceFormat {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| TraceError::UnknownFormat(s.to_string()))
    }
}

/// The kind of a traced operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TraceOpKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A discard (TRIM, UNMAP).
    Discard,
    /// A cache flush; its offset and length are 0.
    Flush,
}

/// One traced operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Time in microseconds, as recorded (the epoch is the format's; 0 in fio v2 logs).
    pub time_us: u64,
    /// The device: MSR `host_disk`, blkparse `major,minor`, fio's file name, Alibaba's
    /// device id, Tencent's volume id; empty for the CloudPhysics formats.
    pub device: String,
    /// What the operation does.
    pub kind: TraceOpKind,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TraceRecord {
    /// The operation to replay; `seed` sets a write's content. The range is as traced: the
    /// replayer maps or clips it to its disk.
    pub fn to_op(&self, seed: u64) -> IoOp {
        let (offset, len) = (self.offset, self.len);
        match self.kind {
            TraceOpKind::Read => IoOp::Read { offset, len },
            TraceOpKind::Write => IoOp::Write { offset, len, seed },
            TraceOpKind::Discard => IoOp::Unmap { offset, len },
            TraceOpKind::Flush => IoOp::Flush,
        }
    }
}

/// Why a trace could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The file could not be opened.
    #[error("cannot open trace {path}")]
    Open {
        /// The path as given.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading failed.
    #[error("{file}: read failed")]
    Read {
        /// The trace's name.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A field of a line (or of a binary record) is malformed.
    #[error("{file}:{line}: field '{field}': {reason} in {value:?}")]
    BadField {
        /// The trace's name.
        file: String,
        /// 1-based line number (record number for vscsi).
        line: u64,
        /// The field's name.
        field: &'static str,
        /// The field's text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The header a format requires is missing or wrong.
    #[error("{file}:{line}: expected {expected}, found {found:?}")]
    BadHeader {
        /// The trace's name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// What was expected.
        expected: &'static str,
        /// The line found.
        found: String,
    },
    /// A binary trace ends inside a record.
    #[error("{file}: record {record} is truncated: {bytes} of 32 bytes")]
    Truncated {
        /// The trace's name.
        file: String,
        /// 1-based record number.
        record: u64,
        /// Bytes present.
        bytes: usize,
    },
    /// The trace has no record to replay: it is empty, no line parses as the format, or
    /// the device filter matches none of its records.
    #[error("{file}: no valid {format} record: {detail}")]
    NoRecords {
        /// The trace's name.
        file: String,
        /// The format tried.
        format: TraceFormat,
        /// Why: what was found instead (the first line that is not a record, quoted and
        /// cut to about 200 bytes; the devices seen).
        detail: String,
    },
    /// A line is too long to be a line of a text trace.
    #[error(
        "{file}:{line}: a line of more than {max} bytes: not a {format} trace (binary data?); it starts {start:?}"
    )]
    LineTooLong {
        /// The trace's name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// The limit.
        max: usize,
        /// The format tried.
        format: TraceFormat,
        /// The line's first 64 bytes.
        start: String,
    },
    /// The format name is not known.
    #[error(
        "unknown trace format {0:?} (expected msr, vscsi, cloudphysics-csv, blkparse, fio-iolog, alibaba or tencent)"
    )]
    UnknownFormat(String),
}

pub use reader::TraceReader;

/// A malformed field, before the file and line are known.
#[derive(Debug)]
struct FieldError {
    field: &'static str,
    value: String,
    reason: String,
}

fn field_err(field: &'static str, value: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        value: excerpt(value),
        reason: reason.into(),
    }
}

/// Bytes of a line an error quotes at most.
const EXCERPT: usize = 200;

/// `s` cut to at most [`EXCERPT`] bytes (at a character boundary), saying how long it
/// was; errors print it escaped (`{:?}`), so control bytes show as escapes.
fn excerpt(s: &str) -> String {
    if s.len() <= EXCERPT {
        return s.to_string();
    }
    let mut end = EXCERPT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

fn parse_u64(field: &'static str, s: &str, radix: u32) -> Result<u64, FieldError> {
    u64::from_str_radix(s, radix).map_err(|e| {
        let reason = match e.kind() {
            IntErrorKind::Empty => "empty",
            IntErrorKind::PosOverflow => "number too large",
            _ => "invalid digit",
        };
        field_err(field, s, reason)
    })
}

fn dec(field: &'static str, s: &str) -> Result<u64, FieldError> {
    parse_u64(field, s, 10)
}

/// `n` sectors in bytes.
fn sectors(field: &'static str, s: &str) -> Result<u64, FieldError> {
    dec(field, s)?
        .checked_mul(512)
        .ok_or_else(|| field_err(field, s, "number too large"))
}

/// A decimal time in some unit (`123.456789`) to microseconds; the unit is `10^decimals` us.
fn time_us(field: &'static str, s: &str, decimals: u32) -> Result<u64, FieldError> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(field_err(field, s, "invalid digit"));
    }
    let scale = 10u64.pow(decimals);
    let mut us = 0;
    for i in 0..decimals as usize {
        us = us * 10 + frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
    }
    dec(field, int)?
        .checked_mul(scale)
        .and_then(|v| v.checked_add(us))
        .ok_or_else(|| field_err(field, s, "number too large"))
}

/// The fields of a CSV line, trimmed, with named access.
struct Fields<'a>(Vec<&'a str>);

impl<'a> Fields<'a> {
    fn csv(line: &'a str) -> Self {
        Fields(line.split(',').map(str::trim).collect())
    }

    fn get(&self, i: usize, field: &'static str) -> Result<&'a str, FieldError> {
        self.0.get(i).copied().ok_or_else(|| field_err(field, "", "missing"))
    }
}

/// What one line or record gave.
enum Step {
    Eof,
    /// Nothing to yield: a blank line, a header, a summary line.
    Nothing,
    /// A recognised operation of no replayable kind.
    Ignored,
    Record(TraceRecord),
}

/// A record; flushes get offset and length 0.
fn record(time_us: u64, device: String, kind: TraceOpKind, offset: u64, len: u64) -> Step {
    let (offset, len) = if kind == TraceOpKind::Flush {
        (0, 0)
    } else {
        (offset, len)
    };
    Step::Record(TraceRecord {
        time_us,
        device,
        kind,
        offset,
        len,
    })
}

#[cfg(test)]
mod testing {
    //! What the format tests share.
    use std::io::Write;

    use super::*;

    pub(super) fn temp(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f
    }

    /// All records and the first error, if any, of `content`.
    pub(super) fn parse(format: TraceFormat, content: &str) -> (Vec<TraceRecord>, Option<String>) {
        let f = temp(content.as_bytes());
        let mut records = Vec::new();
        for r in TraceReader::open(f.path(), format).unwrap() {
            match r {
                Ok(r) => records.push(r),
                Err(e) => return (records, Some(e.to_string())),
            }
        }
        (records, None)
    }

    /// Records with bad lines skipped, and the number skipped.
    pub(super) fn parse_skipping(format: TraceFormat, content: &str) -> (Vec<TraceRecord>, u64) {
        let f = temp(content.as_bytes());
        let mut reader = TraceReader::open(f.path(), format).unwrap().skip_bad(true);
        let records = reader.by_ref().collect::<Result<Vec<_>, _>>().unwrap();
        (records, reader.skipped())
    }

    pub(super) fn rec(time_us: u64, device: &str, kind: TraceOpKind, offset: u64, len: u64) -> TraceRecord {
        TraceRecord {
            time_us,
            device: device.to_string(),
            kind,
            offset,
            len,
        }
    }

    pub(super) fn read_all(reader: TraceReader) -> (Vec<TraceRecord>, Vec<String>) {
        let (mut ok, mut err) = (Vec::new(), Vec::new());
        for r in reader {
            match r {
                Ok(r) => ok.push(r),
                Err(e) => err.push(e.to_string()),
            }
        }
        (ok, err)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::rec;
    use super::*;
    use TraceOpKind::{Discard, Write as W};

    #[test]
    fn format_names_round_trip() {
        for f in TraceFormat::ALL {
            assert_eq!(f.name().parse::<TraceFormat>().unwrap(), f);
        }
        let err = "csv".parse::<TraceFormat>().unwrap_err().to_string();
        assert!(err.contains("\"csv\"") && err.contains("blkparse"));
    }

    #[test]
    fn excerpts_are_short() {
        assert_eq!(excerpt("abc"), "abc");
        let long = "é".repeat(300);
        let e = excerpt(&long);
        assert!(e.len() < 230 && e.ends_with("(600 bytes in all)"), "{e}");
    }

    #[test]
    fn to_op() {
        let r = rec(0, "", W, 512, 1024);
        assert_eq!(
            r.to_op(9),
            IoOp::Write {
                offset: 512,
                len: 1024,
                seed: 9
            }
        );
        assert_eq!(
            rec(0, "", Discard, 0, 512).to_op(0),
            IoOp::Unmap { offset: 0, len: 512 }
        );
    }
}
