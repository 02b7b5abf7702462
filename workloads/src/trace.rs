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

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::num::IntErrorKind;
use std::path::Path;
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
    /// The format name is not known.
    #[error(
        "unknown trace format {0:?} (expected msr, vscsi, cloudphysics-csv, blkparse, fio-iolog, alibaba or tencent)"
    )]
    UnknownFormat(String),
}

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
        value: value.to_string(),
        reason: reason.into(),
    }
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

fn scsi_kind(opcode: u64) -> Option<TraceOpKind> {
    match opcode {
        0x08 | 0x28 | 0xa8 | 0x88 => Some(TraceOpKind::Read),
        0x0a | 0x2a | 0xaa | 0x8a => Some(TraceOpKind::Write),
        0x35 | 0x91 => Some(TraceOpKind::Flush),
        _ => None,
    }
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

/// A streaming reader of one trace; an iterator of records (see the module docs).
///
/// ```no_run
/// use workloads::{TraceFormat, TraceReader};
/// let mut reader = TraceReader::open("usr_0.csv", TraceFormat::Msr)?.skip_bad(true);
/// let mut bytes = 0;
/// for record in &mut reader {
///     bytes += record?.len;
/// }
/// println!("{bytes} bytes, {} bad lines skipped", reader.skipped());
/// # Ok::<(), workloads::TraceError>(())
/// ```
pub struct TraceReader {
    file: String,
    format: TraceFormat,
    input: Box<dyn BufRead + Send>,
    line: u64,
    buf: Vec<u8>,
    skip_bad: bool,
    skipped: u64,
    ignored: u64,
    device: Option<String>,
    /// Whether the first non-blank line was seen (CSV header, fio header).
    started: bool,
    /// fio iolog version, from the header.
    fio_version: u8,
    done: bool,
}

impl fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceReader")
            .field("file", &self.file)
            .field("format", &self.format)
            .field("line", &self.line)
            .field("skipped", &self.skipped)
            .field("ignored", &self.ignored)
            .finish_non_exhaustive()
    }
}

