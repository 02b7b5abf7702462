//! [`TraceReader`]: one trace file, streamed a line (or a binary record) at a time.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use super::vscsi::parse_vscsi;
use super::{alibaba, blkparse, fio, msr, tencent, vscsi};
use super::{field_err, FieldError, Step, TraceError, TraceFormat, TraceRecord};

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
            TraceFormat::Msr => msr::parse_msr(line),
            TraceFormat::CloudphysicsCsv => vscsi::parse_cloudphysics_csv(line),
            TraceFormat::Blkparse => blkparse::parse_blkparse(line),
            TraceFormat::FioIolog => fio::parse_fio(line, self.fio_version),
            TraceFormat::Alibaba => alibaba::parse_alibaba(line),
            TraceFormat::Tencent => tencent::parse_tencent(line),
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
        parse_vscsi(&rec).map_err(|e| self.bad(e))
    }
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
    fn missing_file_and_non_utf8() {
        let e = TraceReader::open("/nonexistent/trace.csv", TraceFormat::Msr).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/trace.csv"));
        let f = temp(b"1,usr,0,Read,0,512,1\n\xff\xfe,usr\n");
        let (ok, err) = read_all(TraceReader::open(f.path(), TraceFormat::Msr).unwrap());
        assert_eq!(ok.len(), 1);
        assert!(err[0].contains(":2: field 'line': not UTF-8"), "{}", err[0]);
    }
}
