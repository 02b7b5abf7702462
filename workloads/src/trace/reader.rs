//! [`TraceReader`]: one trace file, streamed a line (or a binary record) at a time.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use super::vscsi::parse_vscsi;
use super::{alibaba, blkparse, fio, msr, tencent, vscsi};
use super::{excerpt, field_err, FieldError, Step, TraceError, TraceFormat, TraceRecord};

/// The longest line a text trace may have (real ones are under 200 bytes): a longer one is
/// an error, so a binary file read as text does not fill the memory.
pub const MAX_LINE: usize = 64 * 1024;
/// Devices a [`TraceError::NoRecords`] names.
const DEVICES_NAMED: usize = 5;

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
    /// Records yielded.
    yielded: u64,
    /// Records the device filter dropped, and the first devices seen.
    filtered: u64,
    devices: Vec<String>,
    /// The first line that was not a record (skipped as bad, or passed over by the
    /// parser), for the error of a trace without records.
    first_unused: Option<String>,
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
            yielded: 0,
            filtered: 0,
            devices: Vec::new(),
            first_unused: None,
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
        let n = (&mut self.input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| self.read_error(e))?;
        if n == 0 {
            return Ok(Step::Eof);
        }
        self.line += 1;
        if n > MAX_LINE {
            self.done = true;
            return Err(TraceError::LineTooLong {
                file: self.file.clone(),
                line: self.line,
                max: MAX_LINE,
                format: self.format,
                start: String::from_utf8_lossy(&self.buf[..64]).into_owned(),
            });
        }
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
                            found: excerpt(line),
                        });
                    }
                };
                return Ok(Step::Nothing);
            }
        }
        let parsed = match self.format {
            TraceFormat::Msr => msr::parse_msr(line),
            TraceFormat::CloudphysicsCsv => vscsi::parse_cloudphysics_csv(line),
            TraceFormat::Blkparse => blkparse::parse_blkparse(line),
            TraceFormat::FioIolog => fio::parse_fio(line, self.fio_version),
            TraceFormat::Alibaba => alibaba::parse_alibaba(line),
            TraceFormat::Tencent => tencent::parse_tencent(line),
            TraceFormat::Vscsi => unreachable!("binary format"),
        };
        if matches!(parsed, Ok(Step::Nothing)) && self.first_unused.is_none() {
            self.first_unused = Some(format!("line {} is not one: {:?}", self.line, excerpt(line)));
        }
        parsed.map_err(|e| self.bad(e))
    }

    /// The error of a trace that yielded no record.
    fn no_records(&self) -> TraceError {
        let detail = if self.filtered > 0 {
            format!(
                "the device filter {:?} matches none of its {} records (devices: {})",
                self.device.as_deref().unwrap_or_default(),
                self.filtered,
                self.devices.join(", ")
            )
        } else if let Some(first) = &self.first_unused {
            let skipped = if self.skipped > 0 {
                format!("{} malformed line(s) skipped; the first: ", self.skipped)
            } else {
                String::new()
            };
            format!("{skipped}{first} (is the format right?)")
        } else if self.ignored > 0 {
            format!(
                "{} operation(s) of other kinds, and no read, write, discard or flush",
                self.ignored
            )
        } else {
            "the trace is empty".to_string()
        };
        TraceError::NoRecords {
            file: self.file.clone(),
            format: self.format,
            detail,
        }
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
        parse_vscsi(&rec).map_err(|e| self.bad(e))
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceRecord, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.step() {
                Ok(Step::Eof) => {
                    self.done = true;
                    if self.yielded == 0 {
                        return Some(Err(self.no_records()));
                    }
                }
                Ok(Step::Nothing) => {}
                Ok(Step::Ignored) => self.ignored += 1,
                Ok(Step::Record(r)) => {
                    if self.device.as_deref().is_none_or(|d| d == r.device) {
                        self.yielded += 1;
                        return Some(Ok(r));
                    }
                    self.filtered += 1;
                    if self.devices.len() < DEVICES_NAMED && !self.devices.contains(&r.device) {
                        self.devices.push(r.device);
                    }
                }
                Err(e @ (TraceError::BadField { .. } | TraceError::Truncated { .. })) if self.skip_bad => {
                    self.skipped += 1;
                    if self.first_unused.is_none() {
                        self.first_unused = Some(e.to_string());
                    }
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
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceReader};

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

    #[test]
    fn a_trace_without_records_is_an_error_that_says_why() {
        let msr = "1,usr,0,Write,0,512,1\n2,web,1,Write,512,512,1\n";
        let err = |content: &[u8], format, skip, device: Option<&str>| {
            let f = temp(content);
            let mut r = TraceReader::open(f.path(), format).unwrap().skip_bad(skip);
            if let Some(d) = device {
                r = r.device(d);
            }
            let (ok, err) = read_all(r);
            assert!(ok.is_empty());
            assert_eq!(err.len(), 1, "{err:?}");
            err[0].clone()
        };
        let e = err(b"", TraceFormat::Msr, false, None);
        assert!(e.contains("no valid msr record: the trace is empty"), "{e}");
        let e = err(b"\n\nTimestamp,Hostname\n", TraceFormat::Msr, false, None);
        assert!(e.contains("the trace is empty"), "{e}");
        // blkparse passes over lines that are not events: an MSR trace gives none.
        let e = err(msr.as_bytes(), TraceFormat::Blkparse, false, None);
        assert!(
            e.contains("no valid blkparse record: line 1 is not one: \"1,usr,0,Write,0,512,1\""),
            "{e}"
        );
        let e = err(msr.as_bytes(), TraceFormat::Alibaba, true, None);
        assert!(
            e.contains("2 malformed line(s) skipped; the first: ") && e.contains(":1: field 'opcode'"),
            "{e}"
        );
        let e = err(msr.as_bytes(), TraceFormat::Msr, false, Some("db_0"));
        assert!(
            e.contains("\"db_0\" matches none of its 2 records (devices: usr_0, web_1)"),
            "{e}"
        );
    }

    #[test]
    fn bad_lines_are_quoted_short_and_long_lines_refused() {
        let long = format!("1,usr,0,Write,{},512,1\n", "9".repeat(5000));
        let (_, err) = read_all(TraceReader::open(temp(long.as_bytes()).path(), TraceFormat::Msr).unwrap());
        assert!(
            err[0].len() < 400 && err[0].contains("(5000 bytes in all)"),
            "{}",
            err[0]
        );
        let binary = vec![0x01u8; 3 * super::super::reader::MAX_LINE];
        let (_, err) = read_all(TraceReader::open(temp(&binary).path(), TraceFormat::Msr).unwrap());
        assert_eq!(err.len(), 1);
        assert!(
            err[0].contains(":1: a line of more than 65536 bytes: not a msr trace"),
            "{}",
            err[0]
        );
        assert!(err[0].len() < 600 && err[0].contains("\\u{1}"), "escaped: {}", err[0]);
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
}
