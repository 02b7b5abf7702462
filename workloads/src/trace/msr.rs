//! MSR Cambridge traces (`msr`): CSV `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`.

use super::{dec, field_err, record, FieldError, Fields, Step, TraceOpKind};

pub(super) fn parse_msr(line: &str) -> Result<Step, FieldError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind};
    use TraceOpKind::{Read as R, Write as W};

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
}
