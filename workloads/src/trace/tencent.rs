//! Tencent CBS traces (`tencent`): CSV `Timestamp,Offset,Size,IOType,VolumeID`.

use super::{field_err, record, sectors, time_us, FieldError, Fields, Step, TraceOpKind};

pub(super) fn parse_tencent(line: &str) -> Result<Step, FieldError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind};
    use TraceOpKind::{Read as R, Write as W};

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
}
