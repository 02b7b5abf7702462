//! fio iologs (`fio-iolog`), versions 2 and 3.

use super::{dec, field_err, record, time_us, FieldError, Step, TraceOpKind};

pub(super) fn parse_fio(line: &str, version: u8) -> Result<Step, FieldError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind, TraceReader};
    use TraceOpKind::{Discard, Flush, Read as R, Write as W};

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
}