impl TraceReader {
    /// Opens a trace file.
    pub fn open(path: impl AsRef<Path>, format: TraceFormat) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| TraceError::Open {
            path: name.clone(),
            source,
        })?;
        Ok(Self::from_reader(name, file, format))
    }

    /// Reads a trace from any reader; `name` is used in errors.
    pub fn from_reader(name: impl Into<String>, reader: impl Read + Send + 'static, format: TraceFormat) -> Self {
        TraceReader {
            file: name.into(),
            format,
            input: Box::new(BufReader::with_capacity(64 * 1024, reader)),
            line: 0,
            buf: Vec::new(),
            skip_bad: false,
            skipped: 0,
            ignored: 0,
            device: None,
            started: false,
            fio_version: 0,
            done: false,
        }
    }

    /// Skip malformed lines (counting them) instead of yielding errors.
    pub fn skip_bad(mut self, skip: bool) -> Self {
        self.skip_bad = skip;
        self
    }

    /// Yield only the records of this device (see [`TraceRecord::device`]).
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    /// Malformed lines skipped so far (with [`skip_bad`](Self::skip_bad)).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Operations of other kinds passed over so far (other SCSI commands, fio file
    /// actions, blkparse events other than `Q`).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The trace's format.
    pub fn format(&self) -> TraceFormat {
        self.format
    }

    fn bad(&self, e: FieldError) -> TraceError {
        TraceError::BadField {
            file: self.file.clone(),
            line: self.line,
            field: e.field,
            value: e.value,
            reason: e.reason,
        }
    }

    fn read_error(&self, source: io::Error) -> TraceError {
        TraceError::Read {
            file: self.file.clone(),
            source,
        }
    }

    fn step(&mut self) -> Result<Step, TraceError> {
        if self.format == TraceFormat::Vscsi {
            return self.vscsi_step();
        }
        self.buf.clear();
        let n = self
            .input
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| self.read_error(e))?;
        if n == 0 {
            return Ok(Step::Eof);
        }
        self.line += 1;
        let buf = std::mem::take(&mut self.buf);
        let result = match std::str::from_utf8(&buf) {
            Ok(text) => {
                let line = text.trim_end_matches(['\n', '\r']);
                if line.trim().is_empty() {
                    Ok(Step::Nothing)
                } else {
                    self.text_line(line)
                }
            }
            Err(_) => Err(self.bad(field_err("line", &String::from_utf8_lossy(&buf), "not UTF-8"))),
        };
        self.buf = buf;
        result
    }

    fn text_line(&mut self, line: &str) -> Result<Step, TraceError> {
        let first = !std::mem::replace(&mut self.started, true);
        if first {
            if let Some(header) = self.format.header() {
                let col = line.split(',').next().unwrap_or_default().trim();
                if col.eq_ignore_ascii_case(header) {
                    return Ok(Step::Nothing);
                }
            }
            if self.format == TraceFormat::FioIolog {
                self.fio_version = match line.trim() {
                    "fio version 2 iolog" => 2,
                    "fio version 3 iolog" => 3,
                    _ => {
                        self.done = true;
                        return Err(TraceError::BadHeader {
                            file: self.file.clone(),
                            line: self.line,
                            expected: "\"fio version 2 iolog\" or \"fio version 3 iolog\"",
                            found: line.to_string(),
                        });
                    }
                };
                return Ok(Step::Nothing);
            }
        }
        let parsed = match self.format {
            TraceFormat::Msr => parse_msr(line),
            TraceFormat::CloudphysicsCsv => parse_cloudphysics_csv(line),
            TraceFormat::Blkparse => parse_blkparse(line),
            TraceFormat::FioIolog => parse_fio(line, self.fio_version),
            TraceFormat::Alibaba => parse_alibaba(line),
            TraceFormat::Tencent => parse_tencent(line),
            TraceFormat::Vscsi => unreachable!("binary format"),
        };
        parsed.map_err(|e| self.bad(e))
    }

    fn vscsi_step(&mut self) -> Result<Step, TraceError> {
        let mut rec = [0u8; 32];
        let mut got = 0;
        while got < rec.len() {
            match self.input.read(&mut rec[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        if got == 0 {
            return Ok(Step::Eof);
        }
        self.line += 1;
        if got < rec.len() {
            self.done = true;
            return Err(TraceError::Truncated {
                file: self.file.clone(),
                record: self.line,
                bytes: got,
            });
        }
        let u16_at = |i: usize| u16::from_le_bytes([rec[i], rec[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
        let (len, cmd, ver, lbn, ts) = (u32_at(4), u16_at(12), u16_at(14), u64_at(16), u64_at(24));
        if ver != 0x0100 {
            let value = format!("{ver:#06x}");
            return Err(self.bad(field_err("ver", &value, "unsupported version (expected 0x0100)")));
        }
        let Some(kind) = scsi_kind(u64::from(cmd)) else {
            return Ok(Step::Ignored);
        };
        let offset = lbn
            .checked_mul(512)
            .ok_or_else(|| self.bad(field_err("lbn", &lbn.to_string(), "number too large")))?;
        Ok(record(ts, String::new(), kind, offset, u64::from(len)))
    }
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

fn parse_msr(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    let ts = dec("timestamp", f.get(0, "timestamp")?)?;
    let host = f.get(1, "hostname")?;
    let disk = dec("disknumber", f.get(2, "disknumber")?)?;
    let ty = f.get(3, "type")?;
    let kind = if ty.eq_ignore_ascii_case("read") {
        TraceOpKind::Read
    } else if ty.eq_ignore_ascii_case("write") {
        TraceOpKind::Write
    } else {
        return Err(field_err("type", ty, "expected Read or Write"));
    };
    let offset = dec("offset", f.get(4, "offset")?)?;
    let len = dec("size", f.get(5, "size")?)?;
    Ok(record(ts / 10, format!("{host}_{disk}"), kind, offset, len))
}

fn parse_cloudphysics_csv(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    dec("version", f.get(0, "version")?)?;
    let time = time_us("time", f.get(1, "time")?, 6)?;
    let op = f.get(2, "op")?;
    let opcode = parse_u64("op", op.trim_start_matches("0x"), 16)?;
    let len = dec("size", f.get(3, "size")?)?;
    let offset = sectors("lbn", f.get(4, "lbn")?)?;
    Ok(match scsi_kind(opcode) {
        Some(kind) => record(time, String::new(), kind, offset, len),
        None => Step::Ignored,
    })
}

/// Whether `s` is a blkparse device field, `major,minor`.
fn is_device(s: &str) -> bool {
    s.split_once(',').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
    })
}

fn parse_blkparse(line: &str) -> Result<Step, FieldError> {
    let t: Vec<&str> = line.split_whitespace().collect();
    // Event lines start with the device; the summary blkparse prints at the end does not.
    if !t.first().is_some_and(|d| is_device(d)) {
        return Ok(Step::Nothing);
    }
    let get = |i: usize, field: &'static str| t.get(i).copied().ok_or_else(|| field_err(field, "", "missing"));
    let time = time_us("time", get(3, "time")?, 6)?;
    if get(5, "action")? != "Q" {
        return Ok(Step::Ignored);
    }
    let rwbs = get(6, "rwbs")?;
    let device = t[0].to_string();
    // A leading F is a preflush: alone (no range, or an empty one) it is a flush; with
    // data it is that write.
    let preflush = rwbs.starts_with('F');
    if preflush && t.get(7).is_none_or(|s| s.starts_with('[')) {
        return Ok(record(time, device, TraceOpKind::Flush, 0, 0));
    }
    let kind = if rwbs.contains('D') {
        TraceOpKind::Discard
    } else if rwbs.contains('W') {
        TraceOpKind::Write
    } else if rwbs.contains('R') {
        TraceOpKind::Read
    } else if preflush {
        TraceOpKind::Flush
    } else {
        return Ok(Step::Ignored);
    };
    let offset = sectors("sector", get(7, "sector")?)?;
    let plus = get(8, "+")?;
    if plus != "+" {
        return Err(field_err("+", plus, "expected '+'"));
    }
    let len = sectors("count", get(9, "count")?)?;
    let kind = if preflush && len == 0 { TraceOpKind::Flush } else { kind };
    Ok(record(time, device, kind, offset, len))
}

fn parse_fio(line: &str, version: u8) -> Result<Step, FieldError> {
    let t: Vec<&str> = line.split_whitespace().collect();
    let (time, rest) = if version == 3 {
        (time_us("time", t[0], 3)?, &t[1..])
    } else {
        (0, &t[..])
    };
    let get = |i: usize, field: &'static str| rest.get(i).copied().ok_or_else(|| field_err(field, "", "missing"));
    let file = get(0, "filename")?;
    let action = get(1, "action")?;
    let kind = match action {
        "read" => TraceOpKind::Read,
        "write" => TraceOpKind::Write,
        "trim" => TraceOpKind::Discard,
        "sync" | "datasync" => return Ok(record(time, file.to_string(), TraceOpKind::Flush, 0, 0)),
        "add" | "open" | "close" | "wait" => return Ok(Step::Ignored),
        _ => {
            return Err(field_err(
                "action",
                action,
                "expected read, write, trim, sync, datasync, add, open, close or wait",
            ))
        }
    };
    let offset = dec("offset", get(2, "offset")?)?;
    let len = dec("length", get(3, "length")?)?;
    Ok(record(time, file.to_string(), kind, offset, len))
}

fn parse_alibaba(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    let device = f.get(0, "device_id")?;
    let op = f.get(1, "opcode")?;
    let kind = match op {
        "R" | "r" => TraceOpKind::Read,
        "W" | "w" => TraceOpKind::Write,
        _ => return Err(field_err("opcode", op, "expected R or W")),
    };
    let offset = dec("offset", f.get(2, "offset")?)?;
    let len = dec("length", f.get(3, "length")?)?;
    let time = dec("timestamp", f.get(4, "timestamp")?)?;
    Ok(record(time, device.to_string(), kind, offset, len))
}

fn parse_tencent(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    let time = time_us("timestamp", f.get(0, "timestamp")?, 6)?;
    let offset = sectors("offset", f.get(1, "offset")?)?;
    let len = sectors("size", f.get(2, "size")?)?;
    let io = f.get(3, "iotype")?;
    let kind = match io {
        "0" => TraceOpKind::Read,
        "1" => TraceOpKind::Write,
        _ => return Err(field_err("iotype", io, "expected 0 (read) or 1 (write)")),
    };
    let volume = f.get(4, "volumeid")?;
    Ok(record(time, volume.to_string(), kind, offset, len))
}

impl Iterator for TraceReader {
    type Item = Result<TraceRecord, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.step() {
                Ok(Step::Eof) => self.done = true,
                Ok(Step::Nothing) => {}
                Ok(Step::Ignored) => self.ignored += 1,
                Ok(Step::Record(r)) => {
                    if self.device.as_deref().is_none_or(|d| d == r.device) {
                        return Some(Ok(r));
                    }
                }
                Err(TraceError::BadField { .. } | TraceError::Truncated { .. }) if self.skip_bad => {
                    self.skipped += 1;
                }
                Err(e) => {
                    if matches!(e, TraceError::Read { .. }) {
                        self.done = true;
                    }
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;

    fn temp(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f
    }

    /// All records and the first error, if any, of `content`.
    fn parse(format: TraceFormat, content: &str) -> (Vec<TraceRecord>, Option<String>) {
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
    fn parse_skipping(format: TraceFormat, content: &str) -> (Vec<TraceRecord>, u64) {
        let f = temp(content.as_bytes());
        let mut reader = TraceReader::open(f.path(), format).unwrap().skip_bad(true);
        let records = reader.by_ref().collect::<Result<Vec<_>, _>>().unwrap();
        (records, reader.skipped())
    }

    fn rec(time_us: u64, device: &str, kind: TraceOpKind, offset: u64, len: u64) -> TraceRecord {
        TraceRecord {
            time_us,
            device: device.to_string(),
            kind,
            offset,
            len,
        }
    }

    use TraceOpKind::{Discard, Flush, Read as R, Write as W};

    #[test]
    fn format_names_round_trip() {
        for f in TraceFormat::ALL {
            assert_eq!(f.name().parse::<TraceFormat>().unwrap(), f);
        }
        let err = "csv".parse::<TraceFormat>().unwrap_err().to_string();
        assert!(err.contains("\"csv\"") && err.contains("blkparse"));
    }

    #[test]
    fn msr() {
        let good = "128166372003061629,usr,0,Read,7014609920,24576,41286\r\n\
                    \r\n\
                    128166372016382155,usr,1,write,1317441536,8192,1963\r\n";
        let (r, e) = parse(TraceFormat::Msr, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(12816637200306162, "usr_0", R, 7014609920, 24576),
                rec(12816637201638215, "usr_1", W, 1317441536, 8192)
            ]
        );
        let with_header = format!("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n{good}");
        assert_eq!(parse(TraceFormat::Msr, &with_header).0.len(), 2);
        let bad = format!("{good}128166372016382155,usr,1,Write,1317441536,12x,1963\n");
        let (r, e) = parse(TraceFormat::Msr, &bad);
        assert_eq!(r.len(), 2);
        let e = e.unwrap();
        assert!(e.ends_with(":4: field 'size': invalid digit in \"12x\""), "{e}");
        assert!(parse(TraceFormat::Msr, "1,usr,0,Erase,0,512,1\n")
            .1
            .unwrap()
            .contains("field 'type'"));
        assert!(parse(TraceFormat::Msr, "1,usr,0,Read\n")
            .1
            .unwrap()
            .contains("field 'offset': missing"));
        assert_eq!(parse_skipping(TraceFormat::Msr, &bad), (r, 1));
    }

    #[test]
    fn device_filter() {
        let good = "1,usr,0,Read,0,512,1\n2,usr,1,Write,512,512,1\n3,usr,0,Write,1024,512,1\n";
        let f = temp(good.as_bytes());
        let r: Vec<_> = TraceReader::open(f.path(), TraceFormat::Msr)
            .unwrap()
            .device("usr_0")
            .map(|r| r.unwrap().offset)
            .collect();
        assert_eq!(r, vec![0, 1024]);
    }

    fn vscsi_record(sn: u32, len: u32, cmd: u16, ver: u16, lbn: u64, ts: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(sn.to_le_bytes());
        v.extend(len.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        v.extend(cmd.to_le_bytes());
        v.extend(ver.to_le_bytes());
        v.extend(lbn.to_le_bytes());
        v.extend(ts.to_le_bytes());
        v
    }

    fn read_all(reader: TraceReader) -> (Vec<TraceRecord>, Vec<String>) {
        let (mut ok, mut err) = (Vec::new(), Vec::new());
        for r in reader {
            match r {
                Ok(r) => ok.push(r),
                Err(e) => err.push(e.to_string()),
            }
        }
        (ok, err)
    }

    #[test]
    fn vscsi() {
        let mut data = vscsi_record(1, 4096, 0x2a, 0x0100, 8, 100);
        data.extend(vscsi_record(2, 512, 0x28, 0x0100, 1, 200));
        data.extend(vscsi_record(3, 0, 0x12, 0x0100, 0, 250)); // INQUIRY: ignored
        data.extend(vscsi_record(4, 0, 0x35, 0x0100, 0, 260)); // SYNCHRONIZE CACHE
        data.extend(vscsi_record(5, 512, 0x2a, 0x0200, 1, 300)); // bad version
        data.extend(vscsi_record(6, 512, 0x8a, 0x0100, 2, 400));
        let f = temp(&data);
        let reader = TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap();
        let (ok, err) = read_all(reader);
        assert_eq!(
            ok,
            vec![
                rec(100, "", W, 4096, 4096),
                rec(200, "", R, 512, 512),
                rec(260, "", Flush, 0, 0),
                rec(400, "", W, 1024, 512)
            ]
        );
        assert_eq!(err.len(), 1);
        assert!(err[0].ends_with(":5: field 'ver': unsupported version (expected 0x0100) in \"0x0200\""));

        data.extend(&vscsi_record(7, 512, 0x2a, 0x0100, 3, 500)[..20]);
        let f = temp(&data);
        let mut reader = TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap().skip_bad(true);
        assert_eq!(reader.by_ref().count(), 4);
        assert_eq!((reader.skipped(), reader.ignored()), (2, 1));
        let (ok, err) = read_all(TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap());
        assert_eq!(ok.len(), 4);
        assert!(
            err[1].ends_with(": record 7 is truncated: 20 of 32 bytes"),
            "{}",
            err[1]
        );
    }

    #[test]
    fn cloudphysics_csv() {
        let good = "version,time,op,size,lbn\r\n1,5633898,2a,512,42932745\r\n1,5633899,28,6656,40409911\r\n1,5633899,12,0,0\r\n";
        let (r, e) = parse(TraceFormat::CloudphysicsCsv, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(5_633_898_000_000, "", W, 42932745 * 512, 512),
                rec(5_633_899_000_000, "", R, 40409911 * 512, 6656)
            ]
        );
        let bad = format!("{good}1,5633899,zz,512,1\n");
        let e = parse(TraceFormat::CloudphysicsCsv, &bad).1.unwrap();
        assert!(e.ends_with(":5: field 'op': invalid digit in \"zz\""), "{e}");
        assert_eq!(parse_skipping(TraceFormat::CloudphysicsCsv, &bad).1, 1);
    }

    #[test]
    fn blkparse() {
        let good = "\
  8,0    3        1     0.000000000   697  Q  WS 223490 + 8 [kjournald]
  8,0    3        2     0.000001234   697  G  WS 223490 + 8 [kjournald]
  8,0    3        3     0.000002000   697  Q   R 100 + 16 [cat]
  8,16   0        1     1.500000000   800  Q  DS 2048 + 2048 [fstrim]
  8,0    1        4     2.000000000   697  Q FWS [jbd2/sda1-8]
  8,0    1        6     2.010000000   697  Q FWS 0 + 0 [jbd2/sda1-8]
  8,0    1        7     2.020000000   697  Q FWFS 4096 + 8 [jbd2/sda1-8]
  8,0    0        0     2.100000000     0  m   N cfq697 insert_request
  8,0    1        5     2.200000000   697  Q   N [kworker]

CPU0 (8,0):
 Reads Queued:           1,        8KiB\t Writes Queued:           1,        4KiB
Total (8,0):
Throughput (R/W): 0KiB/s / 0KiB/s
Events (8,0): 7 entries
Skips: 0 forward (0 -   0.0%)
";
        let (r, e) = parse(TraceFormat::Blkparse, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(0, "8,0", W, 223490 * 512, 4096),
                rec(2, "8,0", R, 51200, 8192),
                rec(1_500_000, "8,16", Discard, 1 << 20, 1 << 20),
                rec(2_000_000, "8,0", Flush, 0, 0),
                rec(2_010_000, "8,0", Flush, 0, 0),
                rec(2_020_000, "8,0", W, 4096 * 512, 4096)
            ]
        );
        let bad = good.replacen(
            "3        3     0.000002000   697  Q   R 100 +",
            "3        3     0.000002000   697  Q   R 1x0 +",
            1,
        );
        let e = parse(TraceFormat::Blkparse, &bad).1.unwrap();
        assert!(e.ends_with(":3: field 'sector': invalid digit in \"1x0\""), "{e}");
        let (r2, skipped) = parse_skipping(TraceFormat::Blkparse, &bad);
        assert_eq!((r2.len(), skipped), (5, 1));
    }

    #[test]
    fn fio_iolog_v2_and_v3() {
        let v2 = "fio version 2 iolog\n/dev/sdb add\n/dev/sdb open\n/dev/sdb write 0 4096\r\n/dev/sdb read 4096 8192\n/dev/sdb trim 8192 4096\n/dev/sdb sync 0 0\n/dev/sdb close\n";
        let (r, e) = parse(TraceFormat::FioIolog, v2);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(0, "/dev/sdb", W, 0, 4096),
                rec(0, "/dev/sdb", R, 4096, 8192),
                rec(0, "/dev/sdb", Discard, 8192, 4096),
                rec(0, "/dev/sdb", Flush, 0, 0)
            ]
        );
        let v3 = "fio version 3 iolog\n0 f add\n5 f open\n12 f write 512 512\n\n13 f datasync 0 0\n20 f close\n";
        let (r, e) = parse(TraceFormat::FioIolog, v3);
        assert_eq!(e, None);
        assert_eq!(r, vec![rec(12_000, "f", W, 512, 512), rec(13_000, "f", Flush, 0, 0)]);
        let e = parse(TraceFormat::FioIolog, &format!("{v3}21 f erase 0 1\n"))
            .1
            .unwrap();
        assert!(e.contains(":8: field 'action'") && e.contains("\"erase\""), "{e}");
        let e = parse(TraceFormat::FioIolog, "fio version 3 iolog\n1 f write 0\n")
            .1
            .unwrap();
        assert!(e.ends_with(":2: field 'length': missing in \"\""), "{e}");
        let e = parse(TraceFormat::FioIolog, "/dev/sdb write 0 4096\n").1.unwrap();
        assert!(e.contains(":1: expected \"fio version 2 iolog\""), "{e}");
        let f = temp(b"nonsense\n/dev/sdb write 0 4096\n");
        let mut reader = TraceReader::open(f.path(), TraceFormat::FioIolog)
            .unwrap()
            .skip_bad(true);
        assert!(reader.next().unwrap().is_err());
        assert!(reader.next().is_none());
    }

    #[test]
    fn alibaba() {
        let good = "device_id,opcode,offset,length,timestamp\n10,R,126764536832,4096,1577808000000126\n10,W,1024,8192,1577808000000204\n";
        let (r, e) = parse(TraceFormat::Alibaba, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(1577808000000126, "10", R, 126764536832, 4096),
                rec(1577808000000204, "10", W, 1024, 8192)
            ]
        );
        let e = parse(TraceFormat::Alibaba, &format!("{good}10,X,0,512,1\n")).1.unwrap();
        assert!(e.ends_with(":4: field 'opcode': expected R or W in \"X\""), "{e}");
    }

    #[test]
    fn tencent() {
        let good = "1538323200,4781576,8,1,1063\r\n1538323201,0,16,0,1063\r\n";
        let (r, e) = parse(TraceFormat::Tencent, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(1_538_323_200_000_000, "1063", W, 4781576 * 512, 4096),
                rec(1_538_323_201_000_000, "1063", R, 0, 8192)
            ]
        );
        let e = parse(
            TraceFormat::Tencent,
            &format!("{good}1538323202,0,99999999999999999999,1,1\n"),
        )
        .1
        .unwrap();
        assert!(e.contains(":3: field 'size': number too large"), "{e}");
        let e = parse(TraceFormat::Tencent, "1538323202,0,8,2,1\n").1.unwrap();
        assert!(e.contains("field 'iotype'"), "{e}");
    }

    #[test]
    fn missing_file_and_non_utf8() {
        let e = TraceReader::open("/nonexistent/trace.csv", TraceFormat::Msr).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/trace.csv"));
        let f = temp(b"1,usr,0,Read,0,512,1\n\xff\xfe,usr\n");
        let (ok, err) = read_all(TraceReader::open(f.path(), TraceFormat::Msr).unwrap());
        assert_eq!(ok.len(), 1);
        assert!(err[0].contains(":2: field 'line': not UTF-8"), "{}", err[0]);
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

    /// Validates both forms of the real CloudPhysics trace, when `shared/` is beside the
    /// repository (it is not part of the project: the test returns when it is absent).
    #[test]
    fn cloudphysics_trace_both_forms_agree() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/cloudphysics");
        let (bin, csv) = (dir.join("cloudPhysicsIO.vscsi"), dir.join("cloudPhysicsIO.csv"));
        if !bin.exists() || !csv.exists() {
            eprintln!("skipped: {} not present", dir.display());
            return;
        }
        let mut bin = TraceReader::open(bin, TraceFormat::Vscsi).unwrap();
        let mut csv = TraceReader::open(csv, TraceFormat::CloudphysicsCsv).unwrap();
        let (mut n, mut writes) = (0u64, 0u64);
        loop {
            let (b, c) = match (bin.next(), csv.next()) {
                (None, None) => break,
                (Some(b), Some(c)) => (b.unwrap(), c.unwrap()),
                _ => panic!("the two forms differ in length after {n} records"),
            };
            // The CSV has whole seconds.
            assert_eq!((b.kind, b.offset, b.len), (c.kind, c.offset, c.len));
            assert_eq!(b.time_us / 1_000_000 * 1_000_000, c.time_us);
            n += 1;
            writes += u64::from(b.kind == W);
        }
        assert_eq!(n, 113_872);
        assert_eq!((bin.ignored(), csv.ignored()), (0, 0));
        let wf = writes as f64 / n as f64;
        assert!((wf - 0.587).abs() < 0.001, "{wf}");
    }
}
